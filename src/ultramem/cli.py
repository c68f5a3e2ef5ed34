"""The `ultramem` command.

Each subcommand lives in its own module that defines `add_parser(subparsers)`; `COMMANDS` maps
each command to its module, so `ultramem train ...` imports the train module alone and `--help`
stays fast (nothing here imports torch or transformers). A module that is not present (an
optional part not built yet) is skipped.

Errors caused by the input (a bad flag, config value, path, data directory or checkpoint) end
with one line `ultramem CMD: message` on stderr and exit code 2; Ctrl-C ends with exit code 130.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NoReturn

# command -> the module that defines it, in the order `ultramem --help` lists them.
COMMANDS: dict[str, str] = {
    "demo": "ultramem.commands.demo",
    "presets": "ultramem.commands.presets",
    "prepare": "ultramem.commands.data",
    "train": "ultramem.commands.train",
    "eval": "ultramem.commands.eval",
    "study": "ultramem.commands.eval",
    "capacity": "ultramem.commands.capacity",
    "capacity-passes": "ultramem.commands.capacity",
    "generate": "ultramem.commands.generate",
    "init": "ultramem.commands.init",  # a fresh model larger than memory, int8 table files
    "diagnose": "ultramem.commands.diagnose",
    "export": "ultramem.commands.export",  # Hugging Face
}

# torch CPU threads of every command that computes (study keeps its own flag): more threads can
# be much slower on a machine shared with other jobs (docs/training.md).
DEFAULT_THREADS = 1


class UsageError(Exception):
    """Bad input given on the command line; `main` prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: `ultramem train: error: ... (see ... --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except None, False and [] (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == []:
            return action.help
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps the description's line breaks (commands with examples)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone when it is one of COMMANDS."""
    parser = Parser(prog="ultramem", description="UltraMemV2 language models",
                    formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.add_parser(sub)
    for p in sub.choices.values():
        _show_defaults(p)
    return parser


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Every option of p shows its default in --help, whatever formatter its module chose."""
    raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
    p.formatter_class = RawHelpFormatter if raw else HelpFormatter
    for action in p._actions:
        shown = action.default is not None and action.default is not False  # 0 is shown
        if action.help is None and action.option_strings and shown:
            action.help = "default: %(default)s"


def add_threads_argument(p: argparse.ArgumentParser, default: int | None = DEFAULT_THREADS,
                         note: str = "") -> None:
    """`--threads N`, the same flag and default for every command."""
    p.add_argument("--threads", type=int, default=default, metavar="N",
                   help="torch CPU threads (0: torch's choice); more than 1 can be much slower "
                        "on a machine busy with other jobs" + note)


def set_threads(n: int | None) -> None:
    """Apply --threads (None or 0: leave torch's choice)."""
    if n is not None and n < 0:
        raise UsageError(f"--threads must be >= 0, got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


def read_text_arg(path: str, flag: str = "--text") -> str:
    """The UTF-8 text of a file named on the command line; UsageError if it is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} {path}: not UTF-8 text ({err.reason} at byte {err.start})"
                         ) from None
    if not text.strip():
        raise UsageError(f"{flag} {path} is empty")
    return text


def check_device(name: str, label: str | None = None) -> None:
    """UsageError unless torch can run on device `name` (cpu, cuda, cuda:N) here; the message
    starts with label (default `--device NAME`)."""
    import torch

    label = label or f"--device {name}"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise UsageError(f"{label}: expected cpu, cuda or cuda:N")
    if kind == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None \
                else "no CUDA device is visible"
            raise UsageError(f"{label}: {why}; use cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"{label}: there are {torch.cuda.device_count()} CUDA devices")


def warn(command: str, message: str) -> None:
    """One warning line on stderr: `ultramem CMD: warning: message`."""
    print(f"ultramem {command}: warning: {' '.join(message.split())}", file=sys.stderr)


def user_error(err: BaseException) -> str | None:
    """The one-line message of an error the input caused, or None (a bug: keep the traceback)."""
    from ultramem.config import ConfigError

    # The project's input errors. A class whose module was never imported cannot have been
    # raised, so only loaded modules are consulted (importing them would cost seconds).
    kinds: list[type] = [UsageError, ConfigError]
    for module, name in (("ultramem.data.shards", "DataError"),
                         ("ultramem.data.corpus", "CorpusError"),
                         ("ultramem.train.checkpoint", "CheckpointError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    if isinstance(err, tuple(kinds)):
        return str(err)
    if isinstance(err, FileNotFoundError) or (isinstance(err, OSError) and err.filename):
        return f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ultramem {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        print(f"ultramem {args.command}: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m ultramem.cli` (torchrun): run the imported module's main, so the commands and
    # this guard share one UsageError class rather than two copies of this file.
    from ultramem.cli import main as _main

    sys.exit(_main())
