"""The scores step (stage scores): per-sample difficulty, its file, and the training dynamics it records."""
