"""The reward model's value head: one linear layer from the last hidden state to a score.

Owns: attaching it to a model (as an attribute, so checkpoints hold it like any parameter), finding it, and taking it
off for the duration of a plain causal-LM save. Scoring with it (which needs packed batches) is train/stages.py's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .methods import unwrap

VALUE_HEAD = "lmforge_value_head"  # attribute of the transformers model, so checkpoints hold it like any parameter
VALUE_HEAD_FILE = "value_head.safetensors"  # beside the trained weights in adapter/ or model/


def attach_value_head(model) -> torch.nn.Linear:
    base = unwrap(model)
    head = torch.nn.Linear(base.config.hidden_size, 1).to(base.get_input_embeddings().weight.dtype)
    torch.nn.init.normal_(head.weight, std=1 / (base.config.hidden_size + 1))
    torch.nn.init.zeros_(head.bias)
    setattr(base, VALUE_HEAD, head)
    return head


def value_head(model) -> torch.nn.Linear | None:
    return getattr(unwrap(model), VALUE_HEAD, None)


@contextmanager
def detached_value_head(model):
    """The model without its value head for the duration (so save_pretrained writes a plain causal LM)."""
    base = unwrap(model)
    head = base._modules.pop(VALUE_HEAD)
    try:
        yield head
    finally:
        setattr(base, VALUE_HEAD, head)
