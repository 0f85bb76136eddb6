"""dq: reproducible Dataset Quantization (Zhou et al., ICCV 2023) as a DVC pipeline."""

__version__ = "0.1.0"
