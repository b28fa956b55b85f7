"""``cltk plan --memory``: the model states against DeepSpeed's own estimators, the parts that each
setting changes, the methods' declared memory, the fit search, and the command's output and errors.
The estimate against measured peaks of real runs: benchmarks/memplan_check.py (docs/launching.md)."""

from __future__ import annotations

import dataclasses

import pytest

from cltk import memplan
from cltk.cli import main
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 8192}


def cfg_of(tmp_path, zero=2, **sections):
    path = write_tiny_run(tmp_path, zero_stage=zero, **sections)
    return path, load_config(path)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """An 8B Llama run config (planned only: the model is built on the meta device)."""
    path = write_tiny_run(tmp_path_factory.mktemp("big"), model={"config": LLAMA_8B},
                          data={"seq_len": 4096}, train={"micro_batch_size": 2})
    cfg = load_config(path)
    return path, cfg, memplan.model_shape(cfg)


def states(shape, s, trainable=None):
    return sum(b for part, _, b in memplan.model_states(shape, s, trainable or shape.params))


def test_the_8b_shape_is_read_from_its_config_without_weights(big):
    _, _, shape = big
    assert shape.params == 8_030_261_248  # Llama-3-8B
    assert shape.largest_layer == 128256 * 4096 and shape.layers == 32


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_equal_deepspeeds_estimator(big, offload):
    _, cfg, shape = big
    s = dataclasses.replace(memplan.setup_of(cfg, 16, 8, "cuda"), offload_optimizer=offload)
    assert s.weight_bytes == 2 and s.zero_stage == 2
    ds_gpu, host = memplan.deepspeed_estimates(shape, s, shape.params)
    assert states(shape, s) == ds_gpu
    assert (host > 0) == offload


def test_zero3_model_states_are_deepspeeds_plus_the_16bit_gradient_partition(big):
    _, cfg, shape = big
    s = dataclasses.replace(memplan.setup_of(cfg, 16, 8, "cuda"), zero_stage=3)
    ds_gpu, _ = memplan.deepspeed_estimates(shape, s, shape.params)
    # DeepSpeed counts 18 bytes per parameter over the ranks; cltk also the bf16 gradient partition
    assert states(shape, s) - ds_gpu == pytest.approx(2 * shape.params / 16, rel=1e-6)
    off = dataclasses.replace(s, offload_optimizer=True, offload_param=True)
    assert states(shape, off) == 2 * shape.largest_layer * 2  # only the gathered layers stay


def test_settings_move_the_parts_they_should(big):
    _, cfg, shape = big
    s = memplan.setup_of(cfg, 16, 8, "cuda")
    plain = memplan.activation_bytes(shape, s, False)
    ckpt = memplan.activation_bytes(shape, s, True)
    assert ckpt < plain / 8  # 32 layers: each keeps its input, one is recomputed
    eager = memplan.activation_bytes(shape, dataclasses.replace(s, attention="eager"), False)
    assert eager - plain == 32 * 2 * 2 * 32 * 4096 * 4096 * 2  # scores + softmax per layer
    fp32 = dataclasses.replace(s, weight_bytes=4)
    assert memplan.activation_bytes(shape, fp32, False) == 2 * plain
    # a CPU rank only touches as much of a bucket as it fills
    tiny_cpu = dataclasses.replace(s, device="cpu")
    assert memplan.buffer_bytes(tiny_cpu, 1000)[0][2] == 1000 * 2
    assert memplan.buffer_bytes(s, 1000)[0][2] == s.reduce_bucket_size * 2


def test_methods_declare_their_memory(tmp_path):
    _, base = cfg_of(tmp_path / "a")
    shape = memplan.model_shape(base)
    s = memplan.setup_of(base, 2, 2, "cpu")
    plain = memplan.estimate(base, shape, s)

    def extra(**sections):
        _, cfg = cfg_of(tmp_path / str(len(sections)) / next(iter(sections)), **sections)
        plan = memplan.estimate(cfg, shape, s)
        return {what: b for part, what, b in plan.lines if part.startswith("method ")}, plan

    ewc, _ = extra(ewc={"lam": 1.0})
    assert list(ewc.values()) == [3 * 4 * -(-shape.params // 2)]
    distill, _ = extra(distill={"alpha": 0.5, "beta": 0.5})
    assert distill["teacher weights (frozen copy)"] == shape.params * 4
    assert distill["teacher logits"] == 2 * 32 * shape.vocab * 4
    lora, plan = extra(lora={"r": 4, "alpha": 8.0})
    grads = next(b for _, what, b in plan.lines if what.startswith("gradients"))
    assert 0 < grads < next(b for _, what, b in plain.lines if what.startswith("gradients")) / 4


def test_the_smallest_change_that_fits(big):
    _, cfg, shape = big
    s = dataclasses.replace(memplan.setup_of(cfg, 16, 8, "cuda"), zero_stage=1)
    assert memplan.estimate(cfg, shape, s).total > 80 * memplan.GIB
    fix = memplan.smallest_fix(cfg, shape, s, 80 * memplan.GIB)
    assert fix is not None and fix[0] == ["ZeRO stage 2 (ds_configs/zero2.json)"]  # the cheapest
    assert fix[1].total <= 80 * memplan.GIB
    # at 4 x 4k tokens ZeRO 2 alone leaves 8B over 80 GiB; checkpointing alone fits
    s4 = dataclasses.replace(s, micro_batch=4)
    fix = memplan.smallest_fix(cfg, shape, s4, 80 * memplan.GIB)
    assert fix is not None and fix[0] == ["train.activation_checkpointing: true"]
    # 40 GiB: no single change; the changes in cost order until it fits
    fix = memplan.smallest_fix(cfg, shape, s4, 40 * memplan.GIB)
    assert fix is not None and len(fix[0]) > 1 and fix[1].total <= 40 * memplan.GIB
    assert memplan.smallest_fix(cfg, shape, s, 2 * memplan.GIB) is None


def test_plan_command_prints_the_parts_and_the_fit(big, capsys):
    path, _, _ = big
    assert main(["plan", "--memory", "--config", str(path), "--world-size", "16",
                 "--gpu-memory", "80", "--set", "train.micro_batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "| model states | weights (bf16) |" in out and "**total**" in out
    assert "does not fit" in out and "train.activation_checkpointing: true" in out
    assert "DeepSpeed's estimator, model states only" in out
    assert main(["plan", "--memory", "--config", str(path), "--world-size", "16", "--gpu-memory",
                 "80", "--set", "train.micro_batch_size=4",
                 "--set", "train.activation_checkpointing=true"]) == 0
    assert "fits:" in capsys.readouterr().out


def test_plan_command_user_errors(tmp_path, capsys):
    path, _ = cfg_of(tmp_path)
    assert main(["plan", "--memory", "--config", str(path), "--gpu-memory", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("cltk: plan: --gpu-memory must be > 0")
    assert main(["plan", "--memory", "--config", str(path), "--measured", str(tmp_path)]) == 2
    assert "holds no finished stage" in capsys.readouterr().err
