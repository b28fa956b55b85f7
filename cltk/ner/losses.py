"""Losses of continual token classification (AddNER / ExtendNER), as pure functions.

Monaikul et al. (2021), "Continual Learning for Named Entity Recognition": the student is a copy of
the previous model (the teacher, frozen); the loss is ``alpha * KL(teacher || student)`` on the old
types' outputs plus ``beta * CE`` on the new types' labels. The KL term is taken at temperature T on
both sides and scaled by T^2 (Hinton et al. 2015), so its gradient scale does not shrink with T.

Positions are flattened: logits ``[N, C]`` and labels ``[N]`` with -100 where no word starts.
``distill_kl`` and ``token_ce`` are means over the positions they cover (0 when none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltk.ner.data import IGNORE


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over ``mask`` positions.

    Args:
        student_logits: ``[N, C]``.
        teacher_logits: ``[N, C]``, same columns; ``-inf`` where the teacher gives probability 0.
        mask: ``[N]`` bool, the positions to distil.
        temperature: T > 0.
    """
    t = float(temperature)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    p_t = log_p_t.exp()
    # xlogy: a column the teacher gives probability 0 (-inf logit) adds 0, not 0 * -inf
    kl = (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(-1)
    return t * t * _masked_mean(kl, mask)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [N, C]`` against ``labels [N]``, mean over ``mask`` positions."""
    safe = labels.clamp(min=0)
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    return _masked_mean(ce, mask & (labels != IGNORE))


def extendner_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                   alpha: float, beta: float, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ExtendNER: one output layer whose first ``C_old`` columns are the teacher's labels.

    Args:
        student: ``[N, C]`` logits (``O`` is column 0, then B/I of old types, then new types).
        teacher: ``[N, C_old]`` logits of the frozen previous model, or ``None`` (first step, or
            naive fine-tuning: plain CE on every labelled position).
        labels: ``[N]`` label ids in the student's columns, -100 where ignored. The step's data
            tags only the new types, so ``O`` may hide an old-type entity.

    As in Monaikul et al.: a position labelled with a new type takes CE on its label; a position
    labelled ``O`` (not a new type, maybe an old one) takes the teacher's distribution as its
    target, with probability 0 on the new columns: KL between that and the student's softmax over
    **all** columns, so the student learns to keep the old types there and not to claim new ones.
    Both terms are sums over their tokens divided by the number of labelled tokens (the metrics
    ``ce`` and ``kd`` are these shares).
    """
    labelled = labels != IGNORE
    if teacher is None:
        ce = token_ce(student, labels, labelled)
        return beta * ce, {"ce": ce.detach()}
    c_old = teacher.shape[-1]
    new = labelled & (labels >= c_old)
    o = labelled & (labels == 0)
    # each labelled token takes one term, and both are means over all labelled tokens: a mean of
    # CE over the few new-type tokens alone would outweigh the KL on the many O tokens per token
    n = labelled.sum().clamp(min=1)
    ce = token_ce(student, labels, new) * new.sum() / n
    # the padded teacher: its probabilities, then -inf logits (probability 0) on the new columns
    pad = teacher.new_full((teacher.shape[0], student.shape[-1] - c_old), float("-inf"))
    padded = torch.cat([teacher.float(), pad.float()], dim=-1)
    kd = distill_kl(student, padded, o, temperature) * o.sum() / n
    return alpha * kd + beta * ce, {"ce": ce.detach(), "kd": kd.detach()}


def addner_loss(student: list[torch.Tensor], teacher: list[torch.Tensor] | None, labels: torch.Tensor,
                alpha: float, beta: float, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AddNER: one output layer per step; the last is the new one.

    Args:
        student: one ``[N, C_j]`` logits tensor per layer, the new layer last.
        teacher: the frozen previous model's logits of the old layers (``len(student) - 1``
            tensors), or ``None`` (first step, or naive fine-tuning: the old layers get no loss).
        labels: ``[N]`` ids in the new layer's columns (``O`` + its types), -100 where ignored.

    The new layer learns its types from CE on every labelled position (``O`` is right for it
    whatever old type a token has); each old layer is distilled from its teacher layer on every
    labelled position, and the KL terms are summed over the old layers.
    """
    labelled = labels != IGNORE
    ce = token_ce(student[-1], labels, labelled)
    if teacher is None:
        return beta * ce, {"ce": ce.detach()}
    if len(teacher) != len(student) - 1:
        raise ValueError(f"{len(teacher)} teacher layers for {len(student)} student layers")
    kd = sum(
        (distill_kl(s, t, labelled, temperature) for s, t in zip(student, teacher)),
        torch.zeros((), device=ce.device),
    )
    return alpha * kd + beta * ce, {"ce": ce.detach(), "kd": kd.detach()}
