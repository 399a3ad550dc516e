"""The `gateway` command: run, check, route, deliver, queue, spool, erase, simulate (README, "Commands").

parser.py    the command line (every sub-command's arguments, exit codes) and `main`
commands.py  run, _worker, route, deliver, queue, spool, erase, simulate
check.py     `gateway check`
common.py    loading the config and printing its problems, exit codes shared by commands
"""

from gateway.cli.parser import EXIT_CODES, build_parser, main

__all__ = ["EXIT_CODES", "build_parser", "main"]
