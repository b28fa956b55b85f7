"""The data path on real ranks: rank 0 prepares, the others wait and map; errors reach every rank.

Run by tests/test_prepare.py::test_two_ranks_prepare_once_and_train_a_mixture_in_proportion as
``deepspeed --num_gpus 2 tests/scripts/data_ranks.py GOOD.yaml BAD.yaml OUT_DIR`` (CPU, gloo).
Each rank writes ``OUT_DIR/rank<r>.json``: the bad config's error, how many sources it tokenised itself,
and the fingerprints of the domains it mapped; then the good run trains (``cltk.train``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cltk
from cltk import distributed as dist
from cltk.data import packing
from cltk.data import prepare as prep
from cltk.errors import UserError
from cltk.validate import load_config

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
good, bad, out = args[0], args[1], Path(args[2])
dist.init()
encoded = []
real_encode = packing.encode_stream
packing.encode_stream = lambda *a, **k: encoded.append(1) or real_encode(*a, **k)

try:  # a bad file: every rank gets rank 0's error, before any training, and none hangs
    prep.prepare(load_config(bad))
    error = None
except UserError as e:
    error = f"{type(e).__name__}: {e}"
tok, domains = prep.prepare(load_config(good))
record = {
    "error": error,
    "encoded": len(encoded),
    "fingerprints": {n: packing.packed_fingerprint(d) for n, d in domains.items()},
}
(out / f"rank{dist.rank()}.json").write_text(json.dumps(record))
cltk.train(load_config(good))
