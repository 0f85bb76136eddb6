"""Thin DVC stage entry points: `python -m stages.<name>`. Each parses paths and calls dq."""
