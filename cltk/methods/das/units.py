"""Unit maps: which slices of which weights belong to each attention head and each FFN unit.

DAS (Ke et al., ICLR 2023) scores and soft-masks *units*: attention heads and FFN intermediate
neurons. A unit owns

- **a head** h: its rows of the query/key/value projections (and of their biases) and its input
  columns of the attention output projection (``o_proj``). With grouped-query attention a KV head is
  shared by ``H / H_kv`` query heads; the map records that sharing (``UnitSlice.members``) and
  :mod:`cltk.methods.das.masking` protects a shared KV head as much as the most important head that reads it
  (max over the group), because masking it less would let training move what that head relies on.
- **an FFN unit** u: its rows of the input projections (gate and up, or fc1, with bias) and its
  input column of the output projection (down, or fc2). In a mixture-of-experts layer every
  expert's neurons are units (expert e's neuron u is unit ``e * I + u``), then a shared expert's.

Each unit also has a *gate point*: the input of the attention output projection is the heads'
outputs laid out ``[..., H * head_dim]`` (head-major), and the input of the FFN output projection is
the FFN activation ``[..., I]``; experts stored as 3-D tensors are gated through their ``down_proj``
(scaling its column u scales neuron u's contribution exactly as a gate on the activation).
Multiplying by a gate scales one unit's contribution (:func:`attach_gates`); :mod:`cltk.methods.das.importance`
takes gradients with respect to such gates. The token rows of the input embedding and of the LM
head (``UnitMap.tokens``) get gates of their own: a gate scaling row r of either.

Which projections hold the units is found from the model's structure
(:mod:`cltk.methods.das.unit_discovery`); :func:`register_architecture` names them for a model that structure
does not reveal. Parameter names are those of the model the map is built on: a PEFT-wrapped model
gets its prefixed names (``base_model.model....base_layer.weight``), a DeepSpeed engine those of
``engine.module``. Shapes come from module attributes, so a ZeRO-3 partitioned model maps too (full
shape: ``param.ds_shape``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cltk.methods.das.unit_discovery import (
    ARCHITECTURES,
    ArchSpec,
    BlockParts,
    UnitMapError,
    blocks_path,
    discover_block,
    io_features,
    register_architecture,
)
from cltk.methods.kit.zero_view import full_shape

__all__ = ["ArchSpec", "UnitMap", "UnitMapError", "attach_gates", "build_unit_map",
           "register_architecture"]


@dataclass(frozen=True)
class UnitSlice:
    """The share of every unit of one kind in one parameter.

    Attributes:
        param: qualified parameter name in the model the map was built on.
        role: ``"q"``, ``"k"``, ``"v"``, ``"o"`` for heads; ``"in"``, ``"out"`` for FFN units.
            ``"o"`` and ``"out"`` are the output side: zeroing them removes exactly the unit's
            contribution, as a zero gate does.
        dims: dimensions of the stored tensor that index units (Conv1D stores ``[in, out]``; 3-D
            experts use two: expert and feature); ``positions`` index them flattened row-major.
        positions: ``[G, k]`` long: indices along ``dims`` owned by group g.
        members: ``[n]`` long: the group of units ``offset .. offset + n - 1`` of the layer.
            Groups are units themselves except for shared KV heads (``h // (H / H_kv)``).
        offset: the layer's unit index of ``members[0]`` (FFNs after a layer's experts).
    """

    param: str
    role: str
    dims: tuple[int, ...]
    positions: torch.Tensor
    members: torch.Tensor
    offset: int = 0


@dataclass(frozen=True)
class Gate:
    """Where units ``start .. start + count - 1`` of a layer are gated.

    ``param`` None: multiply the input of ``module`` (``[..., count * width]``). Otherwise scale the
    module's 3-D parameter ``param`` by the gates viewed as ``shape`` during its forward.
    """

    module: str
    start: int
    count: int
    param: str | None = None
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerUnits:
    """Units of one block: gate points and parameter slices."""

    head_gate: str
    ffn_gates: tuple[Gate, ...]
    heads: tuple[UnitSlice, ...]
    ffn: tuple[UnitSlice, ...]


@dataclass(frozen=True)
class TokenRows:
    """Input embedding and LM head: module paths (gates) and parameter names (masks; tied: same)."""

    vocab: int
    embed_module: str
    embed_param: str
    head_module: str | None
    head_param: str | None


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
    blocks: str = ""
    tokens: TokenRows | None = None

    def slices(self) -> list[tuple[int, str, UnitSlice]]:
        """Every ``(layer, kind, slice)`` with kind ``"heads"`` or ``"ffn"``."""
        out = []
        for i, layer in enumerate(self.layers):
            out += [(i, "heads", s) for s in layer.heads] + [(i, "ffn", s) for s in layer.ffn]
        return out


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


def _unsupported(model: nn.Module, why: str) -> UnitMapError:
    core = core_model(model)
    model_type = getattr(getattr(core, "config", None), "model_type", None)
    names = [f"{n} ({type(m).__name__})" for n, m in core.named_modules() if n][:40]
    return UnitMapError(
        f"no unit map for model type {model_type!r} ({type(core).__name__}): {why}. Modules found: "
        f"{', '.join(names)}. Name its projections with cltk.methods.das.units.register_architecture("
        f"{model_type!r}, ArchSpec(layers=..., attention='separate'|'fused_gpt2'|'fused_neox', "
        "qkv=(...), attn_out=..., ffn_in=(...), ffn_out=...)) (see docs/das.md)."
    )


def _arange_groups(n: int, width: int, start: int = 0, stride: int | None = None) -> torch.Tensor:
    """``[n, width]`` index blocks: group g owns ``start + g*stride + [0, width)``."""
    stride = width if stride is None else stride
    return start + torch.arange(n)[:, None] * stride + torch.arange(width)[None, :]


class _Builder:
    """Turns one block's :class:`BlockParts` into unit slices (names and shapes recorded)."""

    def __init__(self, model: nn.Module, core: nn.Module, num_heads: int):
        self.core, self.num_heads = core, num_heads
        self.names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), n)  # a tied weight: the name named_parameters() keeps
        self.shapes: dict[str, torch.Size] = {}

    def name(self, p: torch.Tensor | None, where: str) -> str | None:
        if p is None:
            return None
        name = self.names.get(id(p))
        if name is None:
            raise UnitMapError(f"{where} is not a parameter of the given model")
        self.shapes[name] = full_shape(p)
        return name

    def linear(self, path: str) -> tuple[nn.Module, int, int, bool]:
        mod = self.core.get_submodule(path)
        feats = io_features(mod)
        if feats is None:
            raise UnitMapError(f"{path} ({type(mod).__name__}) is neither a Linear nor a Conv1D")
        base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
        return base, *feats

    def add(self, acc: list, path: str, role: str, positions, members, out_side=False, offset=0):
        base, _, _, transposed = self.linear(path)
        feature_dim = 1 if transposed else 0  # a Linear stores [out, in], Conv1D [in, out]
        dim = (1 - feature_dim) if out_side else feature_dim
        acc.append(UnitSlice(self.name(base.weight, f"{path}.weight"), role, (dim,), positions,
                             members, offset))
        bias = None if out_side else getattr(base, "bias", None)
        if bias is not None:
            acc.append(UnitSlice(self.name(bias, f"{path}.bias"), role, (0,), positions, members,
                                 offset))

    def heads(self, path: str, parts: BlockParts) -> tuple[list[UnitSlice], int, int]:
        """Head slices of one block; returns them, head_dim and the number of KV heads."""
        h = self.num_heads
        _, width, _, _ = self.linear(f"{path}.{parts.attn_out}")
        if width % h:
            raise UnitMapError(f"{path}.{parts.attn_out} reads {width} features, not a multiple "
                               f"of num_attention_heads={h}: fix the config")
        d = width // h
        outs = [self.linear(f"{path}.{q}")[2] for q in parts.qkv]
        if parts.layout == "separate":
            kv, rest = divmod(outs[1], d)
            if outs[0] != width or rest or outs[2] != outs[1]:
                raise UnitMapError(f"{path}: q/k/v give {outs} features but the config implies "
                                   f"{width} queries and heads of {d}: fix the config or register "
                                   "a matching ArchSpec")
        else:
            kv2, rest = divmod(outs[0] - width, d)
            kv = kv2 // 2
            if rest or kv2 % 2 or kv < 1:
                raise UnitMapError(f"{path}.{parts.qkv[0]} gives {outs[0]} features: not q|k|v "
                                   f"for {h} heads of {d}")
        if h % kv:
            raise UnitMapError(f"{path}: {h} heads are not a multiple of {kv} KV heads")
        r = h // kv
        own, shared = torch.arange(h), torch.arange(h) // r
        acc: list[UnitSlice] = []
        q = [f"{path}.{p}" for p in parts.qkv]
        if parts.layout == "separate":
            self.add(acc, q[0], "q", _arange_groups(h, d), own)
            self.add(acc, q[1], "k", _arange_groups(kv, d), shared)
            self.add(acc, q[2], "v", _arange_groups(kv, d), shared)
        elif parts.layout == "blocks":  # q | k | v
            self.add(acc, q[0], "q", _arange_groups(h, d), own)
            self.add(acc, q[0], "k", _arange_groups(kv, d, start=h * d), shared)
            self.add(acc, q[0], "v", _arange_groups(kv, d, start=(h + kv) * d), shared)
        else:  # per KV group: its r query heads, then k, then v
            step = (r + 2) * d
            qpos = (torch.arange(h) // r * step + torch.arange(h) % r * d)[:, None]
            self.add(acc, q[0], "q", qpos + torch.arange(d), own)
            self.add(acc, q[0], "k", _arange_groups(kv, d, start=r * d, stride=step), shared)
            self.add(acc, q[0], "v", _arange_groups(kv, d, start=(r + 1) * d, stride=step), shared)
        self.add(acc, f"{path}.{parts.attn_out}", "o", _arange_groups(h, d), own, out_side=True)
        return acc, d, kv

    def ffn(self, path: str, parts: BlockParts, prefix: str) -> tuple[list, list[Gate]]:
        acc: list[UnitSlice] = []
        gates: list[Gate] = []
        offset = 0
        for ex in parts.experts:
            mod = self.core.get_submodule(f"{path}.{ex.path}")
            e, i = ex.num, ex.size
            units = torch.arange(e * i)
            base = units // i * (2 * i)  # [E, 2I] flattened: expert e's first row
            u = units % i
            pair = (torch.stack([base + 2 * u, base + 2 * u + 1], 1) if ex.interleaved
                    else torch.stack([base + u, base + i + u], 1))  # gate_u and up_u
            members = units
            for attr, fused in ex.ins + ex.biases:
                p = getattr(mod, attr)
                rows = pair if fused else units[:, None]
                dims = (0, 1) if (ex.transposed is False or p.dim() == 2) else (0, 2)
                acc.append(UnitSlice(self.name(p, f"{path}.{ex.path}.{attr}"), "in", dims, rows,
                                     members, offset))
            down = getattr(mod, ex.out)
            dims = (0, 1) if ex.transposed else (0, 2)
            acc.append(UnitSlice(self.name(down, f"{path}.{ex.path}.{ex.out}"), "out", dims,
                                 units[:, None], members, offset))
            shape = (e, i, 1) if ex.transposed else (e, 1, i)
            gates.append(Gate(f"{prefix}{path}.{ex.path}", offset, e * i, ex.out, shape))
            offset += e * i
        for dense in parts.ffns:
            _, inter, _, _ = self.linear(f"{path}.{dense.out}")
            units = torch.arange(inter)
            for rel, fused in dense.ins:
                rows = torch.stack([units, units + inter], 1) if fused else units[:, None]
                self.add(acc, f"{path}.{rel}", "in", rows, units, offset=offset)
            self.add(acc, f"{path}.{dense.out}", "out", units[:, None], units, out_side=True,
                     offset=offset)
            gates.append(Gate(f"{prefix}{path}.{dense.out}", offset, inter))
            offset += inter
        return acc, gates


def build_unit_map(model: nn.Module) -> UnitMap:
    """Map the units of an HF causal LM (plain, PEFT-wrapped, or inside a DeepSpeed engine).

    Raises:
        UnitMapError: a part not found (names it and the modules there, and how to register the
            architecture), or projection sizes that disagree with the config.
    """
    core = core_model(model)
    config = getattr(core, "config", None)
    model_type = getattr(config, "model_type", None)
    n_heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None) or core.get_input_embeddings().embedding_dim
    spec = ARCHITECTURES.get(model_type)
    try:
        layers_path = blocks_path(core, config)
        blocks = core.get_submodule(layers_path)
        if not isinstance(n_heads, int) or n_heads < 1:
            if spec is None:  # name the missing part first, if one is missing
                discover_block(blocks[0], f"{layers_path}.0", hidden, 1, model_type)
            raise UnitMapError("its config has no num_attention_heads")
    except (UnitMapError, AttributeError) as err:
        raise _unsupported(model, str(err)) from err
    prefix = _prefix_of(model, core)
    build = _Builder(model, core, n_heads)
    layers, kvs, dims = [], set(), set()
    for i in range(len(blocks)):
        path = f"{layers_path}.{i}"
        try:
            parts = spec.parts() if spec else discover_block(
                blocks[i], path, hidden, n_heads, model_type)
            heads, head_dim, kv = build.heads(path, parts)
            ffn, gates = build.ffn(path, parts, prefix)
        except AttributeError as err:
            raise _unsupported(model, f"block {path} lacks {err}") from err
        except UnitMapError as err:
            raise _unsupported(model, str(err)) from err
        kvs.add(kv)
        dims.add(head_dim)
        layers.append(LayerUnits(f"{prefix}{path}.{parts.attn_out}", tuple(gates),
                                 tuple(heads), tuple(ffn)))
    inters = {sum(g.count for g in layer.ffn_gates) for layer in layers}
    if len(inters) != 1 or len(kvs) != 1 or len(dims) != 1:
        raise UnitMapError(f"layers differ in FFN units {sorted(inters)}, KV heads {sorted(kvs)} "
                           f"or head size {sorted(dims)}: DAS needs one shape for every layer")
    return UnitMap(model_type or type(core).__name__, len(layers), n_heads, kvs.pop(), dims.pop(),
                   inters.pop(), tuple(layers), build.shapes, layers_path,
                   _token_rows(model, core, build, prefix))


def _token_rows(model: nn.Module, core: nn.Module, build: _Builder, prefix: str) -> TokenRows | None:
    """The input embedding and LM head, if the model exposes them the HF way."""
    try:
        emb, head = core.get_input_embeddings(), core.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if emb is None or getattr(emb, "weight", None) is None:
        return None
    paths = {id(m): n for n, m in core.named_modules()}
    base = head.get_base_layer() if hasattr(head, "get_base_layer") else head
    weight = getattr(base, "weight", None) if head is not None else None
    vocab = full_shape(emb.weight)[0]
    if weight is not None and full_shape(weight)[0] != vocab:
        weight = None  # a head over another vocabulary: not token rows of the embedding's
    return TokenRows(
        vocab, prefix + paths[id(emb)], build.name(emb.weight, "input embedding"),
        None if weight is None else prefix + paths[id(head)],
        None if weight is None else build.name(weight, "output embedding"),
    )


def _prefix_of(model: nn.Module, core: nn.Module) -> str:
    """Module-name prefix of ``core`` inside ``model`` ('' when they are the same)."""
    if core is model:
        return ""
    for name, mod in model.named_modules():
        if mod is core:
            return name + "."
    raise UnitMapError("the wrapped causal LM is not a submodule of the given model")


def _gate_pre_hook(gate: Callable[[], torch.Tensor], width: int) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        g = gate().to(x.dtype)  # [U]
        shaped = x.unflatten(-1, (g.numel(), width)) * g[:, None]
        return (shaped.flatten(-2), *rest)

    return hook


def _param_gate_hooks(module: nn.Module, gate: Gate, values: Callable[[], torch.Tensor]) -> list:
    """Scale ``module.<gate.param>`` by the gates for the module's forward only.

    The scaled tensor shadows the parameter as an instance attribute (the forward reads
    ``self.down_proj``); the parameter itself is untouched and stays registered.
    """
    def before(mod: nn.Module, args: tuple) -> None:
        p = mod._parameters[gate.param]
        object.__setattr__(mod, gate.param, p * values().to(p.dtype).view(gate.shape))

    def after(mod: nn.Module, args: tuple, output) -> None:
        mod.__dict__.pop(gate.param, None)

    return [module.register_forward_pre_hook(before),
            module.register_forward_hook(after, always_call=True)]


def _embed_hook(gate: Callable[[], torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * gate().to(output.dtype)[args[0]][..., None]

    return hook


def _head_hook(gate: Callable[[], torch.Tensor]) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * gate().to(output.dtype)

    return hook


def _rows(t: torch.Tensor, i: int, start: int, count: int) -> torch.Tensor:
    return t[i, start : start + count]


def attach_gates(
    model: nn.Module,
    umap: UnitMap,
    heads: torch.Tensor | None = None,
    ffn: torch.Tensor | None = None,
    embed: torch.Tensor | None = None,
    head: torch.Tensor | None = None,
) -> list[RemovableHandle]:
    """Multiply each head's output, each FFN unit's activation and token rows by a gate.

    Args:
        model: the model ``umap`` was built on.
        umap: its unit map.
        heads: ``[L, H]`` gates on the input of each attention output projection, or None.
        ffn: ``[L, I]`` gates on each FFN unit's activation (experts: their down projection).
        embed: ``[V]`` gates on the input embedding's rows (the token's vector is scaled).
        head: ``[V]`` gates on the LM head's rows (the token's logit is scaled).

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
            for g in layer.ffn_gates:
                mod = model.get_submodule(g.module)
                values = partial(_rows, ffn, i, g.start, g.count)
                if g.param is None:
                    handles.append(mod.register_forward_pre_hook(_gate_pre_hook(values, 1)))
                else:
                    handles += _param_gate_hooks(mod, g, values)
    rows = umap.tokens
    if rows is not None and embed is not None:
        mod = model.get_submodule(rows.embed_module)
        handles.append(mod.register_forward_hook(_embed_hook(lambda: embed)))
    if rows is not None and head is not None and rows.head_module is not None:
        mod = model.get_submodule(rows.head_module)
        handles.append(mod.register_forward_hook(_head_hook(lambda: head)))
    return handles


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a mappable model, in order (e.g. for hooks on hidden states)."""
    core = core_model(model)
    try:
        return list(core.get_submodule(blocks_path(core, getattr(core, "config", None))))
    except (UnitMapError, AttributeError) as err:
        raise _unsupported(model, str(err)) from err
