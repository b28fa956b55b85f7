"""EWC and online EWC (``ewc:``): a quadratic penalty ``lam / 2 * sum F (theta - theta*)^2`` that
holds each weight near its value at the end of the last stage, in proportion to its diagonal
Fisher F.

Here: the config section and its checks. The hooks are in :mod:`.method`, the arithmetic in
:mod:`.penalty`; docs/ewc.md says what is computed, and what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class EwcConfig:
    lam: float | None = option(
        "lambda, the penalty's strength: lam/2 * sum F (theta - theta*)^2 (required; see "
        "docs/ewc.md to size it)",
        None,
    )
    gamma: float = option(
        "online EWC: F <- gamma * F + F_stage after each stage (1: every stage counts fully)", 1.0
    )
    fisher_steps: int = option(
        "the stage's last N optimizer steps whose squared gradients make its Fisher (all if fewer)",
        20,
    )
    fisher: str = option(
        "how F is estimated: 'batch' (mean squared gradient of the stage's last fisher_steps batches: "
        "free, but near the squared mean gradient at large batches) or 'sample' (mean squared "
        "gradient of fisher_samples single sequences of the stage's own data at its end: one "
        "extra forward and backward each, on every rank); docs/ewc.md compares them",
        "batch",
    )
    fisher_samples: int = option(
        "with fisher: sample, how many of the stage's trained sequences (all if fewer)", 64
    )
    report_penalty: bool = option(
        "compute the penalty's value every step (loss term ewc_penalty); costs one more pass over "
        "the partitions, which the gradient does not need",
        True,
    )


def check(cfg: RunConfig, ewc: EwcConfig) -> None:
    if ewc.lam is None:
        raise ConfigError(
            "ewc.lam",
            "set the penalty's strength lambda (>= 0), e.g. ewc: {lam: 1000}; docs/ewc.md says "
            "how to size it",
        )
    if ewc.lam < 0:
        raise ConfigError(
            "ewc.lam", f"must be >= 0 (a negative one pushes weights away), got {ewc.lam}"
        )
    if not 0 <= ewc.gamma <= 1:
        raise ConfigError("ewc.gamma", f"must be in [0, 1], got {ewc.gamma}")
    if ewc.fisher_steps < 1:
        raise ConfigError("ewc.fisher_steps", f"must be >= 1, got {ewc.fisher_steps}")
    if ewc.fisher not in ("batch", "sample"):
        raise ConfigError("ewc.fisher", f"must be 'batch' or 'sample', got {ewc.fisher!r}")
    if ewc.fisher_samples < 1:
        raise ConfigError("ewc.fisher_samples", f"must be >= 1, got {ewc.fisher_samples}")
    _check_precision(cfg)


def _check_precision(cfg: RunConfig) -> None:
    """EWC works on the fp32 master weights DeepSpeed's optimizer steps on (:mod:`cltk.methods.kit.zero_view`);
    without ZeRO, bf16 / fp16 training hides them in a wrapper cltk cannot read: refused at load."""
    from cltk.methods.kit.zero_view import check_fp32_reachable

    check_fp32_reachable(cfg, "ewc", "EWC")


def memory(cfg: RunConfig, section: EwcConfig, inputs: Any) -> dict[str, int]:
    """The Fisher, the anchor and the running sum of squared gradients: fp32, each laid out like this
    rank's ZeRO partition."""
    return {"Fisher + anchor + squared-gradient sum (fp32 partitions)": 3 * inputs.partition()}


SPEC = register(MethodSpec("ewc", EwcConfig, "cltk.methods.ewc.method:EwcMethod",
                           "EWC / online EWC: a Fisher-weighted pull towards the last stage's weights",
                           check, acts_on_base=True,
                           memory=memory))
