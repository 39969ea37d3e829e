"""The bottom layer every other folder builds on: errors, atomic files, launch facts, numerics,
the component registry and progress lines. Nothing here imports the rest of herbens."""
