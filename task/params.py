"""Model parameters as named numpy arrays (what the federated layers send and receive).

``get_arrays`` follows ``model.state_dict()`` order (parameters and buffers, e.g. BatchNorm running
statistics and int64 ``num_batches_tracked``) and returns detached CPU copies; ``set_arrays`` is
strict: the key set and every shape must match the model exactly, and values are cast to the
dtype of the tensor they replace.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def get_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Detached CPU copies of the state dict, in its order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load ``arrays`` into ``model``; missing/extra keys or a shape mismatch raise ValueError."""
    state = model.state_dict()
    missing = [k for k in state if k not in arrays]
    extra = [k for k in arrays if k not in state]
    if missing or extra:
        raise ValueError(
            f"arrays do not match the model: missing keys {missing}, unexpected keys {extra}"
        )
    new_state: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        value = np.asarray(arrays[key])
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(
                f"array {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ref.shape)}"
            )
        new_state[key] = torch.as_tensor(value, dtype=ref.dtype)
    model.load_state_dict(new_state, strict=True)
