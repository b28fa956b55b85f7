"""SoftTargetTrainer on a tiny random Llama, CPU only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from cltk.methods.kit.soft_losses import distillation_loss, soft_target_loss
from cltk.methods.soft_targets.hf_trainer import SoftTargetTrainer, shift_labels

VOCAB, SEQ, N = 64, 16, 8


def _llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(cfg).float()


class _Rows(torch.utils.data.Dataset):
    """Learnable sequences x[t+1] = x[t] + step (mod vocab); row i leaves its first i labels out,
    so rows hold different numbers of labelled tokens (what makes token normalisation matter)."""

    def __init__(self) -> None:
        self.items = []
        for i in range(N):
            ids = (torch.arange(SEQ) * (1 + i % 3) + 5 * i) % VOCAB
            labels = ids.clone()
            labels[:i] = -100
            mask = torch.ones(SEQ, dtype=torch.long)
            self.items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def batch(self) -> dict:
        return {k: torch.stack([it[k] for it in self.items]) for k in self.items[0]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=N,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        weight_decay=0.0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _hand_soft_target(student, teacher, batch, **kw) -> torch.Tensor:
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # shifted by hand, the usual way: drop the last logit and the first label
    return soft_target_loss(s[:, :-1], batch["labels"][:, 1:], F.log_softmax(t[:, :-1], -1), **kw)


def test_shift_labels_aligns_and_pads():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert shift_labels(labels).tolist() == [[2, 3, -100], [-100, 6, -100]]


def test_trains_and_reports_the_soft_target_loss(tmp_path):
    student, teacher = _llama(0), _llama(1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = _Rows()
    opts = {"p": 0.6, "one_hot_below": 0.01}
    expected_first = _hand_soft_target(student, teacher, data.batch(), **opts).item()
    trainer = SoftTargetTrainer(
        model=student,
        args=_args(tmp_path, max_steps=15),
        train_dataset=data,
        teacher_model=teacher,
        soft_target=opts,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 15
    # the first logged step ran on the untouched student, with the whole data set as its batch
    assert losses[0] == pytest.approx(expected_first, rel=1e-4)
    assert losses[-1] < 0.7 * losses[0]
    # the teacher stayed frozen and in eval mode
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    # evaluation goes through the same loss
    metrics = trainer.evaluate(eval_dataset=data)
    expected_eval = _hand_soft_target(student, teacher, data.batch(), **opts).item()
    assert metrics["eval_loss"] == pytest.approx(expected_eval, rel=1e-4)


def test_accumulation_matches_one_big_batch(tmp_path):
    """micro-batch 2 x accumulation 4 gives the same update as 8 x 1 (SGD, one step)."""
    data, teacher = _Rows(), _llama(1)
    params = []
    for bs, ga in [(N, 1), (2, 4)]:
        student = _llama(0)
        trainer = SoftTargetTrainer(
            model=student,
            args=_args(
                tmp_path / f"{bs}",
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                optim="sgd",
                learning_rate=1.0,
                max_grad_norm=0.0,
            ),
            train_dataset=data,
            teacher_model=teacher,
            soft_target={"p": 0.6},
        )
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    moved = (params[0] - torch.cat([p.flatten() for p in _llama(0).parameters()])).abs().max()
    assert moved > 1e-3  # the step did something
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_distill_compute_loss_matches_hand(tmp_path):
    student, teacher, data = _llama(0), _llama(1), _Rows()
    opts = {"alpha": 0.5, "beta": 0.7, "temperature": 2.0}
    trainer = SoftTargetTrainer(
        model=student, args=_args(tmp_path), train_dataset=data, teacher_model=teacher, distill=opts
    )
    batch = data.batch()
    got = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
    want = distillation_loss(
        s[:, :-1], batch["labels"][:, 1:], F.log_softmax(t[:, :-1], -1), **opts
    )
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # with a global count the sum is divided by it instead
    n = int((batch["labels"][:, 1:] != -100).sum())
    half = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(2 * n))
    assert half.item() == pytest.approx(want.item() / 2, rel=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({}, "exactly one"),
        ({"soft_target": {"p": 0.9}, "distill": {"alpha": 1.0}}, "exactly one"),
        ({"soft_target": {"q": 0.9}}, "unknown keys"),
        ({"soft_target": {"p": 1.5}}, "p must be in"),
        ({"distill": {"temperature": -1.0}}, "temperature"),
    ],
)
def test_rejects_bad_options(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        SoftTargetTrainer(model=_llama(0), args=_args(tmp_path), teacher_model=_llama(1), **kw)


def test_batch_without_labels_is_refused(tmp_path):
    student = _llama(0)
    trainer = SoftTargetTrainer(
        model=student, args=_args(tmp_path), teacher_model=_llama(1), soft_target={}
    )
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(student, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
