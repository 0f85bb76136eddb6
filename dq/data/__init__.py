"""The data step (stage prepare): sources, codecs, the prepared store, images read by row."""
