"""What every stage entry point shares: the command line (`--params`, `--data`) and the loaded params."""
from __future__ import annotations

import argparse
from pathlib import Path

from dq.params import Params, load_params


def parse_args(description: str, argv: list[str] | None = None, extra=None,
               builds_models: bool = False) -> tuple[argparse.Namespace, Params]:
    """Parse `--params` (default params.yaml) and `--data` (default data/), then load the params; a stage
    that `builds_models` also has timm check the model names (Params.check_model_names)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--data", default="data", type=Path, help="root of the stage outputs (default: data)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if builds_models:
        params.check_model_names(args.params)
    return args, params
