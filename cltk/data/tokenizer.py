"""Train, load and fingerprint tokenizers.

``train_tokenizer`` builds a SentencePiece-style BPE tokenizer (``▁`` marks spaces, unknown
characters fall back to their UTF-8 bytes ``<0x00>``..``<0xFF>``, ids laid out like Llama's:
``<unk>``, ``<s>``, ``</s>``, the 256 bytes, then the learned pieces).

It is trained with HF ``tokenizers`` rather than the ``sentencepiece`` library because (measured
here) its Rust BPE trainer takes well under a second on 2 MB at vocab 4096 and the result is a ``tokenizer.json`` that ``AutoTokenizer`` loads offline with no
slow-to-fast conversion (which would need ``sentencepiece`` and ``protobuf`` at load time).
Training is not reproducible across processes when pairs tie (hash-map order), which is why runs
take trained tokenizers through the data cache (``cltk.data.prepare``).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cltk.errors import UserError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_SPECIALS = (UNK, BOS, EOS)
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
# Smallest useful vocabulary: the specials, the 256 byte tokens and some room for pieces.
MIN_VOCAB_SIZE = len(_SPECIALS) + len(_BYTES) + 64
# GPT-2's split (contractions, words, numbers, punctuation, whitespace runs) so that runs of
# indentation stay one pre-token for code; the Metaspace step then writes spaces as "▁".
_SPLIT = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Files that mark a directory as holding a tokenizer that AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(UserError):
    """A tokenizer cannot be trained or loaded; the message names the cause and the fix."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_chars: int | None = None,
) -> PreTrainedTokenizerBase:
    """Train a byte-fallback BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Args:
        texts: Training texts (e.g. the documents of every domain).
        vocab_size: Target vocabulary size, specials and byte tokens included. The result has at
            most this many tokens (fewer only when the text runs out of pairs to merge); size a
            model's embeddings with ``len(tokenizer)``.
        out_dir: Directory to ``save_pretrained`` into; ``AutoTokenizer.from_pretrained(out_dir)``
            loads it offline.
        seed: Seed of the text sample taken when ``max_chars`` is set.
        max_chars: If set, train on a seeded random sample of whole texts of about this many
            characters (like SentencePiece's ``input_sentence_size``), to bound time on big corpora.

    Returns:
        The trained tokenizer, with ``eos_token="</s>"``, ``bos_token="<s>"``, pad = eos, and
        ``split_special_tokens=True`` so text that spells "</s>" never turns into the EOS id.

    Raises:
        TokenizerError: ``vocab_size`` too small, or no text.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or (
        vocab_size < MIN_VOCAB_SIZE
    ):
        raise TokenizerError(
            f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (3 specials + 256 byte tokens + "
            f"room to learn pieces), got {vocab_size!r}"
        )
    corpus = [t for t in texts if t]
    if max_chars is not None:
        corpus = _sample_texts(corpus, max_chars, seed)
    if not corpus:
        raise TokenizerError("no text to train a tokenizer on; check the domains' sources")

    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        # "never": no "▁" prepended, so decode(encode(text)) == text exactly.
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
    ])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_BYTES),  # the byte tokens are inserted after training
        special_tokens=list(_SPECIALS),
        # Rare characters are left to byte fallback so the vocabulary goes to frequent pieces.
        limit_alphabet=max(32, min(1000, (vocab_size - MIN_VOCAB_SIZE) // 4)),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok = _insert_byte_tokens(tok)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,  # it would change decoded text (" ." -> ".")
        split_special_tokens=True,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def _sample_texts(texts: list[str], max_chars: int, seed: int) -> list[str]:
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise TokenizerError(f"max_chars must be a positive integer or None, got {max_chars!r}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    kept, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        kept.append(i)
        total += len(texts[i])
    return [texts[i] for i in sorted(kept)]


def _insert_byte_tokens(tok: Tokenizer) -> Tokenizer:
    """Renumber the vocabulary as specials, 256 byte tokens, then the learned pieces.

    Byte fallback only works when the ``<0xXX>`` tokens are in the model's vocabulary; giving them
    to the trainer as special tokens instead would make literal text "<0x41>" match them.
    """
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    vocab = {token: i for i, token in enumerate(_SPECIALS + _BYTES)}
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (one saved by ``train_tokenizer`` or a model's) offline.

    A tokenizer without a pad token gets pad = eos, as the trained ones have.

    Raises:
        TokenizerError: The path is missing, is not a tokenizer directory, or fails to load.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"tokenizer path {str(path)!r} does not exist; train one (train_tokenizer) or point "
            "at a model directory that holds tokenizer files"
        )
    if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerError(
            f"{str(path)!r} is not a tokenizer directory: it holds none of {list(_TOKENIZER_FILES)}"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"cannot load the tokenizer in {str(path)!r}: {e}") from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A stable hash of what decides token ids: vocabulary, special tokens and encoding rules.

    Equal for the same tokenizer saved and reloaded, or trained twice to the same vocabulary; different
    when any token, id, special token or (for fast tokenizers) merge or pre-tokenizer changes.
    Used as a cache key and to catch a tokenizer that does not match a cache or a model.

    Returns:
        16 hex characters.
    """
    payload: dict[str, Any] = {
        "vocab": sorted((i, t) for t, i in tok.get_vocab().items()),
        "special": sorted((k, str(v)) for k, v in tok.special_tokens_map.items()),
        "added": sorted(
            (i, str(t), bool(getattr(t, "special", True)))
            for i, t in tok.added_tokens_decoder.items()
        ),
        "split_special_tokens": bool(getattr(tok, "split_special_tokens", False)),
    }
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation and padding are call-time settings; they do not change the ids of a text.
        payload["backend"] = {
            k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "post_processor")
        }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
