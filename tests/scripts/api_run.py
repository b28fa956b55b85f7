"""`import cltk` front door, NaN guard and `cltk.evaluate`, in one process (run by tests/test_api.py)."""

import json
import sys
from pathlib import Path

import torch

import cltk
import cltk.rundir
from cltk.continual import ContinualRun
from cltk.engine import NonFiniteLossError
from cltk.method import Method

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.tiny_run import write_tiny_run  # noqa: E402

tmp = Path(sys.argv[1])
path = write_tiny_run(tmp, cache_dir=tmp / "cache", train={"checkpoint_every": 2})
cfg = cltk.load_config(path)


class NanAtStep3(Method):
    name = "nan"

    def extra_loss(self, ctx, batch, logits, labels):
        bad = ctx.stage.index == 0 and ctx.step == 3
        return {"nan": torch.tensor(float("nan") if bad else 0.0)}


try:
    ContinualRun(cfg, methods=[NanAtStep3()]).run()
    raise SystemExit("a NaN loss did not stop the run")
except NonFiniteLossError as e:
    print("NAN-STOPPED:", e)
latest = (cfg.out / "checkpoints" / "latest").read_text().strip()
print("LATEST:", latest)
try:
    cltk.train(cfg)  # a fresh start into the same output dir must not overwrite the run
    raise SystemExit("a fresh start overwrote an existing run")
except cltk.rundir.RunExistsError as e:
    print("REFUSED:", e)
try:  # resuming with another global batch would silently shift the data position
    cltk.train(cltk.load_config(path, overrides=["train.micro_batch_size=1"]), resume=True)
    raise SystemExit("a resume with another global batch was accepted")
except ValueError as e:
    print("BATCH-REFUSED:", e)
result = cltk.train(cfg, resume=True)
print("TRAINED:", json.dumps(result.report.perplexity))
again = cltk.evaluate(cfg, out_dir=tmp / "eval")
print("EVALUATED:", json.dumps(again.perplexity))
