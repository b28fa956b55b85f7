"""Everything a run needs from its data before training: the tokenizer and every domain packed.

``cltk prepare --config RUN.yaml`` does it ahead of a run; ``cltk train`` does what is missing. Rank 0
does the work (trains the tokenizer, streams each source once through it into memory-mapped token
files); the other ranks wait, then map the same files, so no rank tokenises twice and every rank sees
identical data. A failure on rank 0 (a bad file, say) is raised on every rank, so none hangs.

A domain's cache key is cheap: the source spec, ``max_chars``, the (path, size, mtime) of every file it
reads, the tokenizer's fingerprint and the packing settings (no content is read to compute it). The
content hash computed during the pass is recorded in the manifest. A source file that changed since it
was prepared gives a new key, so it is prepared again and the log names the file; a resumed run whose data
changed is refused (``OUT/data.json`` records what it trained on); a file that changes during the pass
is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import tokenizers

from cltk import distributed as dist
from cltk import registry
from cltk.config import DomainConfig, RunConfig
from cltk.data.corpora import iter_documents, resolve_source, source_units
from cltk.data.packing import (
    PackedDomain,
    SourceSpec,
    check_args,
    load_packed,
    read_manifest,
    settings_key,
    write_packed,
)
from cltk.data.reading import CorpusError, file_stats, source_items
from cltk.data.tokenizer import (
    TokenizerError,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from cltk.data.windows import apportion
from cltk.errors import UserError
from cltk.tracking import log

RUN_DATA = "data.json"


class StaleDataError(UserError):
    """A resumed run's data changed since the run started."""


def prepare(cfg: RunConfig) -> tuple[Any, dict[str, PackedDomain]]:
    """The run's tokenizer and every domain packed and memory-mapped, preparing what is missing.

    The returned mapping holds the configured domains in config order, then the extra sources the
    active methods declare (:func:`cltk.registry.extra_sources`, named ``<method>.<name>``).
    """
    tokenizer = prepare_tokenizer(cfg)
    return tokenizer, prepare_domains(cfg, tokenizer)


def check_sources(cfg: RunConfig) -> None:
    """Every domain's and extra source's files listed (globs expanded, files stat'ed, nothing read) on
    rank 0, its error raised on every rank: a glob that matches nothing, a FIFO, a dangling symlink
    are refused before the run writes anything into its output directory."""

    def work() -> None:
        for d in cfg.domains + registry.extra_sources(cfg):
            for _, part in source_items(resolved_source(cfg, d)):
                source_units(part, domain=d.name)

    _on_main(work)


def _on_main(fn, *args):
    """``fn(*args)`` on rank 0; its result (or its error, re-raised) on every rank."""
    result: Any = None
    if dist.is_main():
        try:
            result = ("ok", fn(*args))
        except UserError as e:
            result = ("error", e)
            if dist.world_size() == 1:
                raise
        except BaseException as e:  # a bug: every rank stops, rank 0 with the traceback
            if dist.world_size() > 1:
                dist.broadcast_object(("error", RuntimeError(f"rank 0 failed preparing data: {e!r}")))
            raise
    status, value = dist.broadcast_object(result)
    if status == "error":
        raise value
    return value


def _configured_tokenizer(cfg: RunConfig) -> Any:
    t = cfg.tokenizer
    if t.path:
        return load_tokenizer(cfg.resolve(t.path))
    if cfg.model.gguf:
        from cltk.models import load_gguf_tokenizer

        return load_gguf_tokenizer(cfg.resolve(cfg.model.gguf))
    return load_tokenizer(cfg.resolve(cfg.model.init_from))


def prepare_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer: ``tokenizer.path``, the model's own, or one trained on the corpora.

    A trained one reads only ``tokenizer.train.max_chars_per_domain`` characters of each training
    domain (streamed). It is saved to ``OUT/tokenizer`` once (rank 0); a resumed run reuses it and
    refuses a configured tokenizer that differs from it.
    """
    out = cfg.out / "tokenizer"
    if cfg.tokenizer.train is None:
        tok = _configured_tokenizer(cfg)
        _on_main(_save_or_check, out, tok)
        return tok
    _on_main(_train_if_missing, cfg, out)
    return load_tokenizer(out)


def _save_or_check(out: Path, tok: Any) -> None:
    if (out / "tokenizer_config.json").is_file():
        check_cached_tokenizer(out.parent, tok)
    else:
        tok.save_pretrained(str(out))


def _train_if_missing(cfg: RunConfig, out: Path) -> None:
    """Train the run's tokenizer into ``OUT/tokenizer``, through the cache.

    BPE training breaks ties between equally frequent pairs by hash-map order, which differs between
    processes, so two trainings on the same text can differ on a small corpus. The trained tokenizer
    is therefore kept in ``data.cache_dir`` under a key of its inputs (the training domains' sources,
    their files' path/size/mtime, the budgets, vocabulary and seed): runs that share a cache and train
    on the same data get the same tokenizer, hence the same packed data.
    """
    if (out / "tokenizer_config.json").is_file():
        return
    t = cfg.tokenizer.train
    key = settings_key({
        "tokenizer_train": [t.vocab_size, t.max_chars_per_domain, cfg.seed, tokenizers.__version__],
        "domains": [[d.name, _parts(cfg, d)] for d in _tokenizer_domains(cfg)],
    })
    cached = cfg.cache_dir / f"tokenizer-{key}"
    if not (cached / "tokenizer_config.json").is_file():
        tmp = cfg.cache_dir / f".tokenizer-{key}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_tokenizer(_tokenizer_texts(cfg), t.vocab_size, tmp, seed=cfg.seed)
        try:
            tmp.replace(cached)  # atomic: a cache entry is whole or absent
        except OSError:  # another run stored it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cached, out, dirs_exist_ok=True)


def _tokenizer_domains(cfg: RunConfig) -> list[DomainConfig]:
    """What a trained tokenizer reads: the training domains and the methods' extra sources (data the
    run trains on), each up to ``tokenizer.train.max_chars_per_domain`` characters."""
    return cfg.train_domains() + registry.extra_sources(cfg)


def _tokenizer_texts(cfg: RunConfig):
    budget = cfg.tokenizer.train.max_chars_per_domain
    for d in _tokenizer_domains(cfg):
        items = source_items(resolved_source(cfg, d))
        shares = apportion([w for w, _ in items], budget)
        for (_, part), share, part_max in zip(items, shares, _budgets(d)):
            used = 0  # the start of the very sample that is packed (the same seeded unit order)
            docs = iter_documents(part, max_chars=part_max, seed=cfg.seed, domain=d.name)
            for doc in docs:
                if used >= share:
                    docs.close()  # stop reading: the rest of the source is not needed
                    break
                yield doc[: share - used]
                used += len(doc)


def resolved_source(cfg: RunConfig, d: DomainConfig) -> dict:
    """A domain's source with relative paths resolved against the config file's directory."""
    return resolve_source(d.source, cfg.base_dir)


def _budgets(d: DomainConfig) -> list[int | None]:
    """``max_chars`` of each part of a domain: shared out by weight (None: read everything)."""
    items = source_items(d.source)
    if d.max_chars is None:
        return [None] * len(items)
    return [max(1, b) for b in apportion([w for w, _ in items], d.max_chars)]


def _parts(cfg: RunConfig, d: DomainConfig) -> list[tuple[float, dict, int | None, list]]:
    """``(weight, source, max_chars, [path, size, mtime_ns] of its files)`` of each part of a domain."""
    out = []
    for (w, part), budget in zip(source_items(resolved_source(cfg, d)), _budgets(d)):
        units = source_units(part, domain=d.name)
        out.append((w, dict(part), budget, file_stats(p for u in units for p in u.paths)))
    return out


def domain_key(cfg: RunConfig, d: DomainConfig, tokenizer_fp: str, parts: list) -> str:
    """The cache key of a domain: everything that decides its token ids, read without the content."""
    return settings_key({
        "parts": [[w, src, budget, stats] for w, src, budget, stats in parts],
        "tokenizer": tokenizer_fp, "seq_len": cfg.data.seq_len,
        "eval_sequences": cfg.data.eval_sequences, "seed": cfg.seed,
    })


def changed_files(old: list, new: list) -> list[str]:
    """What differs between two ``[path, size, mtime_ns, sampled hash]`` lists, one line per file
    (a list written by an older cltk, without the hash, compares on size and mtime)."""
    before, after = {f[0]: tuple(f[1:]) for f in old}, {f[0]: tuple(f[1:]) for f in new}
    lines = []
    for p in sorted(before.keys() | after.keys()):
        if p not in after:
            lines.append(f"{p} is gone")
        elif p not in before:
            lines.append(f"{p} is new")
        elif before[p] != after[p][: len(before[p])]:
            (s0, m0), (s1, m1) = before[p][:2], after[p][:2]
            what = (f"size {s0:,} -> {s1:,} bytes" if s0 != s1 else "modified (same size)"
                    if m0 != m1 else "edited in place (same size and mtime, other content)")
            lines.append(f"{p} changed: {what}" + (" (truncated?)" if s1 < s0 else ""))
    return lines


def _prepare_domain(cfg: RunConfig, d: DomainConfig, tokenizer: Any, fp: str) -> str:
    """Pack one domain into the cache unless it is there; returns its directory."""
    check_args(d.name, cfg.data.seq_len, cfg.data.eval_sequences)
    parts = _parts(cfg, d)
    key = domain_key(cfg, d, fp, parts)
    final = cfg.cache_dir / f"{d.name}-{key}"
    if read_manifest(final) is not None:
        return str(final)
    files = [f for *_, stats in parts for f in stats]
    pointer = cfg.cache_dir / f"{d.name}.latest.json"
    if pointer.is_file():
        changes = changed_files(json.loads(pointer.read_text())["files"], files)
        if changes:
            log(f"domain {d.name}: source changed since it was last prepared ({'; '.join(changes[:5])}"
                f"{'; ...' if len(changes) > 5 else ''}); preparing it again")
    log(f"domain {d.name}: preparing (tokenising {len(files)} file(s) into {final})")

    def unchanged() -> None:
        now = [f for *_, stats in _parts(cfg, d) for f in stats]
        changes = changed_files(files, now)
        if changes:
            raise CorpusError(
                f"domain {d.name!r}: a source file changed while it was being prepared "
                f"({'; '.join(changes[:5])}); prepare again once the files are stable"
            )

    specs = [
        SourceSpec(iter_documents(src, max_chars=budget, seed=cfg.seed, domain=d.name), w,
                   _label(src))
        for w, src, budget, _ in parts
    ]
    manifest = write_packed(final, d.name, specs, tokenizer, cfg.data.seq_len,
                            cfg.data.eval_sequences, cfg.seed,
                            {"key": key, "files": files, "source": d.source,
                             "max_chars": d.max_chars}, before_commit=unchanged)
    pointer.write_text(json.dumps({"key": key, "files": files}))
    log(f"domain {d.name}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens, "
        f"{manifest['train_sequences']:,} train sequences")
    return str(final)


def _label(src: dict) -> str:
    kind = next(k for k in src if k in ("builtin", "files", "jsonl", "hf_dataset"))
    return f"{kind}:{src[kind]}"


def prepare_domains(cfg: RunConfig, tokenizer: Any) -> dict[str, PackedDomain]:
    """Every domain (training and eval-only) packed, in config order, then the methods' extra
    sources; cached across runs."""

    def work() -> dict[str, str]:
        fp = tokenizer_fingerprint(tokenizer)
        every = cfg.domains + registry.extra_sources(cfg)
        dirs = {d.name: _prepare_domain(cfg, d, tokenizer, fp) for d in every}
        _check_run_data(cfg, dirs)
        return dirs

    dirs = _on_main(work)
    return {name: load_packed(Path(path), name) for name, path in dirs.items()}


def _check_run_data(cfg: RunConfig, dirs: dict[str, str]) -> None:
    """Refuse to go on with a run that trained on other data; record the data of a new run."""
    record = {}
    for name, path in dirs.items():
        m = read_manifest(Path(path))
        record[name] = {"key": m["key"], "files": m["files"],
                        "content_sha256": [s["content_sha256"] for s in m["sources"]]}
    path = cfg.out / RUN_DATA
    started = (cfg.out / "checkpoints").is_dir() or any((cfg.out / "stages").glob("*/stage.json"))
    if path.is_file() and started:
        old = json.loads(path.read_text())
        for name, now in record.items():
            if name not in old:
                continue
            # the same key (files and settings) yet other text: an edit the sampled hash missed, read
            # again because the cache was deleted. It is refused, never recorded over the old hash
            other_text = old[name].get("content_sha256", now["content_sha256"]) != now["content_sha256"]
            # a record of an older cltk (files without sampled hashes, another key layout): its files'
            # size and mtime and the content hash decide; the resume config check covers the settings
            legacy = any(len(f) == 3 for f in old[name]["files"])
            changed = (bool(changed_files(old[name]["files"], now["files"])) if legacy
                       else old[name]["key"] != now["key"])
            if changed or other_text:
                what = changed_files(old[name]["files"], now["files"]) or (
                    ["the text read now differs from the text the run trained on (content hash)"]
                    if other_text else ["the tokenizer or packing settings changed"])
                what_it_is = "domain" if name in {d.name for d in cfg.domains} else "source"
                raise StaleDataError(
                    f"{what_it_is} {name!r}: its data changed since this run trained on it "
                    f"({'; '.join(what[:5])}); restore the files, or start a new run in another "
                    "output_dir"
                )
        record = {**old, **record}
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def check_cached_tokenizer(out: Path, tokenizer: Any) -> None:
    """Refuse to resume a run whose saved tokenizer differs from the one configured now."""
    saved = out / "tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        if tokenizer_fingerprint(load_tokenizer(saved)) != tokenizer_fingerprint(tokenizer):
            raise TokenizerError(
                f"tokenizer: {saved} (saved by this run) differs from the configured tokenizer; a resumed "
                "run must keep its tokenizer. Use a new output_dir to start over"
            )
