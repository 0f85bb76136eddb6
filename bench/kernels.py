"""What pinning the CPU kernels costs (dq.core.kernels), and the proof that it makes the shared artifacts the same bytes.

    python -m bench.kernels [--data data] [--out /tmp/dq-kernels] [--repeat 2] [--timings-only]

Runs the features and compress stages of a workspace (`--data`: a `dvc repro` of the defaults; its
prepared/ and selection/ are linked) as DVC runs them, each in its own process, alternating:

    pinned        the default: dq.core.kernels pins ATen, oneDNN and MKL to AVX2 (MKL CNR STRICT)
    native        DQ_CPU_KERNELS=native: the CPU's fastest kernels (AVX-512 and AMX here)

and prints the median wall time of each and the ratio (the issue's budget: pinned at most 1.2x slower).
Then it runs both stages pinned under other settings made from outside (2 threads, 1 thread, ISA limits
of an older CPU: SSE4.1 for oneDNN and MKL, ATen's default loops) and prints the MD5 of features/train.h5
and compact/dataset.h5 of every run: equal hashes are the cross-machine claim of docs/DESIGN.md. Native runs
print theirs too: on this machine they differ (the probe), which is why the pinning exists.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "pinned": {},
    "native": {"DQ_CPU_KERNELS": "native"},
}
OUTSIDE = {
    "pinned, 1 thread": {"OMP_NUM_THREADS": "1"},
    "pinned, 2 threads": {"OMP_NUM_THREADS": "2"},
    "pinned, SSE limits set outside": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                                       "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "native, 1 thread": {"DQ_CPU_KERNELS": "native", "OMP_NUM_THREADS": "1"},
    "native, SSE limits set outside": {"DQ_CPU_KERNELS": "native", "ATEN_CPU_CAPABILITY": "default",
                                       "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def run(stage: str, data: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stages.launch", stage, "--data", str(data)], cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{stage} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def workspace(out: Path, source: Path, name: str) -> Path:
    data = out / name
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for part in ("prepared", "selection"):
        (data / part).symlink_to((source / part).resolve(), target_is_directory=True)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/dq-kernels"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--timings-only", action="store_true", help="skip the runs under settings made from outside")
    args = ap.parse_args()
    times = {(v, s): [] for v in VARIANTS for s in ("features", "compress")}
    hashes = {}
    for r in range(args.repeat):
        for variant, env in VARIANTS.items():  # alternating: a busy spell hits both
            data = workspace(args.out, args.data, f"{variant}-{r}")
            for stage in ("features", "compress"):
                times[variant, stage].append(run(stage, data, env))
            hashes[variant] = (md5(data / "features" / "train.h5"), md5(data / "compact" / "dataset.h5"))
            print(f"run {r}: {variant}: features {times[variant, 'features'][-1]:.1f} s, compress "
                  f"{times[variant, 'compress'][-1]:.1f} s", flush=True)
    for stage in ("features", "compress"):
        pinned, native = (statistics.median(times[v, stage]) for v in ("pinned", "native"))
        print(f"{stage:9s} pinned {pinned:6.1f} s  native {native:6.1f} s  pinned / native {pinned / native:.2f}x")
    for name, env in ({} if args.timings_only else OUTSIDE).items():
        data = workspace(args.out, args.data, name.replace(" ", "-").replace(",", ""))
        for stage in ("features", "compress"):
            run(stage, data, env)
        hashes[name] = (md5(data / "features" / "train.h5"), md5(data / "compact" / "dataset.h5"))
    print(f"{'run':34s} {'features/train.h5':34s} compact/dataset.h5")
    for name, (features, compact) in hashes.items():
        print(f"{name:34s} {features:34s} {compact}")


if __name__ == "__main__":
    main()
