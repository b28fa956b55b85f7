"""EWC (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018) on DeepSpeed ZeRO 0-3.

Everything lives in this rank's ZeRO partitions (:mod:`cltk.methods.kit.zero_view`), never as a full copy of
the model: the Fisher F and the anchor theta* are flat fp32 tensors shaped like each partition the
torch optimizer steps on, so under ZeRO 1/2/3 each rank holds 1 / world of them.

- **Penalty gradient.** Right before the torch optimizer steps a partition,
  ``lam * F * (theta - theta*)`` is added to its ``.grad`` (the reduced gradient of the data
  loss): exactly the gradient of ``lam / 2 * sum F (theta - theta*)^2``, with no extra forward or
  backward. It is added after DeepSpeed has clipped the gradient, so clipping (``train.grad_clip``)
  bounds the data gradient only.
- **Penalty value** (``report_penalty``). Once per step (at the first micro-batch) the penalty at
  the current weights is summed over this rank's partitions and all-reduced; it is returned as the
  loss term ``ewc_penalty`` (a value only: its gradient is the one above), so ``loss`` =
  ``loss_main`` + penalty in metrics.csv and the logs.
- **Fisher.** The diagonal empirical Fisher of the stage's own batches (replay included), for
  free: the mean of g * g over the stage's last ``fisher_steps`` steps, g being the reduced (and
  clipped) gradient of the data loss the optimizer sees, before the penalty's gradient is added.
- **After each stage**: ``F <- gamma * F + F_stage``; ``theta* <-`` the stage's final fp32 weights.

F, theta* and, inside the Fisher window, the running sum of g * g are :meth:`state_tensors`, saved
per rank in every checkpoint and stage directory (``methods_rank<r>.pt``) and restored on resume.
The next stage builds a new engine; its partitions must be laid out as the saved ones (same model,
trainable set, ZeRO stage family and world size), which a signature of the layout checks.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import torch

from cltk import distributed as dist
from cltk.errors import UserError
from cltk.method import Method, StageContext
from cltk.methods.ewc.penalty import add_square_, fold_fisher, penalty_
from cltk.methods.kit.zero_view import LayoutError, Partition, ZeroView, zero_view
from cltk.tracking import log

if TYPE_CHECKING:  # the package imports this module on use: no import back at run time
    from cltk.config import RunConfig
    from cltk.methods.ewc import EwcConfig


class EwcStateError(UserError):
    """Saved EWC state that cannot be used by this stage's engine."""


def layout_signature(view: ZeroView) -> torch.Tensor:
    """``[partitions, 2]`` int64: each partition's size and a CRC of which parameter elements sit
    where in it."""
    rows = []
    for part in view.partitions:
        text = ";".join(f"{f.name}:{f.start}:{f.numel}:{f.offset}" for f in part.fragments)
        rows.append([part.numel, zlib.crc32(text.encode())])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


class EwcMethod(Method):
    """The ``ewc:`` hooks (see the module doc).

    Attributes:
        fisher, anchor: per partition of this rank, F and theta* (None before the first stage ends).
        square_sum: per partition, the sum of g * g over the Fisher window so far (None outside it).
        stages: stages folded into ``fisher``.
        window_steps: steps summed in ``square_sum``.
    """

    name = "ewc"

    @classmethod
    def from_config(cls, cfg: RunConfig, section: EwcConfig) -> EwcMethod:
        return cls(section)

    def __init__(self, section: EwcConfig):
        self.ewc = section
        self.lam = float(section.lam or 0.0)
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None
        self.square_sum: list[torch.Tensor] | None = None
        self.layout: torch.Tensor | None = None  # the signature the tensors above follow
        self.stages = 0
        self.window_steps = 0
        self.view: ZeroView | None = None
        self._ctx: StageContext | None = None
        self._signature: torch.Tensor | None = None
        self._window_start = 0
        self._last_window_step = -1
        self._penalty: tuple[int, torch.Tensor] | None = None
        self._detach: Any = None

    # ----- hooks -------------------------------------------------------------------------------
    def on_engine_ready(self, ctx: StageContext) -> None:
        try:
            self.view = zero_view(ctx.engine)
        except LayoutError as e:
            raise EwcStateError(f"ewc: {e}") from e
        self._ctx = ctx
        self._signature = layout_signature(self.view)
        self.square_sum, self.window_steps, self._last_window_step = None, 0, -1
        self._penalty = None
        self._window_start = max(0, len(ctx.schedule) - self.ewc.fisher_steps)
        self._place()
        self._detach = self.view.on_step(before=self._before_step)
        if self.fisher is not None:
            log(
                f"ewc: penalty on, lam {self.lam:g}, Fisher of {self.stages} stage(s) (gamma "
                f"{self.ewc.gamma:g}); this stage's Fisher from steps {self._window_start + 1}-"
                f"{len(ctx.schedule)}"
            )

    def extra_loss(self, ctx: StageContext, batch: dict[str, torch.Tensor], logits: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ewc_penalty``: the penalty at this step's weights over all ranks (a value only)."""
        if self.fisher is None or self.lam == 0 or not self.ewc.report_penalty:
            return {}
        if self._penalty is None or self._penalty[0] != ctx.step:
            self._penalty = (ctx.step, self.penalty())
        return {"ewc_penalty": self._penalty[1].to(device=logits.device, dtype=torch.float32)}

    def on_stage_end(self, ctx: StageContext) -> None:
        assert self.view is not None, "on_engine_ready must run first"
        if self._detach is not None:
            self._detach()
            self._detach = None
        if self.square_sum is None or self.window_steps == 0:
            raise RuntimeError(f"ewc: stage {ctx.stage.name} ended with no Fisher step")
        last = self._penalty[1].item() if self._penalty is not None else None
        steps = self.window_steps
        stage_mean, stage_max = self._stats(self.square_sum, 1.0 / steps)
        old = self.fisher or [None] * len(self.square_sum)
        self.fisher = [
            fold_fisher(f, s, steps, self.ewc.gamma) for f, s in zip(old, self.square_sum)
        ]
        self.anchor = [p.tensor.detach().clone() for p in self.view.partitions]
        self.layout, self.stages = self._signature, self.stages + 1
        self.square_sum, self.window_steps = None, 0
        total_mean, _ = self._stats(self.fisher, 1.0)
        log(
            f"ewc: stage {ctx.stage.name}: Fisher of its last {steps} step(s): mean "
            f"{stage_mean:.3e}, max {stage_max:.3e}; Fisher of {self.stages} stage(s): mean "
            f"{total_mean:.3e}; anchor set to the stage's final weights"
            + (f"; penalty at its last step {last:.4e}" if last is not None else "")
        )
        self.view, self._ctx, self._penalty = None, None, None

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "window_steps": self.window_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stages = int(state.get("stages", 0))
        self.window_steps = int(state.get("window_steps", 0))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, tensors in (
            ("fisher", self.fisher),
            ("anchor", self.anchor),
            ("square_sum", self.square_sum),
        ):
            for i, t in enumerate(tensors or []):
                out[f"{key}.{i}"] = t
        if out:
            assert self.layout is not None
            out["layout"] = self.layout
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        def listed(key: str) -> list[torch.Tensor] | None:
            found = [tensors[f"{key}.{i}"] for i in range(len(tensors)) if f"{key}.{i}" in tensors]
            return found or None

        self.fisher, self.anchor = listed("fisher"), listed("anchor")
        self.square_sum = listed("square_sum")
        self.layout = tensors.get("layout")
        if self.stages > 0 and (self.fisher is None or self.anchor is None):
            raise EwcStateError(
                f"ewc: the state being restored says {self.stages} stage(s) made a Fisher, but "
                f"this rank's methods_rank{dist.rank()}.pt holds none: restore that file"
            )
        if self.window_steps > 0 and self.square_sum is None:
            raise EwcStateError(
                f"ewc: the checkpoint says {self.window_steps} Fisher step(s) were summed, but "
                f"this rank's methods_rank{dist.rank()}.pt lacks them: restore that file"
            )
        if self.view is not None:  # resumed mid-stage: the engine exists
            self._place()

    # ----- internals ---------------------------------------------------------------------------
    def _place(self) -> None:
        """Check the held tensors fit this engine's partitions; move them to their devices."""
        assert self.view is not None and self._signature is not None
        held = [t for t in (self.fisher, self.anchor, self.square_sum) if t is not None]
        if not held:
            return
        if self.layout is None or not torch.equal(self.layout, self._signature):
            raise EwcStateError(
                "ewc: the saved Fisher and anchor are laid out for other ZeRO partitions than "
                "this stage's engine: the model, its trainable parameters, the ZeRO stage (1/2 vs "
                "3 vs 0) or the number of ranks changed since they were made; keep them the same "
                "for the whole run"
            )
        parts = self.view.partitions
        for tensors in held:
            for i, part in enumerate(parts):
                tensors[i] = tensors[i].to(device=part.tensor.device, dtype=torch.float32)

    @torch.no_grad()
    def _before_step(self, parts: list[tuple[int, Partition]]) -> None:
        """Right before the optimizer steps ``parts``: sum g * g (Fisher window), then add the
        penalty's gradient to g."""
        assert self.view is not None and self._ctx is not None
        step = self._ctx.step
        window = step >= self._window_start
        if window:
            if self.square_sum is None:
                self.square_sum = [torch.zeros_like(p.tensor) for p in self.view.partitions]
                self.layout = self._signature
            if step != self._last_window_step:  # ZeRO 3 steps its sub-groups one hook at a time
                self.window_steps += 1
                self._last_window_step = step
        for i, part in parts:
            g = part.tensor.grad
            if g is None:
                continue
            if window:
                assert self.square_sum is not None
                add_square_(self.square_sum[i], g)
            if self.fisher is not None and self.anchor is not None and self.lam > 0:
                penalty_(part.tensor.detach(), self.anchor[i], self.fisher[i], self.lam, grad=g)

    def penalty(self) -> torch.Tensor:
        """The penalty at the current weights over every rank (0-dim float64, equal on all)."""
        assert self.view is not None and self.fisher is not None and self.anchor is not None
        parts = self.view.partitions
        values = [  # all queued before the first host copy waits for them
            penalty_(p.tensor.detach(), a, f, self.lam)
            for p, a, f in zip(parts, self.anchor, self.fisher)
        ]
        local = sum((v.cpu() for v in values), torch.zeros((), dtype=torch.float64))
        return self._sum_over_ranks(local)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; under ZeRO 0 every rank holds every element: nothing to add."""
        assert self.view is not None
        return t if self.view.layout == "plain" else dist.all_reduce_sum(t)

    def _stats(self, tensors: list[torch.Tensor], scale: float) -> tuple[float, float]:
        """Mean and max of ``scale * tensors`` over every parameter element of every rank
        (collective)."""
        assert self.view is not None
        count = sum(f.numel for p in self.view.partitions for f in p.fragments)
        total = sum(float(t.sum()) for t in tensors) * scale
        top = max((float(t.max()) for t in tensors if t.numel()), default=0.0) * scale
        sums = self._sum_over_ranks(torch.tensor([total, float(count)], dtype=torch.float64))
        if self.view.layout != "plain":
            top = float(dist.all_gather_cat(torch.tensor([top], dtype=torch.float64)).max())
        return float(sums[0] / max(float(sums[1]), 1.0)), top
