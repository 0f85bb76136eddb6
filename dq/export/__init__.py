"""The export step (stage export): the rebuilt compact set and the test split as image files."""
