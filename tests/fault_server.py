"""`python -m tests.fault_server [serve flags]`: asyncengine serve with a FaultHook whose
engine dies at its 3rd step (for tests/test_shutdown.py; the real CLI has no such hook)."""
from __future__ import annotations

import argparse
import sys

from api.server import add_serve_args, serve
from asyncengine.cli import add_engine_args, config_from_args
from asyncengine.reliability.faults import FaultHook

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    add_serve_args(parser)
    args = parser.parse_args(sys.argv[1:])
    serve(args, config_from_args(args), faults=FaultHook(fatal_at_step=3))
