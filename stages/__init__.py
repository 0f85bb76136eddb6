"""Thin DVC stage entry points: `python -m stages.<name>`. Each parses paths and calls dq."""
import importlib.util
import sys

# dvc.yaml says `python`, which is whatever the caller's PATH finds. Outside the project's venv that
# is an interpreter without the pinned packages, and the first import would fail deep in a stage.
_MISSING = [name for name in ("numpy", "torch", "timm", "h5py", "yaml") if importlib.util.find_spec(name) is None]
if _MISSING:
    print(f"error: {sys.executable} lacks the pinned packages ({', '.join(_MISSING)}); "
          "run `make pipeline`, or `. .venv/bin/activate` before calling dvc", file=sys.stderr)
    raise SystemExit(1)
