"""Inference engines for the rollout workers and teacher scorers (HF transformers; vLLM in its own module)."""
