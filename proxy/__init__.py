"""nextstate.proxy: the recording OpenAI-API proxy (agent -> proxy -> vLLM; proxy -> store)."""
