"""nextstate.adapters: client-side helpers tying agent frameworks to the proxy (agent -> proxy)."""
