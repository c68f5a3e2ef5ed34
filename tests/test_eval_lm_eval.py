"""lm-evaluation-harness: the `ultramem` model and our local task YAMLs, offline, tiny model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from ultramem.config import ModelConfig  # noqa: E402
from ultramem.eval.lm_eval_adapter import TASK_DIR, UltraMemHarnessLM  # noqa: E402
from ultramem.tasks import TASKS  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ultramem.train.config import TrainConfig
    from ultramem.train.trainer import train

    out = tmp_path_factory.mktemp("lm_eval_run")
    torch.set_num_threads(1)
    train(ModelConfig.preset("tiny/ultramem_v2"),
          TrainConfig(steps=3, batch_size=2, seq_len=64, warmup=1, eval_every=0, ckpt_every=0,
                      tensorboard=False, plot=False), out, show_progress=False)
    return out


def _req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_yamls_cover_every_task():
    assert sorted(p.stem for p in TASK_DIR.glob("*.yaml")) == sorted(f"ultramem_{t}"
                                                                     for t in TASKS)


@torch.no_grad()
def test_adapter_scores_match_the_model(checkpoint):
    lm = UltraMemHarnessLM(checkpoint=str(checkpoint), device="cuda:0", batch_size=2)
    model, tok = lm.model, lm.tok
    pairs = [("The secret code is?", " 4831"), ("abc? ", "12"), ("", "Hello")]
    got = lm.loglikelihood([_req("loglikelihood", p) for p in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        ctx_ids = tok.encode(ctx) or [lm.prefix_id]
        ids = ctx_ids + tok.encode(cont)
        logp = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)[0]
        tail = logp[len(ctx_ids) - 1 :]
        gold = torch.tensor(ids[len(ctx_ids):])
        assert lp == pytest.approx(float(tail.gather(1, gold[:, None]).sum()), abs=1e-4)
        assert greedy == bool((tail.argmax(-1) == gold).all())
    text = "Beautiful is better than ugly. " * 12  # longer than one 256-token window
    rolling, = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = [lm.prefix_id] + tok.encode(text)
    logp = torch.cat([model(torch.tensor([w[:-1]]))[0].float().log_softmax(-1)[0][-n:]
                      .gather(1, torch.tensor(w[-n:])[:, None])
                      for w, n in _windows(ids, lm.max_len)])
    assert rolling == pytest.approx(float(logp.sum()), rel=1e-4)
    out, = lm.generate_until([_req("generate_until", ("abc", {"until": ["\n"],
                                                             "max_gen_toks": 5}))])
    assert isinstance(out, str) and "\n" not in out and len(out.encode()) <= 5


def _windows(ids, max_len):
    """Disjoint windows predicting every token after the prefix once, each with full context."""
    out, pos = [], 1
    while pos < len(ids):
        end = min(pos + max_len, len(ids))
        start = max(0, end - max_len - 1)
        out.append((ids[start:end], end - pos))
        pos = end
    return out


def test_lm_eval_runs_our_task_offline(checkpoint):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="ultramem", model_args={"checkpoint": str(checkpoint)},
        tasks=["ultramem_needle", "ultramem_kv_retrieval"],
        task_manager=TaskManager(include_path=str(TASK_DIR)), limit=5, bootstrap_iters=0)
    for name in ("ultramem_needle", "ultramem_kv_retrieval"):
        acc = results["results"][name]["acc,none"]
        assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["ultramem_needle"]["effective"] == 5
