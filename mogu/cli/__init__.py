"""The ``mogu`` command line: ``mogu <command> --help``.

Each command lives in its own module that defines ``register(subparsers)``, adding one
or more sub-commands whose parsers set ``func`` (called with the parsed args, returning
an exit code). Add a module name to COMMAND_MODULES to add commands. What the commands
share (model options, path checks before the model loads, loading, the one-line error
``mogu CMD: error: ...``) is in :mod:`mogu.cli.common`.
"""
from __future__ import annotations

import importlib
from typing import List, Optional

from . import common

COMMAND_MODULES = [
    "mogu.cli.generate",   # mogu generate, mogu chat
    "mogu.cli.train",      # mogu train-expert, mogu train-router
    "mogu.cli.eval",       # mogu build-data, mogu eval
    "mogu.cli.safety",     # mogu calibrate, mogu probe
    "mogu.cli.serve",      # mogu export-vllm
]


def build_parser() -> common.ArgumentParser:
    parser = common.ArgumentParser(
        prog="mogu", description="MoGU: safe/usable LoRA experts with per-token routers",
        epilog="Errors are one line 'mogu COMMAND: error: ...' with exit code 1 (2 for bad options); --debug or "
               f"{common.DEBUG_ENV}=1 adds the traceback. Every path given is checked before the model loads.")
    parser.add_argument("--version", action="version", version=common.version_line())
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"on an error, print the Python traceback too (default: off; also "
                             f"{common.DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:          # that command family is not part of this build
                continue
            raise
        module.register(sub)
    for command_parser in sub.choices.values():
        common.add_debug_arg(command_parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:             # --help, --version (0) or a bad option (2, one line printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return common.run(args)

