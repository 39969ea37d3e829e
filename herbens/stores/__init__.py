"""Per-split stores beside a run: logits, embeddings and sparse teacher targets."""
