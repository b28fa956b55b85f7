"""The HF Trainer door: soft targets or distillation from a frozen teacher in ``Trainer``.

For users whose training code already lives in the HF Trainer::

    trainer = SoftTargetTrainer(
        model=student, args=TrainingArguments(...), train_dataset=ds,
        teacher_model=previous_stage_model, soft_target={"p": 0.9, "one_hot_below": None},
    )
    trainer.train()

Only the loss changes: the student's logits and the teacher's log-probabilities go through
:func:`cltk.methods.kit.soft_losses.soft_target_loss` or :func:`cltk.methods.kit.soft_losses.distillation_loss`. Everything else
(optimizer, schedule, DeepSpeed via ``args.deepspeed``, checkpoints) is the Trainer's own.

Token normalisation: the loss is the sum over the tokens of a micro-batch divided by
``num_items_in_batch``, the Trainer's count of labelled tokens over the whole accumulated batch
(and over ranks when ``args.average_tokens_across_devices``), so micro-batch 1 x accumulation 8
equals 8 x 1 even when sequences hold different numbers of labelled tokens.

Limits: the teacher is a full copy on every rank (fine under ZeRO 1/2; under ZeRO 3 it is not
partitioned, use cltk's own engine for that); it runs in the dtype it was given. DataParallel
(several GPUs in one process, no launcher) is refused: launch one process per GPU.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from cltk.methods.kit.soft_losses import (
    check_distillation_args,
    check_soft_target_args,
    distillation_loss,
    soft_target_loss,
)

__all__ = ["SoftTargetTrainer", "shift_labels", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the HF convention for unlabelled positions

_SOFT_TARGET_KEYS = {"p", "one_hot_below"}
_DISTILL_KEYS = {"alpha", "beta", "temperature"}


def _options(
    soft_target: Mapping[str, Any] | None, distill: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """Validate the two option dicts; return ``("soft_target" | "distill", loss kwargs)``."""
    if (soft_target is None) == (distill is None):
        raise ValueError(
            "SoftTargetTrainer needs exactly one of soft_target={...} or distill={...}"
        )
    if soft_target is not None:
        unknown = set(soft_target) - _SOFT_TARGET_KEYS
        if unknown:
            raise ValueError(f"soft_target has unknown keys {sorted(unknown)}; "
                             f"known: {sorted(_SOFT_TARGET_KEYS)}")
        kwargs = {"p": 0.9, "one_hot_below": None, **soft_target}
        check_soft_target_args(kwargs["p"], kwargs["one_hot_below"])
        return "soft_target", kwargs
    distill = dict(distill or {})
    unknown = set(distill) - _DISTILL_KEYS
    if unknown:
        raise ValueError(
            f"distill has unknown keys {sorted(unknown)}; known: {sorted(_DISTILL_KEYS)}"
        )
    kwargs = {"alpha": 1.0, "beta": 1.0, "temperature": 1.0, **distill}
    check_distillation_args(kwargs["alpha"], kwargs["beta"], kwargs["temperature"])
    return "distill", kwargs


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Align labels with the logits of a causal LM: ``out[..., t] = labels[..., t + 1]``.

    The last position gets ``ignore_index``, so the logits are used whole: no slice, no copy of
    the ``[batch, seq, vocab]`` tensor.

    Args:
        labels: ``[batch, seq]`` token ids as fed to the model.
        ignore_index: value for the last position, which has no next token.

    Returns:
        ``[batch, seq]`` labels aligned with the logits.
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


class SoftTargetTrainer(Trainer):
    """``transformers.Trainer`` whose loss is soft-target CE or distillation against a teacher.

    Args:
        *args: passed to ``transformers.Trainer``.
        teacher_model: the frozen teacher (for continual pre-training, usually the model as it was
            after the previous stage). It is put in eval mode, its parameters stop requiring
            gradients, and it is moved to ``args.device``. It must share the student's tokenizer.
        soft_target: ``{"p": 0.9, "one_hot_below": None}``: see
            :func:`cltk.methods.kit.soft_losses.soft_target_loss`.
        distill: ``{"alpha": 1.0, "beta": 1.0, "temperature": 1.0}``: see
            :func:`cltk.methods.kit.soft_losses.distillation_loss`. Give exactly one of ``soft_target`` and
            ``distill``.
        **kwargs: passed to ``transformers.Trainer``.

    Batches must hold ``labels`` (the input ids with ``-100`` where no loss is wanted, unshifted,
    as for any HF causal LM) or ``shift_labels`` (already aligned with the logits).
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module,
        soft_target: Mapping[str, Any] | None = None,
        distill: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher_model is None:
            raise ValueError("SoftTargetTrainer needs a teacher_model")
        self.loss_mode, self.loss_kwargs = _options(soft_target, distill)
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"SoftTargetTrainer does not support DataParallel ({self.args.n_gpu} GPUs in one "
                "process): launch one process per GPU (torchrun / deepspeed / accelerate)"
            )
        teacher_model.requires_grad_(False)
        self.teacher_model = teacher_model.eval().to(self.args.device)
        # Have the Trainer count labelled tokens for every model, not only those whose forward
        # takes **kwargs: the count is what the loss is divided by (see the module docstring).
        self.model_accepts_loss_kwargs = True
        # We always shift, so the count must be over labels[..., 1:] (what `shift_labels` keeps).
        self._loss_shifts_labels = True

    def _teacher_logits(self, inputs: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        """Teacher logits ``[batch, seq, vocab]`` in the teacher's dtype.

        Raw logits, not log-probs: both losses normalise the teacher a chunk at a time, so no
        vocabulary-sized fp32 copy is made here.
        """
        with torch.no_grad():
            out = self.teacher_model(**inputs)
            logits = out["logits"] if isinstance(out, Mapping) else out[0]
        return logits.to(device)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Forward student and teacher, shift the labels once, and apply the configured loss.

        Args:
            model: the (possibly wrapped) student.
            inputs: one batch; ``labels`` / ``shift_labels`` are removed before the forwards, so
                the models do not compute a loss of their own.
            return_outputs: also return the student's outputs (evaluation).
            num_items_in_batch: the Trainer's labelled-token count of the accumulated batch; the
                summed loss is divided by it. Without it the loss is this batch's mean and the
                Trainer divides it by the accumulation steps.

        Returns:
            The scalar loss, or ``(loss, outputs)``.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        aligned = inputs.pop("shift_labels", None)
        if aligned is None:
            if labels is None:
                raise ValueError(
                    "SoftTargetTrainer needs 'labels' (or 'shift_labels') in every batch; got "
                    f"keys {sorted(inputs)}"
                )
            aligned = shift_labels(labels)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        teacher = self._teacher_logits(inputs, logits.device)
        aligned = aligned.to(logits.device)
        if self.loss_mode == "soft_target":
            loss = soft_target_loss(logits, aligned, teacher, ignore_index=IGNORE_INDEX,
                                    num_tokens=num_items_in_batch, **self.loss_kwargs)
        else:
            loss = distillation_loss(logits, aligned, teacher, ignore_index=IGNORE_INDEX,
                                     num_tokens=num_items_in_batch, **self.loss_kwargs)
        # Read by training_step just after this call: a loss already divided by the global count
        # must not be divided again by the accumulation steps.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and getattr(
            self.args, "average_tokens_across_devices", False
        ):
            # The count spans all ranks, and DDP / DeepSpeed average gradients over ranks: undo
            # that average, as the Trainer's own compute_loss does.
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp)
        return (loss, outputs) if return_outputs else loss
