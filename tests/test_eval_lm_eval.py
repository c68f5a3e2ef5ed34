"""lm-evaluation-harness: the `ultramem` model (a `TemplateLM`, tokenizing by lm-eval's rules) and
our local task YAMLs, offline, tiny model; an exported folder on lm-eval's own `hf` backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _split(tok, context, continuation):
    """lm-eval's rule, by hand: trailing spaces of the context go to the continuation, whose
    tokens are those of the whole text after the context's own."""
    whole = tok.encode(context + continuation)
    ctx_ids = tok.encode(context.rstrip())
    assert whole[:len(ctx_ids)] == ctx_ids
    return ctx_ids, whole[len(ctx_ids):]


@torch.no_grad()
def test_adapter_scores_match_the_model(checkpoint):
    lm = UltraMemHarnessLM(checkpoint=str(checkpoint), device="cuda:0", batch_size=2)
    model, tok = lm.model, lm.tok
    pairs = [("The secret code is?", " 4831"), ("abc? ", "12"), ("", "Hello")]
    got = lm.loglikelihood([_req("loglikelihood", p) for p in pairs])
    for (ctx, cont), (lp, greedy) in zip(pairs, got, strict=True):
        ctx_ids, cont_ids = _split(tok, ctx, cont) if ctx else ([lm.prefix_id], tok.encode(cont))
        ids = ctx_ids + cont_ids
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


def _write_checkpoint(model, path, tokenizer_spec):
    """The checkpoint layout `load_model`/`load_tokenizer` read."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "ultramem-checkpoint", "version": 1, "step": 0,
            "model": model.cfg.to_dict(), "tokenizer": tokenizer_spec}
    (path / "config.json").write_text(json.dumps(meta))
    save_model(model, str(path / "model.safetensors"))
    (path / "trainer_state.json").write_text("{}")
    return path


@torch.no_grad()
def test_bpe_context_ending_in_a_space_scores_the_merged_token(tmp_path):
    """With a byte-level BPE, " 4831" is one token: the context's trailing space moves into the
    continuation (lm-eval's rule) instead of being scored as a lone space token."""
    from ultramem import LM
    from ultramem.data.tokenizer import train_bpe

    tok = train_bpe(iter(["The secret code is 4831. The code is 1234 or 4831."] * 40), 300)
    model = LM(ModelConfig.preset("tiny").replace(n_layers=2, vocab_size=tok.vocab_size), seed=0)
    ckpt = tmp_path / "bpe"
    _write_checkpoint(model, ckpt, tok.save(ckpt))
    lm = UltraMemHarnessLM(checkpoint=str(ckpt))
    context, continuation = "The secret code is ", "4831"
    ctx_ids = tok.encode("The secret code is")
    cont_ids = tok.encode("The secret code is 4831")[len(ctx_ids):]
    assert len(cont_ids) == 1  # " 4831" merged into one token
    assert tok.encode(context) + tok.encode(continuation) != ctx_ids + cont_ids  # naive split
    (lp, greedy), = lm.loglikelihood([_req("loglikelihood", (context, continuation))])
    ids = torch.tensor([ctx_ids + cont_ids])
    logp = model.eval()(ids[:, :-1])[0].float().log_softmax(-1)[0, -1]  # predicts the last id
    assert lp == pytest.approx(float(logp[cont_ids[0]]), abs=1e-5)
    assert greedy == (int(logp.argmax()) == cont_ids[0])
    # the empty context is the end-of-text token, which the BPE has
    (lp0, _), = lm.loglikelihood([_req("loglikelihood", ("", "The"))])
    first = model(torch.tensor([[tok.eos_id]]))[0].float().log_softmax(-1)[0, -1]
    assert lm.prefix_token_id == tok.eos_id and len(tok.encode("The")) == 1
    assert lp0 == pytest.approx(float(first[tok.encode("The")[0]]), abs=1e-5)


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
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False), limit=5,
        bootstrap_iters=0)
    for name in ("ultramem_needle", "ultramem_kv_retrieval"):
        acc = results["results"][name]["acc,none"]
        assert 0.0 <= acc <= 1.0
    assert results["n-samples"]["ultramem_needle"]["effective"] == 5


# Run in a fresh interpreter: ultramem is installed but not imported, and transformers' copies
# of the folder's modeling code go to a temporary HF_HOME.
_HF_BACKEND = """
import json, sys
assert "ultramem" not in sys.modules
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

folder, tasks = sys.argv[1:]
# byte-level exports have no BOS/EOS token: the newline (10) is the empty-context prefix
lm = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=2,
          prefix_token_id=10)
out = lm_eval.simple_evaluate(model=lm, tasks=["ultramem_needle"], limit=3, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=tasks, include_defaults=False),
                              log_samples=True)
print(json.dumps({
    "model_class": type(lm.model).__module__ + "." + type(lm.model).__name__,
    "acc": out["results"]["ultramem_needle"]["acc,none"],
    "samples": [[s["doc"]["prompt"], s["doc"]["answer"], s["resps"][0][0][0]]
                for s in out["samples"]["ultramem_needle"]],
}))
"""


@pytest.mark.usefixtures("one_thread")
def test_lm_eval_hf_backend_evaluates_an_exported_folder(tmp_path):
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")
    from ultramem import LM
    from ultramem.hf import export

    model = LM(ModelConfig.preset("tiny").replace(n_layers=2), seed=0).eval()
    folder = export(model, tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _HF_BACKEND, str(folder), str(TASK_DIR)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["model_class"] == "ultramem.hf.UltraMemForCausalLM"
    assert 0.0 <= got["acc"] <= 1.0 and len(got["samples"]) == 3
    with torch.no_grad():
        for prompt, answer, lp in got["samples"]:  # bytes: no merges across the boundary
            ctx, cont = list(prompt.encode()), list(answer.encode())
            logp = model(torch.tensor([ctx + cont[:-1]]))[0].float().log_softmax(-1)[0]
            want = logp[len(ctx) - 1:].gather(1, torch.tensor(cont)[:, None]).sum()
            assert lp == pytest.approx(float(want), abs=1e-4)
