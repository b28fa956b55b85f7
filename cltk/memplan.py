"""``cltk plan --memory``: the memory one rank of a run will need, by part, and whether it fits.

Parts per rank, in bytes (``N`` parameters, ``T`` trainable, ``W`` ranks, ``p`` bytes per weight: 2 in
bf16, 4 in fp32):

- **model states**, laid out as DeepSpeed keeps them: 16-bit (or fp32) weights, whole under ZeRO 0-2 and
  ``p N / W`` under ZeRO 3 plus the layers gathered for compute; gradients, whole under ZeRO 0-1 and
  partitioned from ZeRO 2, plus their fp32 partition in mixed precision; the optimizer's fp32 master
  partition and Adam's two moments (``12 T / W``); offload moves gradients' fp32 partition, master and
  moments (and under ZeRO 3 with ``offload_param`` the weights) to host memory. DeepSpeed's own
  estimators (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``) are
  shown beside this where they apply (mixed precision, every weight trained) and give the host side of
  offload;
- **DeepSpeed's buffers**: the gradient reduction buckets (``reduce_bucket_size`` elements, two with
  ``overlap_comm`` under ZeRO 1/2) and ZeRO 3's prefetch bucket. On a GPU torch allocates them whole; on
  a CPU only the pages written count (at most the trainable parameters);
- **activations** of one micro-batch: every decoder layer's saved tensors, or with
  ``train.activation_checkpointing`` each layer's input plus one layer recomputed in backward; the
  logits, their gradient and the loss's temporaries;
- **each method's state**, declared by the method (``MethodSpec.memory``): a teacher, a Fisher and an
  anchor, importance, masks, a reference gradient;
- **runtime**: on a GPU an allowance for the CUDA context and allocator slack (not measured by torch); on
  a CPU the resident size of the libraries, measured in this process once it has imported them.

The sum is compared with the GPU's memory; when it does not fit, the smallest change that makes it fit
is searched (ZeRO 2, checkpointing, ZeRO 3, a smaller micro-batch, offload). Validated against the peak
memory the runs record in ``stage.json`` (docs/launching.md, "Big models").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltk import registry
from cltk.config import RunConfig
from cltk.errors import UserError

GIB = 2**30
CUDA_RUNTIME_BYTES = int(1.5 * GIB)  # CUDA context, cuBLAS/NCCL workspaces, allocator slack
LOSS_CHUNK_ELEMENTS = 1 << 24  # cltk.losses.CHUNK_ELEMENTS (not imported: it pulls in torch)


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model, read from its config on the meta device (no weights)."""

    params: int
    largest_layer: int  # parameters of the largest module (DeepSpeed's ZeRO-3 estimator takes it)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    meta_model: Any = field(default=None, compare=False, repr=False)


@dataclass
class Setup:
    """A run's memory-relevant settings; the fit search changes copies of it."""

    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    reduce_bucket_size: int
    overlap_comm: bool
    prefetch_bucket_size: int
    weight_bytes: int  # 2 (bf16/fp16) or 4 (fp32)
    micro_batch: int
    seq_len: int
    checkpointing: bool
    attention: str
    world_size: int
    gpus_per_node: int
    device: str  # "cuda" or "cpu"

    def describe(self) -> str:
        off = [k for k, on in (("optimizer", self.offload_optimizer), ("param", self.offload_param))
               if on]
        return (f"ZeRO {self.zero_stage}{' + offload ' + '/'.join(off) if off else ''}, "
                f"{'bf16' if self.weight_bytes == 2 else 'fp32'}, micro batch {self.micro_batch} x "
                f"{self.seq_len} tokens, checkpointing {'on' if self.checkpointing else 'off'}, "
                f"{self.attention} attention, {self.world_size} rank(s) on {self.device}")


@dataclass
class MemoryInputs:
    """What a method's ``MethodSpec.memory`` function sees (bytes per rank)."""

    shape: ModelShape
    setup: Setup
    trainable: int
    activations: int  # one micro-batch's forward activations as the run keeps them
    full_activations: int  # the same without checkpointing (a pass that suspends it)

    @property
    def tokens(self) -> int:
        return self.setup.micro_batch * self.setup.seq_len

    def partition(self, bytes_per_element: int = 4) -> int:
        """A tensor laid out like this rank's ZeRO partition of the trainable weights (fp32)."""
        s = self.setup
        share = self.trainable if s.zero_stage == 0 else -(-self.trainable // s.world_size)
        return share * bytes_per_element

    def frozen_copy(self) -> int:
        """A frozen copy of the model beside the student (a teacher): whole under ZeRO 0-2,
        partitioned (plus the gathered layers) under ZeRO 3, in the student's precision."""
        s, p = self.setup, self.setup.weight_bytes
        if s.zero_stage == 3:
            return -(-self.shape.params // s.world_size) * p + 2 * self.shape.largest_layer * p
        return self.shape.params * p

    def logits(self) -> int:
        """One micro-batch's logits in the compute precision."""
        return self.tokens * self.shape.vocab * self.setup.weight_bytes


@dataclass
class Plan:
    setup: Setup
    lines: list[tuple[str, str, int]]  # (part, what, bytes per rank)
    host_offload: int = 0  # host memory per node for offloaded states (DeepSpeed's estimate)
    deepspeed_estimate: int | None = None  # DeepSpeed's model-states figure per GPU, where it applies

    @property
    def total(self) -> int:
        return sum(b for _, _, b in self.lines)


# ----- inputs ------------------------------------------------------------------------------------------


def model_shape(cfg: RunConfig) -> ModelShape:
    """The configured model's shape from its config, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    m = cfg.model
    if m.init_from:
        config = AutoConfig.from_pretrained(str(cfg.resolve(m.init_from)), local_files_only=True)
    elif m.gguf:
        p = cfg.resolve(m.gguf)
        config = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)  # type: ignore[union-attr]
    else:
        spec = dict(m.config or {})
        spec.setdefault("vocab_size", _vocab(cfg))
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    heads = int(config.num_attention_heads)
    return ModelShape(
        params=sum(params.values()),
        largest_layer=largest,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
        vocab=int(config.vocab_size),
        meta_model=model,
    )


def _vocab(cfg: RunConfig) -> int:
    t = cfg.tokenizer
    if t.train is not None:
        return t.train.vocab_size
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(cfg.resolve(t.path)), local_files_only=True))


def setup_of(cfg: RunConfig, world_size: int, gpus_per_node: int, device: str) -> Setup:
    """The memory-relevant settings of ``cfg`` on ``world_size`` ranks of ``device``."""
    from cltk.ds_config import load_deepspeed_json

    ds = load_deepspeed_json(cfg.resolve(cfg.deepspeed))  # type: ignore[arg-type]
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    bf16 = (ds.get("bf16") or {}).get("enabled", False)
    fp16 = (ds.get("fp16") or {}).get("enabled", False)
    half = device == "cuda" if bf16 == "auto" else bool(bf16) or fp16 is True
    if cfg.model.dtype == "bfloat16":
        half = True
    return Setup(
        zero_stage=stage,
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
        offload_param=(zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        reduce_bucket_size=int(float(zero.get("reduce_bucket_size", 5e8))),
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        prefetch_bucket_size=int(float(zero.get("stage3_prefetch_bucket_size", 5e7))),
        weight_bytes=2 if half else 4,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.seq_len,
        checkpointing=cfg.train.activation_checkpointing,
        attention=cfg.model.attn_implementation or "sdpa",
        world_size=world_size,
        gpus_per_node=min(gpus_per_node, world_size),
        device=device,
    )


# ----- the parts ---------------------------------------------------------------------------------------


def layer_activation_elements(shape: ModelShape, s: Setup) -> int:
    """Elements one decoder layer keeps for backward over one micro-batch (Llama-shaped: two norms,
    q/k/v and their rotary copies, attention output, the residual, gate/up/activation/product)."""
    h, kv, inter = shape.hidden, shape.hidden * shape.kv_heads // shape.heads, shape.intermediate
    tokens = s.micro_batch * s.seq_len
    per_token = 7 * h + 3 * kv + 4 * inter
    attn = 0
    if s.attention == "eager":  # scores and their softmax, [b, heads, T, T] each
        attn = 2 * s.micro_batch * shape.heads * s.seq_len * s.seq_len
    return tokens * per_token + attn


def activation_bytes(shape: ModelShape, s: Setup, checkpointing: bool) -> int:
    """One micro-batch's decoder activations (without the logits)."""
    p, tokens = s.weight_bytes, s.micro_batch * s.seq_len
    one_layer = layer_activation_elements(shape, s) * p
    if checkpointing:  # each layer's input, and one layer at a time recomputed in backward
        return shape.layers * tokens * shape.hidden * p + one_layer + 3 * tokens * shape.hidden * p
    return shape.layers * one_layer + 3 * tokens * shape.hidden * p  # + embeddings, final norm


def loss_bytes(shape: ModelShape, s: Setup) -> int:
    """Logits, their gradient, and the cross-entropy's fp32 temporaries (cltk.losses)."""
    n = s.micro_batch * (s.seq_len - 1) * shape.vocab
    logits = 2 * n * s.weight_bytes  # the logits and their gradient
    if n <= LOSS_CHUNK_ELEMENTS:  # plain cross-entropy: an fp32 log-softmax (and an fp32 copy)
        return logits + n * 4 * (2 if s.weight_bytes == 2 else 1)
    return logits + 2 * LOSS_CHUNK_ELEMENTS * 4  # two chunk temporaries


def model_states(shape: ModelShape, s: Setup, trainable: int) -> list[tuple[str, str, int]]:
    """Weights, gradients and optimizer state per rank on the device (see the module docstring)."""
    n, t, w, p = shape.params, trainable, s.world_size, s.weight_bytes
    mixed = p < 4
    part = -(-t // w)
    if s.zero_stage == 3:
        weights = 0 if s.offload_param else -(-n // w) * p
        weights += 2 * shape.largest_layer * p  # gathered for compute, one layer ahead
    else:
        weights = n * p
    grads = t * p if s.zero_stage <= 1 else part * p
    grads32 = part * 4 if mixed else 0
    optim = part * 12
    if s.offload_optimizer:  # gradients go to the host partition, where the optimizer steps
        grads32, optim = 0, 0
        grads = t * p if s.zero_stage <= 1 else 0
    return [
        ("model states", f"weights ({'bf16' if mixed else 'fp32'})", weights),
        ("model states", "gradients" + (" (16-bit; fp32 partition below)" if mixed else ""), grads),
        ("model states", "gradients, fp32 partition", grads32),
        ("model states", "optimizer: fp32 master + Adam moments" +
         (" (offloaded to host)" if s.offload_optimizer else ""), optim),
    ]


def buffer_bytes(s: Setup, trainable: int) -> list[tuple[str, str, int]]:
    """DeepSpeed's gradient buckets (and ZeRO 3's prefetch bucket)."""
    if s.zero_stage == 0:
        return []
    p = 4 if s.zero_stage == 1 else s.weight_bytes  # ZeRO 1 stages an fp32 accumulator
    used = s.reduce_bucket_size if s.device == "cuda" else min(s.reduce_bucket_size, trainable)
    buffers = 2 if s.overlap_comm and s.zero_stage < 3 else 1
    out = [("buffers", f"gradient reduction bucket{'s' if buffers > 1 else ''} "
            f"({buffers} x reduce_bucket_size {s.reduce_bucket_size:.3g})", buffers * used * p)]
    if s.zero_stage == 3:
        pre = s.prefetch_bucket_size if s.device == "cuda" else 0  # counted as gathered weights
        out.append(("buffers", f"prefetch bucket ({s.prefetch_bucket_size:.3g})", pre * s.weight_bytes))
    return out


def deepspeed_estimates(shape: ModelShape, s: Setup, trainable: int) -> tuple[int | None, int]:
    """DeepSpeed's own (GPU bytes per rank, host bytes per node) for the model states; the GPU figure
    only where its assumptions hold (mixed precision, every weight trained, ZeRO 2 or 3)."""
    if s.zero_stage not in (2, 3):
        return None, 0
    nodes = max(1, s.world_size // s.gpus_per_node)
    if s.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.params, s.gpus_per_node, nodes, cpu_offload=s.offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, s.gpus_per_node, nodes,
            cpu_offload=s.offload_optimizer, cpu_offload_params=s.offload_param)
    applies = s.weight_bytes == 2 and trainable == shape.params
    host = cpu if (s.offload_optimizer or s.offload_param) else 0
    return (gpu if applies else None), host


def runtime_bytes(s: Setup) -> tuple[str, int]:
    if s.device == "cuda":
        return "CUDA context and allocator slack (allowance)", CUDA_RUNTIME_BYTES
    import resource

    import deepspeed  # noqa: F401  (what every rank imports)

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return "process: Python, torch, DeepSpeed, transformers (measured here)", rss


def estimate(cfg: RunConfig, shape: ModelShape, s: Setup) -> Plan:
    """The plan of ``cfg`` as set up by ``s``: every part per rank."""
    trainable = shape.params
    for spec, section in registry.active(cfg):
        if spec.trainable is not None:
            trainable = spec.trainable(section, shape.meta_model)
    acts = activation_bytes(shape, s, s.checkpointing)
    inputs = MemoryInputs(shape, s, trainable, acts, activation_bytes(shape, s, False))
    lines = model_states(shape, s, trainable) + buffer_bytes(s, trainable)
    lines.append(("activations", f"decoder ({'checkpointed' if s.checkpointing else 'all kept'})",
                  acts))
    lines.append(("activations", "logits, their gradient, loss temporaries", loss_bytes(shape, s)))
    for spec, section in registry.active(cfg):
        for what, b in spec.memory(cfg, section, inputs).items():
            lines.append((f"method {spec.name}", what, int(b)))
    lines.append(("runtime", *runtime_bytes(s)))
    ds_gpu, host = deepspeed_estimates(shape, s, trainable)
    return Plan(s, [ln for ln in lines if ln[2] > 0], host, ds_gpu)


# ----- fitting ------------------------------------------------------------------------------------------


def _changes(s: Setup) -> list[tuple[str, dict[str, Any]]]:
    """Single changes in the order of what they cost in speed (least first)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if s.zero_stage < 2:
        out.append(("ZeRO stage 2 (ds_configs/zero2.json)", {"zero_stage": 2}))
    if not s.checkpointing:
        out.append(("train.activation_checkpointing: true", {"checkpointing": True}))
    if s.zero_stage < 3:
        out.append(("ZeRO stage 3 (ds_configs/zero3.json)", {"zero_stage": 3}))
    if s.micro_batch > 1:
        half = s.micro_batch // 2
        out.append((f"train.micro_batch_size: {half} (and twice the gradient_accumulation_steps)",
                    {"micro_batch": half}))
    if not s.offload_optimizer:
        out.append(("offload_optimizer: {device: cpu}", {"offload_optimizer": True}))
    if not s.offload_param:
        out.append(("ZeRO 3 with offload_param: {device: cpu} (ds_configs/zero3_offload.json)",
                    {"zero_stage": 3, "offload_optimizer": True, "offload_param": True}))
    return out


def smallest_fix(cfg: RunConfig, shape: ModelShape, s: Setup, limit: int) -> tuple[list[str], Plan] | None:
    """The first single change that makes the plan fit in ``limit`` bytes; else the shortest run of
    changes in cost order (micro-batch halved down to 1); None when nothing fits."""
    for what, change in _changes(s):
        plan = estimate(cfg, shape, dataclasses.replace(s, **change))
        if plan.total <= limit:
            return [what], plan
    done: list[str] = []
    cur = s
    while True:
        options = _changes(cur)
        if not options:
            return None
        what, change = options[0]
        cur = dataclasses.replace(cur, **change)
        done.append(what)
        plan = estimate(cfg, shape, cur)
        if plan.total <= limit:
            return done, plan


# ----- measured peaks and the report ---------------------------------------------------------------------


def measured_peak(out_dir: Path, device: str) -> int | None:
    """The highest peak per rank the run's ``stage.json`` files recorded (bytes): host RSS on a CPU,
    device memory on a GPU; None without a finished stage."""
    key = "device" if device == "cuda" else "rss"
    peaks = [r.get(key, 0) for f in sorted(Path(out_dir).glob("stages/*/stage.json"))
             for r in json.loads(f.read_text()).get("peak_memory_mb", [])]
    return int(max(peaks) * 2**20) if peaks else None


def gib(b: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"


def format_plan(plan: Plan, memory_gib: float | None, fix: tuple[list[str], Plan] | None,
                measured: int | None) -> str:
    rows = ["| part | what | per rank |", "|---|---|---:|"]
    rows += [f"| {part} | {what} | {gib(b)} |" for part, what, b in plan.lines]
    rows.append(f"| **total** | | **{gib(plan.total)}** |")
    out = [f"memory plan: {plan.setup.describe()}", "", *rows, ""]
    if plan.deepspeed_estimate is not None:
        out.append(f"DeepSpeed's estimator, model states only: {gib(plan.deepspeed_estimate)} per GPU")
    if plan.host_offload:
        out.append(f"host memory for offloaded states (DeepSpeed's estimate): "
                   f"{gib(plan.host_offload)} per node")
    if measured is not None:
        out.append(f"measured peak (stage.json, highest rank): {gib(measured)}; estimate / measured "
                   f"= {plan.total / measured:.2f}")
    if memory_gib is not None:
        limit = int(memory_gib * GIB)
        if plan.total <= limit:
            out.append(f"fits: {gib(plan.total)} of {memory_gib:g} GiB per GPU")
        elif fix is None:
            out.append(f"does not fit in {memory_gib:g} GiB per GPU, whatever ZeRO stage, offload, "
                       "checkpointing or micro-batch: use more GPUs (world size) or a smaller model")
        else:
            out.append(f"does not fit: {gib(plan.total)} > {memory_gib:g} GiB per GPU; smallest change "
                       f"that fits: {' + '.join(fix[0])} ({gib(fix[1].total)})")
    return "\n".join(out)


def plan_memory(cfg: RunConfig, world_size: int, gpus_per_node: int, device: str,
                memory_gib: float | None, measured_dir: Path | None = None) -> str:
    """The text ``cltk plan --memory`` prints."""
    if world_size < 1 or gpus_per_node < 1:
        raise UserError("plan: --world-size and --gpus-per-node must be >= 1")
    if memory_gib is not None and memory_gib <= 0:
        raise UserError(f"plan: --gpu-memory must be > 0 GiB, got {memory_gib}")
    shape = model_shape(cfg)
    s = setup_of(cfg, world_size, gpus_per_node, device)
    plan = estimate(cfg, shape, s)
    fix = None
    if memory_gib is not None and plan.total > memory_gib * GIB:
        fix = smallest_fix(cfg, shape, s, int(memory_gib * GIB))
    measured = measured_peak(measured_dir, device) if measured_dir else None
    if measured_dir and measured is None:
        raise UserError(f"plan: --measured {measured_dir} holds no finished stage (stages/*/stage.json)")
    head = (f"model: {shape.params:,} parameters ({shape.layers} layers, hidden {shape.hidden}, "
            f"vocab {shape.vocab})")
    return head + "\n" + format_plan(plan, memory_gib, fix, measured)
