"""Run a stage in one process, or under torchrun with `runtime.nproc` processes.

`python -m stages.launch features` is the DVC command of the stages that can run distributed
(features, train). With runtime.nproc == 1 it runs the stage in this process; otherwise it execs
`torchrun --standalone --nproc_per_node N -m stages.<name>`. For several machines run torchrun yourself
on each (see README, "GPUs").
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

from dq.errors import run_cli
from dq.params import load_params

DISTRIBUTED_STAGES = ("features", "train")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=DISTRIBUTED_STAGES)
    args, rest = parser.parse_known_args(argv)
    params_path = "params.yaml"
    if "--params" in rest:
        params_path = rest[rest.index("--params") + 1]
    nproc = load_params(params_path).runtime.nproc
    module = f"stages.{args.stage}"
    if nproc == 1:
        sys.argv = [module] + rest
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *rest]
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    run_cli(main)
