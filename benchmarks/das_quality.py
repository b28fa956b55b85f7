"""DAS quality in minutes: forgetting of a base's domain with and without DAS and its token rows.

    flock /tmp/cltk-heavy.lock python benchmarks/das_quality.py --seeds 1 2

One process, no DeepSpeed (update masks on a plain torch AdamW: the ZeRO-0 layout of
``cltk.methods.das.masking``; the 2-rank ZeRO layouts are tested in tests/test_masking.py). It

1. trains a byte-fallback BPE tokenizer (``--vocab``) on Python stdlib code and Shakespeare
   (cltk's builtin corpora, ``--chars`` of each), packs both into ``--seq-len`` sequences and keeps
   ``--eval-seqs`` of each aside;
2. trains a base: a small Llama with tied embeddings (``--hidden``, ``--layers``) on code for
   ``--base-steps`` (seed 0, shared by every arm and seed);
3. per seed, scores DAS's proxy importance of the base on ``--importance-seqs`` Shakespeare
   sequences (as ``DasMethod`` does before the first stage) and trains the base on Shakespeare for
   ``--steps`` in three arms: ``naive`` (no masks), ``das-units`` (update masks on heads and FFN
   units: ``das.protect_embeddings: false``) and ``das`` (units and token rows: the default);
   data order and dropout seeded by the seed, equal in every arm;
4. prints, per arm and seed, code's perplexity against the base's (forgetting) and Shakespeare's
   (what was learnt), then the mean and range over seeds.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("naive", "das-units", "das")


def pack(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids += tok(d)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def perplexity(model, seqs: torch.Tensor, bs: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), bs):
            x = seqs[i : i + bs]
            total += float(model(input_ids=x, labels=x).loss) * x.numel()
            count += x.numel()
    return math.exp(total / count)


def train(model, seqs: torch.Tensor, steps: int, args, seed: int, masks=None) -> None:
    from cltk.methods.das.masking import attach_update_masks

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warm = min(10, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    handle = None
    if masks is not None:
        handle = attach_update_masks(SimpleNamespace(module=model, optimizer=opt), masks)
    model.train()
    torch.manual_seed(seed)
    for _ in range(steps):
        x = seqs[torch.randint(0, len(seqs), (args.batch,), generator=gen)]
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    if handle is not None:
        handle.remove()


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chars", type=int, default=400_000)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-seqs", type=int, default=48)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--importance-seqs", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def _corpora(args) -> tuple[object, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The tokenizer trained on both corpora, and per corpus its (training, held-out) sequences."""
    from cltk.data.corpora import load_documents
    from cltk.data.tokenizer import train_tokenizer

    docs = {
        name: load_documents({"builtin": name}, max_chars=args.chars, seed=0, domain=name)
        for name in ("stdlib", "shakespeare")
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(docs["stdlib"] + docs["shakespeare"], args.vocab, tmp, seed=0)
    data = {}
    for name, d in docs.items():
        seqs = pack(tok, d, args.seq_len)
        seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))]
        data[name] = (seqs[args.eval_seqs :], seqs[: args.eval_seqs])  # (train, held out)
    return tok, data


def _base_model(tok, args):
    import transformers as T

    config = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config)


def _run_seed(base, code, shk, base_code: float, seed: int, args, rows: dict) -> None:
    """One seed: importance on shakespeare, then each arm trained from the base; a table row each."""
    from cltk.methods.das.importance import estimate_importance, normalize
    from cltk.methods.das.masking import param_masks

    gen = torch.Generator().manual_seed(seed)
    pick = shk[0][torch.randperm(len(shk[0]), generator=gen)[: args.importance_seqs]]
    batches = [{"input_ids": pick[i : i + args.batch]} for i in range(0, len(pick), args.batch)]
    imp = normalize(estimate_importance(base, batches, mode="proxy", seed=seed))
    for arm in ARMS:
        model = copy.deepcopy(base)
        masks = None if arm == "naive" else param_masks(model, imp, tokens=arm == "das")
        train(model, shk[0], args.steps, args, seed=seed, masks=masks)
        c, s = perplexity(model, code[1]), perplexity(model, shk[1])
        rows[arm].append((c, s))
        print(f"| {seed} | {arm} | {c:.2f} | {100 * (c / base_code - 1):+.1f}% | {s:.2f} |",
              flush=True)


def _print_over_seeds(rows: dict[str, list[tuple[float, float]]], base_code: float) -> None:
    print("\nover seeds: mean (min-max)\n")
    print("| arm | code ppl | code vs base | shakespeare ppl |")
    print("|---|---:|---:|---:|")
    for arm, xs in rows.items():
        cs, ss = [x[0] for x in xs], [x[1] for x in xs]
        f = [100 * (c / base_code - 1) for c in cs]
        print(
            f"| {arm} | {sum(cs) / len(cs):.2f} ({min(cs):.2f}-{max(cs):.2f}) | "
            f"{sum(f) / len(f):+.1f}% ({min(f):+.1f}-{max(f):+.1f}) | "
            f"{sum(ss) / len(ss):.2f} ({min(ss):.2f}-{max(ss):.2f}) |"
        )


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tok, data = _corpora(args)
    code, shk = data["stdlib"], data["shakespeare"]
    base = _base_model(tok, args)
    train(base, code[0], args.base_steps, args, seed=0)
    base_code, base_shk = perplexity(base, code[1]), perplexity(base, shk[1])
    n_params = sum(p.numel() for p in base.parameters())
    n_embed = base.get_input_embeddings().weight.numel()
    print(
        f"tokenizer {len(tok)} tokens; {len(code[0])} code and {len(shk[0])} shakespeare training "
        f"sequences of {args.seq_len}; model {n_params:,} parameters ({n_embed:,} in the tied "
        f"embedding); base after {args.base_steps} steps on code: code ppl {base_code:.2f}, "
        f"shakespeare ppl {base_shk:.2f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    rows: dict[str, list[tuple[float, float]]] = {a: [] for a in ARMS}
    print("\n| seed | arm | code ppl (base %.2f) | code vs base | shakespeare ppl |" % base_code)
    print("|---|---|---:|---:|---:|")
    for seed in args.seeds:
        _run_seed(base, code, shk, base_code, seed, args, rows)
    _print_over_seeds(rows, base_code)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
