"""Continual token classification (named-entity recognition): new entity types step by step,
kept by distillation from the previous step's model (AddNER / ExtendNER). See ``docs/ner.md``.

A mode of its own beside continual pre-training: ``cltk ner --config NER.yaml`` or
:func:`run_ner` on a config from :func:`load_ner_config`.
"""

from cltk.ner.config import NerConfig, load_ner_config, parse_config
from cltk.ner.data import NerDataError


def __getattr__(name: str):
    if name == "run_ner":  # imported on use: it pulls in DeepSpeed, the config and data parts do not
        from cltk.ner.run import run_ner

        return run_ner
    raise AttributeError(name)

__all__ = [
    "NerConfig",
    "NerDataError",
    "load_ner_config",
    "parse_config",
    "run_ner",
]
