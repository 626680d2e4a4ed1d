"""What every config module of `model` shares, in a leaf that imports nothing of the package but
`utils.errors`: the config error, the layer types, the activation and remat-policy names and the "did you mean"
hint. `config`, `vision_config` and `vision` import it, so none of them imports another to raise.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from gemma_mtp_jax.utils.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# The MLP activations `layers.activation` implements (HF `hidden_activation` values), for the text
# decoder and the vision tower alike.
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "silu")
# The remat policies `layers.remat` implements (config key `remat_policy`, text and vision alike).
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


class ConfigError(UserError, ValueError):
  """A model configuration is invalid; the message names the field at fault."""


def closest(key: str, valid: Sequence[str]) -> str:
  """" (did you mean 'a', 'b'?)" for the valid names closest to `key`; "" when none is close."""
  close = difflib.get_close_matches(key, list(valid), n=3)
  return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
