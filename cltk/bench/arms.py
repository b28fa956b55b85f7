"""What ``cltk bench`` compares: its arms (each a set of run-config overrides) and its tiers (the model,
the domains and the budget they run on).

An arm is one way of training the same stages; every arm of a tier runs the tier's config with the
same steps, batch and seeds, so they differ only by what the overrides turn on. ``{general}`` in an
override is the tier's general data (data like the starting model's pre-training data, never a stage).
"""

from __future__ import annotations

from dataclasses import dataclass

# arm -> (overrides, what it is); the order is the page's
ARMS: dict[str, tuple[list[str], str]] = {
    "naive": ([], "plain sequential training, no method: the baseline"),
    "joint": (["train.joint=true"], "every domain mixed in one stage, same steps: the bound"),
    "replay": (["replay={share: 0.25}"], "a quarter of every batch from earlier stages' data"),
    "replay-reservoir": (["replay={share: 0.25, memory: 200}"],
                         "replay from a reservoir of 200 earlier sequences kept on disk"),
    "replay-general": (["replay={general: {general}, general_share: 0.25}"],
                       "a quarter of every batch from general data (never a stage)"),
    "replay+general": (["replay={share: 0.2, general: {general}, general_share: 0.1}"],
                       "earlier stages at 0.2 and general data at 0.1"),
    "blocks": (["blocks={k: 2, p: 0.9}"],
               "incremental soft-target blocks (2 per domain), online teacher"),
    "blocks-offline": (["blocks={k: 2, p: 0.9, teacher: offline}"],
                       "the same from the offline top-64 teacher cache"),
    "distill": (["distill={alpha: 1.0, beta: 1.0}"], "KL to the previous stage + CE"),
    "das": (["das={importance_samples: 64}"], "DAS soft-masking of heads, FFN units and token rows"),
    "lora": (["lora={r: 8, alpha: 16}"], "a LoRA adapter per domain (base frozen), routed at eval"),
    "agem": (["agem={memory: 256}"], "A-GEM projection against 256 earlier sequences"),
    "spg": (["spg={importance_steps: 8}"], "SPG parameter-level soft masks"),
    "ewc": (["ewc={lam: 20000, fisher_steps: 8}"], "online EWC"),
    "lr-continue": (["train.lr_span=run"], "one LR schedule over the run (no re-warm per stage)"),
    "lr-wsd": (["train.schedule=wsd", "train.decay_share=0.2"], "warmup-stable-decay per stage"),
    "replay+distill": (["replay={share: 0.25}", "distill={alpha: 1.0, beta: 1.0}"],
                       "replay of earlier stages with distillation"),
    "replay+das": (["replay={share: 0.25}", "das={importance_samples: 64}"],
                   "replay of earlier stages with DAS"),
    "merge": (["merge={alpha: 0.5}"], "each stage's result averaged with its start, half and half"),
    "ema": (["ema={decay: 0.9}"], "an EMA of the weights (decay 0.9) exported as each stage's model"),
    "merge+replay+general": (["merge={alpha: 0.5}", "replay={share: 0.2, general: {general}, "
                              "general_share: 0.1}"], "merge with replay of earlier stages and general data"),
    "merge-0.8+replay+general": (["merge={alpha: 0.8}", "replay={share: 0.2, general: {general}, "
                                  "general_share: 0.1}"],
                                 "merge at alpha 0.8 (a fifth of each stage's update undone) with "
                                 "replay of earlier stages and general data"),
    "ema+replay+general": (["ema={decay: 0.9}", "replay={share: 0.2, general: {general}, "
                            "general_share: 0.1}"], "EMA with replay of earlier stages and general data"),
}


@dataclass(frozen=True)
class Tier:
    """A tier: ``config`` (under ``examples/bench/``) continued by every arm; ``base``, when set, is
    the config of the starting model, pre-trained by cltk once per seed before the arms; ``general``
    the general-data sources (a YAML list) of the replay arms; ``arms`` the default arms."""

    name: str
    config: str
    base: str | None
    general: str
    arms: tuple[str, ...]
    about: str


TIERS: dict[str, Tier] = {
    "small": Tier(
        "small", "small.yaml", "small_base.yaml", "[{domain: general}]", tuple(ARMS),
        "a 4M-parameter Llama pre-trained by cltk on a general mix (Python code and man pages, "
        "evaluation-only afterwards), continued on Shakespeare, the Bible and software licences",
    ),
    "real": Tier(
        "real", "real.yaml", None, "[{domain: code}, {domain: manpages}]",
        ("naive", "joint", "replay+general", "blocks", "das", "lora", "replay+distill"),
        "SmolLM2-135M (GGUF) continued on Shakespeare and software licences, with Python code and "
        "man pages (what it already knows) evaluation-only",
    ),
}


def overrides(arm: str, tier: Tier) -> list[str]:
    """The arm's ``--set`` overrides on ``tier``."""
    return [o.replace("{general}", tier.general) for o in ARMS[arm][0]]
