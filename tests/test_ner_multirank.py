"""One real 2-rank launch (deepspeed launcher, CPU, gloo) of tiny continual NER runs on a slice of
the Brown corpus: ExtendNER under ZeRO 2 and ZeRO 3 (which must train alike, the ZeRO 3 teacher
partitioned), and AddNER under ZeRO 1, each two steps with a teacher in the second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cltk.data.tokenizer import train_tokenizer
from cltk.ner.data import NerDataError, brown_dir, read_brown
from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path, name: str, variant: str, zero: int, tokenizer: Path) -> Path:
    raw = {
        "output_dir": str(tmp / name),
        "variant": variant,
        "distill": {"alpha": 1.0, "beta": 1.0, "temperature": 2.0},
        "deepspeed": str(ROOT / "ds_configs" / f"zero{zero}.json"),
        "model": {"config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 64,
                             "max_position_embeddings": 96, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0}},
        "tokenizer": {"path": str(tokenizer)},
        "train": {"steps": 4, "micro_batch_size": 4, "lr": 0.003, "max_len": 64, "log_every": 1},
        "steps": [
            {"name": "names", "types": ["NAME"],
             "data": {"brown": {"categories": ["news"], "offset": 0, "sentences": 48}}},
            {"name": "numbers", "types": ["NUM"],
             "data": {"brown": {"categories": ["news"], "offset": 48, "sentences": 48}}},
        ],
        "eval": {"brown": {"categories": ["news"], "offset": 4000, "sentences": 24}},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_addner_and_extendner_on_two_ranks_under_zero_1_2_3(tmp_path):
    try:
        brown_dir()
    except NerDataError as e:
        pytest.skip(str(e))
    # one tokenizer for every run (BPE training breaks ties differently from process to process)
    sents = read_brown({"categories": ["news"], "sentences": 96})
    train_tokenizer([" ".join(w) for w, _ in sents], 500, tmp_path / "tok")
    runs = {"extend_z2": ("extendner", 2), "extend_z3": ("extendner", 3), "add_z1": ("addner", 1)}
    cfgs = [_config(tmp_path, name, v, z, tmp_path / "tok") for name, (v, z) in runs.items()]
    run_ranks([ROOT / "tests" / "scripts" / "ner_ranks.py", *cfgs], timeout=600)
    for name, (variant, _) in runs.items():
        out = tmp_path / name
        report = json.loads((out / "ner_f1.json").read_text())
        assert len(report["f1"]) == 2 and report["types"] == ["NAME", "NUM"]
        assert all(0 <= v <= 1 for row in report["f1"] for v in row)
        assert set(report["forgetting"]) == {"NAME"} and (out / "ner_f1.png").stat().st_size > 0
        log = _log(out)
        assert [r["step"] for r in log] == [0] * 4 + [1] * 4
        # step 0 has no teacher; step 1 distils from one, and the term is live (teacher != student)
        assert all("kd" not in r for r in log[:4])
        assert all(r["kd"] > 1e-4 for r in log[5:])
        if variant == "addner":  # the old layers start as the teacher's copy: KL 0
            assert abs(log[4]["kd"]) < 1e-6
        # ExtendNER's CE covers new-type tokens only: a micro-batch may have none
        assert all(r["ce"] >= 0 for r in log) and sum(r["ce"] > 0 for r in log[4:]) >= 2
        s0 = torch.load(out / "steps" / "0-names" / "tagger.pt")
        s1 = torch.load(out / "steps" / "1-numbers" / "tagger.pt")
        if variant == "extendner":  # one layer, grown from O,B,I to O,B,I,B,I
            assert s0["heads.0.weight"].shape[0] == 3 and s1["heads.0.weight"].shape[0] == 5
            assert "heads.1.weight" not in s1
        else:  # a second layer beside the first
            assert s1["heads.0.weight"].shape == s0["heads.0.weight"].shape
            assert s1["heads.1.weight"].shape[0] == 3
    # ZeRO 3 (student and teacher partitioned) trains like ZeRO 2 (a full teacher per rank)
    z2, z3 = _log(tmp_path / "extend_z2"), _log(tmp_path / "extend_z3")
    for key in ("loss", "ce", "kd"):
        assert [r.get(key, 0.0) for r in z3] == pytest.approx([r.get(key, 0.0) for r in z2],
                                                             rel=1e-4, abs=1e-6)
