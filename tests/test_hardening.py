"""The second hardening pass (issue 22): a table of bad inputs, each one line, exit 2, no traceback and
nothing in the output directory changed, run through ``cltk.cli.main`` in this process; the output
directory's lock between two real processes; row 0 keyed by what it depends on; data edited in place
refused on ``--resume``; a surviving rank told that another rank died.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from cltk import cli
from tests.kit import tiny_llama
from tests.multirank import free_port
from tests.test_user_errors import _tmpfs, _umount, assert_one_line
from tests.tiny_run import TINY_MODEL, write_tiny_run

ROOT = Path(__file__).resolve().parents[1]


def snapshot(out: Path) -> dict[str, tuple[int, int]] | None:
    if not out.exists():
        return None
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


# ----- the table -----------------------------------------------------------------------------------
# Each case writes its inputs under tmp and returns (argv, words the one line must hold). The output
# directory (tmp/out) holds a user's file beforehand; it must come out exactly as it went in.

Case = Callable[[Path], tuple[list[str], list[str]]]


def _train(tmp: Path, *sets: str, **sections: Any) -> list[str]:
    argv = ["train", "--config", str(write_tiny_run(tmp, **sections))]
    for s in sets:
        argv += ["--set", s]
    return argv


def _ds(tmp: Path, text: bytes | str) -> list[str]:
    argv = _train(tmp)
    (tmp / "ds.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return argv


def _model_dir(tmp: Path, weights: bytes | None) -> Path:
    """A model directory with a real config.json and the given bytes as model.safetensors."""
    d = tmp / "model"
    d.mkdir(parents=True, exist_ok=True)
    tiny_llama(vocab_size=400).config.save_pretrained(d)
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def _real_weights(tmp: Path) -> bytes:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4096)}, str(tmp / "w.safetensors"))
    return (tmp / "w.safetensors").read_bytes()


def _init_from(tmp: Path, weights: bytes | None) -> list[str]:
    d = _model_dir(tmp, weights)
    return _train(tmp, model={"init_from": str(d)}, tokenizer={"train": {"vocab_size": 400}})


def _yaml_error(tmp: Path) -> list[str]:
    argv = _train(tmp)
    text = (tmp / "run.yaml").read_text().replace("name: tiny", "name: tiny\ntrain: {lr: [1,")
    (tmp / "run.yaml").write_text(text)
    return argv


def _files(tmp: Path, make: Callable[[Path], None]) -> list[str]:
    (tmp / "docs").mkdir(parents=True, exist_ok=True)
    make(tmp / "docs" / "a.txt")
    return _train(tmp, domains=[{"name": "notes", "source": {"files": "docs/*.txt"}}])


def _eval(tmp: Path, weights: bytes | None, *extra: str) -> list[str]:
    d = _model_dir(tmp / "m", weights)
    return ["eval", "--config", str(write_tiny_run(tmp)), "--models", str(d), *extra]


def _bench_out_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["bench", "--tier", "small", "--out", str(tmp / "afile"), "--arms", "naive"]


def _ner(tmp: Path) -> list[str]:
    raw = yaml.safe_load((ROOT / "examples" / "ner" / "brown.yaml").read_text())
    raw["train"]["lr"] = "fast"
    raw["deepspeed"] = str(ROOT / "ds_configs" / "zero2.json")
    (tmp / "ner.yaml").write_text(yaml.safe_dump(raw))
    return ["ner", "--config", str(tmp / "ner.yaml")]


CASES: dict[str, tuple[Case, list[str]]] = {
    # numbers a type check lets through
    "lr nan": (lambda t: _train(t, "train.lr=.nan"), ["train.lr", "finite"]),
    "lr inf": (lambda t: _train(t, "train.lr=.inf"), ["train.lr", "finite"]),
    "weight_decay inf": (lambda t: _train(t, "train.weight_decay=.inf"), ["train.weight_decay"]),
    "epochs inf": (lambda t: _train(t, "train.epochs=.inf", "train.max_steps_per_stage=null"),
                   ["train.epochs", "finite"]),
    "grad_clip nan": (lambda t: _train(t, "train.grad_clip=.nan"), ["train.grad_clip", "finite"]),
    "output_dir empty": (lambda t: _train(t, "output_dir=''"), ["output_dir", "empty"]),
    "override bad yaml": (lambda t: _train(t, "train.lr=[1,"), ["train.lr", "not valid YAML"]),
    # the DeepSpeed JSON
    "ds zero int": (lambda t: _ds(t, '{"zero_optimization": 2}'), ["zero_optimization", "object"]),
    "ds zero list": (lambda t: _ds(t, '{"zero_optimization": [2]}'), ["zero_optimization", "list"]),
    "ds not utf8": (lambda t: _ds(t, b'{"bf16": {"enabled": "\xff"}}'), ["ds.json", "not UTF-8"]),
    "ds bf16 yes": (lambda t: _ds(t, '{"bf16": {"enabled": "yes"}}'), ["bf16.enabled", "'yes'"]),
    "ds clipping differs": (lambda t: _ds(t, '{"gradient_clipping": 0.5}'),
                            ["gradient_clipping=0.5", "train.grad_clip is 1"]),
    # the model
    "hidden_size 0": (lambda t: _train(t, model={"config": {**TINY_MODEL, "hidden_size": 0}}),
                      ["model.config.hidden_size", "positive"]),
    "layers 0": (lambda t: _train(t, model={"config": {**TINY_MODEL, "num_hidden_layers": 0}}),
                 ["model.config.num_hidden_layers", "positive"]),
    "tokenizer beyond embedding": (
        lambda t: _train(t, model={"config": {**TINY_MODEL, "vocab_size": 300}}),
        ["tokenizer.train.vocab_size", "300 rows"]),
    "init_from no weights": (lambda t: _init_from(t, None), ["model.init_from", "no weights"]),
    "init_from truncated": (lambda t: _init_from(t, _real_weights(t)[:5000]),
                            ["model.init_from", "model.safetensors", "damaged"]),
    "init_from garbage": (lambda t: _init_from(t, b"garbage" * 50),
                          ["model.init_from", "model.safetensors", "damaged"]),
    "lora target no layer": (lambda t: _train(t, lora={"target_modules": ["q_prj"]}),
                             ["lora.target_modules", "q_prj", "q_proj"]),
    # sections written but "off": checked all the same
    "replay share negative": (lambda t: _train(t, replay={"share": -0.1}), ["replay.share"]),
    "replay general negative": (lambda t: _train(t, replay={"general_share": -0.5}),
                                ["replay.general_share"]),
    "blocks k negative": (lambda t: _train(t, blocks={"k": -3}), ["blocks.k", "> 0"]),
    "blocks p off": (lambda t: _train(t, blocks={"k": 1, "p": 5.0}), ["blocks.p"]),
    "distill alpha": (lambda t: _train(t, distill={"alpha": -1}), ["distill.alpha", ">= 0"]),
    # messages that must name the right thing
    "unknown key in optional section": (
        lambda t: _train(t, tokenizer={"train": {"vocab_size": 400, "vocab_sise": 3}}),
        ["tokenizer.train.vocab_sise", "did you mean 'vocab_size'"]),
    "source kind typo": (
        lambda t: _train(t, domains=[{"name": "a", "source": {"builtin": "kjv", "fiels": "x"}}]),
        ["'fiels' is not a source kind", "'files'"]),
    "yaml syntax": (_yaml_error, ["run.yaml:", "not valid YAML"]),
    "config not utf8": (lambda t: (_train(t), (t / "run.yaml").write_bytes(b"name: \xff\n"))[0],
                        ["run.yaml", "not UTF-8"]),
    "fifo": (lambda t: _files(t, lambda p: os.mkfifo(p)), ["a.txt", "FIFO"]),
    "dangling symlink": (lambda t: _files(t, lambda p: p.symlink_to(t / "gone.txt")),
                         ["a.txt", "dangling symlink", "gone.txt"]),
    # other commands
    "eval config no weights": (lambda t: _eval(t, None), ["no weights"]),
    "eval garbage weights": (lambda t: _eval(t, b"\x00" * 100), ["model.safetensors", "damaged"]),
    "bench out is a file": (_bench_out_file, ["--out", "afile", "is a file"]),
    "bench bad override": (lambda t: ["bench", "--tier", "small", "--out", str(t / "b"), "--arms",
                                      "naive", "--set", "train.lrr=1"],
                           ["before any run", "train.lrr", "did you mean 'lr'"]),
    "ner string for a number": (_ner, ["train.lr", "must be a number"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_and_changes_nothing(name, tmp_path, capsys, process_group):
    setup, words = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    before = snapshot(out)
    argv = setup(tmp_path)
    start = time.perf_counter()
    code, printed = run_cli(capsys, argv)
    seconds = time.perf_counter() - start
    assert_one_line(code, printed, *words)
    assert snapshot(out) == before, name
    assert not (tmp_path / "b").exists() or name != "bench bad override"
    print(f"{name}: {seconds:.1f} s")  # the timings docs/config.md lists (pytest -s)


def test_agem_memory_beyond_an_earlier_stage_is_refused_before_row_0(tmp_path, capsys, process_group):
    cfg = write_tiny_run(tmp_path, agem={"memory": 100000})
    code, printed = run_cli(capsys, ["train", "--config", str(cfg)])
    assert_one_line(code, printed, "agem.memory", "100000")
    assert not (tmp_path / "out" / "start.json").exists()  # refused before row 0 was measured
    assert not (tmp_path / "out" / ".cltk.lock").exists()  # the lock goes with the run


def test_read_only_places(tmp_path, capsys, process_group):
    ro = tmp_path / "ro"
    _tmpfs(ro, "1m", readonly=True)
    try:
        cfg = write_tiny_run(tmp_path, data={"cache_dir": str(ro / "cache")})
        assert_one_line(*run_cli(capsys, ["prepare", "--config", str(cfg)]), "data.cache_dir",
                        "Read-only")
        argv = _eval(tmp_path, _real_weights(tmp_path), "--out", str(ro / "eval"))
        assert_one_line(*run_cli(capsys, argv), "cltk eval --out", "Read-only")
    finally:
        _umount(ro)


def test_relative_globs_resolve_against_the_config_directory(tmp_path, monkeypatch):
    from cltk.data.prepare import _parts
    from cltk.validate import load_config

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello\n")
    cfg = load_config(write_tiny_run(tmp_path, domains=[
        {"name": "notes", "source": {"files": "docs/*.txt"}}]))
    monkeypatch.chdir(ROOT)  # another working directory: the glob still finds the file
    (_, _, _, stats), = _parts(cfg, cfg.domains[0])
    assert [s[0] for s in stats] == [str(tmp_path / "docs" / "a.txt")]


# ----- the output directory's lock --------------------------------------------------------------------


def _holder(out: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from cltk.lock import acquire; "
            "acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path, capsys, process_group):
    domains = [{"name": "code", "source": {"files": str(tmp_path / "none" / "*.py")}}]
    cfg = write_tiny_run(tmp_path, domains=domains)  # fails on its data right after the lock
    out = tmp_path / "out"
    out.mkdir()
    holder = _holder(out)
    try:
        before = snapshot(out)
        for extra in ([], ["--resume"]):  # a second run, or a requeued job resuming
            line = assert_one_line(*run_cli(capsys, ["train", "--config", str(cfg), *extra]),
                                   "in use by another cltk run", socket.gethostname(),
                                   f"pid {holder.pid}")
            assert "Nothing was changed" in line
            assert snapshot(out) == before
    finally:
        holder.kill()  # kill -9: the lock file stays behind, with the dead holder's line
        holder.wait()
    assert (out / ".cltk.lock").read_text().split() == [socket.gethostname(), str(holder.pid)]
    code, printed = run_cli(capsys, ["train", "--config", str(cfg), "--resume"])
    assert "in use" not in printed  # the dead holder does not block: the run got to its data
    assert_one_line(code, printed, "none")
    assert not (out / ".cltk.lock").exists()  # released (removed) when the run ended


def test_two_real_runs_into_one_output_dir(tmp_path):
    """The issue's case: two ``cltk train`` into one output_dir; the second is refused, the first's
    metrics are whole. The first is paused (SIGSTOP) once it holds the lock, so the second surely
    meets it alive, then continued."""
    cfg = write_tiny_run(tmp_path, train={"max_steps_per_stage": 2}, eval={"start": False})
    def env() -> dict[str, str]:  # each process its own rendezvous port
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": "0",
                "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(free_port())}

    cmd = [sys.executable, "-m", "cltk", "train", "--config", str(cfg)]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lock = tmp_path / "out" / ".cltk.lock"
    deadline = time.time() + 600
    def held() -> bool:  # the file exists and its line is written
        try:
            return bool(lock.read_text().strip())
        except OSError:
            return False

    while not held() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        assert lock.exists(), "the first run ended before it took the lock"
        second = subprocess.run(cmd + ["--resume"], env=env(), capture_output=True, text=True,
                                timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # a header and 2 steps of 2 stages: nothing interleaved


# ----- row 0 and the data a run trained on ---------------------------------------------------------


def test_row_0_is_measured_again_when_what_it_depends_on_changes(tmp_path, capsys, process_group,
                                                                 monkeypatch):
    import cltk.continual
    from cltk.errors import UserError

    def stop(self, *a, **k):  # each attempt measures row 0, then stops before training
        raise UserError("stopped after row 0 (test)")

    monkeypatch.setattr(cltk.continual.ContinualRun, "run_stage", stop)
    start = tmp_path / "out" / "start.json"

    def attempt(**data: Any) -> tuple[dict, str]:
        code, printed = run_cli(capsys, ["train", "--config",
                                         str(write_tiny_run(tmp_path, data=data))])
        assert_one_line(code, printed, "stopped after row 0")
        return json.loads(start.read_text()), printed

    first, _ = attempt()
    again, printed = attempt()
    assert again == first and "row 0 read from" in printed
    shorter, printed = attempt(seq_len=16)
    assert "measured with another seq_len" in printed
    assert shorter["key"]["seq_len"] == 16 and shorter["perplexity"] != first["perplexity"]
    fewer, printed = attempt(seq_len=16, eval_sequences=2)
    assert "another eval_sequences" in printed and fewer["perplexity"] != shorter["perplexity"]


def _edit_in_place(path: Path, offset: int) -> None:
    """Change one byte at ``offset``, keeping the size and the mtime."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] = ord("Z") if data[offset] != ord("Z") else ord("Y")
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_data_edited_in_place_is_refused_on_resume(tmp_path, capsys, process_group):
    import shutil

    from cltk.data.reading import SAMPLE_BYTES

    docs = tmp_path / "docs"
    docs.mkdir()
    line = "def f(x):\n    return x * 2  # a line of code to learn\n\n"
    small, big = docs / "small.txt", docs / "big.txt"
    small.write_text(line * 400)  # ~20 KB: hashed whole
    big.write_text(line * 5000)  # ~250 KB: hashed in samples
    assert small.stat().st_size < SAMPLE_BYTES < big.stat().st_size
    cfg = write_tiny_run(tmp_path, domains=[
        {"name": "small", "source": {"files": str(small)}},
        {"name": "big", "source": {"files": str(big)}}],
        train={"max_steps_per_stage": 1}, eval={"start": False})
    code, printed = run_cli(capsys, ["train", "--config", str(cfg)])
    assert code == 0, printed
    recorded = (tmp_path / "out" / "data.json").read_text()
    _edit_in_place(small, 5000)
    line1 = assert_one_line(*run_cli(capsys, ["train", "--config", str(cfg), "--resume"]),
                            "domain 'small'", "edited in place (same size and mtime")
    shutil.copy(big, tmp_path / "big.orig")
    small.write_text(line * 400)
    os.utime(small, ns=(0, json.loads(recorded)["small"]["files"][0][2]))
    # an edit the samples miss, read again because the cache is gone: refused by the content hash,
    # and data.json keeps what the run trained on
    _edit_in_place(big, 20000)
    shutil.rmtree(tmp_path / "cache")
    line2 = assert_one_line(*run_cli(capsys, ["train", "--config", str(cfg), "--resume"]),
                            "domain 'big'", "content hash")
    assert (tmp_path / "out" / "data.json").read_text() == recorded, (line1, line2)


# ----- a surviving rank ---------------------------------------------------------------------------

SURVIVOR = """
import os, signal, sys, time
import cltk.cli as cli
from cltk import distributed as dist

def body(args):
    dist.init()
    if dist.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(2)
    dist.barrier()
    return 0

cli._main = body
sys.exit(cli.main(["train", "--config", "unused.yaml"]))
"""


def test_a_surviving_rank_says_another_rank_died_and_how_to_resume(tmp_path):
    script = tmp_path / "survivor.py"
    script.write_text(SURVIVOR)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT), "DEEPSPEED_TIMEOUT": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    out0, _ = procs[0].communicate(timeout=300)
    procs[1].communicate(timeout=60)
    assert procs[0].returncode == cli.EXIT_PEER_LOST, out0[-3000:]
    lines = [ln for ln in out0.splitlines() if ln.startswith("cltk: ")]
    assert len(lines) == 1 and "another rank died" in lines[0] and "--resume" in lines[0], out0
    assert "bug in cltk" not in out0 and "Traceback" not in out0


# ----- settings that were ignored ------------------------------------------------------------------


def test_heatmap_false_draws_no_picture_and_removes_an_old_one(tmp_path):
    from cltk.metrics import forgetting_report
    from cltk.metrics_files import save_report

    report = forgetting_report([[10.0, 20.0], [12.0, 15.0]], ["s0", "s1"], ["a", "b"], ["a", "b"])
    assert save_report(report, tmp_path)["png"].is_file()
    paths = save_report(report, tmp_path, heatmap=False)
    assert "png" not in paths and not (tmp_path / "forgetting.png").exists()
    assert (tmp_path / "forgetting.csv").is_file() and (tmp_path / "forgetting.json").is_file()


def test_a_warmup_longer_than_its_span_is_said():
    from types import SimpleNamespace

    from cltk.schedules import warmup_note

    t = SimpleNamespace(warmup_steps=10, lr_span="stage")
    assert "train.warmup_steps 10 >= the stage's 6 steps" in warmup_note(t, [6, 20], 0)
    assert warmup_note(t, [6, 20], 1) is None
    run = SimpleNamespace(warmup_steps=10, lr_span="run")
    assert warmup_note(run, [6, 20], 0) is None and warmup_note(run, [4, 5], 0) is not None
    assert warmup_note(run, [4, 5], 1) is None  # a run-long schedule warms up once
