"""Training data: clip metadata, the prepared on-disk layout, and the stage-1 / stage-2 datasets."""
