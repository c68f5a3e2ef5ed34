"""Evaluation: teacher-forced task scoring against oracles and greedy decoding, text metrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ultramem import LM, ModelConfig
from ultramem.data.tokenizer import ByteTokenizer
from ultramem.eval.perplexity import text_metrics, token_nll
from ultramem.eval.task_eval import evaluate_task, score_examples
from ultramem.tasks import Example, build_tasks, encode

TOK = ByteTokenizer()


class Oracle(nn.Module):
    """Knows the sequences it will see; predicts token j + 1 at position j (or j + shift)."""

    def __init__(self, seqs: list[list[int]], shift: int = 1, max_seq_len: int = 256):
        super().__init__()
        self.seqs, self.shift = seqs, shift
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len, vocab_size=256)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, targets=None):
        logits = torch.zeros(*x.shape, 256)
        for i, row in enumerate(x.tolist()):
            while row and row[-1] == 0:  # right padding (no text here holds a NUL byte)
                row = row[:-1]
            # The sequence this row starts, or (a left-truncated example) ends.
            seq = next((s for s in self.seqs if s[: len(row)] == row), None)
            if seq is None:
                seq = next(s[-len(row):] for s in self.seqs if s[-len(row):] == row)
            for j in range(min(len(row), len(seq) - self.shift)):
                logits[i, j, seq[j + self.shift]] = 20.0
        return logits, None


def _examples(name="kv_retrieval", n=6):
    return build_tasks("tiny", [name])[name].examples(n, seed=2)


@pytest.mark.parametrize("name", ["kv_retrieval", "icl", "needle", "multi_round"])
def test_perfect_model_scores_one_and_off_by_one_scores_zero(name):
    exs = _examples(name)
    seqs = [encode(e, TOK)[0] for e in exs]
    perfect = score_examples(Oracle(seqs), TOK, exs, batch_size=4)
    n_answers = sum(len(e.answers()) for e in exs)
    assert perfect["accuracy"] == 1.0 and perfect["n"] == n_answers
    assert perfect["token_accuracy"] == 1.0 and perfect["answer_nll"] < 1e-3
    assert perfect["dropped"] == 0
    copy = score_examples(Oracle(seqs, shift=0), TOK, exs, batch_size=4)  # predicts token j
    assert copy["accuracy"] == 0.0 and copy["n"] == n_answers
    lookahead = score_examples(Oracle(seqs, shift=2), TOK, exs, batch_size=4)
    assert lookahead["accuracy"] == 0.0


class Believer(Oracle):
    """Predicts the next token of one fixed sequence, whatever the input."""

    def forward(self, x, targets=None):
        logits = torch.zeros(*x.shape, 256)
        seq = self.seqs[0]
        for j in range(min(x.shape[1], len(seq) - 1)):
            logits[:, j, seq[j + 1]] = 20.0
        return logits, None


def test_one_wrong_token_fails_its_answer_only():
    ex = Example((("k?", False), (" 4831", True), ("\nj?", False), (" 77", True)))
    ids, _ = encode(ex, TOK)
    wrong = list(ids)
    wrong[ids.index(ord("3"))] = ord("9")  # believes ' 4891'
    r = score_examples(Believer([wrong]), TOK, [ex])
    assert r["n"] == 2 and r["correct"] == 1 and r["token_accuracy"] == pytest.approx(7 / 8)
    assert score_examples(Believer([ids]), TOK, [ex])["correct"] == 2


def test_needle_reports_every_depth():
    exs = _examples("needle", 10)
    r = score_examples(Oracle([encode(e, TOK)[0] for e in exs]), TOK, exs)
    assert set(r["by_group"]) == {"depth=0", "depth=0.25", "depth=0.5", "depth=0.75", "depth=1"}
    assert all(v == 1.0 for v in r["by_group"].values())


def test_too_long_examples_keep_their_tail_and_count_dropped_answers():
    exs = _examples("long_memo", 4)
    seqs = [encode(e, TOK)[0] for e in exs]
    for limit in (30, 31, 32, 33, 34, 35):  # cuts the facts and some questions, some mid-answer
        r = score_examples(Oracle(seqs, max_seq_len=limit), TOK, exs)
        kept = sum(1 for e, s in zip(exs, seqs, strict=True) for p, _ in e.queries()
                   if len(TOK.encode(p)) > len(s) - limit)
        assert r["dropped"] + r["n"] == 12 and r["n"] == kept and 0 < kept < 12
        assert r["accuracy"] == 1.0 and r["token_accuracy"] == 1.0


def test_forced_scoring_agrees_with_greedy_generation():
    torch.manual_seed(0)
    model = LM(ModelConfig.preset("tiny", n_layers=2), seed=3).eval()
    exs = _examples("kv_retrieval", 1)
    for ex in exs:
        for prompt, gold in ex.queries()[:2]:
            ids = TOK.encode(prompt)
            gold_ids = TOK.encode(gold)
            logits, _ = model(torch.tensor([ids + gold_ids]))
            forced = logits[0, len(ids) - 1 : len(ids) + len(gold_ids) - 1].argmax(-1).tolist()
            greedy = model.generate(torch.tensor([ids]), 1, temperature=0.0)[0, -1].item()
            assert forced[0] == greedy
            ok = score_examples(model, TOK, [Example(((prompt, False), (gold, True)))])
            assert ok["accuracy"] == float(forced == gold_ids)


class Uniform(nn.Module):
    def __init__(self, max_seq_len=64):
        super().__init__()
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, targets=None):
        return torch.zeros(*x.shape, 256), None


def test_text_metrics_of_a_uniform_model_are_eight_bits_per_byte():
    text = "Beautiful is better than ugly. " * 20  # 620 bytes: several windows of 64
    m = text_metrics(Uniform(), TOK, text)
    assert m["tokens"] == len(text) - 1 == m["bytes"]
    assert m["loss"] == pytest.approx(math.log(256))
    assert m["bits_per_byte"] == pytest.approx(8.0)


def test_token_nll_windows_predict_every_token_once():
    ids = list(range(1, 200))
    # The oracle knows each window; it is right only when window inputs and targets line up.
    seqs = [ids[s : s + 51] for s in range(0, len(ids) - 1, 50)]
    nll, count = token_nll(Oracle(seqs, max_seq_len=50), ids, seq_len=50, batch_size=3)
    assert count == len(ids) - 1
    assert nll / count < 1e-6
    nll, _ = token_nll(Oracle(seqs, shift=2, max_seq_len=50), ids, seq_len=50)
    assert nll / count > 5


def test_fact_world_reports_bits(tiny_model):
    task = build_tasks("ci", ["facts"])["facts"]
    exs = task.examples()
    r = evaluate_task(tiny_model, TOK, task)
    assert r["facts"] == len(exs) == 48 and r["n"] == 48
    assert r["bits_stored"] == pytest.approx(r["recalled"] * math.log2(10))
    seqs = [encode(e, TOK)[0] for e in exs]
    oracle = Oracle(seqs)
    perfect = score_examples(oracle, TOK, exs)
    assert perfect["correct"] == 48


def test_eval_command_rejects_zero_examples(tmp_path, capsys):
    from ultramem.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
