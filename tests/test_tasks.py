"""Task generators and scorers: determinism, answers that follow from the text, masks, scoring."""

from __future__ import annotations

import re

import pytest

from ultramem.data.builtin import TEMPLATES
from ultramem.data.tokenizer import ByteTokenizer
from ultramem.tasks import (
    LONG_CONTEXT,
    SIZES,
    TASKS,
    Example,
    build_tasks,
    encode,
    exact_match,
    masked_targets,
    score_predictions,
)
from ultramem.tasks.base import answer_spans

TOK = ByteTokenizer()


@pytest.mark.parametrize("name", list(TASKS))
def test_seeded_and_streams_disjoint(name):
    task = build_tasks("tiny", [name])[name]
    a, b = task.examples(5, seed=3), task.examples(5, seed=3)
    assert [e.text for e in a] == [e.text for e in b]
    if name != "facts":  # the fact world is fixed; its phrasings are what is held out
        assert [e.text for e in a] != [e.text for e in task.examples(5, seed=4)]
        assert not set(e.text for e in a) & set(task.train_documents(50, seed=3))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("name", list(TASKS))
def test_queries_are_prefixes_and_fit(size, name):
    task = build_tasks(size, [name])[name]
    limit = {"ci": 200, "tiny": 256, "small": 1100}[size]
    for ex in task.examples(20, seed=0):
        qs = ex.queries()
        assert qs, "every example asks something"
        for prompt, gold in qs:
            assert ex.text.startswith(prompt + gold)
            assert re.fullmatch(r" [A-Za-z0-9]+", gold)
        assert [g for _, g in qs] == ex.answers()
        assert len(ex.text.encode()) <= limit


def test_long_context_categories_are_seven():
    assert len(LONG_CONTEXT) == 7 and set(LONG_CONTEXT) < set(TASKS)
    assert len({TASKS[n].category for n in LONG_CONTEXT}) == 7


# ---------------------------------------------------------------------- answers follow the text


def _ex(name, n=30, size="tiny"):
    return build_tasks(size, [name])[name].examples(n, seed=1)


def test_long_memo_answers_are_the_stated_facts():
    for ex in _ex("long_memo"):
        facts = dict(re.findall(r"(\w+) is (\d+)\.", ex.text.split("\n")[0]))
        for prompt, gold in ex.queries():
            key = re.findall(r"What is (\w+)\?$", prompt)[0]
            assert facts[key] == gold.strip()


def test_multi_round_answers_are_current_values():
    n_answers = 0
    for ex in _ex("multi_round"):
        for prompt, gold in ex.queries():
            current = {}
            for line in prompt.split("\n"):
                if line.startswith("round"):
                    current.update(re.findall(r"(\w+)=(\d+)", line))
            key = prompt.rsplit("\n", 1)[-1][:-1]
            assert current[key] == gold.strip()
            n_answers += 1
    # Answers only after round 1, and at least one asks for a value set in an earlier round.
    assert n_answers == 30 * 2 * 2


def test_icl_answers_follow_the_rule_shown_before():
    for ex in _ex("icl"):
        for prompt, gold in ex.queries():
            lines = prompt.split("\n")
            word = lines[-1].split(" ->")[0]
            shown = {ln[0]: ln.split("-> ")[1] for ln in lines[:-1]}
            assert shown[word[0]] == gold.strip()
            assert word not in [ln.split(" ->")[0] for ln in lines[:-1]]


def test_reasoning_answer_is_the_sum():
    for ex in _ex("reasoning"):
        (prompt, gold), = ex.queries()
        values = dict(re.findall(r"Let (\w+) be (\d)\.", prompt))
        terms = prompt.rsplit("\n", 1)[-1].removesuffix(" = ?").split(" + ")
        assert sum(int(values[t]) for t in terms) == int(gold)


def test_needle_depth_grid_and_answer():
    exs = _ex("needle", 10)
    assert [e.group for e in exs[:5]] == ["depth=0", "depth=0.25", "depth=0.5", "depth=0.75",
                                          "depth=1"]
    for ex in exs:
        (prompt, gold), = ex.queries()
        assert re.findall(r"The secret code is (\d+)\.", prompt) == [gold.strip()]
        pos = prompt.index("The secret code is") / len(prompt.rsplit("\n", 1)[0])
        assert abs(pos - float(ex.group.split("=")[1])) < 0.25


def test_kv_retrieval_answers_match_pairs():
    for ex in _ex("kv_retrieval"):
        pairs = dict(re.findall(r"(\w+): (\d+)", ex.text.split("\n")[0]))
        assert len(pairs) == 8
        for prompt, gold in ex.queries():
            assert pairs[prompt.rsplit("\n", 1)[-1][:-1]] == gold.strip()


def test_multi_hop_answer_follows_the_chain():
    for ex in _ex("multi_hop"):
        refs = dict(re.findall(r"(\w+) = (\w+)\.", ex.text.split("\n")[0]))
        for prompt, gold in ex.queries():
            node, hops = prompt.rsplit("\n", 1)[-1].removesuffix(" = ?"), 0
            while not node.isdigit():
                node, hops = refs[node], hops + 1
            assert node == gold.strip() and hops == 2


def test_facts_are_asked_in_a_held_out_phrasing():
    task = build_tasks("tiny", ["facts"])["facts"]
    train = task.train_documents(2)[0]
    exs = task.examples()
    assert len(exs) == len(task.facts()) == 192
    for f, ex in zip(task.facts(), exs, strict=True):
        (prompt, gold), = ex.queries()
        assert gold == " " + f.value
        assert prompt + gold not in train  # never seen with this fact
        template, = [t for t in TEMPLATES[f.attribute]
                     if t.format(p=f.person, v=f.value) == ex.text]
        # ... but the phrasing itself is seen in training with other people.
        pattern = re.escape(template.split("{v}")[0]).replace(re.escape("{p}"),
                                                               r"([A-Z]\w+ [A-Z]\w+)")
        assert set(re.findall(pattern, train)) - {f.person}
    assert task.bits_per_fact() == pytest.approx(3.3219, abs=1e-3)


# ---------------------------------------------------------------------- masks and scorers


def test_masked_targets_select_exactly_the_answer_tokens():
    ex = Example((("What is abc?", False), (" 4831", True), ("\nWhat is xy?", False),
                  (" 7", True), ("\n", False)))
    ids, mask = encode(ex, TOK)
    assert TOK.decode(ids) == ex.text
    x, y = masked_targets(ids, mask)
    assert len(x) == len(y) == len(ids) - 1
    kept = [(j, t) for j, t in enumerate(y) if t != -100]
    assert TOK.decode([t for _, t in kept]) == " 4831 7"
    # Target j is token j + 1: each kept position is the one just before an answer byte.
    for j, t in kept:
        assert t == ids[j + 1] and mask[j + 1] and x[j] == ids[j]
    assert [j for j, _ in kept] == [i - 1 for i, m in enumerate(mask) if m]
    # An off-by-one mask (shifted by one token) would select other bytes.
    shifted = [t if m else -100 for t, m in zip(ids[1:], mask[:-1], strict=True)]
    assert TOK.decode([t for t in shifted if t != -100]) != " 4831 7"
    assert answer_spans(mask) == [(12, 17), (29, 31)]


def test_answer_segments_are_validated():
    with pytest.raises(ValueError, match="answer segment"):
        Example((("q", False), ("4831", True)))  # no leading space


def test_exact_match_scorer():
    assert exact_match(" 4831.\nWhat is", " 4831") == 1.0
    assert exact_match(" 4831", " 4831") == 1.0
    assert exact_match("4831\n", " 4831") == 1.0
    assert exact_match(" 48310", " 4831") == 0.0  # one digit too many
    assert exact_match(" 483", " 4831") == 0.0  # one digit short
    assert exact_match(" 4832", " 4831") == 0.0
    assert exact_match("", " 4831") == 0.0
    assert exact_match(" red", " red") == 1.0 and exact_match(" redd", " red") == 0.0
    golds = [g for ex in _ex("kv_retrieval", 5) for g in ex.answers()]
    assert score_predictions([g + "\n" for g in golds], golds) == 1.0
    assert score_predictions([" 1" + g.strip() for g in golds], golds) == 0.0
    with pytest.raises(ValueError):
        score_predictions(["x"], [])
