"""The compact store's first home: every public name of dq.compact, for code that imports dq.format.

`python -m dq.format describe|validate FILE` still works; new code imports dq.compact.
"""
import sys

from dq.compact import *  # noqa: F401,F403
from dq.compact import __all__  # noqa: F401

if __name__ == "__main__":
    from dq.compact.cli import main
    from dq.errors import run_cli

    run_cli(lambda: main(sys.argv[1:]))
