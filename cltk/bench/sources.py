"""A tier's data, resolved to files: the general replay sources must share nothing with the
evaluation-only domains on which "what it knew" is measured, or the general replay arms are trained on
the very distribution they are scored on. Checked on the files each source reads (not on the names:
``{domain: code}`` and ``{builtin: stdlib}`` are the same data), before any arm runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from cltk.bench.arms import Tier
from cltk.data.corpora import source_units
from cltk.data.reading import source_items
from cltk.errors import UserError

BENCH_CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "bench"


def source_files(source: dict, domain: str) -> set[Path]:
    """Every file a source (a mixture: each of its parts) reads, resolved."""
    return {Path(p).resolve() for _, part in source_items(source)
            for u in source_units(part, domain=domain) for p in u.paths}


def tier_files(tier: Tier, general: str | None = None) -> tuple[dict[str, set[Path]],
                                                                   dict[str, set[Path]]]:
    """``(general, evaluation-only)``: the files of each general replay source of ``tier`` (its
    ``general``, or the YAML list ``general``) and of each evaluation-only domain of its config."""
    cfg = yaml.safe_load((BENCH_CONFIGS / tier.config).read_text())
    domains = {d["name"]: d for d in cfg["domains"]}
    held = {n: source_files(d["source"], n) for n, d in domains.items() if d.get("eval_only")}
    out: dict[str, set[Path]] = {}
    for g in yaml.safe_load(tier.general if general is None else general):
        if g.get("domain") is not None:
            name = g["domain"]
            if name not in domains:
                raise UserError(f"bench: tier {tier.name}'s general data names domain {name!r}, "
                                f"which {tier.config} does not have")
            out[f"domain:{name}"] = source_files(domains[name]["source"], name)
        else:
            out[g["name"]] = source_files(g["source"], f"general data {g['name']}")
    return out, held


def check_general_apart(tier: Tier, general: str | None = None) -> None:
    """Refuse a tier whose general replay reads a file of an evaluation-only domain."""
    gen, held = tier_files(tier, general)
    for g, g_files in gen.items():
        for d, d_files in held.items():
            shared = sorted(g_files & d_files)
            if shared:
                raise UserError(
                    f"bench: tier {tier.name}'s general data {g!r} shares {len(shared)} file(s) with "
                    f"the evaluation-only domain {d!r} (e.g. {shared[0]}): what it knew would be "
                    "measured on what general replay trains on; draw general data from another source"
                )
