"""The tagger (a transformers backbone + output layers), its growth per step, and prediction.

- **ExtendNER**: one output layer; a step adds the new types' columns (``B-t``, ``I-t``) after the
  old ones, whose weights are copied.
- **AddNER**: one output layer per step, each with its own ``O`` column; at prediction
  :func:`resolve_addner` combines them into one label per word.

Both end in :func:`repair_bio`: an ``I-t`` that does not continue a ``t`` entity becomes ``B-t``.
"""

from __future__ import annotations

import torch
from torch import nn

from cltk.ner.data import head_labels, tag_type


class NerTagger(nn.Module):
    """``backbone`` (any transformers ``AutoModel``: encoder or decoder) + linear output layers."""

    def __init__(self, backbone: nn.Module, head_sizes: list[int]):
        super().__init__()
        self.backbone = backbone
        hidden = int(backbone.config.hidden_size)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in head_sizes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """One ``[b, T, C_j]`` logits tensor per output layer."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return [head(h) for head in self.heads]


def layer_types(variant: str, steps_types: list[list[str]]) -> list[list[str]]:
    """The types of each output layer after the given steps."""
    if variant == "extendner":
        return [[t for ts in steps_types for t in ts]]
    return [list(ts) for ts in steps_types]


def build_backbone(model_cfg: dict | None, init_from: str | None, vocab_size: int) -> nn.Module:
    """A transformers ``AutoModel`` from an inline config (fresh weights) or an HF directory."""
    from transformers import AutoConfig, AutoModel

    if init_from is not None:
        return AutoModel.from_pretrained(init_from, dtype=torch.float32)
    cfg = dict(model_cfg or {})
    cfg.setdefault("vocab_size", vocab_size)
    return AutoModel.from_config(AutoConfig.for_model(**cfg))


def grow(
    state: dict[str, torch.Tensor], variant: str, old_sizes: list[int], new_sizes: list[int],
    model: NerTagger,
) -> None:
    """Load the previous step's ``state`` into ``model``, which has the new step's layers.

    Backbone and old layers are copied; ExtendNER copies the old columns into the first rows of
    the wider layer, the new rows keep their fresh initialisation.
    """
    own = model.state_dict()
    for k, v in state.items():
        if variant == "extendner" and k.startswith("heads.0."):
            own[k][: old_sizes[0]] = v
        else:
            own[k] = v
    model.load_state_dict(own)


def repair_bio(tags: list[str]) -> list[str]:
    """Make a tag sequence valid BIO: an ``I-t`` not after ``B-t``/``I-t`` becomes ``B-t``."""
    out, prev = [], None
    for tag in tags:
        t = tag_type(tag)
        if tag.startswith("I-") and prev != t:
            tag = "B-" + t  # type: ignore[operator]
        out.append(tag)
        prev = t
    return out


def resolve_addner(probs: list[torch.Tensor], layers: list[list[str]]) -> list[str]:
    """One label per word from AddNER's layers: the most confident non-O claim, else O.

    Args:
        probs: per layer, ``[n_words, C_j]`` probabilities (columns :func:`head_labels` of its types).
        layers: each layer's types.
    """
    n = probs[0].shape[0]
    best = ["O"] * n
    score = torch.full((n,), -1.0)
    for p, types in zip(probs, layers):
        labels = head_labels(types)
        conf, idx = p.max(-1)
        for w in range(n):
            if idx[w] != 0 and conf[w] > score[w]:
                best[w], score[w] = labels[int(idx[w])], conf[w]
    return repair_bio(best)


def predict_words(
    variant: str, logits: list[torch.Tensor], first: list[int], layers: list[list[str]]
) -> list[str]:
    """Word tags of one sentence from its ``[T, C_j]`` logits per layer; ``first`` per word.

    Words with no sub-token (truncated) are predicted ``O``.
    """
    keep = [i for i, f in enumerate(first) if f >= 0]
    idx = torch.tensor([first[i] for i in keep], dtype=torch.long)
    probs = [lg.float()[idx].softmax(-1) for lg in logits]
    if variant == "extendner":
        labels = head_labels(layers[0])
        got = repair_bio([labels[int(i)] for i in probs[0].argmax(-1)])
    else:
        got = resolve_addner(probs, layers)
    out = ["O"] * len(first)
    for i, tag in zip(keep, got):
        out[i] = tag
    return repair_bio(out)
