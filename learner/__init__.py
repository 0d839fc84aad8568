"""nextstate.learner: judges recorded turns and trains LoRA adapters (store -> learner -> vLLM)."""
