"""The patch-dropping step (stage compress): the patch grid, patch scorers, GradCAM++, the compress pass."""
