"""`ultramem train`'s flags, generated from the config dataclasses.

Every field of TrainConfig, ModelConfig and each memory kind's config is a flag:
`--FIELD` / `--train.FIELD`, `--model.FIELD`, `--model.memory.FIELD` (dashes or underscores).
A flag is the same as `--set KEY=VALUE`: it joins the same list, in command-line order, so
values are parsed as YAML and checked by the dataclasses (`ultramem.config.check_types`).
The fields are read from the classes' source with `ast`, not imported: importing
`ultramem.train.config` loads torch, and `--help` must stay fast without it.
tests/test_train_cli.py holds this reading to `dataclasses.fields`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FieldInfo:
    """One dataclass field as `--help` shows it."""

    name: str
    type: str  # the annotation as written: "int | None"
    default: str  # the default as a YAML value: "3e-3", "null", "[0, 2]"
    help: str  # the field's `# comment`, else the sentence of the class docstring about it


def read_fields(path: Path, class_name: str) -> tuple[list[FieldInfo], str]:
    """(fields, docstring) of dataclass `class_name` defined at the top level of file `path`."""
    lines, tree = _parsed(path)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    doc = ast.get_docstring(cls) or ""
    fields = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name, value = node.target.id, node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
            factory = next(k.value for k in value.keywords if k.arg == "default_factory")
            default = f"{ast.unparse(factory)}()"
        else:
            default = _yaml(ast.literal_eval(value)) if value is not None else ""
        rest = lines[node.end_lineno - 1][node.end_col_offset:].strip()
        comment = rest[1:].strip() if rest.startswith("#") else ""
        fields.append(FieldInfo(name, ast.unparse(node.annotation), default,
                                comment or _sentence_about(doc, name)))
    return fields, doc


@functools.cache
def _parsed(path: Path) -> tuple[list[str], ast.Module]:
    source = path.read_text(encoding="utf-8")
    return source.splitlines(), ast.parse(source)


def _yaml(value: Any) -> str:
    """value as it is written on the command line (YAML): true, null, [0, 2]."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _sentence_about(doc: str, name: str) -> str:
    """The docstring clause that documents field `name`: one that starts with it (`top_m: ...`,
    `value_dim / pre_value_dim: ...`), else the first that names it; "" if none does."""
    clauses = _clauses(doc)
    for clause in clauses:
        head = re.match(r"([\w /,]+):", clause)
        if head and name in re.split(r"[ /,]+", head.group(1)):
            return clause
    word = re.compile(rf"(?<![\w.`]){name}(?![\w`(])")
    return next((c for c in clauses if word.search(c)), "")


def _clauses(doc: str) -> list[str]:
    """doc cut into sentences and `;` clauses, outside parentheses (`i.e.`, `et al.` stay)."""
    text, out, depth, start = " ".join(doc.split()), [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if (ch in ".;" and depth == 0 and text[i + 1:i + 2] == " "
                and not re.search(r"(\bi\.e|\be\.g|\bal)\.$", text[start:i + 1])):
            out.append(text[start:i + 1].rstrip(";") + ("." if ch == ";" else ""))
            start = i + 2
    return [*out, text[start:]] if text[start:] else out


def cli_train_defaults() -> dict[str, Any]:
    """TrainConfig defaults of the command line, not the class (`--help` shows them)."""
    from ultramem.cli import DEFAULT_THREADS

    return {"threads": DEFAULT_THREADS}

# ModelConfig's fields have no docstring of their own in ultramem/config.py.
MODEL_FIELD_HELP = {
    "vocab_size": "token vocabulary (set from the data's tokenizer)",
    "n_layers": "transformer blocks",
    "d_model": "model width",
    "n_heads": "attention heads (d_model / n_heads must be even, for RoPE)",
    "ffn_hidden": "hidden width of the SwiGLU FFN",
    "max_seq_len": "longest sequence (raised to seq_len when training)",
    "rope_theta": "RoPE base",
    "qk_norm": "RMS-normalise queries and keys",
    "tie_embeddings": "the output layer shares the token embedding",
    "norm_eps": "RMSNorm epsilon",
}


class FieldFlag(argparse.Action):
    """`--KEY VALUE`: the same as `--set KEY=VALUE`, appended to the same list (args.overrides),
    so flags and --set apply in command-line order and are checked the same way."""

    def __init__(self, option_strings: list[str], dest: str, key: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kwargs)
        self.key = key

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.overrides = [*namespace.overrides, f"{self.key}={values}"]


def add_field_flags(p: argparse.ArgumentParser) -> None:
    """A flag for every field of TrainConfig, ModelConfig and each memory kind, grouped in
    --help by class, each with its type, default and documentation."""
    from ultramem.config import MEMORY_KINDS, SPARSE_CONFIGS

    root = Path(__file__).resolve().parent.parent
    taken = {s for a in p._actions for s in a.option_strings}
    train_fields, _ = read_fields(root / "train" / "config.py", "TrainConfig")
    group = p.add_argument_group(
        "train fields (TrainConfig)",
        "--FIELD VALUE or --train.FIELD VALUE, the same as --set FIELD=VALUE")
    for f in train_fields:
        short = "--" + f.name.replace("_", "-")
        cli_default = cli_train_defaults().get(f.name)
        shown = None if cli_default is None else _yaml(cli_default)
        _add_field(group, ["train."], f, f"train.{f.name}", default=shown,
                   short=None if short in taken else short)

    model_fields, _ = read_fields(root / "config.py", "ModelConfig")
    group = p.add_argument_group(
        "model fields (ModelConfig)",
        "--model.FIELD VALUE, the same as --set model.FIELD=VALUE. Defaults shown are the "
        "classes'; the preset (tiny unless --preset or the config file names one) sets its own.")
    for f in model_fields:
        if f.name != "memory":
            help = f.help or MODEL_FIELD_HELP.get(f.name, "")
            _add_field(group, ["model."], FieldInfo(f.name, f.type, f.default, help),
                       f"model.{f.name}")
    group.add_argument("--model.memory.kind", action=FieldFlag, key="model.memory.kind",
                       choices=MEMORY_KINDS, metavar="KIND",
                       help=f"the sparse layer: {', '.join(MEMORY_KINDS)} (default: the "
                            f"preset's); a new kind starts from its class's defaults. Its "
                            f"fields, --model.memory.FIELD VALUE, are listed below by kind; a "
                            f"field of another kind is an error. --set model.memory=false: a "
                            f"dense model")

    seen: dict[str, argparse.Action] = {}
    for kind, cls in SPARSE_CONFIGS.items():
        fields, doc = read_fields(root / "config.py", cls.__name__)
        summary = _clauses(doc)[0]
        group = p.add_argument_group(f"model.memory fields of kind {kind} ({cls.__name__})",
                                     summary)
        for f in fields:
            if f.name == "kind":
                continue
            if f.name not in seen:
                seen[f.name] = _add_field(group, ["model.memory."], f, f"model.memory.{f.name}")
            else:  # the flag exists (an earlier kind's field): list it here with this kind's help
                shown = copy.copy(seen[f.name])
                shown.help, shown.metavar = _help(f), _metavar(f.type)
                group._group_actions.append(shown)


def _add_field(group, prefixes: list[str], f: FieldInfo, key: str, default: str | None = None,
               short: str | None = None) -> argparse.Action:
    """The flag of field f (`--PREFIX.NAME`, dashed; `short` too), and a hidden alias spelled
    with underscores."""
    dashed = [f"--{pre}{f.name.replace('_', '-')}" for pre in prefixes]
    flags = dashed + ([short] if short else [])
    kwargs: dict[str, Any] = {"nargs": "?", "const": "true"} if f.type == "bool" else {}
    action = group.add_argument(*flags, action=FieldFlag, key=key, metavar=_metavar(f.type),
                                help=_help(f, default), **kwargs)
    if "_" in f.name:
        aliases = [f"--{pre}{f.name}" for pre in prefixes] + ([f"--{f.name}"] if short else [])
        group.add_argument(*aliases, action=FieldFlag, key=key, help=argparse.SUPPRESS, **kwargs)
    return action


def _metavar(annotation: str) -> str:
    return {"int": "INT", "float": "FLOAT", "bool": "BOOL", "str": "STR"}.get(annotation, "VALUE")


def _help(f: FieldInfo, default: str | None = None) -> str:
    """`doc (type; default: X)`, escaped for argparse's % formatting."""
    shown = f.default if default is None else f"{default} (the class's: {f.default})"
    text = f"{f.help} ({f.type}; default: {shown})" if f.help else f"{f.type}; default: {shown}"
    return text.replace("%", "%%")
