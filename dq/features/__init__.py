"""The features step (stage features): backbones, embeddings, the linear probe, the features file."""
