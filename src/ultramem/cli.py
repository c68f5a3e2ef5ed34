"""The `ultramem` command.

Each subcommand lives in its own module that defines `add_parser(subparsers)`; this file only
lists them, so features add a command without touching each other. A module that is not present
(an optional part not built yet) is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, description) in the order `ultramem --help` shows them.
COMMAND_MODULES: tuple[str, ...] = (
    "ultramem.commands.demo",       # demo
    "ultramem.commands.presets",    # presets
    "ultramem.commands.data",       # prepare
    "ultramem.commands.train",      # train
    "ultramem.commands.eval",       # eval, study
    "ultramem.commands.generate",   # generate
    "ultramem.commands.diagnose",   # diagnose
    "ultramem.commands.export",     # export (Hugging Face)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultramem", description="UltraMemV2 language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
