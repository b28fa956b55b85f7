"""lm-eval tasks through cltk on real ranks: each document scored on one rank, the figures of one rank.

Run by tests/test_tasks.py on 2 ranks (CPU, gloo):

    deepspeed --num_gpus 2 tests/scripts/task_ranks.py --model DIR --include tasks --out OUT

Two runs in the same processes, both through :func:`cltk.tasks.evaluate_tasks`:

- ``plain``: a full copy of the model per rank (as ``cltk eval`` and ZeRO 0/1/2 stages score), limit 20:
  an even split, so lm-eval adds no padding request and every request must be scored exactly once.
- ``zero3``: the model partitioned by a ZeRO-3 engine without optimizer (as row 0 and a ZeRO-3 stage are
  scored), limit 21: an uneven split, so the ranks run different numbers of forwards and cltk's lockstep
  must even them out (else the ranks hang on the parameter gathers). Before each forward each rank records
  the share of the model it holds and the share it has gathered in full.

Each rank writes ``OUT/rank<r>.json``: per run, the scores, the requests it scored (task, doc, choice),
its forward count, and for zero3 the largest share of the model it held (its partition) and had gathered
before a forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cltk import distributed as dist
from cltk import tasks

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--include", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=None)
args = parser.parse_args()

dist.init()
made = []
make_lm = tasks.make_lm
tasks.make_lm = lambda *a, **k: made.append(make_lm(*a, **k)) or made[-1]  # keep the LM to read it
tokenizer = AutoTokenizer.from_pretrained(args.model)
out: dict = {}


def settings(limit: int) -> tasks.TaskSettings:
    return tasks.TaskSettings(("kjv_cloze",), (str(Path(args.include).resolve()),), limit, None, 4)


model = AutoModelForCausalLM.from_pretrained(args.model)
scores = tasks.evaluate_tasks(model, tokenizer, settings(20))
out["plain"] = {"scores": scores, "requests": made[-1].requests, "forwards": made[-1].forwards}

import deepspeed  # noqa: E402

held: list[float] = []
model = AutoModelForCausalLM.from_pretrained(args.model).requires_grad_(False)
engine, *_ = deepspeed.initialize(model=model, config={
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})


def measure(module, *_):
    """Before each forward: the share of the model this rank holds (its partition) and the share
    materialised in full (gathered parameters not yet released)."""
    params = list(module.parameters())
    total = sum(p.ds_numel for p in params)
    held.append((sum(p.ds_tensor.numel() for p in params) / total,
                 sum(p.numel() for p in params) / total))


engine.module.register_forward_pre_hook(measure)
zero3 = engine.zero_optimization_stage() == 3
scores = tasks.evaluate_tasks(engine.module, tokenizer, settings(21), zero3=zero3)
out["zero3"] = {"scores": scores, "requests": made[-1].requests, "forwards": made[-1].forwards,
                "partition": max(h[0] for h in held),
                "gathered": max(h[1] for h in held), "zero_stage": engine.zero_optimization_stage()}
Path(args.out).mkdir(parents=True, exist_ok=True)
(Path(args.out) / f"rank{dist.rank()}.json").write_text(json.dumps(out))
dist.barrier()
torch.distributed.destroy_process_group()
