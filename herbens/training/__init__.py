"""Training: the run folder, the parts built from a recipe, the training loop, checkpoints and the preflight."""
