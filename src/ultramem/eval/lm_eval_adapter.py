"""lm-evaluation-harness adapter: our checkpoints as `--model ultramem`, our tasks as local YAMLs.

    python -m ultramem.eval.lm_eval_cli --model ultramem \\
        --model_args checkpoint=runs/x --tasks ultramem_needle --limit 50

runs lm-eval's own command line after registering the model, and adds `--include_path` for the
YAMLs in `ultramem/eval/lm_eval_tasks/` (one per task, generated locally: nothing is downloaded).
`lm_eval` alone cannot find a model that is not imported, hence the module entry point; in Python,
`import ultramem.eval.lm_eval_adapter` then `lm_eval.simple_evaluate(model="ultramem", ...)`.
(An exported folder, `ultramem export`, also runs on lm-eval's own `hf` backend:
`--model hf --model_args pretrained=DIR,trust_remote_code=True`, plus `prefix_token_id=10` for a
byte-level folder, which has no BOS/EOS token; docs/evaluation.md.)

The model is a `TemplateLM`, so requests are tokenized by lm-eval's rules, as for its `hf`
backend: trailing spaces of a context move to the continuation, and the continuation's tokens
are those of context + continuation after the context's own tokens. With a BPE tokenizer that
matters where tokens merge across the boundary (" 42" is one token, not " " then "42"). An empty
context is the prefix token: the end-of-text token, or for byte checkpoints (which have none)
the newline that separates documents.

The tasks are `loglikelihood` tasks whose `acc` is lm-eval's is_greedy: the answer is right when
greedy decoding produces it, the same criterion as `ultramem.eval.task_eval`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"


@register_model("ultramem")
class UltraMemHarnessLM(TemplateLM):
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

    # -- TemplateLM's tokenizer hooks -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """End of text, also the prefix of an empty context (byte checkpoints: the newline)."""
        return self.prefix_id

    @property
    def max_length(self) -> int:
        return self.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **_: Any) -> list[int]:
        return self.tok.encode(string)  # our tokenizers add no special tokens

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

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

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), tokenized by
        `TemplateLM.loglikelihood`."""
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            ids = self.tok_encode(req.args[0])
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, self.prefix_token_id, self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - 1):]
            x = torch.tensor([ids], device=self._device)
            y = self.model.generate(x, n, temperature=0.0)
            text = self.tok_decode(y[0, len(ids):].tolist())
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

