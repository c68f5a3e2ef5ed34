"""Serve an UltraMemV2 model far larger than memory from disk: tokens/s cold and warm, RSS, reads.

1. `ultramem init --preset umv2-227m-20b --out WORK/model` writes the model (20.0B table
   parameters as int8 row files, one per layer, plus the dense weights), timed.
2. Per batch size, one fresh process: the model's files are dropped from the page cache
   (posix_fadvise DONTNEED), it loads the model (tables memory-mapped, dense weights cast by
   `prepare_for_serving(--dtype)`) and greedily decodes --new tokens after a --prompt-len-token
   prompt, twice: cold (rows read from disk as they are met) and warm (the same prompt again:
   the same rows, now in the page cache). Reported: load time, prefill and decode tokens/s,
   bytes read from disk (/proc/self/io read_bytes) per decoded token beside the cost model's
   `accounting.decode_bytes(cfg, B, 1)["sparse"] / B` (int8 row bytes), peak RSS (VmHWM, which
   counts the mapped table pages touched) and the anonymous (non-file) part of RSS at the end.
3. `ultramem generate` on the model, as a user runs it, timed.
4. WORK is deleted unless --keep.

    nice -n 10 python benchmarks/serve_disk.py     # table + runs/benchmarks/serve_disk.json
    python benchmarks/serve_disk.py --plan         # what this machine and 120B need (arithmetic)

It refuses to start when the model would leave less than --min-free-gb on the disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def drop_cache(model_dir: Path) -> None:
    for f in model_dir.rglob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def record_rows(model) -> list[list]:
    """Make every memory layer's table source keep the rows it reads (one list per layer)."""
    seen: list[list] = []
    for layer in model.memory_layers():
        src, log = layer.table_source, []
        seen.append(log)

        def read(rows, scores, xp, _read=src.read, _log=log):
            _log.append(rows.reshape(-1).cpu())
            return _read(rows, scores, xp)

        src.read = read
    return seen


def decode(model, prompt, stream, seen: list[list]) -> dict:
    """Prefill prompt [B, P], then one decode step per column of stream [B, new] with a KV
    cache: the next input is stream's token, not the model's choice (an untrained model's
    greedy continuation repeats one token, so it would re-read the same rows and flatter the
    cold figures); argmax tokens are kept for the checksum. Times, disk reads and distinct
    table rows read by the decode steps."""
    import torch

    from ultramem.model import KVCache

    (b, new), picks = stream.shape, model.cfg.memory.top_m
    cache = KVCache.for_model(model, b, capacity=prompt.shape[1] + new)
    r0, t0 = read_bytes(), time.perf_counter()
    with torch.no_grad():
        logits, _ = model(prompt, cache=cache)
        r1, t1 = read_bytes(), time.perf_counter()
        for log in seen:
            log.clear()
        chosen = [logits[:, -1].argmax(-1)]
        for i in range(new):
            logits, _ = model(stream[:, i : i + 1], cache=cache)
            chosen.append(logits[:, -1].argmax(-1))
    r2, t2 = read_bytes(), time.perf_counter()
    distinct = sum(int(torch.cat(log).unique().numel()) for log in seen if log)
    out = torch.stack(chosen, 1)
    return {"prefill_s": t1 - t0, "prefill_read_bytes": r1 - r0,
            "prefill_tokens_per_s": prompt.numel() / (t1 - t0),
            "decode_s": t2 - t1, "decode_read_bytes": r2 - r1,
            "tokens_per_s": b * new / (t2 - t1),
            "read_bytes_per_token": (r2 - r1) / (b * new),
            "distinct_rows_per_token": distinct / (b * new),
            "rows_per_token": picks * len(seen),
            "argmax_sha1": hashlib.sha1(out.numpy().tobytes()).hexdigest()[:12]}


def serve(model_dir: Path, batch: int, prompt_len: int, new: int, threads: int, dtype: str,
          reps: int, compare: bool) -> dict:
    """Load (cold), then `reps` times per prefetch mode: evict the tables from this process and
    the page cache (`Int8RowTables.release`), decode cold, decode the same again warm."""
    import statistics

    import torch

    from ultramem.accounting import decode_bytes
    from ultramem.offload import load_offloaded
    from ultramem.serve import prepare_for_serving

    torch.set_num_threads(threads)
    r0, t0 = read_bytes(), time.perf_counter()
    model = load_offloaded(model_dir)
    prepare_for_serving(model, dtype)
    load_s, load_read = time.perf_counter() - t0, read_bytes() - r0
    sources = [layer.table_source for layer in model.memory_layers()]
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 256, (batch, prompt_len), generator=gen)
    stream = torch.randint(0, model.cfg.vocab_size, (batch, new), generator=gen)
    seen = record_rows(model)
    runs = []
    for rep in range(reps):
        for prefetch in (True, False) if compare else (True,):
            for src in sources:
                src.release(drop_cache=True)
                src.prefetch = prefetch
            cold = decode(model, prompt, stream, seen)
            warm = decode(model, prompt, stream, seen)
            runs.append({"rep": rep, "prefetch": prefetch, "cold": cold, "warm": warm})
    summary = {}
    for prefetch in sorted({r["prefetch"] for r in runs}, reverse=True):
        mine = [r for r in runs if r["prefetch"] == prefetch]
        summary["prefetch" if prefetch else "no_prefetch"] = {
            f"{phase}_{key}": statistics.median(r[phase][key] for r in mine)
            for phase in ("cold", "warm")
            for key in ("tokens_per_s", "prefill_tokens_per_s", "read_bytes_per_token",
                        "distinct_rows_per_token")}
    model_bytes = decode_bytes(model.cfg, batch, bytes_per_weight=1)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new, "threads": threads,
            "dtype": dtype, "load_s": load_s, "load_read_bytes": load_read,
            "median": summary, "runs": runs,
            "rows_per_token": runs[0]["cold"]["rows_per_token"],
            "model_sparse_bytes_per_token": model_bytes["sparse"] / batch,
            "model_dense_bytes_per_step": model_bytes["dense"], **status()}


def vs_ram(preset: str, batches: list[int], new: int, threads: int, dtype: str,
           rounds: int = 5) -> dict:
    """Warm decode of one model written by `ultramem init`, its int8 rows memory-mapped against
    the same rows copied into RAM (`in_memory=True`), timed in turns so both share the noise."""
    import statistics

    import torch

    from ultramem.config import ModelConfig
    from ultramem.offload import load_offloaded, write_initialized
    from ultramem.serve import prepare_for_serving

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="ultramem-vs-ram-"))
    try:
        write_initialized(ModelConfig.preset(preset), work / "model")
        models = {mode: prepare_for_serving(load_offloaded(work / "model",
                                                           in_memory=mode == "ram"), dtype)
                  for mode in ("mmap", "ram")}
        out = {}
        for batch in batches:
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, 256, (batch, 16), generator=gen)
            stream = torch.randint(0, 256, (batch, new), generator=gen)
            times: dict[str, list[float]] = {m: [] for m in models}
            for _ in range(rounds):
                for mode, model in models.items():
                    times[mode].append(decode(model, prompt, stream, [])["tokens_per_s"])
            out[batch] = {m: statistics.median(t) for m, t in times.items()}
        return {"preset": preset, "dtype": dtype, "threads": threads, "new_tokens": new,
                "rounds": rounds, "warm_tokens_per_s": out}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- part 3: the plan


def plan() -> dict:
    """Arithmetic from the cost model: what this machine and the paper's 120B model need."""
    from ultramem.accounting import count_params, decode_bytes, sparse_tables
    from ultramem.config import ModelConfig
    from ultramem.offload import RowLayout

    def tables(cfg):
        return sum(t.params for t in sparse_tables(cfg))

    base = ModelConfig.preset("umv2-1b-7b")
    dense_1b = count_params(base)["total"] - tables(base)
    row = base.memory.value_dim + base.memory.pre_value_dim
    # n_keys such that the total reaches 120B with the 1B/7B backbone (the paper's 2.5B/120B
    # shapes are not in REFERENCE.md): rows per layer = (120e9 - dense) / (layers * row)
    n_keys = round(((120e9 - dense_1b) / (len(base.memory_blocks) * row)) ** 0.5)
    big = base.replace(memory={"n_keys": n_keys})
    out = {"120b_config": {"base": "umv2-1b-7b", "n_keys": n_keys, **count_params(big),
                           "table_params": tables(big)}}
    t = tables(big)
    rows = len(big.memory_blocks) * big.memory.n_values
    layout = RowLayout(big.memory.value_dim, big.memory.pre_value_dim)
    dense = count_params(big)["total"] - t
    per_rank = {}
    for w in (1, 8, 16, 32, 64):
        per_rank[w] = {
            # training, column-sharded tables (value_optimizer=adam, the only sharded option):
            # float32 weights + RowSparseAdam's two float32 moments, 1/W of each per rank; the
            # dense part replicated under DDP with AdamW (weights, grads, 2 moments: 16 B/param)
            "train_tables_gib": 12 * t / w / GIB,
            "train_dense_ddp_gib": 16 * dense / GIB,
            "shuffle_buffers_gib": rows * 8 / GIB,  # int64 perm, replicated
            "serve_bf16_tables_gib": 2 * t / w / GIB,
            "serve_int8_tables_gib": rows * layout.width / w / GIB,
        }
    out["120b_per_rank"] = per_rank
    out["120b_decode_bytes_bf16"] = {b: {k: v / b for k, v in decode_bytes(big, b, 2).items()}
                                     for b in (1, 16, 64)}
    out["120b_decode_bytes_int8_tables"] = {
        b: decode_bytes(big, b, 1)["sparse"] / b for b in (1, 16, 64)}
    return out


# ----------------------------------------------------------------------------- driver


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="umv2-227m-20b")
    parser.add_argument("--n-keys", type=int, default=None, help="change the preset's n_keys")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new", type=int, default=32, help="decoded tokens per sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "int8"),
                        help="dense weights (prepare_for_serving); tables are int8 rows")
    parser.add_argument("--reps", type=int, default=3,
                        help="cold + warm decodes per batch size (medians are reported)")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="also measure every repeat without the WILLNEED prefetch")
    parser.add_argument("--min-free-gb", type=float, default=15.0,
                        help="refuse to write a model that leaves less free disk than this")
    parser.add_argument("--workdir", default=None, help="where the model goes (a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    parser.add_argument("--plan", action="store_true", help="print the arithmetic only")
    parser.add_argument("--vs-ram", default=None, metavar="PRESET",
                        help="only compare warm decode, mmap against RAM, on this preset")
    parser.add_argument("--out", default="runs/benchmarks/serve_disk.json")
    parser.add_argument("--_serve", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        row = serve(Path(args._serve[0]), args.batches[0], args.prompt_len, args.new,
                    args.threads, args.dtype, args.reps, args._serve[1] == "compare")
        print(json.dumps(row))
        return
    if args.plan:
        print(json.dumps(plan(), indent=1))
        return
    if args.vs_ram:
        result = vs_ram(args.vs_ram, args.batches, args.new, args.threads, args.dtype)
        result["command"] = "python benchmarks/serve_disk.py " + " ".join(sys.argv[1:])
        print(json.dumps(result, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    from ultramem.accounting import count_params
    from ultramem.config import ModelConfig
    from ultramem.offload import disk_bytes

    cfg = ModelConfig.preset(args.preset)
    if args.n_keys is not None:
        cfg = cfg.replace(memory={"n_keys": args.n_keys})
    need = disk_bytes(cfg)
    parent = Path(args.workdir).parent if args.workdir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free - need < args.min_free_gb * 1e9:
        sys.exit(f"serve_disk: the model takes {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are "
                 f"free: that leaves less than --min-free-gb {args.min_free_gb}")
    work = Path(args.workdir) if args.workdir else Path(
        tempfile.mkdtemp(prefix="ultramem-serve-disk-"))
    model_dir = work / "model"
    cli = [sys.executable, "-m", "ultramem.cli"]
    result = {"preset": args.preset, "n_keys": cfg.memory.n_keys, **count_params(cfg),
              "disk_bytes_expected": need, "machine": "2-core AMD Zen 4 VM, no GPU",
              "command": "python benchmarks/serve_disk.py " + " ".join(sys.argv[1:])}
    try:
        init = cli + ["init", "--preset", args.preset, "--out", str(model_dir)]
        if args.n_keys is not None:
            init += ["--n-keys", str(args.n_keys)]
        start = time.perf_counter()
        subprocess.run(init, check=True)
        result["write_s"] = time.perf_counter() - start
        result["disk_bytes"] = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
        result["free_disk_bytes_after_write"] = shutil.disk_usage(model_dir).free
        me = [sys.executable, __file__, "--prompt-len", str(args.prompt_len), "--new",
              str(args.new), "--threads", str(args.threads), "--dtype", args.dtype, "--reps",
              str(args.reps)]
        rows = []
        mode = "compare" if args.no_prefetch else "prefetch"
        for batch in args.batches:
            drop_cache(model_dir)
            out = subprocess.check_output(
                me + ["--batches", str(batch), "--_serve", str(model_dir), mode], text=True)
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]["median"]), file=sys.stderr)
        result["rows"] = rows
        drop_cache(model_dir)
        gen = cli + ["generate", "--checkpoint", str(model_dir), "--prompt",
                     "Memory layers make total parameters cheap", "--max-new-tokens", "16",
                     "--dtype", args.dtype, "--threads", str(args.threads)]
        start = time.perf_counter()
        text = subprocess.check_output(gen, text=True)
        result["generate"] = {"command": "ultramem " + " ".join(gen[3:]),
                              "wall_s_cold": time.perf_counter() - start,
                              "output": text.strip()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            result["cleaned_up"] = not work.exists()
    _print(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


def _print(result: dict) -> None:
    print(f"{result['preset']}: {result['total'] / 1e9:.2f}B parameters, "
          f"{result['disk_bytes'] / 1e9:.2f} GB on disk, written in {result['write_s']:.0f} s")
    print(f"{'B':>3} {'prefetch':>11} {'load s':>7} {'cold tok/s':>10} {'warm tok/s':>10} "
          f"{'cold prefill tok/s':>18} {'disk KB/tok':>11} {'model KB/tok':>12} "
          f"{'rows/tok':>12} {'peak RSS':>10} {'anon RSS':>10}")
    for r in result["rows"]:
        for mode, m in r["median"].items():
            print(f"{r['batch']:>3} {mode:>11} {r['load_s']:>7.2f} "
                  f"{m['cold_tokens_per_s']:>10.2f} {m['warm_tokens_per_s']:>10.2f} "
                  f"{m['cold_prefill_tokens_per_s']:>18.2f} "
                  f"{m['cold_read_bytes_per_token'] / 1e3:>11.1f} "
                  f"{r['model_sparse_bytes_per_token'] / 1e3:>12.1f} "
                  f"{m['cold_distinct_rows_per_token']:>5.0f} / {r['rows_per_token']:<4} "
                  f"{_gb(r['VmHWM']):>10} {_gb(r['RssAnon']):>10}")
    print("medians over --reps; tok/s: decode steps; disk KB/tok: read from disk per decoded "
          "token (cold); model KB/tok: accounting.decode_bytes(B, 1 byte)['sparse'] / B; "
          "rows/tok: distinct table rows read per decoded token / rows picked")
    if "generate" in result:
        g = result["generate"]
        print(f"`{g['command']}`: {g['wall_s_cold']:.1f} s from a cold page cache")


if __name__ == "__main__":
    main()
