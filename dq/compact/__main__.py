"""`python -m dq.compact describe|validate FILE`."""
import sys

from dq.compact.cli import main
from dq.core.errors import run_cli

run_cli(lambda: main(sys.argv[1:]))
