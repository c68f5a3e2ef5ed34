"""lm-evaluation-harness adapter: our checkpoints as `--model ultramem`, our tasks as local YAMLs.

    python -m ultramem.eval.lm_eval_cli --model ultramem \\
        --model_args checkpoint=runs/x --tasks ultramem_needle --limit 50

runs lm-eval's own command line after registering the model, and adds `--include_path` for the
YAMLs in `ultramem/eval/lm_eval_tasks/` (one per task, generated locally: nothing is downloaded).
`lm_eval` alone cannot find a model that is not imported, hence the module entry point; in Python,
`import ultramem.eval.lm_eval_adapter` then `lm_eval.simple_evaluate(model="ultramem", ...)`.

The tasks are `loglikelihood` tasks whose `acc` is lm-eval's is_greedy: the answer is right when
greedy decoding produces it, the same criterion as `ultramem.eval.task_eval`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"


@register_model("ultramem")
class UltraMemHarnessLM(HarnessLM):
    """`model_args`: checkpoint=DIR (a checkpoint or run directory), device=cpu, batch_size=8."""

    def __init__(self, checkpoint: str, device: str | None = "cpu", batch_size: int | str = 8,
                 max_gen_toks: int = 16, **_: Any):
        super().__init__()
        from ultramem.train.checkpoint import load_model, load_tokenizer

        # lm-eval's CLI passes its own default device ('cuda'); fall back to the CPU without one.
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"

        self.model = load_model(checkpoint, device=device).eval()
        self.tok = load_tokenizer(checkpoint)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_len = self.model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        # No BOS token: the end-of-text token when the tokenizer has one, else a newline.
        eos = getattr(self.tok, "eos_id", None)
        self.prefix_id = eos if eos is not None else self.tok.encode("\n")[0]

    # -- scoring ----------------------------------------------------------------------------

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), greedy?) per (context ids, continuation ids)."""
        out: list[tuple[float, bool]] = []
        for b in range(0, len(pairs), self.batch_size):
            chunk = pairs[b : b + self.batch_size]
            rows = []
            for ctx, cont in chunk:
                full = (ctx + cont)[-(self.max_len + 1):]
                rows.append((full[:-1], len(cont)))
            width = max(len(r) for r, _ in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for i, (r, _) in enumerate(rows):
                x[i, : len(r)] = torch.tensor(r)
            logp = F.log_softmax(self.model(x.to(self._device))[0].float(), -1).cpu()
            for i, ((r, n), (_, cont)) in enumerate(zip(rows, chunk, strict=True)):
                lp = logp[i, len(r) - n : len(r)]  # positions predicting the continuation
                gold = torch.tensor(cont)
                out.append((float(lp.gather(1, gold[:, None]).sum()),
                            bool((lp.argmax(-1) == gold).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx = self.tok.encode(context) if context else [self.prefix_id]
            pairs.append((ctx, self.tok.encode(continuation)))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self.tok.encode(req.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, self.prefix_id, self.max_len, context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok.encode(context) or [self.prefix_id])[-(self.max_len - 1):]
            x = torch.tensor([ids], device=self._device)
            y = self.model.generate(x, n, temperature=0.0)
            text = self.tok.decode(y[0, len(ids):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def load_dataset(task: str, size: str = "tiny", n: int = 100, seed: int = 1, **_: Any):
    """The `custom_dataset` of our YAMLs: one row per answer {prompt, answer, group}, test split."""
    import datasets

    from ultramem.tasks import build_tasks

    t = build_tasks(size, [task])[task]
    rows = [{"prompt": p, "answer": a, "group": ex.group}
            for ex in t.examples(n, seed) for p, a in ex.queries()]
    return {"test": datasets.Dataset.from_list(rows)}


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `ultramem` registered and our task YAMLs included."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "ls", "validate") and not argv[0].startswith("-h"):
        argv = ["run", *argv]
    if argv and argv[0] in ("run", "ls", "validate") and "--include_path" not in argv:
        argv += ["--include_path", str(TASK_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()

