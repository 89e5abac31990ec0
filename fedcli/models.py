"""The two model families a federation can choose, and their conversion to named arrays.

torch is imported inside the functions that need it: the coordinator only needs `shapes`,
so `fedcli aggregate` never pays torch's import time.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is heavy; the spec is a higher layer, named here only in annotations
    from torch import nn

    from fedcli.protocol.spec import ModelSpec


def build(spec: ModelSpec, n_features: int) -> nn.Module:
    """Logistic regression or a small ReLU MLP, both ending in one logit."""
    from torch import nn

    if spec.kind == "logreg":
        return nn.Sequential(nn.Linear(n_features, 1))
    layers, width = [], n_features
    for h in spec.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def initial(spec: ModelSpec, n_features: int) -> dict[str, np.ndarray]:
    """Round-0 weights: the same bytes on any machine for the same seed."""
    import torch

    torch.manual_seed(spec.seed)
    return to_arrays(build(spec, n_features))


def shapes(spec: ModelSpec, n_features: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of `build(spec, n_features)`, without torch (tested against it)."""
    widths = [n_features, *(spec.hidden if spec.kind == "mlp" else ()), 1]
    out: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        out[f"{2 * i}.weight"], out[f"{2 * i}.bias"] = (fan_out, fan_in), (fan_out,)
    return out


def to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    import torch

    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in arrays.items()})
    return model


def predict(spec: ModelSpec, arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Probability of the positive class for each row."""
    import torch

    model = load_arrays(build(spec, X.shape[1]), arrays).eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(X)).squeeze(1)).numpy()
