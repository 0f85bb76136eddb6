"""The train step (stage train): classifiers, data, schedule, the training loop, evaluation."""
