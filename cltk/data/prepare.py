"""Everything a run needs from its data before training: the tokenizer and every domain packed.

Rank 0 does the work first (trains the tokenizer, tokenises, fills the cache); the other ranks wait, then
load the same results from disk, so no rank tokenises twice and every rank sees identical data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.data.corpora import load_documents
from cltk.data.packing import PackedDomain, pack_domain
from cltk.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer


def _documents(cfg: RunConfig) -> dict[str, list[str]]:
    return {
        d.name: load_documents(d.source, max_chars=d.max_chars, seed=cfg.seed, domain=d.name)
        for d in cfg.domains
    }


def prepare(cfg: RunConfig) -> tuple[Any, dict[str, PackedDomain]]:
    """The run's tokenizer and every domain packed, reading each corpus once."""
    docs = _documents(cfg)
    tokenizer = prepare_tokenizer(cfg, docs)
    return tokenizer, prepare_domains(cfg, tokenizer, docs)


def _configured_tokenizer(cfg: RunConfig) -> Any:
    t = cfg.tokenizer
    if t.path:
        return load_tokenizer(cfg.resolve(t.path))
    if cfg.model.gguf:
        from cltk.models import load_gguf_tokenizer

        return load_gguf_tokenizer(cfg.resolve(cfg.model.gguf))
    return load_tokenizer(cfg.resolve(cfg.model.init_from))


def prepare_tokenizer(cfg: RunConfig, docs: dict[str, list[str]]) -> Any:
    """The run's tokenizer: ``tokenizer.path``, the model's own, or one trained on the corpora.

    It is saved to ``OUT/tokenizer`` once (rank 0); a resumed run reuses it and refuses a configured
    tokenizer that differs from it.
    """
    t = cfg.tokenizer
    out = cfg.out / "tokenizer"
    saved = (out / "tokenizer_config.json").is_file()
    if t.train is None:
        tok = _configured_tokenizer(cfg)
        if saved:
            check_cached_tokenizer(cfg.out, tok)
        elif dist.is_main():
            tok.save_pretrained(str(out))
        dist.barrier()
        return tok
    if dist.is_main() and not saved:
        budget = t.train.max_chars_per_domain

        def texts():
            for d in cfg.train_domains():
                used = 0
                for doc in docs[d.name]:
                    if used >= budget:
                        break
                    yield doc[: budget - used]
                    used += len(doc)

        train_tokenizer(texts(), t.train.vocab_size, out, seed=cfg.seed)
    dist.barrier()
    return load_tokenizer(out)


def prepare_domains(
    cfg: RunConfig, tokenizer: Any, docs: dict[str, list[str]]
) -> dict[str, PackedDomain]:
    """Every domain (training and eval-only) packed, in config order; cached across runs."""

    def pack() -> dict[str, PackedDomain]:
        return {
            d.name: pack_domain(
                d.name,
                docs[d.name],
                tokenizer,
                cfg.data.seq_len,
                eval_sequences=cfg.data.eval_sequences,
                cache_dir=cfg.cache_dir,
                seed=cfg.seed,
            )
            for d in cfg.domains
        }

    if dist.is_main():
        packed = pack()
    dist.barrier()
    if not dist.is_main():
        packed = pack()  # cache hits: rank 0 wrote them
    return packed


def check_cached_tokenizer(out: Path, tokenizer: Any) -> None:
    """Refuse to resume a run whose saved tokenizer differs from the one configured now."""
    saved = out / "tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        if tokenizer_fingerprint(load_tokenizer(saved)) != tokenizer_fingerprint(tokenizer):
            raise ValueError(
                f"tokenizer: {saved} (saved by this run) differs from the configured tokenizer; a resumed "
                "run must keep its tokenizer. Use a new output_dir to start over"
            )
