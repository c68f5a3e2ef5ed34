"""Built-in data that needs no download: a generated world of facts, and text shipped with Python.

The fact world is what a memory layer should store: each person has a few attributes, stated in
several phrasings. `fact_prompts` asks for them, so a model's recall can be scored exactly.
"""

from __future__ import annotations

import codecs
import random
from dataclasses import dataclass

from ultramem.data.tokenizer import ByteTokenizer

FIRST = ["Ada", "Bram", "Chen", "Dara", "Emil", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia",
         "Milo", "Nia", "Omar", "Pia", "Quin", "Rosa", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara"]
LAST = ["Abbot", "Berg", "Costa", "Dunn", "Ekko", "Ferro", "Gale", "Holm", "Ives", "Jura",
        "Kern", "Lund", "Moss", "Nagy", "Orr", "Pike", "Quill", "Roth", "Sato", "Toft"]
ATTRIBUTES = {
    "city": ["Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Perth", "Turin", "Dakar", "Hanoi", "Bern"],
    "job": ["baker", "pilot", "nurse", "judge", "miner", "poet", "chef", "smith", "tutor", "medic"],
    "pet": ["cat", "dog", "owl", "fox", "yak", "eel", "bat", "emu", "elk", "ram"],
}
TEMPLATES = {
    "city": ["{p} lives in {v}.", "{p} has a home in {v}.", "The city of {p} is {v}."],
    "job": ["{p} works as a {v}.", "{p} is a {v} by trade.", "The job of {p} is {v}."],
    "pet": ["{p} owns a {v}.", "{p} keeps a {v} at home.", "The pet of {p} is a {v}."],
}
PROMPTS = {"city": "The city of {p} is", "job": "The job of {p} is", "pet": "The pet of {p} is"}


@dataclass(frozen=True)
class Fact:
    person: str
    attribute: str
    value: str


def fact_world(n_people: int = 64, seed: int = 0) -> list[Fact]:
    """n_people distinct people, each with one value per attribute, drawn with `seed`."""
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    if n_people > len(names):
        raise ValueError(f"n_people: at most {len(names)} distinct names, got {n_people}")
    people = rng.sample(names, n_people)
    return [Fact(p, a, rng.choice(vals)) for p in people for a, vals in ATTRIBUTES.items()]


def fact_text(facts: list[Fact], repeats: int = 4, seed: int = 0) -> str:
    """Every fact stated `repeats` times in random phrasings and order, one per line."""
    rng = random.Random(seed)
    lines = [rng.choice(TEMPLATES[f.attribute]).format(p=f.person, v=f.value)
             for f in facts for _ in range(repeats)]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def fact_prompts(facts: list[Fact]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: the prompt ends just before ' <value>.'."""
    return [(PROMPTS[f.attribute].format(p=f.person), " " + f.value) for f in facts]


def python_text() -> str:
    """English text that ships with every Python: the Zen of Python and stdlib docstrings."""
    import collections
    import contextlib
    import io
    import json
    import textwrap

    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen once
        import this
    zen = codecs.decode(this.s, "rot13")

    docs = [m.__doc__ or "" for m in (collections, json, textwrap, random, codecs)]
    return zen + "\n" + "\n".join(docs)


def byte_encode(text: str) -> list[int]:
    """`ByteTokenizer().encode`: the UTF-8 bytes of text."""
    return ByteTokenizer().encode(text)


def byte_decode(ids: list[int]) -> str:
    """`ByteTokenizer().decode`."""
    return ByteTokenizer().decode(ids)
