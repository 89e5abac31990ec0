"""The two model families a federation can choose, and their conversion to named arrays."""

import numpy as np
import torch
from torch import nn

from .spec import ModelSpec


def build(spec: ModelSpec, n_features: int) -> nn.Module:
    """Logistic regression or a small ReLU MLP, both ending in one logit."""
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
    torch.manual_seed(spec.seed)
    return to_arrays(build(spec, n_features))


def shapes(spec: ModelSpec, n_features: int) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in build(spec, n_features).state_dict().items()}


def to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in arrays.items()})
    return model


def predict(spec: ModelSpec, arrays: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Probability of the positive class for each row."""
    model = load_arrays(build(spec, X.shape[1]), arrays).eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(X)).squeeze(1)).numpy()
