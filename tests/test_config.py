import json
from pathlib import Path

import pytest
import yaml

from cltk.config import ConfigError, describe
from cltk.ds_config import deepspeed_config
from cltk.validate import load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, raw, ds=None):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(
        json.dumps(
            ds
            if ds is not None
            else {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
        )
    )
    raw = {"deepspeed": "ds.json", **raw}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def base():
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": 32}},
        "tokenizer": {"train": {"vocab_size": 400}},
        "domains": [{"name": "a", "source": {"builtin": "stdlib"}}],
    }


def test_valid_config_loads_with_types_and_relative_paths(tmp_path):
    raw = base()
    raw["train"] = {"lr": "3e-4", "micro_batch_size": 2}
    cfg = load_config(write(tmp_path, raw), world_size=1)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.resolve(cfg.deepspeed) == tmp_path / "ds.json"
    assert cfg.out == tmp_path / "runs/run"


@pytest.mark.parametrize(
    "patch, key, words",
    [
        ({"trian": {}}, "trian", "did you mean 'train'"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"train": {"micro_batch_size": 2.5}}, "train.micro_batch_size", "integer"),
        ({"train": {"schedule": "step"}}, "train.schedule", "one of"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size", "> 0"),
        ({"domains": []}, "domains", "at least one"),
        ({"domains": [{"name": "a", "source": {"builtin": "nope"}}]}, "domains[0].source", "nope"),
        ({"domains": [{"name": "a", "source": {}}]}, "domains[0].source", "source"),
        ({"tokenizer": {"train": {"vocab_size": 100}}}, "tokenizer.train.vocab_size", ">= 323"),
        (
            {
                "domains": [
                    {"name": "a", "source": {"builtin": "kjv"}},
                    {"name": "a", "source": {"builtin": "kjv"}},
                ]
            },
            "domains[1].name",
            "twice",
        ),
        ({"model": {"init_from": "missing/dir"}}, "model.init_from", "does not exist"),
        ({"model": {}}, "model", "exactly one"),
        ({"deepspeed": "nothere.json"}, "deepspeed", "not found"),
        ({"replay": {"share": 1.0}}, "replay.share", "[0, 1)"),
        ({"blocks": {"k": 2, "p": 1.5}}, "blocks.p", "(0, 1]"),
        (
            {"blocks": {"k": 2, "p": 0.5, "one_hot_below": 0.6}},
            "blocks.one_hot_below",
            "must not exceed",
        ),
        ({"distill": {"temperature": 0}}, "distill", "temperature must be > 0"),
        ({"blocks": {"k": 3}, "distill": {}}, "distill", "choose one"),
        ({"das": {}, "lora": {"base": "frozen"}}, "das", "protect nothing"),
        ({"das": {}, "lora": {"base": "merged"}}, "das", "protect nothing"),
        ({"lora": {"r": 0}}, "lora.r", "positive"),
        ({"lora": {"base": "frozen"}, "distill": {}}, "distill", "frozen"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, patch, key, words):
    raw = {**base(), **patch}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw), world_size=1)
    assert e.value.key == key
    assert words in str(e.value)


def test_inconsistent_batch_names_all_factors(tmp_path):
    raw = base()
    raw["train"] = {"micro_batch_size": 4, "gradient_accumulation_steps": 2, "train_batch_size": 8}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, raw), world_size=2)
    assert e.value.key == "train.train_batch_size"
    assert "= 16" in str(e.value)
    assert load_config(write(tmp_path, raw), world_size=1).train.train_batch_size == 8


def test_deepspeed_json_may_not_disagree_or_own_the_optimizer(tmp_path):
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16"):
        load_config(write(tmp_path, base(), {"train_micro_batch_size_per_gpu": 16}), world_size=1)
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(write(tmp_path, base(), {"optimizer": {"type": "Adam"}}), world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    raw = {**base(), "deepspeed": str(bad)}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p, world_size=1)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_and_deepspeed_config(tmp_path):
    cfg = load_config(
        write(tmp_path, base()),
        overrides=["train.micro_batch_size=3", "train.gradient_accumulation_steps=2"],
        world_size=2,
    )
    ds = deepspeed_config(cfg, world_size=2, bf16_available=False)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (3, 2, 12)
    assert ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, 2, bf16_available=True)["bf16"]["enabled"] is True


def test_shipped_quickstart_config_is_valid():
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", world_size=2)
    assert [d.name for d in cfg.domains] == ["code", "shakespeare", "bible"]


def test_reference_lists_every_section():
    keys = [row[0] for row in describe()]
    for k in ("train.lr", "blocks.p", "das.mask", "lora.per", "replay.share", "domains"):
        assert k in keys


def test_docs_config_reference_is_current():
    import subprocess
    import sys

    table = subprocess.run(
        [sys.executable, "-m", "cltk", "config-reference"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert table.strip() in (ROOT / "docs" / "config.md").read_text(), (
        "docs/config.md is stale: regenerate it with `cltk config-reference`"
    )
