"""cltk: continual pre-training of LLMs on DeepSpeed.

import cltk
cfg = cltk.load_config("examples/quickstart.yaml", overrides=["train.lr=1e-3"])
result = cltk.train(cfg)            # runs every stage; result.report is the forgetting matrix
print(result.report.forgetting)
"""

from cltk import methods  # noqa: F401  (registers every method cltk ships)
from cltk.config import ConfigError, RunConfig
from cltk.validate import load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "RunConfig", "load_config", "train", "evaluate", "ContinualRun"]


def train(cfg: RunConfig, resume: bool = False):
    """Run (or resume) a continual pre-training run; returns a ``RunResult`` with the report."""
    from cltk.continual import train as _train

    return _train(cfg, resume=resume)


def evaluate(cfg: RunConfig, model_dirs=None, out_dir=None, start_dir=None):
    """Forgetting matrix of saved models (default: the run's stage exports); row 0 is ``start_dir``, or
    the config's model unless ``cfg.eval.start`` is false."""
    from cltk.report import evaluate_models, run_stage_dirs

    return evaluate_models(
        cfg, list(model_dirs) if model_dirs else run_stage_dirs(cfg), out_dir, start_dir=start_dir
    )


def __getattr__(name):
    if name == "ContinualRun":
        from cltk.continual import ContinualRun

        return ContinualRun
    raise AttributeError(name)
