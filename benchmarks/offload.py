"""Value tables larger than the process: decode with tables memory-mapped from disk.

1. A writer process builds an UltraMemV2 model whose value tables are several GB, saves it as a
   training checkpoint (safetensors) and writes its tables as int8 row files (one per layer,
   under tables/, `ultramem.offload.write_int8_tables`).
2. The checkpoint's pages are dropped from the page cache (posix_fadvise DONTNEED), so serving
   starts cold, from disk.
3. One fresh process per mode loads the model and decodes `--new` tokens for a batch with the KV
   cache, reporting tokens/s and its peak resident memory (ru_maxrss, which counts the mapped
   table pages it touched). Modes: mmap fp32, mmap int8, and fp32 tables copied into RAM.

    python benchmarks/offload.py            # table + runs/benchmarks/offload.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIG = dict(vocab_size=256, n_layers=4, d_model=256, n_heads=4, ffn_hidden=768,
              max_seq_len=256,
              memory=dict(n_keys=640, key_dim=128, top_m=32, value_dim=256, pre_value_dim=256,
                          init_samples=512))


def write(out: Path, n_keys: int) -> None:
    import torch

    from ultramem import LM, ModelConfig
    from ultramem.offload import write_int8_tables
    from ultramem.train.checkpoint import save_checkpoint

    cfg_dict = json.loads(json.dumps(CONFIG))
    cfg_dict["memory"]["n_keys"] = n_keys
    cfg = ModelConfig.from_dict(cfg_dict)
    torch.manual_seed(0)
    model = LM(cfg, seed=0)
    path = save_checkpoint(out, 1, model=model, config={"model": cfg.to_dict()})
    del model
    write_int8_tables(path)
    print(path)


def drop_cache(path: Path) -> None:
    for f in path.rglob("*.safetensors"):  # the checkpoint and its tables/ row files
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def serve(path: Path, mode: str, batch: int, new: int, threads: int) -> None:
    import torch

    from ultramem.offload import load_offloaded

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_offloaded(path, int8=mode == "mmap-int8", in_memory=mode == "ram-fp32")
    load_s = time.perf_counter() - start
    prompt = torch.randint(0, 256, (batch, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(prompt, 2, temperature=0)  # warm up code paths
        start = time.perf_counter()
        model.generate(prompt, new, temperature=0)
        decode_s = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tables = sum(layer.table_source.values.nbytes + layer.table_source.pre_values.nbytes
                 for layer in model.memory_layers())
    print(json.dumps({"mode": mode, "batch": batch, "new_tokens": new, "load_s": load_s,
                      "decode_s": decode_s, "tokens_per_s": batch * new / decode_s,
                      "peak_rss_bytes": rss, "table_bytes": tables}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-keys", type=int, default=CONFIG["memory"]["n_keys"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads when serving")
    parser.add_argument("--out", default="runs/benchmarks/offload.json")
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (temp dir)")
    parser.add_argument("--_write", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_serve", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._write:
        write(Path(args._write), args.n_keys)
        return
    if args._serve:
        serve(Path(args._serve[0]), args._serve[1], args.batch, args.new, args.threads)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ultramem-offload-"))
    me = [sys.executable, __file__, "--n-keys", str(args.n_keys), "--batch", str(args.batch),
          "--new", str(args.new), "--threads", str(args.threads)]
    try:
        ckpt = Path(subprocess.check_output(me + ["--_write", str(work)], text=True).split()[-1])
        rows = []
        for mode in ("mmap-fp32", "mmap-int8", "ram-fp32"):
            drop_cache(ckpt)
            out = subprocess.check_output(me + ["--_serve", str(ckpt), mode], text=True)
            rows.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'mode':<10} {'tables':>9} {'peak RSS':>9} {'tables/RSS':>10} {'tok/s':>8} "
          f"{'load s':>7}")
    for r in rows:
        gib = 2**30
        print(f"{r['mode']:<10} {r['table_bytes'] / gib:8.2f}G {r['peak_rss_bytes'] / gib:8.2f}G "
              f"{r['table_bytes'] / r['peak_rss_bytes']:>10.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['load_s']:>7.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": CONFIG | {"n_keys": args.n_keys},
                                          "command": "python benchmarks/offload.py "
                                          + " ".join(sys.argv[1:]), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
