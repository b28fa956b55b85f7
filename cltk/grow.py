"""A run that grows: ``cltk train --resume`` with new domains appended to a finished run's config.

Continual pre-training never ends. Appending domains at the end of ``domains`` and resuming continues the
run from the last finished stage's export: the earlier stages are kept (their ``stage.json`` rows and
exports), their exports are scored on the new domains so the forgetting matrix stays complete, and the
new stages train as any other. Everything that made the earlier stages what they are must stay as it
was: the domains already in the run and their order, the seed, model, tokenizer, packing and
the sections of methods that shape the stages (``MethodSpec.fixed_on_resume``).
:func:`check_config` and :func:`check_plan` refuse any change there, naming it, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cltk import checkpoint, registry
from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.errors import UserError
from cltk.plan import Stage, plan_record
from cltk.tracking import log

# config keys that shape what earlier stages trained and how they were scored, besides the sections
# of the methods that shape the stages themselves (MethodSpec.fixed_on_resume)
FIXED_KEYS = ("seed", "model", "tokenizer", "data.seq_len", "data.eval_sequences")


def fixed_keys() -> tuple[str, ...]:
    """Every key a resumed run may not change."""
    return FIXED_KEYS + tuple(s.name for s in registry.specs() if s.fixed_on_resume)
_HOW = (
    "A resumed run may append new domains at the end of `domains` (and change training settings "
    "such as train.*); to change the rest, start a new output_dir"
)


class RunChangedError(UserError):
    """A resumed run whose config changes what its finished part was trained or scored on."""


def _get(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None  # type: ignore[assignment]
    return raw


def _differ(old: Any, new: Any) -> bool:
    """Unequal, ignoring keys of a section ``old`` lacks (a config written before they existed);
    the values inside (a domain's ``source``, ``model.config``) are compared whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(v != new.get(k) for k, v in old.items())
    return old != new


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What ``new`` (a config as ``RunConfig.to_dict``) changes in the part of ``old`` a run keeps."""
    changes = [
        f"{k}: {_get(old, k)!r} -> {_get(new, k)!r}"
        for k in fixed_keys()
        if _differ(_get(old, k), _get(new, k))
    ]
    old_d, new_d = old.get("domains") or [], new.get("domains") or []
    for i, od in enumerate(old_d):
        if i >= len(new_d):
            changes.append(f"domain {od['name']!r} (domains[{i}]) was removed")
        elif new_d[i]["name"] != od["name"]:
            names = [d["name"] for d in new_d]
            where = (
                f"now at domains[{names.index(od['name'])}]"
                if od["name"] in names
                else "no longer there"
            )
            changes.append(
                f"domains[{i}] was {od['name']!r} and is now {new_d[i]['name']!r} "
                f"({od['name']!r} is {where}): the order of the run's domains changed"
            )
        else:
            for k in od:
                if od[k] != new_d[i].get(k):
                    changes.append(
                        f"domains[{i}] ({od['name']}).{k}: {od.get(k)!r} -> {new_d[i].get(k)!r}"
                    )
    return changes


def check_config(cfg: RunConfig) -> list[str]:
    """Refuse a resume whose config changes the run's finished part; returns the appended domains.

    Compares with ``OUT/config.yaml`` (the config the run last ran with). Call before any work.

    Raises:
        RunChangedError: naming every change.
    """
    path = cfg.out / "config.yaml"
    if not path.is_file():
        return []
    old = yaml.safe_load(path.read_text()) or {}
    new = cfg.to_dict()
    changes = config_changes(old, new)
    if changes:
        raise RunChangedError(
            f"{cfg.out} holds a run that this config changes: " + "; ".join(changes) + f". {_HOW}"
        )
    added = [d["name"] for d in new["domains"][len(old.get("domains") or []) :]]
    for spec, section in registry.active(cfg) if added else []:
        why = spec.grow_refusal(section)
        if why:
            raise RunChangedError(f"domains {added} were appended, but {why}")
    if added:
        log(f"grow: domains {', '.join(added)} appended to the run in {cfg.out}")
    return added


def check_plan(out: Path, stages: list[Stage]) -> None:
    """Refuse a plan whose first stages differ from those ``OUT/plan.json`` recorded.

    Raises:
        RunChangedError: naming the first stage that differs and how.
    """
    path = Path(out) / "plan.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())["stages"]
    new = plan_record(stages)["stages"]
    shaping = ["its domain's data", "data.seq_len", "the seed", *fixed_keys()[len(FIXED_KEYS):]]
    causes = ", ".join(shaping[:-1]) + " or " + shaping[-1]
    for i, o in enumerate(old):
        if i >= len(new):
            raise RunChangedError(
                f"stage {i} ({o['name']}) of the run in {out} is gone from the plan. {_HOW}"
            )
        if o != new[i]:
            diff = ", ".join(
                f"{k} {o.get(k)!r} -> {new[i].get(k)!r}" for k in o if o.get(k) != new[i].get(k)
            )
            raise RunChangedError(
                f"stage {i} ({o['name']}) of the run in {out} would change: {diff} ({causes} "
                f"changed). {_HOW}"
            )


def complete_row(
    cfg: RunConfig,
    tokenizer: Any,
    domains: dict[str, Any],
    names: list[str],
    stage_dir: Path,
    record: dict[str, Any],
    record_file: str,
) -> list[float]:
    """A finished stage's row over ``names``: its export is scored on the domains the row lacks (the
    domains appended since), and the stage record is rewritten with them (collective)."""
    from cltk.models import build_model
    from cltk.start import evaluate_frozen

    missing = [n for n in names if n not in record["perplexity"]]
    if missing:
        log(f"grow: scoring stage {stage_dir.name}'s export on {', '.join(missing)}")
        model = build_model(cfg, tokenizer, init_dir=stage_dir)
        record["perplexity"].update(evaluate_frozen(cfg, model, [domains[n] for n in missing]))
        del model
        if dist.is_main():
            checkpoint.write_atomic(stage_dir / record_file, json.dumps(record, indent=1))
        dist.barrier()
    return [record["perplexity"][n] for n in names]
