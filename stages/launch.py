"""Run a stage in one process, or under torchrun with `runtime.nproc` processes.

`python -m stages.launch features` is the DVC command of the stages that can run distributed
(features, compress, train). With runtime.nproc == 1 it runs the stage in this process; otherwise it execs
`torchrun --standalone --nproc_per_node N -m stages.<name>`. For several machines, set
DQ_TORCHRUN_ARGS on node 0 to the rendezvous options that replace `--standalone` (e.g.
"--nnodes 2 --node_rank 0 --rdzv_endpoint node0:29500") and run torchrun yourself on the other nodes
(docs/GPU.md, "Several machines").
"""
from __future__ import annotations

import argparse
import os
import runpy
import shlex
import sys

from dq.core.errors import DQError, run_cli
from dq.params import RuntimeParams, load_params

DISTRIBUTED_STAGES = ("features", "compress", "teacher", "train")


def torchrun_command(module: str, nproc: int, rest: list[str]) -> list[str]:
    """The torchrun command line that starts `nproc` copies of `module` on this machine."""
    rendezvous = shlex.split(os.environ.get("DQ_TORCHRUN_ARGS", "")) or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}",
            "-m", module, *rest]


def check_devices(runtime: RuntimeParams) -> None:
    """One GPU per process: more processes than visible GPUs would share (and overflow) them."""
    if runtime.device == "cpu":
        return
    import torch

    count = torch.cuda.device_count()
    if count and runtime.nproc > count:
        raise DQError(f"runtime.nproc = {runtime.nproc} is not allowed with {count} visible CUDA device(s); "
                      f"expected at most {count} (one process per GPU), or runtime.device: cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=DISTRIBUTED_STAGES)
    args, rest = parser.parse_known_args(argv)
    params_path = "params.yaml"
    if "--params" in rest:
        params_path = rest[rest.index("--params") + 1]
    runtime = load_params(params_path).runtime
    module = f"stages.{args.stage}"
    if runtime.nproc == 1:
        sys.argv = [module] + rest
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    check_devices(runtime)
    cmd = torchrun_command(module, runtime.nproc, rest)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    run_cli(main)
