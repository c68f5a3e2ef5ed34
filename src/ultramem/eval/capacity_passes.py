"""Bits stored against passes over the facts: the same capacity run (architecture, size, world and
every setting but the number of epochs) trained for different numbers of passes, gathered from the
`capacity.json` of several `ultramem capacity` reports.

One schedule's own learning curve cannot show saturation (its learning rate decays at its end, so
it always flattens); the same model trained for twice the passes can. A run that stores under
LEVELLED more bits with twice the passes is called "at capacity" here. Every figure comes from
the reports' run rows; `ultramem capacity-passes` writes passes.md, passes.json and passes.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ultramem.eval.capacity_report import _k
from ultramem.eval.report import _table

LEVELLED = 0.05  # under 5% more bits per doubling of the passes: at capacity
REFERENCE = "moe"  # the architecture every other is compared with, at the same size and passes


def _same_run(run: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(key, settings without the pass count): runs with one key differ only in their passes."""
    settings = {k: v for k, v in run["settings"].items() if k not in ("epochs", "measure_every")}
    return json.dumps({"name": run["name"], **settings}, sort_keys=True), settings


def _backbone(settings: dict[str, Any]) -> str:
    """Settings that make two architectures comparable (the table's learning rate aside: models
    without tables do not record it)."""
    return json.dumps({k: v for k, v in settings.items() if k != "value_lr_scale"},
                      sort_keys=True)


def gain_per_doubling(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Relative gain in bits from point a to point b (more epochs), per doubling of the passes."""
    doublings = math.log2(b["epochs"] / a["epochs"])
    return (b["bits"] / max(a["bits"], 1e-9)) ** (1 / doublings) - 1


def verdict(row: dict[str, Any]) -> str:
    """'world filled' (>= 99% of the world: capacity not measured), 'at capacity' (the last
    step added under LEVELLED per doubling), 'still rising' (it added more, over at most one
    doubling), or 'not shown' (it added more, over a longer step)."""
    last = row["points"][-1]
    if last["bits"] >= 0.99 * row["world_bits"]:
        return "world filled"
    if row["last_gain"] < LEVELLED:
        return "at capacity"
    a, b = row["points"][-2:]
    # Bits grow ever slower with passes, so a step longer than one doubling averages in the
    # faster early gains: its rate bounds the last doubling's from above, and shows nothing
    # when it is over LEVELLED.
    return "still rising" if b["epochs"] <= 2 * a["epochs"] else "not shown (last step > 2x)"


def ceiling(points: list[dict[str, Any]], world_bits: float) -> dict[str, Any] | None:
    """Where the bits would end if each further doubling of the passes added `shrink` times what
    the last one added (a geometric series; an extrapolation, not a measurement): from the last
    three points, when both steps are one doubling each. None when there are no such points or
    the gains are not shrinking (no finite ceiling on this evidence); capped at the world."""
    if len(points) < 3:
        return None
    a, b, c = points[-3:]
    if b["epochs"] != 2 * a["epochs"] or c["epochs"] != 2 * b["epochs"]:
        return None
    before, last = b["bits"] - a["bits"], max(c["bits"] - b["bits"], 0.0)  # a loss adds nothing
    if before <= 0 or last >= before:
        return None
    shrink = last / before
    bits = min(c["bits"] + last * shrink / (1 - shrink), world_bits)
    return {"shrink": shrink, "bits": bits, "capped": bits == world_bits,
            "to_go": bits / c["bits"] - 1}


def collect(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rows of the runs that appear at two or more pass counts among reports ((label, the
    report's JSON) pairs, in the order given). Where two reports hold the same run at the same
    passes, the first is used and the other listed under 'also'."""
    groups: dict[str, dict[str, Any]] = {}
    for label, result in reports:
        for run in result["runs"]:
            key, settings = _same_run(run)
            group = groups.setdefault(key, {
                "name": run["name"], "arch": run["arch"], "multiple": run["multiple"],
                "total_params": run["total_params"], "active_params": run["active_params"],
                "world_bits": run["world_bits"], "settings": settings, "points": [],
                "also": []})
            point = {"epochs": run["settings"]["epochs"], "bits": run["bits"],
                     "bits_per_total": run["bits_per_total"],
                     "bits_per_active": run["bits_per_active"],
                     "recalled": run["recalled"] / run["n_facts"],
                     "cpu_seconds": run["cpu_seconds"], "curve": run["curve"],
                     "report": label, "commit": result["commit"]}
            if any(p["epochs"] == point["epochs"] for p in group["points"]):
                group["also"].append({k: point[k] for k in ("epochs", "bits", "report")})
            else:
                group["points"].append(point)
    rows = [g for g in groups.values() if len(g["points"]) >= 2]
    for row in rows:
        row["points"].sort(key=lambda p: p["epochs"])
        pts = row["points"]
        row["gains"] = [gain_per_doubling(a, b) for a, b in zip(pts, pts[1:], strict=False)]
        row["last_gain"] = row["gains"][-1]
        row["verdict"] = verdict(row)
        row["ceiling"] = ceiling(pts, row["world_bits"])
    for row in rows:  # bits over the reference architecture's at the same size and passes
        ref = next((r for r in rows if r["arch"] == REFERENCE and r is not row
                    and r["multiple"] == row["multiple"]
                    and _backbone(r["settings"]) == _backbone(row["settings"])), None)
        by_epochs = {p["epochs"]: p["bits"] for p in ref["points"]} if ref else {}
        row["over_reference"] = {p["epochs"]: p["bits"] / by_epochs[p["epochs"]]
                                 for p in row["points"] if p["epochs"] in by_epochs}
        row["ceiling_over_reference"] = (
            row["ceiling"]["bits"] / ref["ceiling"]["bits"]
            if ref and row["ceiling"] and ref["ceiling"] else None)
    rows.sort(key=lambda r: (r["multiple"], r["arch"] != REFERENCE, r["arch"]))
    return {"rows": rows, "reports": [{"report": label, "commit": result["commit"],
                                       "command": result["config"].get("command", "")}
                                      for label, result in reports]}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    passes = sorted({p["epochs"] for r in rows for p in r["points"]})
    lines = [
        "# Knowledge capacity against passes over the facts",
        "",
        f"Generated by `{result['command']}` at commit `{result['commit']}` from the runs of "
        "these `ultramem capacity` reports (each names its own command and commit):",
        "",
    ]
    lines += [f"- `{r['report']}` (commit `{r['commit']}`)" for r in result["reports"]]
    lines += [
        "",
        "A row is one model (architecture, size, fact world and every training setting but the "
        "number of passes) trained from scratch once per number of passes, each run with its own "
        "warmup and cosine schedule. A cell is the bits stored at the end of that run, with bits "
        "per total parameter in brackets. 'per doubling' is each step's gain in bits per "
        "doubling of the passes; a model is 'at capacity' when the last step's is under "
        f"{LEVELLED:.0%}, 'still rising' when it is more over at most one doubling (over a "
        "longer step the average includes the faster early gains, so it shows nothing), "
        "'world filled' when it stores 99% of the world's bits (its capacity "
        "is then not measured).",
        "",
    ]
    table = []
    for r in rows:
        cells = {p["epochs"]: f"{_k(p['bits'])} ({p['bits_per_total']:.2f})"
                 for p in r["points"]}
        table.append([r["name"], f"{r['total_params']:,}", f"{r['active_params']:,}"]
                     + [cells.get(e, "") for e in passes]
                     + [" -> ".join(f"{g:+.1%}" for g in r["gains"]), r["verdict"]])
    lines += _table(["run", "total params", "active params"]
                    + [f"{e} passes" for e in passes] + ["per doubling", "verdict"], table)
    compared = [r for r in rows if r["over_reference"]]
    if compared:
        lines += ["", f"Bits stored over those of `{REFERENCE}` at the same size and passes:",
                  ""]
        lines += _table(["run"] + [f"{e} passes" for e in passes],
                        [[r["name"]] + [f"{r['over_reference'][e]:.2f}"
                                        if e in r["over_reference"] else "" for e in passes]
                         for r in compared])
    extrapolated = [r for r in rows if r["ceiling"]]
    if extrapolated:
        lines += [
            "", "Extrapolated ceiling (not measured): where the bits would end if every further "
            "doubling of the passes added the same fraction ('shrink') of the previous "
            "doubling's gain as the last did over the one before (a geometric series from the "
            "last three points; the nearer 'shrink' is to 1, the less the figure means). Rows "
            "whose gains are not shrinking have no finite ceiling on this evidence and are left "
            "out.", ""]
        lines += _table(
            ["run", "shrink", "ceiling bits", "per total param", "above the last run",
             f"over `{REFERENCE}`'s"],
            [[r["name"], f"{r['ceiling']['shrink']:.2f}",
              _k(r["ceiling"]["bits"]) + (" (the world)" if r["ceiling"]["capped"] else ""),
              f"{r['ceiling']['bits'] / r['total_params']:.2f}",
              f"{r['ceiling']['to_go']:+.0%}",
              f"{r['ceiling_over_reference']:.2f}" if r["ceiling_over_reference"] else ""]
             for r in extrapolated])
    also = [(r["name"], a) for r in rows for a in r["also"]]
    if also:
        lines += ["", "Also in these reports, the same run at the same passes (the first report "
                  "listed is the one used above): "
                  + "; ".join(f"{name} at {a['epochs']} passes in `{a['report']}`: "
                              f"{_k(a['bits'])} bits" for name, a in also) + "."]
    lines += ["", "![bits stored against passes](passes.png)", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    from ultramem.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        pts = r["points"]
        line, = axes[0].plot([p["epochs"] for p in pts], [p["bits"] for p in pts], "o-",
                             label=r["name"])
        for i, p in enumerate(pts):  # each run's own curve, the longest darkest
            axes[1].plot([c["epoch"] for c in p["curve"]], [c["bits"] for c in p["curve"]], "-",
                         color=line.get_color(), alpha=0.35 + 0.65 * (i + 1) / len(pts),
                         label=r["name"] if i == len(pts) - 1 else None)
    world = rows[0]["world_bits"]
    for ax in axes:
        ax.axhline(world, color="grey", lw=1, ls=":", label="every fact")
        ax.set_ylabel("bits stored")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    passes = sorted({p["epochs"] for r in rows for p in r["points"]})
    axes[0].set_xticks(passes, [str(e) for e in passes])
    axes[0].minorticks_off()
    axes[0].set_xlabel("passes over the facts (one run per point)")
    axes[0].set_title("bits stored at the end of each run")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("during each run (longer runs darker)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_report(path: Path) -> dict[str, Any]:
    """A capacity report's JSON from its directory or file; ValueError naming the path if it is
    not one."""
    file = path / "capacity.json" if path.is_dir() else path
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no capacity.json (give an `ultramem capacity` --out "
                         "directory or its capacity.json)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not JSON ({err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("runs"), list):
        raise ValueError(f"{file}: not an `ultramem capacity` report (no 'runs' list)")
    return result


def capacity_passes(paths: list[str], out: Path, command: str) -> dict[str, Any]:
    """Collect the runs of the reports at paths and write passes.md/.json/.png into out."""
    from ultramem.eval.study import git_commit
    from ultramem.files import atomic_write_text

    result = collect([(p, load_report(Path(p))) for p in paths])
    if not result["rows"]:
        raise ValueError("no run of these reports appears at two or more numbers of passes "
                         "(the same architecture, size and settings but --epochs)")
    result = {"command": command, "commit": git_commit(), **result}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "passes.md", markdown(result))
    atomic_write_text(out / "passes.json", json.dumps(result, indent=1))
    png = plot(result, out / "passes.png")
    result["files"] = [str(out / "passes.md"), str(out / "passes.json")] + (
        [str(png)] if png else [])
    return result


__all__ = ["LEVELLED", "capacity_passes", "ceiling", "collect", "gain_per_doubling", "load_report",
           "markdown", "plot", "verdict"]
