"""The optimizer and the learning-rate schedule of a recipe, through timm's factories."""
