"""What every command shares: loading the config, printing its problems."""

from __future__ import annotations

import argparse
import sys

from gateway.config import Config, config_path, load_config
from gateway.errors import ConfigError


def _load(args: argparse.Namespace) -> Config:
    return load_config(config_path(args.config))


def _print_problems(exc: ConfigError) -> None:
    for p in exc.problems:
        print(str(p), file=sys.stderr)


EX_USAGE = 64  # sysexits: the command line is wrong (unknown option, bad value)
EX_NOINPUT = 66  # an input file named on the command line cannot be read
EX_SOFTWARE = 70  # a bug: an unexpected exception (one line; GATEWAY_TRACEBACK=1 shows it)
