"""The CPU kernels of the stages whose outputs teams share, pinned so that their bytes do not depend on the machine.

PyTorch picks its CPU kernels by what the processor offers: ATen's vectorised loops for AVX-512 or AVX2,
oneDNN's convolutions up to AMX, MKL's BLAS per instruction set. Each choice sums in another order.
Measured on this project's AVX-512/AMX machine with ISA limits set from outside: the features stage's
linear probe moved (a float64 L-BFGS fit: 12% of its weights by a float32 ulp under an AVX2 limit, 2% on one
thread instead of two), and through GradCAM++ the keep masks, the compact store, the MAE fill and top-1
followed; the compress stage's own output moved under SSE4.1 limits (its GradCAM++ gradients), though not
under AVX2 ones. So before torch loads, the entry points of the two stages whose outputs are shared
(stages/features.py, stages/compress.py) call `pin_cpu_kernels`, which sets:

    ATEN_CPU_CAPABILITY=avx2         ATen's AVX2 loops, whatever wider units the CPU has
    ONEDNN_MAX_CPU_ISA=AVX2          oneDNN's AVX2 convolutions (no AVX-512, no AMX)
    MKL_ENABLE_INSTRUCTIONS=AVX2     MKL's AVX2 code path ...
    MKL_CBWR=AVX2,STRICT             ... in conditional numerical reproducibility, STRICT mode

overriding what the environment says, so a setting made outside changes no byte. The thread count is the
other source of difference: the probe is fit on one thread (dq.features.backbones.fit_probe). The other stages keep
the CPU's own kernels: pinning MKL slows a transformer's matrix products by 1.5 to 2x, which the MAE and the
classifier would pay for outputs that need not match across machines (tests/test_reproducible.py checks
features and compress under other limits and thread counts; docs/DESIGN.md "Reproducibility across
machines"). Across CPU vendors the features file still differs in its last bits (measured: an AMD EPYC against
an Intel AMX machine; most likely oneDNN sizing its convolution blocks by the cache), while select and compress give
the same bytes; other CPUs (aarch64) keep their own kernels.

`DQ_CPU_KERNELS=native` turns the pinning off: the CPU's fastest kernels, at the price of outputs that
match only machines of the same kind (docs/GPU.md says what this costs in speed).
"""
from __future__ import annotations

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
          "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
OPT_OUT = "DQ_CPU_KERNELS"


def pin_cpu_kernels(environ=os.environ) -> dict[str, str]:
    """Set PINNED in `environ` (before torch is imported) on x86-64 unless DQ_CPU_KERNELS=native; returns what
    was set."""
    if environ.get(OPT_OUT) == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    environ.update(PINNED)
    return dict(PINNED)
