"""Inference: the one prediction loop, and a run's per-split logits and embeddings written through it."""
