"""dq: reproducible Dataset Quantization (Zhou et al., ICCV 2023) as a DVC pipeline.

The public API is re-exported here from the modules that own it (docs/DESIGN.md). The re-exports load
on first use, so `import dq.params` stays light and a stage's imports are only the modules it names.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "read_images": "dq.data.prepared",
    "read_labels": "dq.data.prepared",
    "read_features": "dq.features.file",
    "create_backbone": "dq.features.backbones",
    "classifier_with_probe": "dq.features.backbones",
    "preprocess": "dq.features.backbones",
    "rebuilt_dataset": "dq.mae.rebuilt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dq' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
