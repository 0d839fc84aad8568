"""nextstate.adapters: client-side helpers that tie agent frameworks to the proxy (agent -> proxy)."""
