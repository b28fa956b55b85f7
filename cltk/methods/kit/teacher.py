"""The online teacher: the frozen previous stage, run beside the student by its own engine (shared by the
soft-target and distillation methods, and by the offline teacher cache that it fills).

The teacher of stage ``i`` is the export of stage ``i - 1`` (a ``save_pretrained`` directory). It is
loaded once per stage and wrapped by a second ``deepspeed.initialize`` with no optimizer:

- student under ZeRO 3: the teacher is ZeRO 3 too, each rank holding ``1 / world_size`` of its
  parameters (loaded partitioned through ``HfDeepSpeedConfig``, so no rank ever holds a full copy);
- student under ZeRO 0/1/2: the teacher is a full copy on every rank (stage 0): its forward then
  needs no communication.

Precision follows the student's engine (bf16 / fp16 / fp32). The teacher is in eval mode and runs
under ``torch.no_grad``; :meth:`OnlineTeacher.logits` returns its logits aligned like the student's
(``[b, T-1, V]`` for input ids ``[b, T]``), :meth:`OnlineTeacher.logprobs` their fp32 log-softmax.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.ds_config import deepspeed_config, frozen_deepspeed_config
from cltk.engine import frozen_engine, release_engine
from cltk.forward import next_token_logits
from cltk.losses import IGNORE_INDEX
from cltk.tracking import log

__all__ = [
    "OnlineTeacher",
    "audit_teacher",
    "label_logprobs",
    "mean_label_prob",
    "check_teacher_dir",
    "checkpoint_key",
    "teacher_ds_config",
    "weight_files",
]

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory, sorted by name."""
    d = Path(model_dir)
    return sorted({f for pat in _WEIGHT_PATTERNS for f in d.glob(pat) if f.is_file()})


def check_teacher_dir(model_dir: str | Path | None) -> Path:
    """``model_dir`` as a Path if it holds a loadable model export, else ``ValueError``."""
    if model_dir is None:
        raise ValueError("this stage has no teacher: the first stage trains with plain "
                         "cross-entropy (a teacher needs a previous stage's export)")
    d = Path(model_dir)
    if not (d / "config.json").is_file() or not weight_files(d):
        raise ValueError(
            f"teacher directory {d} holds no full model export (config.json + *.safetensors): the "
            "previous stage must export a save_pretrained model (a LoRA adapter export alone "
            "cannot be a teacher); rerun that stage or merge its adapter"
        )
    return d


def checkpoint_key(model_dir: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 over the names and bytes of the export's weight files: the identity of a teacher."""
    h = hashlib.sha256()
    for f in weight_files(check_teacher_dir(model_dir)):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def teacher_ds_config(cfg: RunConfig, student_engine: Any) -> dict[str, Any]:
    """The teacher's DeepSpeed config: the student's, without training parts, ZeRO 3 or stage 0.

    Args:
        cfg: the run config (its DeepSpeed JSON and batch sizes).
        student_engine: the student's engine; its ZeRO stage and precision are followed.

    Returns:
        A config for ``deepspeed.initialize`` with no optimizer.
    """
    ds = frozen_deepspeed_config(deepspeed_config(cfg, dist.world_size(), dist.bf16_available()),
                                 zero3=student_engine.zero_optimization_stage() == 3)
    ds["bf16"] = {"enabled": bool(student_engine.bfloat16_enabled())}
    ds["fp16"] = {"enabled": bool(student_engine.fp16_enabled())}
    return ds


def _load_frozen(model_dir: Path, ds: dict[str, Any]) -> torch.nn.Module:
    """Load the export, partitioned at load time when ``ds`` is ZeRO 3; parameters frozen."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float16 if ds["fp16"]["enabled"] \
        else torch.float32
    model = None
    if ds["zero_optimization"]["stage"] == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # transformers loads under deepspeed.zero.Init while this object is alive: each rank keeps
        # only its partition. Unset it at once, or the next stage's student would load that way too.
        try:
            hf_ds = HfDeepSpeedConfig(ds)
        except ImportError as e:  # it needs accelerate; without it, partition at initialize
            unset_hf_deepspeed_config()
            log(f"teacher: loading a full copy before partitioning it ({e}); pip install "
                "accelerate to load it partitioned")
        else:
            try:
                model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
            finally:
                unset_hf_deepspeed_config()
                del hf_ds
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model.eval()


class OnlineTeacher:
    """A frozen model scored beside the student (collective under ZeRO 3: every rank calls alike).

    Args:
        model_dir: the teacher's ``save_pretrained`` export (the previous stage's directory).
        cfg: the run config.
        student_engine: the student's DeepSpeed engine (ZeRO stage and precision to follow).
    """

    def __init__(self, model_dir: str | Path, cfg: RunConfig, student_engine: Any):
        self.model_dir = check_teacher_dir(model_dir)
        self.ds_config = teacher_ds_config(cfg, student_engine)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        model = _load_frozen(self.model_dir, self.ds_config)
        self.engine = frozen_engine(model, self.ds_config)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.module.config.vocab_size)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw teacher logits of the next token (the losses normalise them a chunk at a time).

        Args:
            input_ids: ``[b, T]`` token ids (the student's micro-batch, replay rows included).

        Returns:
            ``[b, T-1, V]`` logits in the teacher's precision, contiguous; row ``t`` predicts
            ``input_ids[:, t + 1]``, aligned with the student's ``logits`` and ``labels``.
        """
        return next_token_logits(self.engine, self.engine.module, input_ids.to(self.engine.device))

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[b, T-1, V]`` fp32 log-softmax of :meth:`logits` (what the offline cache stores)."""
        return F.log_softmax(self.logits(input_ids), dim=-1, dtype=torch.float32)

    def weights_sha256(self) -> str:
        """sha256 over the names and fp32 bytes of the teacher's parameters as they are in memory now
        (gathered a parameter at a time under ZeRO 3; collective: every rank calls it, every rank
        gets rank 0's digest). The audit of which weights a stage's teacher held: see
        ``train.log_sequence_ids``."""
        h = hashlib.sha256()
        for name, p in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                if dist.is_main():
                    h.update(name.encode() + b"\0")
                    h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return dist.broadcast_object(h.hexdigest())

    def param_bytes(self) -> int:
        """Bytes of teacher parameters this rank holds (its partitions under ZeRO 3)."""
        total = 0
        for p in self.engine.module.parameters():
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += held.numel() * held.element_size()
        return total

    def close(self) -> None:
        """Free the teacher (its partitions, hooks and the engine)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            release_engine(engine)
        gc.collect()


def audit_teacher(ctx: Any, teacher: Any, when: str) -> None:
    """With ``train.log_sequence_ids`` (the audit log), record which weights the stage's teacher held
    at ``when`` ("start" or "end") in ``<stage dir>/teacher.json``: the teacher's directory and the
    sha256 of its in-memory parameters (see :meth:`cltk.methods.kit.teacher.OnlineTeacher.weights_sha256`)."""
    if not ctx.cfg.train.log_sequence_ids:
        return
    digest = teacher.weights_sha256()
    record = ctx.extras.setdefault("teacher_audit", {"teacher_dir": str(teacher.model_dir)})
    record[f"sha256_{when}"] = digest
    if when == "end" and dist.is_main():
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        (ctx.stage_dir / "teacher.json").write_text(json.dumps(record, indent=1))


def mean_label_prob(label_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's mean probability of the label over the trained positions (``labels`` not
    ignored), a 0-dim tensor: the loop reads it after its own synchronisation, so no extra wait on the
    GPU is added here."""
    valid = labels != IGNORE_INDEX
    probs = label_logprobs.detach().float().exp()
    return (probs * valid).sum() / valid.sum().clamp_min(1)


def label_logprobs(teacher_logits: torch.Tensor, labels: torch.Tensor,
                    rows: int = 1024) -> torch.Tensor:
    """log softmax(teacher_logits) at the labels ``[b, T-1]``, ``rows`` positions at a time (no
    ``[tokens, vocab]`` fp32 temporary)."""
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    y = labels.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for s in range(0, flat.shape[0], rows):
        chunk = flat[s:s + rows].float()
        out[s:s + rows] = chunk.gather(1, y[s:s + rows]).squeeze(1) - torch.logsumexp(chunk, -1)
    return out.view(labels.shape)
