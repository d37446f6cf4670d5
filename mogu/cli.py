"""The ``mogu`` command line: ``mogu <command> --help``.

Each command lives in its own module that defines ``register(subparsers)``, adding one
or more sub-commands whose parsers set ``func`` (called with the parsed args, returning
an exit code). Add a module name to COMMAND_MODULES to add commands.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMAND_MODULES = [
    "mogu.cli_generate",   # mogu generate, mogu chat
    "mogu.cli_train",      # mogu train-expert, mogu train-router
    "mogu.cli_eval",       # mogu build-data, mogu eval
    "mogu.cli_safety",     # mogu calibrate, mogu probe
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mogu", description="MoGU: safe/usable LoRA experts with per-token routers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:          # that command family is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
