"""LoRA runs on 2 real ranks (deepspeed launcher, gloo): frozen base (ZeRO 3), merged (ZeRO 2).

Each run is one launch; the checks then load what it saved in this (fresh) process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

# a few steps that move a zero-initialised adapter; mid-stage checkpoints for the resume test
LORA_TRAIN = {"lr": 3e-2, "warmup_steps": 1, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train(
    tmp: Path, zero: int, cache: Path, base: str, env=None, args=(), **sections
) -> tuple[Path, str]:
    cfg = write_tiny_run(
        tmp,
        zero_stage=zero,
        cache_dir=cache,
        train=LORA_TRAIN,
        lora={"r": 4, "alpha": 8.0, "base": base},
        **sections,
    )
    if zero == 3:  # partition every parameter: below the default threshold (1e5) ZeRO 3 keeps
        # small ones (all of a tiny adapter) whole on each rank, and gathering would go untested
        ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        (tmp / "ds.json").write_text(json.dumps(ds))
    proc = run_ranks(
        ["cltk", "train", "--config", str(cfg), *args],
        module=True,
        timeout=900,
        env=env,
        check=env is None,
    )
    return tmp / "out", proc.stdout


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def stage_json(out: Path, name: str, file: str) -> dict:
    return json.loads((out / "stages" / name / file).read_text())


@pytest.fixture(scope="module")
def frozen_zero3(tmp_path_factory, cache) -> tuple[Path, str]:
    return train(tmp_path_factory.mktemp("frozen3"), 3, cache, "frozen")


def test_frozen_base_zero3_adapters_load_in_a_fresh_process_and_reproduce_the_trained_model(
    frozen_zero3,
):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out, log = frozen_zero3
    for words in ("parameters trainable", "on disk", "median step", "router accuracy"):
        assert words in log
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    base = logits(AutoModelForCausalLM.from_pretrained(str(out / "lora_base")), ids)
    for stage, key in (("00-code", "code"), ("01-bible", "bible")):
        # the files hold the trained adapter (ZeRO 3 gathered it), on the saved base
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(out / "lora_base")),
            str(out / "adapters" / key),
        )
        adapted = logits(peft_model, ids)
        export = logits(AutoModelForCausalLM.from_pretrained(str(out / "stages" / stage)), ids)
        torch.testing.assert_close(adapted, export, rtol=1e-4, atol=1e-4)
        assert (adapted - base).abs().max() > 1e-3
        # ...and reproduce the engine's own model: the perplexity the run measured with the
        # DeepSpeed engine equals the one its evaluation got from the adapter files
        ev = stage_json(out, stage, "lora_eval.json")
        assert ev["oracle_full"][key] == pytest.approx(ev["latest_full"][key], rel=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapters" / "code"))  # base recorded
    torch.testing.assert_close(
        logits(auto, ids),
        logits(AutoModelForCausalLM.from_pretrained(str(out / "stages" / "00-code")), ids),
        rtol=1e-4,
        atol=1e-4,
    )

    report = json.loads((out / "lora_report.json").read_text())
    assert set(report["views"]) == {"oracle", "routed", "merged"}
    oracle = report["views"]["oracle"]["perplexity"]
    assert oracle[0][0] == oracle[1][0]  # code's own adapter is untouched by the bible stage
    forgetting = json.loads((out / "forgetting.json").read_text())
    assert forgetting["perplexity"] == report["views_full_sequence"]["oracle"]["perplexity"]
    router = report["router"][-1]
    assert 0 <= router["accuracy"] <= 1
    assert set(router["choices"]["code"]) == {"base", "code", "bible"}
    assert sum(router["choices"]["code"].values()) == 8  # eval_sequences: every sequence routed


def test_lora_run_killed_mid_stage_resumes_to_the_uninterrupted_result(tmp_path, cache, frozen_zero3):
    """A rank killed in the second domain's stage; --resume restores the adapter engine from the
    mid-stage checkpoint and ends with the uninterrupted run's matrix, views and adapters."""
    ref, _ = frozen_zero3
    out, _ = train(tmp_path, 3, cache, "frozen", env={"CLTK_KILL_AT": "1:3:1", "DEEPSPEED_TIMEOUT": "2"})
    assert (out / "checkpoints" / "latest").read_text().strip() == "s01-step000002"
    assert not (out / "forgetting.json").exists()
    out, log = train(tmp_path, 3, cache, "frozen", args=("--resume",))
    assert "resumed from checkpoint s01-step000002" in log
    got = json.loads((out / "forgetting.json").read_text())["perplexity"]
    want = json.loads((ref / "forgetting.json").read_text())["perplexity"]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)
    for view in ("oracle", "routed", "merged"):
        rep = [json.loads((d / "lora_report.json").read_text()) for d in (out, ref)]
        for a, b in zip(*(r["views"][view]["perplexity"] for r in rep)):
            assert a == pytest.approx(b, rel=1e-6), view
    from safetensors.torch import load_file

    for key in ("code", "bible"):
        a, b = (load_file(str(d / "adapters" / key / "adapter_model.safetensors")) for d in (out, ref))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_merged_base_zero2_with_soft_target_blocks_continues_each_domain_adapter(tmp_path, cache):
    """Two blocks per domain with soft targets from the previous stage's export (the teacher):
    the domain's adapter continues over its blocks, on the weights from before the domain."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, log = train(tmp_path, 2, cache, "merged", blocks={"k": 2})
    assert "soft targets" in log and "continues adapter 'bible'" in log
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    meta = json.loads((out / "adapters" / "bible" / "cltk_adapter.json").read_text())
    before = out / "stages" / "01-code-b1"
    assert Path(meta["base_model"]) == before.resolve()
    assert meta["stages"] == ["bible-b0", "bible-b1"]
    plain_before = AutoModelForCausalLM.from_pretrained(str(before))
    before_logits = logits(plain_before, ids)
    on_before = logits(PeftModel.from_pretrained(plain_before, str(out / "adapters/bible")), ids)
    last = logits(AutoModelForCausalLM.from_pretrained(str(out / "stages" / "03-bible-b1")), ids)
    torch.testing.assert_close(on_before, last, rtol=1e-4, atol=1e-4)
    assert (last - before_logits).abs().max() > 1e-3
    ev = stage_json(out, "03-bible-b1", "lora_eval.json")
    assert stage_json(out, "03-bible-b1", "stage.json")["perplexity"] == ev["latest_full"]
    report = json.loads((out / "lora_report.json").read_text())
    assert report["base"] == "merged" and "router" not in report
