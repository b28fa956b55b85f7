"""The methods a run can use, each registered once by its own package under ``cltk/methods/``.

A method registers a :class:`MethodSpec`: the name of its config section (``das:``, ``ewc:`` ...), the
dataclass that section loads into, its checks, and how to build its hooks. The core (config loading,
validation, the loop) asks this registry and never names a method: a new method is one folder that calls
:func:`register`.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

# The registry is the bottom of the core: the schema (cltk.config) asks it which sections exist, so it
# imports nothing of cltk, not even for types. These aliases name what its callables receive.
RunConfig = Any  # cltk.config.RunConfig
DomainConfig = Any  # cltk.config.DomainConfig
Method = Any  # cltk.method.Method


def _always(section: Any) -> bool:
    return True


def _never(section: Any) -> bool:
    return False


def _no_check(cfg: RunConfig, section: Any) -> None:
    return None


def _one(section: Any) -> int:
    return 1


def _no_refusal(section: Any) -> str | None:
    return None


def _no_sources(cfg: RunConfig, section: Any) -> list[DomainConfig]:
    return []


def _no_key(section: Any) -> str | None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """One method as the core sees it.

    Attributes:
        name: its config section and the key of its state in checkpoints (``das``).
        config: the dataclass its section loads into (every field with ``help`` metadata).
        hooks: ``"module:Class"`` of its :class:`~cltk.method.Method`, imported only when a run uses
            it (torch, DeepSpeed, PEFT: on use) and built once per run by
            ``Class.from_config(cfg, section)`` (:meth:`build`).
        help: one line for ``cltk config-reference`` and docs/config.md.
        check: ``check(cfg, section)`` raises :class:`~cltk.config.ConfigError` naming the key.
        active: whether a given section turns the method on (e.g. blocks with ``k > 1``).
        replaces_loss: whether, when active, it replaces the main loss (at most one such method runs).
        acts_on_base: it changes or protects the base model's weights, so it means nothing when only
            adapters train (refused next to a method with ``freezes_base``).
        freezes_base: only its own new parameters train (LoRA on a frozen base).
        stages_per_domain: how many stages each domain is split into (incremental blocks).
        fixed_on_resume: its section shapes the stages a run has finished (how many per domain), so
            a resumed or growing run may not change it.
        previous_domain_teacher: the key (``distill``) that makes the method learn, at a domain's
            first stage, from the previous domain's model, which a method training fresh adapters
            on a frozen base refuses (None: it does not).
        grow_refusal: why a finished run with this section cannot take appended domains (None: it can).
        run_files: what it writes at the top of the output directory (removed with the other leftovers
            when an attempt that finished no stage is started again).
        order: hook order among active methods (lower first).
        extra_sources: ``extra_sources(cfg, section) -> [DomainConfig]``: corpora the method needs
            besides the domains (never a stage, never scored): prepared like domains (same tokenizer,
            which also trains on them, same cache) under the name ``<method>.<name>``, recorded in
            ``OUT/data.json`` so a resumed run whose files changed is refused.
    """

    name: str
    config: type
    hooks: str
    help: str
    check: Callable[[RunConfig, Any], None] = _no_check
    active: Callable[[Any], bool] = _always
    replaces_loss: Callable[[Any], bool] = _never
    acts_on_base: bool = False
    freezes_base: Callable[[Any], bool] = _never
    stages_per_domain: Callable[[Any], int] = _one
    fixed_on_resume: bool = False
    previous_domain_teacher: Callable[[Any], str | None] = _no_key
    grow_refusal: Callable[[Any], str | None] = _no_refusal
    run_files: tuple[str, ...] = ()
    order: int = 50
    extra_sources: Callable[[RunConfig, Any], list[DomainConfig]] = _no_sources

    def build(self, cfg: RunConfig, section: Any) -> Method:
        """The method's hooks for a run (imports its module on first use)."""
        module, cls = self.hooks.split(":")
        return getattr(importlib.import_module(module), cls).from_config(cfg, section)


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (once per name); returns the spec so a module can keep it."""
    old = _SPECS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def specs() -> list[MethodSpec]:
    """Every registered method, in hook order."""
    return sorted(_SPECS.values(), key=lambda s: (s.order, s.name))


def get(name: str) -> MethodSpec | None:
    return _SPECS.get(name)


def active(cfg: RunConfig) -> list[tuple[MethodSpec, Any]]:
    """The methods a config turns on, with their sections, in hook order."""
    out = []
    for spec in specs():
        section = cfg.sections.get(spec.name)
        if section is not None and spec.active(section):
            out.append((spec, section))
    return out


def stages_per_domain(cfg: RunConfig) -> int:
    """Stages each domain is split into: the most any active method asks for (1 without blocks)."""
    return max([spec.stages_per_domain(section) for spec, section in active(cfg)] or [1])


def build_methods(cfg: RunConfig) -> list[Method]:
    """The hooks of every method the config turns on, in hook order."""
    return [spec.build(cfg, section) for spec, section in active(cfg)]


def extra_sources(cfg: RunConfig) -> list[DomainConfig]:
    """The extra corpora of every active method, named ``<method>.<name>``, in hook order."""
    return [
        dataclasses.replace(d, name=f"{spec.name}.{d.name}", eval_only=True)
        for spec, section in active(cfg)
        for d in spec.extra_sources(cfg, section)
    ]
