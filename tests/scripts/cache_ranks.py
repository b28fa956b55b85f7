"""Two ranks build one sampled-layout teacher cache; the build dies part-way and resumes.

Run by tests/test_teacher_cache.py::test_two_ranks_resume_a_cache_build_from_where_both_can as
``deepspeed --num_gpus 2 tests/scripts/cache_ranks.py OUT_DIR`` (CPU, gloo, plain torch.distributed).
Each rank's teacher dies at another batch (rank 0 after recording 4 batches, rank 1 after 2); the
rebuild must start both ranks at batch 2 (a ZeRO-3 teacher needs equal forwards on every rank) and
end with the cache a fresh single-process build writes. Each rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cltk import distributed as dist  # noqa: E402
from cltk.methods.soft_targets.teacher_cache import (
    CacheKeys,
    TeacherCache,
    build_cache,
    data_key,
    finalize,
    resume_point,
    write_shard,
)
from tests.test_teacher_cache import Scorer, T, V  # noqa: E402  (the one fake teacher)

out = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
tdist.init_process_group("gloo")
rank = dist.rank()
ids = np.random.default_rng(1).integers(0, V, size=(12, T)).astype(np.int32)  # 6 batches a rank
keys = CacheKeys("t" * 64, data_key(ids), 0, T, V, layout="sampled", head=3, samples=5)
where = out / "cache"
try:  # progress recorded after every batch: rank 0 dies with 4 on disk, rank 1 with 2
    build_cache(where, keys, ids, Scorer(fail_at=5 if rank == 0 else 3), batch_size=1,
                progress_every=1)
    died = None
except RuntimeError as e:
    died = str(e)
own = resume_point(where, keys, ids, rank, 2, 1)
scorer = Scorer()
manifest = build_cache(where, keys, ids, scorer, batch_size=1)
x = torch.as_tensor(ids, dtype=torch.long)
got = TeacherCache(where, keys).lookup(x)
if rank == 0:
    fresh = out / "fresh"
    for s in range(2):  # what an uninterrupted build writes
        write_shard(fresh, keys, ids, Scorer(), s, 2, 1)
    finalize(fresh, keys, 2)
    ref = TeacherCache(fresh, keys).lookup(x)
    same = all(torch.equal(a, b) for a, b in zip(got, ref))
else:
    same = None
(out / f"rank{rank}.json").write_text(json.dumps(
    {"died": died, "own": own, "calls": scorer.calls, "rows": manifest["rows"],
     "layout": manifest["layout"], "same": same}))
tdist.barrier()
tdist.destroy_process_group()
