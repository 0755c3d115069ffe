"""The serving engine's decoder: lmforge/model/lean_decoder.py, re-exported under its old name.

The lean decoder moved below serve/ because eval, compare, the checkpoint sweep and chat decode through it too
(generate.py), and they sit below serve/ in the layering. Must not hold code of its own.
"""

from ..model.lean_decoder import (  # noqa: F401  (the names serve's modules and tests import from here)
    FLOAT16_KERNELS,
    SUPPORTED_TYPES,
    WEIGHT_FORMATS,
    Decoder,
    Layer,
    Linear,
    applies_windows,
    bfloat16_kernels,
    fast_decoder_runs,
    holds_in_float16,
    load_adapter_into,
)
