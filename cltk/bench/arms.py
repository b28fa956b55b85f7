"""What ``cltk bench`` compares: its arms (each a set of run-config overrides) and its tiers (the model,
the domains and the budget they run on).

An arm is one way of training the same stages; every arm of a tier runs the tier's config with the
same steps, batch and seeds, so they differ only by what the overrides turn on. ``{general}`` in an
override is the tier's general data (data like the starting model's pre-training data, never a stage),
drawn from sources that share nothing with the evaluation-only domains on which "what it knew" is
measured (``cltk.bench.sources`` checks it); ``{scored}`` is those domains' own training split, for the
one arm that shows what training on the scored distribution adds.
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
    "replay+scored": (["replay={share: 0.2, general: {scored}, general_share: 0.1}"],
                      "in-distribution, not a method to pick: replay+general with the evaluation-only "
                      "domains' own training split as its general data, so it trains on the "
                      "distribution 'lost of what it knew' scores"),
    "blocks": (["blocks={k: 2, p: 0.9}"],
               "incremental soft-target blocks (2 per domain), online teacher"),
    "blocks-offline": (["blocks={k: 2, p: 0.9, teacher: offline}"],
                       "the same from the offline teacher cache (sampled layout, 64 bytes/token)"),
    "blocks-offline-topk": (["blocks={k: 2, p: 0.9, teacher: offline, cache_layout: topk}"],
                            "the same from the first cache layout (top-64 fp16, 260 bytes/token)"),
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
    the general-data sources (a YAML list of ``replay.general`` entries) of the replay arms, which
    must share no file with the evaluation-only domains; ``scored`` the same list naming those
    domains (the in-distribution arm's); ``arms`` the default arms; ``data`` the page's paragraph on
    where general data comes from and where what it knew is measured."""

    name: str
    config: str
    base: str | None
    general: str
    scored: str
    arms: tuple[str, ...]
    about: str
    data: str


PYDOC = "{name: pydoc, source: {builtin: pydoc}, max_chars: %d}"

TIERS: dict[str, Tier] = {
    "small": Tier(
        "small", "small.yaml", "small_base.yaml", f"[{PYDOC % 400000}]", "[{domain: code-manpages}]",
        tuple(ARMS),
        "a 4M-parameter Llama pre-trained by cltk on a general mix (a third each of Python code, man "
        "pages and Python's documentation), continued on Shakespeare, the Bible and software licences",
        "**General data and what it knew.** The general replay arms replay a sample of the pre-training "
        "mix: Python's documentation (the builtin `pydoc` corpus, Debian's `python3.11-doc`, 400,000 "
        "characters). What it knew is measured on the other two thirds of that mix, code and man pages "
        "(held-out documents the base never trained on), which no arm trains on but `replay+scored`: "
        "that one arm replays their own training split, in-distribution, to show how much training on "
        "the scored distribution adds. It is a measurement, not a method to pick: a user cannot replay "
        "the distribution on which their model's general ability is later judged. The documentation "
        "is prose about Python with code examples, so it is closer to the code than to the man pages",
    ),
    "real": Tier(
        "real", "real.yaml", None, f"[{PYDOC % 300000}]", "[{domain: code}, {domain: manpages}]",
        ("naive", "joint", "replay+general", "replay+scored", "merge", "ema", "merge+replay+general",
         "ema+replay+general", "blocks", "das", "lora", "replay+distill"),
        "SmolLM2-135M (GGUF) continued on Shakespeare and software licences, with Python code and "
        "man pages (what it already knows) evaluation-only",
        "**General data and what it knew.** The general replay arms replay Python's documentation (the "
        "builtin `pydoc` corpus, Debian's `python3.11-doc`, 300,000 characters): prose and code "
        "examples of the kind SmolLM2's pre-training mix holds, though not known to be in it. What it "
        "knew is measured on Python code (the standard library) and man pages, which no arm trains on "
        "but `replay+scored`: that one arm replays their own training split, in-distribution, to show "
        "how much training on the scored distribution adds. It is a measurement, not a method to "
        "pick. The documentation is closer to the code than to the man pages",
    ),
    "scratch": Tier(
        "scratch", "../quickstart.yaml", None,
        "[{name: general, source: {builtin: licenses}, max_chars: 200000}]", "[]",
        ("naive", "replay", "replay-reservoir", "replay-general", "replay+general", "distill",
         "blocks", "das", "ewc", "spg", "agem", "lora", "lr-continue", "lr-wsd"),
        "the quickstart's 4M-parameter Llama trained from scratch on Python code, Shakespeare and the "
        "Bible (docs/methods.md); general data: software licences, never a stage",
        "**General data.** The general replay arms replay software licences, a domain that is never a "
        "stage. A model trained from scratch knew nothing before its first stage, so this tier has no "
        "evaluation-only domain and no `replay+scored` arm",
    ),
}


def overrides(arm: str, tier: Tier) -> list[str]:
    """The arm's ``--set`` overrides on ``tier``."""
    return [o.replace("{general}", tier.general).replace("{scored}", tier.scored) for o in ARMS[arm][0]]
