"""The ``replay:`` section: its keys and its checks (registered in :mod:`cltk.methods.replay`)."""

from __future__ import annotations

from dataclasses import dataclass

from cltk.config import ConfigError, DomainConfig, RunConfig, SourceConfig, option
from cltk.registry import stages_per_domain

OUTPUT = "replay"  # OUT/replay/: the reservoir


@dataclass
class GeneralSource(SourceConfig):
    domain: str | None = option(
        "instead of name/source: replay the training windows of this eval_only domain", None
    )


@dataclass
class ReplayConfig:
    share: float = option("share r of each batch drawn from earlier stages' training data", 0.0)
    shares: list[float] | None = option(
        "r per stage (one per stage, the first 0), instead of share", None
    )
    memory: int = option(
        "keep a reservoir of N earlier-stage sequences in OUT/replay and replay from it "
        "(0: from all earlier domains' data)",
        0,
    )
    general: list[GeneralSource] = option(
        "replay sources that are never a stage (data like the pre-training data)", factory=list
    )
    general_share: float = option("share of each batch drawn from the general sources", 0.0)
    general_shares: list[float] | None = option(
        "general share per stage (one per stage), instead of general_share", None
    )

    def share_at(self, stage: int) -> float:
        """Earlier-stage replay share of stage ``stage``."""
        return self.shares[stage] if self.shares is not None else self.share

    def general_share_at(self, stage: int) -> float:
        """General-data share of stage ``stage``."""
        return self.general_shares[stage] if self.general_shares is not None else self.general_share


def _is_name(name: str) -> bool:
    return bool(name) and name.replace("-", "").replace("_", "").isalnum()


def _check_share(value: float, key: str) -> None:
    if not 0 <= value < 1:
        raise ConfigError(key, f"must be in [0, 1), got {value}")


def _check_schedule(
    values: list[float] | None, single: float, key: str, single_key: str, n_stages: int
) -> None:
    if values is None:
        return
    if single:
        raise ConfigError(key, f"give {single_key} or {key}, not both")
    if len(values) != n_stages:
        raise ConfigError(
            key,
            f"has {len(values)} entries but the run has {n_stages} stages (training domains x "
            "blocks): give one share per stage",
        )
    for i, v in enumerate(values):
        _check_share(v, f"{key}[{i}]")


def check(cfg: RunConfig, r: ReplayConfig) -> None:
    n_stages = len(cfg.train_domains()) * stages_per_domain(cfg)
    _check_share(r.share, "replay.share")
    _check_share(r.general_share, "replay.general_share")
    _check_schedule(r.shares, r.share, "replay.shares", "replay.share", n_stages)
    _check_schedule(
        r.general_shares, r.general_share, "replay.general_shares", "replay.general_share", n_stages
    )
    if r.shares and r.shares[0] > 0:
        raise ConfigError("replay.shares[0]", "the first stage has no earlier stage to replay; use 0")
    for i in range(n_stages):
        total = r.share_at(i) + r.general_share_at(i)
        if total >= 1:
            key = "replay.general_shares" if r.general_shares is not None else "replay.general_share"
            raise ConfigError(
                key,
                f"with the earlier-stage share, stage {i} would mix {total:g} of every batch: "
                "nothing left for the stage's own data; keep the two shares' sum below 1",
            )
    if isinstance(r.memory, bool) or r.memory < 0:
        raise ConfigError("replay.memory", f"must be an integer >= 0, got {r.memory}")
    if r.memory and not any(r.share_at(i) for i in range(n_stages)):
        raise ConfigError("replay.memory", "a reservoir needs replay.share (or shares) > 0")
    has_general = r.general_share > 0 or any(r.general_shares or [])
    if r.general and not has_general:
        raise ConfigError("replay.general_share", "general sources are listed but their share is 0")
    if has_general and not r.general:
        raise ConfigError(
            "replay.general", "a general share needs sources: [{name: web, source: {files: ...}}]"
        )
    _check_general(cfg, r.general)


def _check_general(cfg: RunConfig, general: list[GeneralSource]) -> None:
    from cltk.data.corpora import CorpusError, check_source

    domains = {d.name: d for d in cfg.domains}
    seen: set[str] = set()
    for i, g in enumerate(general):
        key = f"replay.general[{i}]"
        if g.domain is not None:
            if g.name or g.source or g.max_chars is not None:
                raise ConfigError(key, "give either domain, or name and source, not both")
            d = domains.get(g.domain)
            if d is None:
                raise ConfigError(f"{key}.domain", f"no domain named {g.domain!r}")
            if not d.eval_only:
                raise ConfigError(
                    f"{key}.domain",
                    f"{g.domain!r} is a training domain (a stage); only an eval_only domain can be "
                    "general data (earlier stages are replayed by replay.share)",
                )
            label = f"domain:{g.domain}"
        else:
            if not _is_name(g.name):
                raise ConfigError(f"{key}.name", f"needs a name of letters, digits, - and _, got "
                                                 f"{g.name!r}")
            if g.max_chars is not None and g.max_chars <= 0:
                raise ConfigError(f"{key}.max_chars", f"must be > 0, got {g.max_chars}")
            try:
                check_source(g.source, domain=f"replay.{g.name}")
            except CorpusError as e:
                raise ConfigError(f"{key}.source", str(e)) from e
            label = g.name
        if label in seen:
            raise ConfigError(key, f"general source {label!r} is listed twice")
        seen.add(label)


def extra_sources(cfg: RunConfig, r: ReplayConfig) -> list[DomainConfig]:
    """The general sources cltk prepares (as ``replay.<name>``); an eval_only domain named by
    ``domain:`` is prepared already."""
    return [
        DomainConfig(name=g.name, source=dict(g.source), max_chars=g.max_chars)
        for g in r.general
        if g.domain is None
    ]


def active(r: ReplayConfig) -> bool:
    """On when any key is set (so that every setting is checked)."""
    return bool(
        r.share > 0 or r.shares is not None or r.general_share > 0 or r.general_shares is not None
        or r.memory or r.general
    )
