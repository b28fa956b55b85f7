"""Find a causal LM's DAS units from its structure: decoder blocks, attention and FFN projections.

:func:`cltk.methods.das.units.build_unit_map` uses this for every model whose ``model_type`` is not registered
(:func:`register_architecture`, kept here with its :class:`ArchSpec`: a model's module paths named
by hand, for what the structure does not reveal). It needs no table of module names:

- **blocks**: the ``ModuleList`` of ``config.num_hidden_layers`` modules;
- **attention**: the shallowest module of a block named like ``*attn*`` / ``*attention*``; its
  projections are the Linear (or GPT-2 ``Conv1D``) layers inside it. The output projection maps
  ``H * head_dim`` features to the hidden size (named ``o_proj``, ``out_proj``, ``dense``, ``c_proj``,
  ... when shapes alone are ambiguous); the others read the hidden states: three of them are q, k
  and v (q is the one with ``H * head_dim`` outputs; the KV head count comes from k's width), one is
  a fused q|k|v projection, whose layout is q | k | v (Phi-3, GPT-2, GPT-BigCode, ...) or, for the
  types in :data:`GROUPED_QKV`, one run per KV group of its query heads then k then v (GPT-NeoX,
  BLOOM and Persimmon interleave q_h, k_h, v_h per head; Falcon, by group);
- **FFN**: the shallowest module named like ``*mlp*`` / ``*ffn*`` / ``*feed_forward*`` (or the block
  itself, as in OPT), minus the attention: every module in it holding an output projection
  (``I -> hidden``) and input projections (``hidden -> I``, or ``hidden -> 2I`` fused gate|up, halves
  as in Phi-3) is a dense FFN; a module holding 3-D parameters ``gate_up_proj [E, 2I, hidden]`` and
  ``down_proj [E, hidden, I]`` holds ``E`` experts of ``I`` units each (Mixtral, Qwen2-MoE, OLMoE,
  ...; ``is_transposed`` experts store both the other way round). A layer's FFN units are its
  experts' units, then each dense FFN's (e.g. Qwen2-MoE's shared expert), in that order.

Anything not found is refused with :class:`UnitMapError` (a :class:`cltk.models.ModelError`, so a
:class:`cltk.errors.UserError`), naming the part and the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from cltk.models import ModelError


class UnitMapError(ModelError):
    """The model's DAS units cannot be mapped: the message names the part not found and the fix."""


# Fused q|k|v laid out per KV group (query heads of the group, then its k, then its v); with as
# many KV heads as heads this is GPT-NeoX's per-head interleaving q_h, k_h, v_h.
GROUPED_QKV = frozenset({"gpt_neox", "gpt_neox_japanese", "bloom", "falcon", "persimmon"})
# Experts whose fused gate|up interleaves gate and up per unit (2u, 2u + 1) instead of halves.
INTERLEAVED_GATE_UP = frozenset({"gpt_oss"})
# Fused layouts cltk does not read (CodeGen splits q|v|k over model-parallel shards): refused.
UNREADABLE_QKV = frozenset({"codegen"})

_ATTN = ("attn", "attention")
_FFN = ("mlp", "ffn", "feed_forward", "moe")
_OUT_NAMES = (
    "o_proj",
    "out_proj",
    "dense",
    "c_proj",
    "o",
    "wo",
    "out",
    "proj",
    "dense_4h_to_h",
    "down_proj",
    "fc2",
    "w2",
    "fc_out",
    "output_linear",
)


@dataclass(frozen=True)
class DenseFfn:
    """One dense FFN: input projections (``(path, fused gate|up)``) and the output projection."""

    ins: tuple[tuple[str, bool], ...]
    out: str


@dataclass(frozen=True)
class Experts:
    """A module of ``num`` experts stored as 3-D parameters (attribute names inside it)."""

    path: str
    ins: tuple[tuple[str, bool], ...]  # (attribute, fused gate|up)
    out: str
    num: int
    size: int
    transposed: bool
    biases: tuple[tuple[str, bool], ...] = ()  # input-side biases [E, I] or [E, 2I]
    interleaved: bool = False  # fused gate|up as (gate_u, up_u) pairs, not halves


@dataclass(frozen=True)
class BlockParts:
    """Module paths (relative to one block) of the units' projections."""

    qkv: tuple[str, ...]  # (q, k, v) or (fused,)
    layout: str  # "separate", "blocks" (q | k | v) or "grouped" (per KV group)
    attn_out: str
    ffns: tuple[DenseFfn, ...]
    experts: tuple[Experts, ...] = ()


def io_features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in, out, stored transposed) of a Linear or HF Conv1D (PEFT: its base layer); else None."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if hasattr(base, "nf") and hasattr(base, "nx"):  # transformers.pytorch_utils.Conv1D
        return base.nx, base.nf, True
    if isinstance(getattr(base, "weight", None), nn.Parameter) and hasattr(base, "in_features"):
        return base.in_features, base.out_features, False
    return None


def find_blocks(core: nn.Module, num_layers: int | None) -> str:
    """Path of the decoder blocks: the first ``ModuleList`` of ``num_layers`` modules."""
    for name, mod in core.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and len(mod) > 0:
            if any(io_features(m) for m in mod[0].modules()):
                return name
    raise UnitMapError(
        f"no decoder blocks found: no ModuleList of config.num_hidden_layers={num_layers} "
        "modules holding Linear layers"
    )


def _projections(root: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``{path: (in, out)}`` of the Linear/Conv1D layers under ``root`` (not under ``skip``)."""
    out = {}
    for name, mod in root.named_modules():
        if not name or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if any(name.startswith(p + ".") for p in out):  # a PEFT wrapper's own layers
            continue
        feats = io_features(mod)
        if feats is not None:
            out[name] = feats[:2]
    return out


def _named_like(
    block: nn.Module, words: tuple[str, ...], avoid: tuple[str, ...] = ()
) -> str | None:
    """The shallowest submodule whose last name contains one of ``words`` (not a norm)."""
    best = None
    for name, mod in block.named_modules():
        last = name.rsplit(".", 1)[-1].lower()
        if not name or "norm" in last or last.startswith("ln") or last in avoid:
            continue
        if not any(io_features(m) or m is not mod and _has_3d(m) for m in mod.modules()):
            continue  # e.g. post_attention_dropout
        if any(w in last for w in words) and (best is None or name.count(".") < best.count(".")):
            best = name
    return best


def _has_3d(mod: nn.Module) -> bool:
    return any(p.dim() == 3 for p in mod.parameters(recurse=False))


def _last(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _pick_out(cands: list[str], where: str, what: str) -> str:
    if len(cands) == 1:
        return cands[0]
    named = [c for c in cands if _last(c) in _OUT_NAMES]
    if len(named) == 1:
        return named[0]
    raise UnitMapError(f"{where}: no single {what} among {cands or 'no projections'}")


def discover_block(
    block: nn.Module, path: str, hidden: int, num_heads: int, model_type: str | None
) -> BlockParts:
    """The unit-holding projections of one decoder block (see the module docstring)."""
    attn = _named_like(block, _ATTN)
    if attn is None:
        raise UnitMapError(
            f"block {path}: no attention module (a submodule named *attn* or "
            f"*attention*) among {[n for n, _ in block.named_children()]}"
        )
    projs = {f"{attn}.{k}": v for k, v in _projections(block.get_submodule(attn)).items()}
    outs = [p for p, (i, o) in projs.items() if o == hidden and i % num_heads == 0]
    reads = [p for p, (i, _) in projs.items() if i == hidden]
    if len(outs) > 1:  # q and o are both [hidden -> hidden]: the name tells the output
        outs = [p for p in outs if _last(p) in _OUT_NAMES] or outs
    attn_out = _pick_out(outs, f"block {path}.{attn}", "attention output projection")
    qkv = [p for p in reads if p != attn_out]
    if len(qkv) == 3:
        width = projs[attn_out][0]
        q = [p for p in qkv if projs[p][1] == width]
        if not q:
            raise UnitMapError(
                f"block {path}.{attn}: no query projection of {width} outputs among {qkv}"
            )
        named_q = [p for p in q if _last(p).startswith(("q", "wq"))]
        q0 = (named_q or q)[0]
        qkv = [q0] + [p for p in qkv if p != q0]
        layout = "separate"
    elif len(qkv) == 1:
        if model_type in UNREADABLE_QKV:
            raise UnitMapError(
                f"block {path}.{attn}: the fused {qkv[0]} of model type "
                f"{model_type!r} has a layout cltk cannot read"
            )
        layout = "grouped" if model_type in GROUPED_QKV else "blocks"
    else:
        raise UnitMapError(
            f"block {path}.{attn}: query/key/value projections not found (want 3 "
            f"separate or 1 fused reading the hidden states, found {qkv})"
        )
    ffn_root = _named_like(block, _FFN)
    skip = (attn,) if ffn_root is None else ()
    root_mod = block if ffn_root is None else block.get_submodule(ffn_root)
    prefix = "" if ffn_root is None else ffn_root + "."
    experts = tuple(_experts(root_mod, prefix, hidden, model_type in INTERLEAVED_GATE_UP))
    ex_paths = tuple(e.path[len(prefix) :] for e in experts)
    ffns = _dense_ffns(_projections(root_mod, skip + ex_paths), prefix, hidden)
    if not ffns and not experts:
        raise UnitMapError(
            f"block {path}: no FFN found (an output projection [I -> {hidden}] with "
            f"input projections [{hidden} -> I] under {ffn_root or 'the block'})"
        )
    return BlockParts(tuple(qkv), layout, attn_out, tuple(ffns), experts)


def _dense_ffns(projs: dict[str, tuple[int, int]], prefix: str, hidden: int) -> list[DenseFfn]:
    parents: dict[str, list[str]] = {}
    for p in projs:
        parents.setdefault(p.rpartition(".")[0], []).append(p)
    found = []
    for members in parents.values():
        outs = [p for p in members if projs[p][1] == hidden and projs[p][0] != hidden]
        if not outs:  # I == hidden: the name tells the output projection
            outs = [p for p in members if projs[p][1] == hidden and _last(p) in _OUT_NAMES]
        if len(outs) != 1:
            continue
        (out,) = outs
        inter = projs[out][0]
        ins = [
            (f"{prefix}{p}", projs[p][1] == 2 * inter)
            for p in members
            if p != out and projs[p][0] == hidden and projs[p][1] in (inter, 2 * inter)
        ]
        if ins:
            found.append(DenseFfn(tuple(ins), f"{prefix}{out}"))
    return found


def _experts(root: nn.Module, prefix: str, hidden: int, interleaved: bool) -> list[Experts]:
    found = []
    for name, mod in root.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        down = own.get("down_proj")
        if down is None or down.dim() != 3:
            continue
        shape = tuple(getattr(down, "ds_shape", down.shape))
        transposed = bool(getattr(mod, "is_transposed", False))
        num, size = shape[0], (shape[1] if transposed else shape[2])
        ins, biases = [], []
        for attr in ("gate_up_proj", "gate_proj", "up_proj"):
            p = own.get(attr)
            if p is None:
                continue
            s = tuple(getattr(p, "ds_shape", p.shape))
            width = s[2] if transposed else s[1]
            if width not in (size, 2 * size) or hidden not in s:
                raise UnitMapError(
                    f"experts {prefix}{name}.{attr} is {s}: not [E, I or 2I, hidden] for I={size}"
                )
            ins.append((attr, width == 2 * size))
            if f"{attr}_bias" in own:
                biases.append((f"{attr}_bias", width == 2 * size))
        if ins:
            found.append(
                Experts(
                    f"{prefix}{name}" if name else prefix.rstrip("."),
                    tuple(ins),
                    "down_proj",
                    num,
                    size,
                    transposed,
                    tuple(biases),
                    interleaved,
                )
            )
    return found


SEPARATE, FUSED_GPT2, FUSED_NEOX = "separate", "fused_gpt2", "fused_neox"


@dataclass(frozen=True)
class ArchSpec:
    """Where the units of one architecture live, as module paths (for models that
    :mod:`cltk.methods.das.unit_discovery` cannot read).

    Attributes:
        layers: path from the causal LM to its ``ModuleList`` of blocks, e.g. ``"model.layers"``.
        attention: ``"separate"`` (q, k, v projections), ``"fused_gpt2"`` (one projection, output
            laid out q | k | v, each head-major) or ``"fused_neox"`` (one projection, output
            interleaved per head: q_h, k_h, v_h; per KV group with fewer KV heads).
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

    def parts(self) -> BlockParts:
        layout = {SEPARATE: "separate", FUSED_GPT2: "blocks", FUSED_NEOX: "grouped"}.get(
            self.attention
        )
        if layout is None:
            raise UnitMapError(
                f"ArchSpec.attention={self.attention!r}: use 'separate', "
                "'fused_gpt2' or 'fused_neox'"
            )
        ffn = DenseFfn(tuple((p, False) for p in self.ffn_in), self.ffn_out)
        return BlockParts(self.qkv, layout, self.attn_out, (ffn,))


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Use ``spec`` for ``config.model_type == model_type`` instead of reading the structure."""
    ARCHITECTURES[model_type] = spec


def blocks_path(core: nn.Module, config) -> str:
    """Path of the decoder blocks: the registered spec's, or the one :func:`find_blocks` finds."""
    spec = ARCHITECTURES.get(getattr(config, "model_type", None))
    if spec is not None:
        return spec.layers
    return find_blocks(core, getattr(config, "num_hidden_layers", None))
