"""Load or build the causal LM of a run: a local HF directory (weights only), a GGUF file, or an inline config.

Also the export of a finished stage with ``save_pretrained`` (safetensors), so transformers loads it as is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from cltk.config import RunConfig
from cltk.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelError(UserError):
    """A model that cannot be loaded or does not fit the tokenizer."""


def _dtype(cfg: RunConfig) -> torch.dtype:
    # "auto": load in fp32; DeepSpeed casts to bf16 itself when its config enables bf16.
    return DTYPES.get(cfg.model.dtype, torch.float32)


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, Any]:
    """A trainable model and its tokenizer from a GGUF file (dequantised by transformers).

    The quantizer marks are dropped so the result trains and saves like any plain checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model.gguf: {p} not found")
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelError("model.gguf needs the gguf package: pip install 'cltk[gguf]'") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (OSError, ValueError, KeyError) as e:  # not GGUF, or an architecture transformers lacks
        raise ModelError(f"model.gguf: cannot load a causal LM from {p}: {e}") from e
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def build_model(cfg: RunConfig, tokenizer: Any, init_dir: Path | None = None) -> PreTrainedModel:
    """The stage's starting model.

    Args:
        cfg: the run config.
        tokenizer: the run's tokenizer; its vocabulary must fit the model's embedding.
        init_dir: a previous stage's export to start from (weights only); overrides ``cfg.model``.
    """
    dtype = _dtype(cfg)
    attn = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation \
        else {}
    if init_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(str(init_dir), dtype=dtype, **attn)
    elif cfg.model.init_from:
        path = cfg.resolve(cfg.model.init_from)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **attn)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.init_from: cannot load a causal LM from {path}: {e}") from e
    elif cfg.model.gguf:
        model, _ = load_gguf(cfg.resolve(cfg.model.gguf), dtype)  # type: ignore[arg-type]
        if attn:
            model.set_attn_implementation(attn["attn_implementation"])
    else:
        spec = dict(cfg.model.config or {})
        model_type = spec.pop("model_type")
        spec.setdefault("vocab_size", len(tokenizer))
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if getattr(tokenizer, k, None) is not None:
                spec.setdefault(k, getattr(tokenizer, k))
        try:
            config = AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as e:
            raise ModelError(f"model.config: {e}") from e
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attn)
    check_tokenizer_fits(model, tokenizer)
    from cltk.model_checks import check_positions

    check_positions(model.config, cfg.data.seq_len)  # the model as built (model_checks read its config)
    model.config.use_cache = False
    return model


def check_tokenizer_fits(model: PreTrainedModel, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding (a mismatched tokenizer)."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_emb} rows: "
            "they do not belong together; use the model's own tokenizer (tokenizer.path) or a model "
            "built for this tokenizer"
        )


def export_pretrained(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor] | None,
    tokenizer: Any,
    out_dir: Path,
) -> None:
    """Write ``out_dir`` atomically: ``save_pretrained`` (safetensors) + tokenizer, via a temp dir."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    from cltk.diskfull import disk_full_guard

    with disk_full_guard(
        out_dir.parent,
        f"the export {out_dir.name}",
        f"{out_dir} is as it was, and a run's stage-end checkpoint is written before its export: "
        f"free space (delete the partial {tmp}), then rerun with --resume to export again",
    ):
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    _replace_dir(tmp, out_dir)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is only removed once ``tmp`` is complete."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO 3 the full shapes (``ds_numel``) are counted."""

    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer stored in a GGUF file."""
    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
