"""Loads ``kjv_cloze.jsonl`` from beside this file, wherever lm-eval is run from (``custom_dataset``)."""

from pathlib import Path


def load(**kwargs):
    import datasets

    data = str(Path(__file__).resolve().parent / "kjv_cloze.jsonl")
    return datasets.load_dataset("json", data_files={"test": data})
