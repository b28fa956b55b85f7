"""Unit maps: which slices of which weights belong to each attention head and each FFN unit.

DAS (Ke et al., ICLR 2023) scores and soft-masks *units*: attention heads and FFN intermediate
neurons. A unit owns

- **a head** h: its rows of the query/key/value projections (and of their biases) and its input
  columns of the attention output projection (``o_proj``). With grouped-query attention a KV head is
  shared by ``H / H_kv`` query heads; the map records that sharing (``UnitSlice.members``) and
  :mod:`cltk.masking` protects a shared KV head as much as the most important head that reads it
  (max over the group), because masking it less would let training move what that head relies on.
- **an FFN unit** u: its rows of the input projections (gate and up, or fc1, with bias) and its
  input column of the output projection (down, or fc2).

Each unit also has a *gate point*: the input of the attention output projection is the heads'
outputs laid out ``[..., H * head_dim]`` (head-major), and the input of the FFN output projection is
the FFN activation ``[..., I]``. Multiplying those inputs by a gate scales one unit's contribution
(:func:`attach_gates`); :mod:`cltk.importance` takes gradients with respect to such gates.

Supported (tested on tiny random models): Llama, Mistral, Qwen2, GPT-2 (``Conv1D``: weights stored
``[in, out]``, fused ``c_attn`` laid out q | k | v), GPT-NeoX (fused ``query_key_value`` interleaved
per head: q_h, k_h, v_h), OPT and Phi. Others: :func:`register_architecture`.

Parameter names are those of the model the map is built on: a PEFT-wrapped model gets its prefixed
names (``base_model.model....base_layer.weight``), a DeepSpeed engine those of ``engine.module``.
Shapes come from module attributes, so a ZeRO-3 partitioned model maps too (full shape:
``param.ds_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

SEPARATE, FUSED_GPT2, FUSED_NEOX = "separate", "fused_gpt2", "fused_neox"


@dataclass(frozen=True)
class ArchSpec:
    """Where the units of one architecture live, as module paths.

    Attributes:
        layers: path from the causal LM to its ``ModuleList`` of blocks, e.g. ``"model.layers"``.
        attention: ``"separate"`` (q, k, v projections), ``"fused_gpt2"`` (one projection, output
            laid out q | k | v, each head-major) or ``"fused_neox"`` (one projection, output
            interleaved per head: q_h, k_h, v_h).
        qkv: paths inside a block: ``(q, k, v)`` for ``separate``, ``(fused,)`` otherwise.
        attn_out: attention output projection; its input is the heads' output.
        ffn_in: projections whose output features are the FFN units (gate and up, or fc1).
        ffn_out: FFN output projection; its input features are the FFN units.
    """

    layers: str
    attention: str
    qkv: tuple[str, ...]
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str


_LLAMA_LIKE = ArchSpec(
    "model.layers", SEPARATE, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
)
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": ArchSpec("transformer.h", FUSED_GPT2, ("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",),
                     "mlp.c_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", FUSED_NEOX, ("attention.query_key_value",),
                         "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "opt": ArchSpec("model.decoder.layers", SEPARATE,
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn.out_proj", ("fc1",), "fc2"),
    "phi": ArchSpec("model.layers", SEPARATE,
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    "self_attn.dense", ("mlp.fc1",), "mlp.fc2"),
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add (or replace) the unit map of ``config.model_type == model_type``."""
    ARCHITECTURES[model_type] = spec


@dataclass(frozen=True)
class UnitSlice:
    """The share of every unit of one kind in one parameter.

    Attributes:
        param: qualified parameter name in the model the map was built on.
        role: ``"q"``, ``"k"``, ``"v"``, ``"qkv"`` (fused), ``"o"`` for heads; ``"in"``, ``"out"``
            for FFN units. ``"o"`` and ``"out"`` are the output side: zeroing them removes exactly
            the unit's contribution, as a zero gate does.
        dim: dimension of the stored tensor that indexes units (Conv1D stores ``[in, out]``).
        positions: ``[G, k]`` long: indices along ``dim`` owned by group g.
        members: ``[U]`` long: the group of each unit. Groups are units themselves except for
            shared KV heads (``members[h] = h // (H / H_kv)``).
    """

    param: str
    role: str
    dim: int
    positions: torch.Tensor
    members: torch.Tensor


@dataclass(frozen=True)
class LayerUnits:
    """Units of one block: gate points (module names) and parameter slices."""

    head_gate: str
    ffn_gate: str
    heads: tuple[UnitSlice, ...]
    ffn: tuple[UnitSlice, ...]


@dataclass(frozen=True)
class UnitMap:
    """Units of a whole model; ``importance`` tensors are ``heads [L, H]`` and ``ffn [L, I]``."""

    arch: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    layers: tuple[LayerUnits, ...]
    shapes: dict[str, torch.Size]

    def slices(self) -> list[tuple[int, str, UnitSlice]]:
        """Every ``(layer, kind, slice)`` with kind ``"heads"`` or ``"ffn"``."""
        out = []
        for i, layer in enumerate(self.layers):
            out += [(i, "heads", s) for s in layer.heads] + [(i, "ffn", s) for s in layer.ffn]
        return out


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO 3 has partitioned it (``ds_shape``)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def core_model(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a DeepSpeed engine and/or a PEFT wrapper."""
    seen = 0
    while seen < 4:
        seen += 1
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeedEngine
            model = model.module
        else:
            break
    return model


def _base(module: nn.Module) -> nn.Module:
    # A PEFT-wrapped projection (e.g. lora.Linear) keeps the original layer as its base layer.
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _io(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, stored transposed) of a Linear or HF Conv1D."""
    base = _base(module)
    if hasattr(base, "nf") and hasattr(base, "nx"):  # transformers.pytorch_utils.Conv1D
        return base.nx, base.nf, True
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features, False
    raise ValueError(f"{type(base).__name__} is neither a Linear nor a Conv1D: cannot map units")


def _unsupported(model: nn.Module, why: str) -> ValueError:
    from cltk.models import ModelError  # a user's model choice: cltk reports it in one line

    core = core_model(model)
    model_type = getattr(getattr(core, "config", None), "model_type", None)
    names = [f"{n} ({type(m).__name__})" for n, m in core.named_modules() if n][:40]
    return ModelError(
        f"no unit map for model type {model_type!r} ({type(core).__name__}): {why}. Modules found: "
        f"{', '.join(names)}. Add one with cltk.units.register_architecture({model_type!r}, "
        "ArchSpec(layers=..., attention='separate'|'fused_gpt2'|'fused_neox', qkv=(...), "
        "attn_out=..., ffn_in=(...), ffn_out=...)) naming those modules (see docs/das.md)."
    )


def _arange_groups(n: int, width: int, start: int = 0, stride: int | None = None) -> torch.Tensor:
    """``[n, width]`` index blocks: group g owns ``start + g*stride + [0, width)``."""
    stride = width if stride is None else stride
    return start + torch.arange(n)[:, None] * stride + torch.arange(width)[None, :]


def build_unit_map(model: nn.Module) -> UnitMap:
    """Map the units of an HF causal LM (plain, PEFT-wrapped, or inside a DeepSpeed engine).

    Raises:
        ValueError: unknown architecture (lists the modules found and how to register one), or
            projection sizes that disagree with the config.
    """
    core = core_model(model)
    config = getattr(core, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise _unsupported(model, "not registered")
    spec = ARCHITECTURES[model_type]
    try:
        blocks = core.get_submodule(spec.layers)
    except AttributeError as err:
        raise _unsupported(model, f"no module {spec.layers!r}") from err
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of "
                         f"num_key_value_heads={n_kv}: fix the model config")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    prefix = _prefix_of(model, core)
    shapes: dict[str, torch.Size] = {}

    def param(block_path: str, rel: str, attr: str) -> str | None:
        mod = _base(core.get_submodule(f"{block_path}.{rel}"))
        p = getattr(mod, attr, None)
        if p is None:
            return None
        name = names.get(id(p))
        if name is None:
            raise ValueError(f"{block_path}.{rel}.{attr} is not a parameter of the given model")
        shapes[name] = full_shape(p)
        return name

    layers = []
    kv_members = torch.arange(n_heads) // (n_heads // n_kv)
    own = torch.arange(n_heads)
    for i in range(len(blocks)):
        path = f"{spec.layers}.{i}"
        try:
            mods = {rel: core.get_submodule(f"{path}.{rel}")
                    for rel in (*spec.qkv, spec.attn_out, *spec.ffn_in, spec.ffn_out)}
        except AttributeError as err:
            raise _unsupported(model, f"block {path} lacks {err}") from err
        heads: list[UnitSlice] = []
        width = n_heads * head_dim

        def add(rel: str, role: str, positions: torch.Tensor, members: torch.Tensor,
                out_side: bool = False, acc: list = heads) -> None:
            _, _, transposed = _io(mods[rel])
            # Rows of a Linear's [out, in] weight are output features; Conv1D stores [in, out].
            feature_dim = 1 if transposed else 0
            dim = (1 - feature_dim) if out_side else feature_dim
            acc.append(UnitSlice(param(path, rel, "weight"), role, dim, positions, members))
            bias = None if out_side else param(path, rel, "bias")
            if bias is not None:
                acc.append(UnitSlice(bias, role, 0, positions, members))

        if spec.attention == SEPARATE:
            q, k, v = spec.qkv
            _check(mods[q], None, width, f"{path}.{q}")
            _check(mods[k], None, n_kv * head_dim, f"{path}.{k}")
            add(q, "q", _arange_groups(n_heads, head_dim), own)
            add(k, "k", _arange_groups(n_kv, head_dim), kv_members)
            add(v, "v", _arange_groups(n_kv, head_dim), kv_members)
        elif spec.attention == FUSED_GPT2:
            (qkv,) = spec.qkv
            _check(mods[qkv], None, 3 * width, f"{path}.{qkv}")
            pos = torch.cat([_arange_groups(n_heads, head_dim, start=j * width)
                             for j in range(3)], 1)
            add(qkv, "qkv", pos, own)
        elif spec.attention == FUSED_NEOX:
            (qkv,) = spec.qkv
            _check(mods[qkv], None, 3 * width, f"{path}.{qkv}")
            add(qkv, "qkv", _arange_groups(n_heads, 3 * head_dim), own)
        else:
            raise ValueError(f"ArchSpec.attention={spec.attention!r}: use 'separate', "
                             "'fused_gpt2' or 'fused_neox'")
        _check(mods[spec.attn_out], width, None, f"{path}.{spec.attn_out}")
        add(spec.attn_out, "o", _arange_groups(n_heads, head_dim), own, out_side=True)

        inter, _, _ = _io(mods[spec.ffn_out])
        ffn: list[UnitSlice] = []
        units = torch.arange(inter)
        for rel in spec.ffn_in:
            _check(mods[rel], None, inter, f"{path}.{rel}")
            add(rel, "in", units[:, None], units, acc=ffn)
        add(spec.ffn_out, "out", units[:, None], units, out_side=True, acc=ffn)
        layers.append(LayerUnits(
            head_gate=f"{prefix}{path}.{spec.attn_out}", ffn_gate=f"{prefix}{path}.{spec.ffn_out}",
            heads=tuple(heads), ffn=tuple(ffn),
        ))
    inters = {len(layer.ffn[-1].members) for layer in layers}
    if len(inters) != 1:
        raise ValueError(f"layers have different FFN sizes {sorted(inters)}: not supported")
    return UnitMap(model_type, len(layers), n_heads, n_kv, head_dim, inters.pop(), tuple(layers),
                   shapes)


def _check(module: nn.Module, want_in: int | None, want_out: int | None, where: str) -> None:
    n_in, n_out, _ = _io(module)
    if (want_in is not None and n_in != want_in) or (want_out is not None and n_out != want_out):
        raise ValueError(
            f"{where} is [{n_in} -> {n_out}] but the config implies "
            f"[{want_in or n_in} -> {want_out or n_out}] (heads, kv heads, head_dim): "
            "fix the config or register a matching ArchSpec"
        )


def _prefix_of(model: nn.Module, core: nn.Module) -> str:
    """Module-name prefix of ``core`` inside ``model`` ('' when they are the same)."""
    if core is model:
        return ""
    for name, mod in model.named_modules():
        if mod is core:
            return name + "."
    raise ValueError("the wrapped causal LM is not a submodule of the given model")


def _gate_pre_hook(gate: Callable[[], torch.Tensor], width: int) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        g = gate().to(x.dtype)  # [U]
        shaped = x.unflatten(-1, (g.numel(), width)) * g[:, None]
        return (shaped.flatten(-2), *rest)

    return hook


def attach_gates(
    model: nn.Module,
    umap: UnitMap,
    heads: torch.Tensor | None = None,
    ffn: torch.Tensor | None = None,
) -> list[RemovableHandle]:
    """Multiply each head's output and each FFN unit's activation by a gate (forward pre-hooks).

    Args:
        model: the model ``umap`` was built on.
        umap: its unit map.
        heads: ``[L, H]`` gates on the input of each attention output projection, or None.
        ffn: ``[L, I]`` gates on the input of each FFN output projection, or None.

    Returns:
        Hook handles; ``h.remove()`` on each detaches the gates.
    """
    handles = []
    for i, layer in enumerate(umap.layers):
        if heads is not None:
            mod = model.get_submodule(layer.head_gate)
            handles.append(mod.register_forward_pre_hook(
                _gate_pre_hook(lambda i=i: heads[i], umap.head_dim)))
        if ffn is not None:
            mod = model.get_submodule(layer.ffn_gate)
            handles.append(mod.register_forward_pre_hook(_gate_pre_hook(lambda i=i: ffn[i], 1)))
    return handles


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a supported model, in order (e.g. for hooks on hidden states)."""
    core = core_model(model)
    model_type = getattr(getattr(core, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise _unsupported(model, "not registered")
    return list(core.get_submodule(ARCHITECTURES[model_type].layers))
