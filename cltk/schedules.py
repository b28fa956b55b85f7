"""Learning-rate schedules of continual pre-training: pure functions of the step.

Two choices make a schedule (``train`` section):

- **shape** (``train.schedule``): after a linear warmup of ``warmup_steps``, ``cosine`` or ``linear``
  decay to ``min_lr_ratio`` of the peak over the rest of the span; ``constant``; or ``wsd``
  (warmup-stable-decay): the peak until the last ``decay_share`` of the span, then a decay to
  ``min_lr_ratio`` shaped ``decay_shape`` (``linear``, ``cosine`` or ``1-sqrt``).
- **span** (``train.lr_span``): ``stage`` re-warms and re-decays in every stage (each stage is a
  complete schedule); ``run`` lays one schedule over all stages of the run, so a stage starts where
  the previous one ended (no re-warm) and only the run's first steps warm up.

The recipes the literature compares are combinations: re-warm + re-decay per stage (``cosine``,
``stage``; Ibrahim et al. 2024), warmup-stable-decay per stage (``wsd``, ``stage``; MiniCPM: ~10% of
the tokens in the decay), constant with a final cooldown (``wsd``, ``run``; Hagele et al. 2024), and
"continue" without re-warming (``cosine``, ``run``; Gupta et al. 2023 on the cost of re-warming).
"""

from __future__ import annotations

import math
from typing import Callable

SHAPES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
SPANS = ("stage", "run")


def decay_curve(frac: float, shape: str) -> float:
    """1 at ``frac`` 0 falling to 0 at ``frac`` 1: ``linear``, ``cosine`` or ``1-sqrt``."""
    frac = min(1.0, max(0.0, frac))
    if shape == "linear":
        return 1.0 - frac
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(frac)
    raise ValueError(f"unknown decay shape {shape!r}; one of {', '.join(DECAY_SHAPES)}")


def lr_multiplier(
    step: int,
    total: int,
    warmup: int,
    shape: str,
    min_ratio: float,
    decay_share: float = 0.1,
    decay_shape: str = "linear",
) -> float:
    """The LR as a share of the peak at ``step`` (0-based) of a span of ``total`` steps.

    Warmup is linear over ``warmup`` steps (clipped so at least one step follows it), reaching the
    peak at step ``warmup``; the last step of a decaying span is at ``min_ratio``.
    """
    warm = min(warmup, max(total - 1, 0))
    if step < warm:
        return (step + 1) / (warm + 1)
    if shape == "constant" or total <= warm + 1:
        return 1.0
    last = total - 1  # the step that reaches min_ratio
    if shape == "wsd":
        decay_steps = max(1, round(decay_share * total))
        start = max(warm, last - decay_steps)  # the last stable step
        if step <= start:
            return 1.0
        decay = decay_curve((step - start) / (last - start), decay_shape)
    elif shape in ("cosine", "linear"):
        decay = decay_curve((step - warm) / (last - warm), shape)
    else:
        raise ValueError(f"unknown schedule {shape!r}; one of {', '.join(SHAPES)}")
    return min_ratio + (1.0 - min_ratio) * decay


def stage_lr_lambda(train_cfg, stage_steps: list[int], stage: int) -> Callable[[int], float]:
    """The multiplier of each step of stage ``stage`` (for ``torch.optim.lr_scheduler.LambdaLR``).

    Args:
        train_cfg: the ``train`` section (schedule, lr_span, warmup_steps, min_lr_ratio, decay_share,
            decay_shape).
        stage_steps: optimizer steps of every stage of the run, in order.
        stage: the stage's index.
    """
    t = train_cfg
    if t.lr_span == "stage":
        offset, total = 0, stage_steps[stage]
    else:
        offset, total = sum(stage_steps[:stage]), sum(stage_steps)

    def f(step: int) -> float:
        return lr_multiplier(
            offset + step,
            total,
            t.warmup_steps,
            t.schedule,
            t.min_lr_ratio,
            t.decay_share,
            t.decay_shape,
        )

    return f


def warmup_note(train_cfg, stage_steps: list[int], stage: int) -> str | None:
    """The warning logged when ``warmup_steps`` do not fit the span they warm (else None): the warmup
    is then clipped to leave one step after it, so the peak LR is reached only at the span's end.
    A warning, not a refusal: the steps are known only once the data is packed, and a short run (a
    benchmark's ``--steps 2``) may mean it."""
    t = train_cfg
    if t.lr_span == "run" and stage > 0:
        return None
    total = stage_steps[stage] if t.lr_span == "stage" else sum(stage_steps)
    if t.warmup_steps < total:
        return None
    span = f"the stage's {total}" if t.lr_span == "stage" else f"the run's {total}"
    return (f"train.warmup_steps {t.warmup_steps} >= {span} steps: the warmup is clipped to "
            f"{max(total - 1, 0)} steps and the peak LR is reached only at the last step; lower "
            "train.warmup_steps to warm up and then train")
