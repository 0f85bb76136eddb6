"""The reconstruction step (stage mae): the MAE model, its training, reconstruction, the rebuilt-set cache."""
