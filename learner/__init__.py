"""nextstate.learner: judges recorded turns, trains LoRA adapters, publishes them to vLLM (store -> learner -> vLLM)."""
