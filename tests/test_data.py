"""`ultramem prepare`: inputs, tokenizers, shards, splits, errors, batched encoding; the
deterministic batch order and the DataLoader around it."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from ultramem.cli import main as cli_main
from ultramem.data.prepare import DataError, prepare
from ultramem.data.shards import BatchOrder, TokenShards, read_meta
from ultramem.data.tokenizer import load_tokenizer


def _all_tokens(data_dir, split) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in TokenShards(data_dir, split).shards])


def test_bytes_round_trip_txt_jsonl_and_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first line\nsecond line\nthird line ends here\n")
    (src / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "héllo world"}) + "\n\n" + json.dumps({"text": "bye"}) + "\n")
    (src / "ignored.bin").write_bytes(b"\x00\x01")
    meta = prepare([str(src)], tmp_path / "out", val_fraction=0.25, shard_tokens=16)
    assert meta["n_documents"] == 3 and meta["dtype"] == "uint16"
    train, val = _all_tokens(tmp_path / "out", "train"), _all_tokens(tmp_path / "out", "val")
    assert len(meta["splits"]["train"]["shards"]) == -(-len(train) // 16)  # 16-token shards
    tok = load_tokenizer(meta["tokenizer"], tmp_path / "out")
    text_train, text_val = tok.decode(train.tolist()), tok.decode(val.tolist())
    # Few documents: the last quarter of each (cut at a newline past its middle, else at the
    # character) goes to validation, in input order; each part ends with a newline.
    assert text_train == "first line\nsecond line\nthird line\nh\u00e9llo wo\nby\n"
    assert text_val == " ends here\nrld\ne\n"


def test_document_split_with_many_documents(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i:02d}"}) + "\n" for i in range(40)))
    prepare([str(f)], tmp_path / "out", val_fraction=0.1)
    val = load_tokenizer({"kind": "bytes"}, tmp_path).decode(_all_tokens(tmp_path / "out", "val"))
    assert val.split("\n")[:-1] == [f"doc {i:02d}" for i in range(9, 40, 10)]


def test_bpe_is_trained_saved_and_reloaded(tmp_path):
    meta = prepare(["builtin:facts", "builtin:python"], tmp_path / "bpe", tokenizer="bpe",
                   vocab_size=600)
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    assert 257 < meta["vocab_size"] <= 600
    tok = load_tokenizer(meta["tokenizer"], tmp_path / "bpe")
    text = "The pet of Ada Berg is a cat.\nBeautiful is better than ugly."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 1.5  # it learned merges
    train = _all_tokens(tmp_path / "bpe", "train")
    assert train.max() < meta["vocab_size"] and (train == tok.eos_id).sum() == 2
    # Deterministic: the same inputs give the same tokens.
    prepare(["builtin:facts", "builtin:python"], tmp_path / "bpe2", tokenizer="bpe",
            vocab_size=600)
    assert np.array_equal(train, _all_tokens(tmp_path / "bpe2", "train"))


@pytest.mark.parametrize("setup, match", [
    (lambda p: str(p / "missing.txt"), "no such file"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no .txt or .jsonl"),
    (lambda p: (p / "e.txt").write_text("  \n") and str(p / "e.txt"), "hold no text"),
    (lambda p: (p / "x.csv").write_text("a,b") and str(p / "x.csv"), "expected a .txt or .jsonl"),
    (lambda p: (p / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n') and str(p / "bad.jsonl"),
     r"bad.jsonl:2: invalid JSON"),
    (lambda p: (p / "nt.jsonl").write_text('{"body": "x"}\n') and str(p / "nt.jsonl"),
     "string 'text'"),
    (lambda p: (p / "latin.txt").write_bytes(b"caf\xe9") and str(p / "latin.txt"), "not UTF-8"),
    (lambda p: "builtin:nope", "unknown built-in"),
])
def test_bad_input_gives_a_clear_error(tmp_path, setup, match):
    source = setup(tmp_path)
    with pytest.raises(DataError, match=match):
        prepare([source], tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_prepare_cli(tmp_path, capsys):
    assert cli_main(["prepare", "builtin:facts", "--out", str(tmp_path / "d")]) == 0
    assert "prepared 1 documents" in capsys.readouterr().out
    assert read_meta(tmp_path / "d")["tokenizer"] == {"kind": "bytes", "vocab_size": 256}
    assert cli_main(["prepare", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_batch_order_is_deterministic_complete_and_rank_consistent(tmp_path):
    f = tmp_path / "t.txt"
    rng = random.Random(0)
    f.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1000)))
    prepare([str(f)], tmp_path / "d", val_fraction=0, shard_tokens=300)
    shards = TokenShards(tmp_path / "d", "train")
    assert len(shards.shards) == 4  # 1001 tokens (with the final newline) in 300-token shards
    order = BatchOrder(shards, seq_len=10, batch_size=3, seed=5)
    assert order.n_windows == 29 + 29 + 29 + 10  # (len - 1) // seq_len per shard
    # One epoch visits every window once; windows never cross a shard boundary.
    seen = {order.sample(k).tobytes() for k in range(order.n_windows)}
    assert len(seen) == order.n_windows
    expected = {np.asarray(s[o:o + 11]).tobytes() for s in shards.shards
                for o in range(0, len(s) - 10, 10)}
    assert seen == expected
    # Same seed, same batches; another epoch, another order.
    again = BatchOrder(shards, seq_len=10, batch_size=3, seed=5)
    x1, y1 = order.batch(7)
    x2, y2 = again.batch(7)
    assert (x1 == x2).all() and (y1 == y2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    first = [order.sample(k).tobytes() for k in range(order.n_windows)]
    second = [order.sample(k + order.n_windows).tobytes() for k in range(order.n_windows)]
    assert first != second and sorted(first) == sorted(second)
    # Two ranks with batch 3 cover exactly what one process with batch 6 sees.
    big = BatchOrder(shards, seq_len=10, batch_size=6, seed=5)
    r0 = BatchOrder(shards, seq_len=10, batch_size=3, seed=5, rank=0, world=2)
    r1 = BatchOrder(shards, seq_len=10, batch_size=3, seed=5, rank=1, world=2)
    for k in (0, 13):
        xb, _ = big.batch(k)
        assert (xb[:3] == r0.batch(k)[0]).all() and (xb[3:] == r1.batch(k)[0]).all()


def test_batch_order_rejects_too_little_data(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("short")
    prepare([str(f)], tmp_path / "d", val_fraction=0)
    with pytest.raises(DataError, match="too little data for seq_len=64.*window of .* 65 tokens"):
        BatchOrder(TokenShards(tmp_path / "d", "train"), seq_len=64, batch_size=2)


def _snapshot(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_prepare_killed_while_replacing_leaves_the_old_data_whole(tmp_path):
    """A prepare that dies (os._exit: no cleanup runs, as after SIGKILL) while writing the new
    shards over an existing data directory leaves the old one complete and readable."""
    import subprocess
    import sys

    old_src, new_src = tmp_path / "old.txt", tmp_path / "new.jsonl"
    old_src.write_text("old text\n" * 200)
    new_src.write_text('{"text": "new words here"}\n' * 400)  # 400 documents
    data = tmp_path / "d"
    prepare([str(old_src)], data, val_fraction=0, shard_tokens=256)
    before = _snapshot(data)
    code = (
        "import os, sys\n"
        "from ultramem.data import prepare as p\n"
        "add, calls = p._ShardWriter.add, [0]\n"
        "def dying_add(self, ids):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 150: os._exit(9)  # mid-write, several shards in\n"
        "    add(self, ids)\n"
        "p._ShardWriter.add = dying_add\n"
        f"p.prepare([{str(new_src)!r}], {str(data)!r}, val_fraction=0, shard_tokens=256)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    assert _snapshot(data) == before
    tokens = _all_tokens(data, "train")
    assert bytes(tokens.astype(np.uint8)).decode() == "old text\n" * 200
    # A complete rerun replaces it; the abandoned work directory does not confuse it.
    meta = prepare([str(new_src)], data, val_fraction=0, shard_tokens=256)
    assert meta["splits"]["train"]["n_tokens"] == len("new words here\n" * 400)
    assert bytes(_all_tokens(data, "train").astype(np.uint8)).decode() == "new words here\n" * 400


def test_damaged_shards_are_named_on_load(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefgh\n" * 100)
    data = tmp_path / "d"
    prepare([str(f)], data, val_fraction=0, shard_tokens=256)
    shard = data / "train_001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # half-rewritten
    with pytest.raises(DataError, match="train_001.bin|damaged"):
        TokenShards(data, "train")
    shard.unlink()
    with pytest.raises(DataError, match="train_001.bin is listed"):
        TokenShards(data, "train")


def test_prepare_refuses_a_directory_it_did_not_write(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some text\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(DataError, match="thesis.tex"):
        prepare([str(f)], mine)
    assert (mine / "thesis.tex").read_text() == "keep"
    with pytest.raises(DataError, match="is a file"):
        prepare([str(f)], f)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_batched_encoding_writes_what_one_document_at_a_time_did(tmp_path, monkeypatch, tokenizer):
    """`prepare` encodes documents in batches (`encode_batch`): the shards hold exactly the ids of
    encoding each document alone (`_encode`, the previous path), across batch boundaries."""
    from ultramem.data import prepare as prep

    f = tmp_path / "docs.jsonl"
    rng = random.Random(1)
    words = ["memory", "value", "table", "key", "Ada", "cat", "héllo", "  ", "\n", "<|end"]
    f.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(
        rng.randint(1, 40)))}) + "\n" for _ in range(45)))
    sources = [str(f), "builtin:facts"]
    monkeypatch.setattr(prep, "ENCODE_BATCH", 4)  # many batches, one cut mid-list
    meta = prepare(sources, tmp_path / "batched", tokenizer=tokenizer, vocab_size=400)
    tok = load_tokenizer(meta["tokenizer"], tmp_path / "batched")
    expected: dict[str, list[int]] = {"train": [], "val": []}
    pieces = prep._split(prep.iter_documents(sources), meta["n_documents"], 0.05)
    for split, text in pieces:
        expected[split] += prep._encode(tok, text)
    for split in ("train", "val"):
        assert _all_tokens(tmp_path / "batched", split).tolist() == expected[split], split
    monkeypatch.setattr(prep, "ENCODE_BATCH", 1)  # one document per call: the same files
    prepare(sources, tmp_path / "single", tokenizer=tokenizer, vocab_size=400)
    assert {n: b for n, b in _snapshot(tmp_path / "batched").items() if n != "meta.json"} == \
        {n: b for n, b in _snapshot(tmp_path / "single").items() if n != "meta.json"}


def _order(tmp_path) -> BatchOrder:
    f = tmp_path / "t.txt"
    rng = random.Random(0)
    f.write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)))
    prepare([str(f)], tmp_path / "d", val_fraction=0, shard_tokens=700)
    return BatchOrder(TokenShards(tmp_path / "d", "train"), seq_len=16, batch_size=3, seed=2,
                      rank=1, world=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_gives_batch_orders_batches(tmp_path, workers):
    """The DataLoader around BatchOrder serves batch(k) exactly, with or without worker
    processes, from the start, from a resume point (its first k), and after a jump; across
    epoch boundaries (the order has 31 windows, 6 per step over both ranks)."""
    from ultramem.data.shards import BatchLoader

    order = _order(tmp_path)
    ref = BatchOrder(order.shards, seq_len=16, batch_size=3, seed=2, rank=1, world=2)
    # What a spawned worker receives: the shard paths, reopened there, not their contents.
    blob = pickle.dumps(order.shards)
    copy = pickle.loads(blob)
    assert len(blob) < 1000 < order.shards.n_tokens
    assert all(np.array_equal(a, b) for a, b in zip(copy.shards, order.shards.shards,
                                                    strict=True))

    def same(loader, ks):
        for k in ks:
            x, y = loader.batch(k)
            rx, ry = ref.batch(k)
            assert x.dtype == torch.int64 and torch.equal(x, rx) and torch.equal(y, ry), k

    loader = BatchLoader(order, workers=workers, stop=12)
    same(loader, range(12))
    same(loader, [12, 13])  # past `stop`: it carries on
    loader.close()
    resumed = BatchLoader(order, workers=workers, stop=12)
    same(resumed, [7, 8, 9, 3, 4, 11])  # a resume at 7, then a jump back and one forward
    resumed.close()


def test_trainer_losses_do_not_depend_on_data_workers(tmp_path):
    from ultramem import ModelConfig
    from ultramem.train.config import TrainConfig
    from ultramem.train.metrics import read_metrics
    from ultramem.train.trainer import Trainer

    cfg = ModelConfig.preset("tiny").replace(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64,
                                             max_seq_len=16, memory=None)
    prepare(["builtin:facts"], tmp_path / "data")
    losses = []
    for workers in (0, 2):
        train = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=0,
                            ckpt_every=0, log_every=1, tensorboard=False, plot=False,
                            device="cpu", threads=1, data_workers=workers)
        out = tmp_path / f"w{workers}"
        Trainer(cfg, train, out, tmp_path / "data", show_progress=False).fit()
        losses.append([r["loss"] for r in read_metrics(out)])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
