"""The study's report: `<family>.md` (a table per metric), `<family>.json`, and two plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ultramem.eval.study_plan import ABLATIONS, PAPER_TABLE2, base_name, run_dir
from ultramem.tasks import LONG_CONTEXT, TASKS


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


# The long-context summary columns, named the same in every table of a report.
MEAN_ACC = "mean acc of 7 (%)"
MEAN_NLL = "mean answer loss of 7"


def _long_context_mean(run: dict[str, Any], tasks: list[str], key: str = "accuracy") -> float:
    """Mean of a task score over the seven long-context categories among tasks (the "mean of
    7"; the fact world is reported on its own)."""
    lc = [t for t in tasks if t in LONG_CONTEXT]
    return sum(run["tasks"][t][key] for t in lc) / max(1, len(lc))


def _long_context_accuracy(run: dict[str, Any], tasks: list[str]) -> float:
    return _long_context_mean(run, tasks)


def _groups(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """base run name -> its rows over training seeds (the first is the study's seed)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault(base_name(r["name"]), []).append(r)
    return out


def _metric_rows(runs: list[dict[str, Any]],
                 tasks: list[str]) -> dict[str, tuple[list[float], bool]]:
    """metric -> (value of each run, lower is better), for the UltraMemV2 vs MoE table."""
    out = {"held-out loss": ([r["text"]["loss"] for r in runs], True),
           "held-out bpb": ([r["text"]["bits_per_byte"] for r in runs], True)}
    for t in tasks:
        out[t] = ([100 * r["tasks"][t]["accuracy"] for r in runs], False)
    for t in tasks:
        out[f"{t} answer loss"] = ([r["tasks"][t]["answer_nll"] for r in runs], True)
    return out


def _fmt(vals: list[float], digits: int) -> str:
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"


def _compare(u: list[float], m: list[float], lower: bool,
             names: tuple[str, str] = ("UltraMemV2", "MoE")) -> str:
    """The name of the better of the two means; with repeats of both, only when the seed ranges
    are apart."""
    if min(u) == max(u) == min(m) == max(m):
        return "tie"
    if len(u) > 1 and len(m) > 1 and min(u) <= max(m) and min(m) <= max(u):
        return "within seed noise"
    return _winner(sum(u) / len(u), sum(m) / len(m), lower, names)


def loss_claim(u: list[float], m: list[float],
               names: tuple[str, str] = ("UltraMemV2", "MoE")) -> str:
    """The held-out loss claim, names[0] (u) against names[1] (m), one value per seed: the mean
    difference set against the seed spreads, in plain words.

    Separated when the two seed ranges do not overlap; otherwise within seed noise, with the
    largest difference any seed of one shows against any seed of the other as the bound. One
    seed on either side measures no spread, and the claim says so."""
    a, b = names
    d = sum(u) / len(u) - sum(m) / len(m)
    su, sm = max(u) - min(u), max(m) - min(m)
    said = f"{a} minus {b}, {d:+.4f} nats/token (mean over {len(u)} and {len(m)} seeds)"
    if len(u) < 2 or len(m) < 2:
        return (f"{said}; one seed on a side measures no seed spread, so this difference is not "
                "yet judged against noise.")
    said += f"; seed spread (max - min) {a} {su:.4f}, {b} {sm:.4f}"
    if min(u) > max(m) or min(m) > max(u):
        better = a if d < 0 else b
        gap = max(min(u) - max(m), min(m) - max(u))
        return (f"{said}. The seed ranges do not overlap (a gap of {gap:.4f}): **{better} is "
                f"better**, by {abs(d):.4f} nats/token, {abs(d) / max(su, sm, 1e-12):.1f}x the "
                "larger spread.")
    bound = max(abs(max(u) - min(m)), abs(min(u) - max(m)))
    return (f"{said}. The seed ranges overlap: **within seed noise**; |difference| < {bound:.4f} "
            f"nats/token (the largest gap between any {a} seed and any {b} seed).")


def markdown(study: dict[str, Any]) -> str:
    """The study's report: one section per function below, in this order."""
    runs = study["runs"]
    tasks = [t for t in TASKS if all(t in r["tasks"] for r in runs)]
    seeded = _groups(runs)
    lines = _header(study, tasks)
    for section in (_loss, _accuracy, _answer_loss, _facts, _needle):
        lines += section(study, tasks)
    lines += _seed_spread(seeded, tasks)
    lines += _versus_moe(seeded, tasks)
    lines += _ablations(study, tasks)
    lines += _ablation_seed_table(seeded, tasks)
    lines += _gap_table(study, tasks)
    lines += _retrieval_table(runs)
    if study.get("plots"):
        lines += ["Plots: `" + study["plots"][0] + "` (loss curves), `" + study["plots"][1]
                  + "` (per-task accuracy)."]
    return "\n".join(lines + [""])


def _header(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Title, what the study is, the command, commit, settings and time."""
    cfg, runs = study["config"], study["runs"]
    lines: list[str] = []
    lines += [f"# Study: the `{cfg['family']}` family", ""]
    if cfg.get("corpus"):
        lines += [f"Trained on the `{cfg['corpus']}` corpus (`ultramem.data.corpus`) mixed with "
                  f"the task documents ({cfg['task_share']:.0%} of the characters); held-out "
                  "loss and bits per byte are measured on the corpus's held-out split, which no "
                  "run trains on.", ""]
    lines += ["Every architecture of the matched preset family (equal activated parameters, equal",
              "total within 3%, dense: activated only) trained on the same data, steps and seed,",
              "then evaluated. Generated by `ultramem study`; numbers are from this one run.", ""]
    if cfg.get("seeds", 1) > 1:
        lines += [f"Runs named `<run>@seed<s>` repeat `<run>` with training seed s (init and "
                  f"batch order); data and evaluation examples are those of seed {cfg['seed']}. "
                  "Their spread is the run-to-run noise the comparisons are judged against.", ""]
    lines += ["```", study["config"].get("command") or "ultramem study", "```", ""]
    if study.get("not_run"):
        lines += [f"**Partial report**: {len(runs)} of {len(runs) + len(study['not_run'])} "
                  f"runs of the plan have finished. Not finished yet: "
                  f"{', '.join(study['not_run'])}.", ""]
    hours = {r["name"]: (r.get("train_seconds_logged", r.get("train_seconds", 0.0))
                         + r.get("seconds", 0.0)) / 3600 for r in runs}
    run_hours = sum(hours.values())
    cpu = _cpu_hours(runs, hours)
    trained = Counter(f"`{r['commit']}`" if r.get("commit") else "not recorded" for r in runs)
    lines += [f"- commit `{study['commit']}`, Python {study['python']}, torch {study['torch']}, "
              f"{study['threads']} CPU thread(s) in this command",
              "- runs trained (finished) at commit: " + ", ".join(
                  f"{c} ({n} run{'s' if n > 1 else ''})" for c, n in trained.items()),
              f"- {cfg['steps']} steps x batch {cfg['batch_size']} x seq_len "
              f"{cfg['seq_len'] or 'max_seq_len'}, lr {cfg['lr']}, seed {cfg['seed']}; data: "
              f"{study['data']['train_tokens']:,} train tokens ({study['data']['tokenizer']}, "
              f"vocabulary {study['data']['vocab_size']})",
              f"- wall time {study['wall_seconds'] / 60:.1f} min for this command; the runs' own "
              f"training and evaluation: {run_hours:.1f} h (training summed from each run's "
              f"log over all the processes it took; a run with a matching eval.json is reused, "
              f"not retrained){cpu}; task examples per task: {cfg['n_examples']} (task size "
              f"`{cfg['task_size'] or cfg['family']}`)", ""]
    return lines


def _cpu_hours(runs: list[dict[str, Any]], hours: dict[str, float]) -> str:
    """'; CPU: at most X CPU-hours ...' from each run's hours and recorded thread count; '' when
    no run recorded its threads."""
    known = [r for r in runs if r.get("threads")]
    if not known:
        return ""
    said = (f"; CPU: at most {sum(hours[r['name']] * r['threads'] for r in known):.1f} "
            "CPU-hours (each run's hours x its threads)")
    if len(known) < len(runs):
        said += f", thread count not recorded for {len(runs) - len(known)} run(s)"
    return said


def _loss(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Train, validation and held-out loss of every run."""
    runs = study["runs"]
    lines: list[str] = []
    corpus = study["config"].get("corpus")
    held = (f"the `{corpus}` corpus's held-out split, which no run trains on "
            "(`ultramem.data.corpus`)" if corpus else
            "standard-library docstrings of modules never trained on (`ultramem.tasks.text`)")
    lines += ["## Loss", "", f"Held-out text: {held}; held-out loss in nats per token. "
              "Validation: the 5% of the training mix held out.", ""]
    rows = []
    for r in runs:
        val = r.get("val_loss")
        rows.append([r["name"], _m(r["params"]["active"]), _m(r["params"]["total"]),
                     f"{r['final_loss']:.3f}", "-" if val is None else f"{val:.3f}",
                     f"{r['text']['loss']:.3f}", f"{r['text']['bits_per_byte']:.3f}",
                     f"{r['seconds_per_step']:.2f}"])
    lines += _table(["run", "active", "total", "train loss", "val loss", "held-out loss",
                     "held-out bpb", "s/step"], rows)
    return lines


def _accuracy(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Task accuracy of every run."""
    runs = study["runs"]
    lines: list[str] = []
    lines += ["## Task accuracy (%)", "", "Exact match of the greedy answer (teacher-forced; "
              "`ultramem.eval.task_eval`). The fact world asks each fact in a phrasing held out "
              "for it.", ""]
    rows = [[r["name"]] + [_pct(r["tasks"][t]["accuracy"]) for t in tasks]
            + [_pct(_long_context_accuracy(r, tasks))]
            for r in runs]
    lines += _table(["run"] + tasks + ["mean of 7"], rows)
    return lines


def _answer_loss(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Answer loss of every run."""
    runs = study["runs"]
    lines: list[str] = []
    lines += ["## Answer loss (nats per answer token)", "",
              "Lower is better; more sensitive than accuracy when accuracies are near 0.", ""]
    rows = [[r["name"]] + [f"{r['tasks'][t]['answer_nll']:.3f}" for t in tasks] for r in runs]
    lines += _table(["run"] + tasks, rows)
    return lines


def _facts(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Facts recalled and bits stored (the fact world)."""
    runs = study["runs"]
    lines: list[str] = []
    if "facts" in tasks:
        lines += ["## Parametric memory (fact world)", ""]
        rows = []
        for r in runs:
            f = r["tasks"]["facts"]
            rows.append([r["name"], f"{f['recalled']}/{f['facts']}", f"{f['bits_stored']:.0f}",
                         f"{f['bits_per_param']:.2e}", f"{f['bits_per_active_param']:.2e}"])
        lines += _table(["run", "facts recalled", "bits stored", "bits / param",
                         "bits / active param"], rows)
    return lines


def _needle(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """Needle accuracy by depth."""
    runs = study["runs"]
    lines: list[str] = []
    if "needle" in tasks:
        groups = sorted({g for r in runs for g in r["tasks"]["needle"].get("by_group", {})})
        if groups:
            lines += ["## Needle accuracy by depth (%)", ""]
            rows = [[r["name"]] + [_pct(r["tasks"]["needle"]["by_group"].get(g, 0.0))
                                   for g in groups] for r in runs]
            lines += _table(["run"] + groups, rows)
    return lines


def _seed_spread(seeded: dict[str, list[dict[str, Any]]], tasks: list[str]) -> list[str]:
    """Each run repeated over seeds: its spread."""
    lines: list[str] = []
    spread = {name: rs for name, rs in seeded.items() if len(rs) > 1}
    if spread:
        lines += ["## Seed spread", "", "Each run and its repeats over training seeds: the "
                  "spread (max - min) is the noise of one training run at these settings.", ""]
        rows = []
        for name, rs in spread.items():
            bpb = [r["text"]["bits_per_byte"] for r in rs]
            loss = [r["text"]["loss"] for r in rs]
            acc = [100 * _long_context_accuracy(r, tasks) for r in rs]
            facts = [str(r["tasks"]["facts"]["recalled"]) for r in rs if "facts" in r["tasks"]]
            rows.append([name, str(len(rs)), " / ".join(f"{x:.4f}" for x in loss),
                         f"{max(loss) - min(loss):.4f}", " / ".join(f"{b:.3f}" for b in bpb),
                         f"{max(bpb) - min(bpb):.3f}", " / ".join(f"{a:.1f}" for a in acc),
                         f"{max(acc) - min(acc):.1f}", " / ".join(facts) or "-"])
        lines += _table(["run", "seeds", "held-out loss", "spread", "held-out bpb", "spread",
                         MEAN_ACC, "spread", "facts recalled"], rows)
    return lines


def _versus_moe(seeded: dict[str, list[dict[str, Any]]], tasks: list[str]) -> list[str]:
    """UltraMemV2 against MoE (over seeds where repeated), next to the paper."""
    lines: list[str] = []
    if "ultramem_v2" in seeded and "moe" in seeded:
        us, ms = seeded["ultramem_v2"], seeded["moe"]
        seeds = len(us) > 1 or len(ms) > 1
        lines += ["## UltraMemV2 vs MoE", "", "Ours at this scale next to the paper's Table 2 "
                  "(32K context, proprietary suite, 'paper' columns). Task rows: accuracy (%); "
                  "held-out loss (nats/token), bpb and answer-loss rows: lower is better."
                  + (f" Mean over seeds (UltraMemV2 {len(us)}, MoE {len(ms)}), range in "
                     "brackets; a side is called better only when the two seed ranges do not "
                     "overlap." if seeds else ""), ""]
        rows = []
        u_rows, m_rows = _metric_rows(us, tasks), _metric_rows(ms, tasks)
        for metric, (u_vals, lower) in u_rows.items():
            m_vals = m_rows[metric][0]
            digits = 1 if metric in tasks else 4 if metric == "held-out loss" else 3
            pu, pm = PAPER_TABLE2.get(metric, (None, None))
            rows.append([metric, _fmt(u_vals, digits), _fmt(m_vals, digits),
                         _compare(u_vals, m_vals, lower),
                         "-" if pu is None else f"{pu}", "-" if pm is None else f"{pm}"])
        lines += _table(["metric", "UltraMemV2", "MoE", "better", "paper UMv2", "paper MoE"],
                        rows)
        loss_u, loss_m = u_rows["held-out loss"][0], m_rows["held-out loss"][0]
        lines += [f"**The held-out loss claim**: {loss_claim(loss_u, loss_m)}", ""]
        ablations = [f"- {loss_claim([r['text']['loss'] for r in rs], loss_m, (f'`{n}`', 'MoE'))}"
                     for n, rs in seeded.items() if n.startswith("ultramem_v2+") and len(rs) > 1]
        if ablations:  # UltraMemV2 ablations repeated over seeds, against the MoE too
            lines += ablations + [""]
        wins = [r[0] for r in rows if r[3] == "UltraMemV2"]
        losses = [r[0] for r in rows if r[3] == "MoE"]
        ties = [r[0] for r in rows if r[3] == "tie"]
        noise = [r[0] for r in rows if r[3] == "within seed noise"]
        lines += [f"UltraMemV2 is better on {len(wins)} of {len(rows)} rows"
                  + (f" ({', '.join(wins)})" if wins else "")
                  + f", worse on {len(losses)}" + (f" ({', '.join(losses)})" if losses else "")
                  + (f", tied on {len(ties)} ({', '.join(ties)})" if ties else "")
                  + (f", within seed noise on {len(noise)}" if noise else "") + "."]
        low = [t for t in tasks if max(u_rows[t][0] + m_rows[t][0]) < 5]
        if low:
            lines += [f"Both score under 5% on {', '.join(low)}: there the accuracy difference "
                      "is noise at this scale and step count; the answer-loss rows are the "
                      "more sensitive comparison."]
        if not seeds:
            lines += ["One seed per run: differences of a few hundredths of a nat or a few "
                      "percent are within run-to-run noise (`--seeds` measures it)."]
        lines.append("")
    return lines


def _ablations(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """The ablations of UltraMemV2 at the study's seed."""
    runs = study["runs"]
    by = {r["name"]: r for r in runs}
    lines: list[str] = []
    abl = [r for r in runs if "+" in r["name"]]
    if abl and "ultramem_v2" in by:
        base = by["ultramem_v2"]
        lines += ["## Ablations of UltraMemV2", ""]
        for name in dict.fromkeys(base_name(r["name"]) for r in abl):
            lines.append(f"- `{name}`: {ABLATIONS[name.split('+', 1)[1]]}")
        lines.append("")
        rows = []
        for r in [base] + abl:
            m = _ablation_metrics(r, tasks)
            rows.append([r["name"], _m(r["params"]["total"]), f"{r['final_loss']:.3f}",
                         f"{m['held-out bpb'][0]:.3f}", f"{m[MEAN_ACC][0]:.1f}",
                         f"{m[MEAN_NLL][0]:.3f}",
                         f"{m['facts recalled'][0]:.0f}" if "facts recalled" in m else "-"])
        lines += _table(["run", "total", "train loss", "held-out bpb", MEAN_ACC, MEAN_NLL,
                         "facts recalled"], rows)
    return lines


def _ablation_metrics(r: dict[str, Any], tasks: list[str]) -> dict[str, tuple[float, bool]]:
    """metric -> (value, lower is better) of one run, for the ablation-over-seeds table."""
    out = {"val loss": (r.get("val_loss") or float("nan"), True),
           "held-out bpb": (r["text"]["bits_per_byte"], True),
           MEAN_ACC: (100 * _long_context_accuracy(r, tasks), False),
           MEAN_NLL: (_long_context_mean(r, tasks, "answer_nll"), True)}
    if "facts" in tasks:
        out["facts recalled"] = (float(r["tasks"]["facts"]["recalled"]), False)
    if "retrieval" in r:
        out["pre-selection recall"] = (r["retrieval"]["preselect_recall"], False)
    return out


def _ablation_seed_table(seeded: dict[str, list[dict[str, Any]]], tasks: list[str]) -> list[str]:
    """Each UltraMemV2 ablation repeated over seeds against UltraMemV2 over the same seeds."""
    base = seeded.get("ultramem_v2", [])
    abl = {name: rs for name, rs in seeded.items() if name.startswith("ultramem_v2+")
           and len(rs) > 1}
    if len(base) < 2 or not abl:
        return []
    lines = ["## Ablations over seeds", "",
             f"Mean over training seeds, range in brackets (UltraMemV2: {len(base)} seeds). A "
             "side is called better only when the two seed ranges do not overlap.", ""]
    header = ["ablation", "metric", "UltraMemV2", "ablation value", "better"]
    rows = []
    base_m = [_ablation_metrics(r, tasks) for r in base]
    for name, rs in abl.items():
        abl_m = [_ablation_metrics(r, tasks) for r in rs]
        for metric, (_, lower) in base_m[0].items():
            if not all(metric in m for m in abl_m):
                continue
            b = [m[metric][0] for m in base_m]
            a = [m[metric][0] for m in abl_m]
            digits = 1 if metric in (MEAN_ACC, "facts recalled") else 3
            verdict = _compare(a, b, lower, names=("ablation", "UltraMemV2"))
            rows.append([f"`{name.split('+', 1)[1]}` ({len(rs)})", metric, _fmt(b, digits),
                         _fmt(a, digits), verdict])
    return lines + _table(header, rows)


def _retrieval_table(runs: list[dict[str, Any]]) -> list[str]:
    """Pre-selection recall of every run with UltraMemV2 layers (`eval.run.retrieval_metrics`)."""
    with_r = [r for r in runs if "retrieval" in r]
    if not with_r:
        return []
    tokens = with_r[0]["retrieval"]["tokens"]
    lines = ["## Retrieval recall", "",
             f"Share of the exact top-m cells (brute force over all n^2 grid scores) that "
             f"retrieval returns, on the first {tokens} tokens of the held-out text, per "
             "memory layer; (-,-): share of the exact top-m whose rank-1 row and column factors "
             "are both negative (`ultramem.diagnostics.preselect_recall`).", ""]
    rows = [[r["name"], f"{r['retrieval']['preselect_recall']:.3f}",
             " ".join(f"{x:.2f}" for x in r["retrieval"]["per_layer"]),
             f"{r['retrieval']['neg_quadrant_share']:.3f}"] for r in with_r]
    return lines + _table(["run", "recall", "per layer", "(-,-) share"], rows)


def _winner(a: float, b: float, lower: bool = False,
            names: tuple[str, str] = ("UltraMemV2", "MoE")) -> str:
    if a == b:
        return "tie"
    return names[0] if (a < b) == lower else names[1]


SMOOTH_POINTS = 50  # the training-loss plot averages about len(log) / this logged steps


def moving_mean(values: list[float], window: int) -> list[float]:
    """The trailing mean of values over `window` entries (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _same_seed_moe(name: str) -> str:
    """The MoE run trained with run `name`'s seed ('ultramem_v2@seed1' -> 'moe@seed1')."""
    return "moe" + name[len(base_name(name)):]


def train_losses(logged: list[dict[str, Any]]) -> dict[int, float]:
    """step -> training loss of a run's metrics log (skipped steps left out)."""
    return {m["step"]: m["loss"] for m in logged if "loss" in m and not m.get("skipped")}


def paired_curve(mine: dict[int, float], theirs: dict[int, float]
                 ) -> tuple[list[int], list[float], int, list[float]]:
    """The steps both runs logged, the difference mine - theirs there, the trailing-mean window
    and the smoothed difference (the curve the loss plot draws)."""
    steps = sorted(set(mine) & set(theirs))
    diff = [mine[k] - theirs[k] for k in steps]
    window = max(1, len(steps) // SMOOTH_POINTS)
    return steps, diff, window, moving_mean(diff, window)


def paired_gap(mine: dict[int, float], theirs: dict[int, float],
               parts: int = 4) -> dict[str, Any] | None:
    """How a run's training loss compares with another's on the same batches, summarized: the
    paired difference mine - theirs (negative: mine is lower), smoothed like the loss plot, at
    its lowest (`lead`, `lead_step`), the last logged step where it is below 0 (None if never),
    and its plain mean over each of `parts` equal step ranges of the steps both logged."""
    steps, diff, window, smooth = paired_curve(mine, theirs)
    if not steps:
        return None
    low = min(range(len(steps)), key=smooth.__getitem__)
    behind = [k for k, d in zip(steps, smooth, strict=True) if d < 0]
    edges = [steps[0] + (steps[-1] - steps[0] + 1) * i / parts for i in range(parts + 1)]
    means = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        part = [d for k, d in zip(steps, diff, strict=True) if lo <= k < hi]
        means.append(sum(part) / len(part) if part else None)
    return {"window": window, "lead": smooth[low],
            "lead_step": steps[low], "last_ahead_step": behind[-1] if behind else None,
            "part_means": means, "first_step": steps[0], "last_step": steps[-1]}


def paired_gaps(losses: dict[str, dict[int, float]]) -> dict[str, dict[str, Any]]:
    """paired_gap of every run (the MoE runs aside) against the MoE of its seed, from each
    run's `train_losses` (in run order): {run name: {"vs": MoE run name, **paired_gap}}."""
    out = {}
    for name, mine in losses.items():
        moe = _same_seed_moe(name)
        if base_name(name) == "moe" or moe not in losses:
            continue
        gap = paired_gap(mine, losses[moe])
        if gap is not None:
            out[name] = {"vs": moe, **gap}
    return out


def _gap_table(study: dict[str, Any], tasks: list[str]) -> list[str]:
    """The paired training-loss gaps of `paired_gaps` (in study["paired_gaps"])."""
    gaps = study.get("paired_gaps") or {}
    if not gaps:
        return []
    parts = len(next(iter(gaps.values()))["part_means"])
    lines = ["## Training loss against the MoE of the same seed", "",
             "The run's training loss minus the MoE's on the very same batches (paired: the "
             "batch-to-batch swings both share cancel; negative: the run is ahead). Largest "
             "lead: the lowest point of the trailing mean the loss plot draws; last step "
             f"ahead: the last logged step where that mean is below 0; then the plain mean of "
             f"the difference over each {_ordinal(parts)} of the steps both runs logged.", ""]
    rows = []
    for name, g in gaps.items():
        rows.append([name, g["vs"], f"{g['lead']:+.3f} (step {g['lead_step']})",
                     "never" if g["last_ahead_step"] is None else str(g["last_ahead_step"]),
                     *("-" if m is None else f"{m:+.3f}" for m in g["part_means"])])
    lines += _table(["run", "against", "largest lead", "last step ahead",
                     *(f"mean, {_ordinal(parts)} {i + 1}" for i in range(parts))], rows)
    return lines


def _ordinal(parts: int) -> str:
    return {2: "half", 3: "third", 4: "quarter", 5: "fifth"}.get(parts, f"1/{parts}")


def plots(study: dict[str, Any], out: Path, logs: dict[str, list[dict[str, Any]]],
          losses: dict[str, dict[int, float]]) -> list[Path]:
    """Loss curves of every run (logs: run name -> its metrics log; losses: its
    `train_losses`), the paired differences of study["paired_gaps"], and per-task accuracy
    bars; [] without matplotlib."""
    from ultramem.plots import pyplot

    plt = pyplot()
    if plt is None:
        return []
    family = study.get("name", study["config"]["family"])
    runs = study["runs"]
    # One colour per run, shared by its seed repeats (dotted lines, hatched bars).
    bases = list(dict.fromkeys(base_name(r["name"]) for r in runs))
    cmap = plt.get_cmap("tab10" if len(bases) <= 10 else "tab20")
    color = {b: cmap(i % cmap.N) for i, b in enumerate(bases)}
    loss_png, task_png = out / f"{family}_loss.png", out / f"{family}_tasks.png"
    # Each run against the MoE of its seed, which trained on the very same batches: the paired
    # difference removes the batch-to-batch swings both curves share.
    pairs = {name: gap["vs"] for name, gap in study.get("paired_gaps", {}).items()}
    # Left: the loss of each logged training batch; middle: the held-out validation loss;
    # right (when there is an MoE run): the paired difference.
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(18 if pairs else 12, 4.5))
    ax, ax_val = axes[0], axes[1]
    windows: set[int] = set()
    for r in runs:
        logged = logs[r["name"]]
        style = {"color": color[base_name(r["name"])],
                 "linestyle": ":" if "@" in r["name"] else "--" if "+" in r["name"] else "-"}
        rows = [m for m in logged if "loss" in m and not m.get("skipped")]
        if rows:
            window = max(1, len(rows) // SMOOTH_POINTS)
            windows.add(window)
            ax.plot([m["step"] for m in rows], moving_mean([m["loss"] for m in rows], window),
                    label=r["name"], **style)
        val = [m for m in logged if "eval_loss" in m]
        if val:
            ax_val.plot([m["step"] for m in val], [m["eval_loss"] for m in val], marker=".",
                        label=r["name"], **style)
        if r["name"] in pairs:
            steps, _, _, smooth = paired_curve(losses[r["name"]], losses[pairs[r["name"]]])
            axes[2].plot(steps, smooth, label=f"{r['name']} - {pairs[r['name']]}", **style)
    if pairs:
        axes[2].axhline(0.0, color="grey", linewidth=0.8)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("train loss difference (nats/token)")
        axes[2].set_title("minus the MoE of the same seed (same batches)", fontsize=10)
        axes[2].legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(f"{family} family: training loss" + (
        f" (trailing mean of {'/'.join(map(str, sorted(windows)))} logged steps)"
        if windows - {1} else ""), fontsize=10)
    ax_val.set_xlabel("step")
    ax_val.set_ylabel("validation loss (nats/token)")
    ax_val.set_title("validation loss")
    ax_val.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    tasks = [t for t in TASKS if all(t in r["tasks"] for r in runs)]
    fig, ax = plt.subplots(figsize=(max(9, len(tasks) * 1.5), 4.5))
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [100 * r["tasks"][t]["accuracy"] for t in tasks], width, label=r["name"],
               color=color[base_name(r["name"])], hatch="///" if "@" in r["name"] else None,
               edgecolor="white" if "@" in r["name"] else None, linewidth=0)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20,
                  fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{family} family: task accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(task_png, dpi=110)
    plt.close(fig)
    return [loss_png, task_png]


def write_report(study: dict[str, Any], out: Path, work: Path) -> list[Path]:
    """Write <family>.md, <family>.json and the plots into out; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    family = study.get("name", study["config"]["family"])
    from ultramem.train.metrics import read_metrics

    logs = {r["name"]: read_metrics(run_dir(work, r["name"])) for r in study["runs"]}
    losses = {name: train_losses(log) for name, log in logs.items()}
    study["paired_gaps"] = paired_gaps(losses)
    pngs = plots(study, out, logs, losses)
    study["plots"] = [p.name for p in pngs]
    md, js = out / f"{family}.md", out / f"{family}.json"
    md.write_text(markdown(study))
    js.write_text(json.dumps(study, indent=2))
    return [md, js, *pngs]
