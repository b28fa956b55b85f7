"""A saved model directory's weight files, checked without loading them (before any work).

Used for ``model.init_from`` (at config time) and for ``cltk eval --models``: a directory with a
``config.json`` but no weights, a truncated or garbage ``*.safetensors`` (its header and coverage are
read through ``safetensors.safe_open``, a memory map: no tensor is read), a sharded index naming a file
that is missing, or a ``pytorch_model.bin`` that is not a torch archive, is one line naming the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from cltk.errors import UserError

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class ModelFilesError(UserError):
    """A model directory whose weights are missing or damaged."""


def _fail(what: str, message: str) -> ModelFilesError:
    return ModelFilesError(f"{what}: {message}")


def check_weights_dir(path: Path, what: str) -> None:
    """Raise :class:`ModelFilesError` (prefixed ``what``, e.g. ``model.init_from``) unless ``path``
    holds readable weights for its ``config.json``."""
    path = Path(path)
    files: list[Path] = []
    for index in INDEXES:
        if (path / index).is_file():
            try:
                names = set(json.loads((path / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as e:
                raise _fail(what, f"{path / index} is not a weight index ({e})") from e
            missing = sorted(n for n in names if not (path / n).is_file())
            if missing:
                raise _fail(what, f"{path / index} names {missing[:3]}, which are missing in {path}; "
                                  "copy the whole model directory")
            files += [path / n for n in sorted(names)]
    if not files:
        files = sorted(f for g in WEIGHT_GLOBS for f in path.glob(g) if f.is_file())
    if not files:
        raise _fail(what, f"{path} has a config.json but no weights (model.safetensors or "
                          "pytorch_model.bin); copy the weights, or save the model with "
                          "save_pretrained")
    for f in files:
        _check_file(f, what)


def _check_file(f: Path, what: str) -> None:
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every damage
            raise _fail(what, f"{f} is damaged or not a safetensors file ({e}); copy it again or "
                              "save the model anew") from e
    elif not zipfile.is_zipfile(f):
        raise _fail(what, f"{f} is not a torch checkpoint (truncated or damaged); copy it again or "
                          "save the model anew")
