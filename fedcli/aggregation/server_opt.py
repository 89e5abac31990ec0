"""Server optimisers: how the coordinator turns the aggregated delta into the next global.

Reddi et al. 2021, "Adaptive Federated Optimization" (FedAdam, FedYogi) and Hsu et al. 2019
(FedAvgM). Each is a pure function (global, delta, state, **params) -> (new global, new state).
The aggregated delta is (bank model - global) averaged, i.e. a negative pseudo-gradient, so
every rule *adds* its step. State is a flat dict of float32 arrays ("m/<tensor>", "v/<tensor>")
so it round-trips through safetensors and can be stored signed next to the global; an empty
state means "first round". Tensors that are not floating point (counters) just take the delta.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from fedcli.aggregation.rules import add_cast
from fedcli.errors import FedcliError, VerificationError

Arrays = Mapping[str, np.ndarray]

# name -> default parameters; the spec may override any of them and nothing else
DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"lr": 1.0},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
}


def check_params(name: str, params: Mapping[str, float] | None = None) -> dict[str, float]:
    """Defaults merged with `params`, after checking the names and ranges; one-line error otherwise."""
    if name not in DEFAULTS:
        raise FedcliError(f"unknown server optimizer {name!r}: use one of {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS[name])
    for k, v in (params or {}).items():
        if k not in out:
            raise FedcliError(f"server optimizer {name} has no parameter {k!r} (has {', '.join(out)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FedcliError(f"server optimizer parameter {k} must be a number, got {v!r}")
        out[k] = float(v)
    if not 0 < out["lr"] <= 10:
        raise FedcliError(f"server lr must be > 0 and at most 10, got {out['lr']}")
    for k in ("momentum", "beta1", "beta2"):
        if k in out and not 0 <= out[k] < 1:
            raise FedcliError(f"server optimizer {k} must be in [0, 1), got {out[k]}")
    if "tau" in out and not 0 < out["tau"] <= 1:
        raise FedcliError(f"server optimizer tau must be in (0, 1], got {out['tau']}")
    return out


def _split(global_: Arrays, delta: Arrays):
    if set(global_) != set(delta):
        raise FedcliError("aggregated delta and global model have different tensor names")
    for k in global_:
        if np.shape(global_[k]) != np.shape(delta[k]):
            raise FedcliError(f"tensor {k!r}: delta shape {np.shape(delta[k])} != global shape {np.shape(global_[k])}")
    floats = [k for k in global_ if np.issubdtype(np.asarray(global_[k]).dtype, np.floating)]
    others = {k: _add_cast(global_[k], delta[k], 1.0) for k in global_ if k not in floats}
    return floats, others


def _add_cast(g: np.ndarray, step: np.ndarray, lr: float) -> np.ndarray:
    g = np.asarray(g)
    if np.issubdtype(g.dtype, np.floating):  # chunked: no model-sized float64 temporaries
        return add_cast(g, step, lr)
    new = g.astype(np.float64) + lr * np.asarray(step, dtype=np.float64)
    if not np.issubdtype(g.dtype, np.floating):
        new = np.rint(new)
    return new.astype(g.dtype)


def _get_state(state: Arrays, key: str, like: np.ndarray, fill: float) -> np.ndarray:
    if key in state:
        s = np.asarray(state[key], dtype=np.float64)
        if s.shape != np.shape(like):
            raise FedcliError(f"server optimizer state {key!r} does not match the model (shape {s.shape})")
        return s
    return np.full(np.shape(like), fill, dtype=np.float64)


def fedavg(global_: Arrays, delta: Arrays, state: Arrays, *, lr: float = 1.0):
    """x <- x + lr * delta (lr=1 is plain FedAvg). Stateless."""
    floats, new = _split(global_, delta)
    for k in floats:
        new[k] = _add_cast(global_[k], delta[k], lr)
    return new, {}


def fedavgm(global_: Arrays, delta: Arrays, state: Arrays, *, lr: float = 1.0, momentum: float = 0.9):
    """Server momentum (Hsu et al. 2019): m <- momentum*m + delta; x <- x + lr*m."""
    floats, new = _split(global_, delta)
    out = {}
    for k in floats:
        m = momentum * _get_state(state, f"m/{k}", global_[k], 0.0) + np.asarray(delta[k], dtype=np.float64)
        new[k] = _add_cast(global_[k], m, lr)
        out[f"m/{k}"] = m.astype(np.float32)
    return new, out


def _adaptive(global_, delta, state, lr, beta1, beta2, tau, yogi: bool):
    floats, new = _split(global_, delta)
    out = {}
    for k in floats:
        d = np.asarray(delta[k], dtype=np.float64)
        m = beta1 * _get_state(state, f"m/{k}", global_[k], 0.0) + (1 - beta1) * d
        v = _get_state(state, f"v/{k}", global_[k], tau * tau)  # v_{-1} = tau^2 as in the paper
        d2 = d * d
        if yogi:
            v = v - (1 - beta2) * d2 * np.sign(v - d2)
        else:
            v = beta2 * v + (1 - beta2) * d2
        new[k] = _add_cast(global_[k], m / (np.sqrt(v) + tau), lr)
        out[f"m/{k}"] = m.astype(np.float32)
        out[f"v/{k}"] = v.astype(np.float32)
    return new, out


def fedadam(global_: Arrays, delta: Arrays, state: Arrays, *, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3):
    """FedAdam: m <- b1 m + (1-b1) d; v <- b2 v + (1-b2) d^2; x <- x + lr m/(sqrt(v)+tau). No bias correction (as in the paper)."""
    return _adaptive(global_, delta, state, lr, beta1, beta2, tau, yogi=False)


def fedyogi(global_: Arrays, delta: Arrays, state: Arrays, *, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3):
    """FedYogi: like FedAdam but v <- v - (1-b2) d^2 sign(v - d^2), so v grows slowly and shrinks gently."""
    return _adaptive(global_, delta, state, lr, beta1, beta2, tau, yogi=True)


_FUNCS = {"fedavg": fedavg, "fedavgm": fedavgm, "fedadam": fedadam, "fedyogi": fedyogi}


def server_step(
    name: str, global_: Arrays, delta: Arrays, state: Arrays | None, params: Mapping[str, float] | None = None
):
    """Apply the named optimizer with checked parameters; returns (new global, new state)."""
    p = check_params(name, params)
    return _FUNCS[name](global_, delta, state or {}, **p)


# ----- persistence (safetensors, never pickle) -----


def state_to_bytes(name: str, state: Arrays, round_no: int) -> bytes:
    """Serialize optimizer state; the metadata says which optimizer and which round produced it."""
    from safetensors.numpy import save

    meta = {"fedcli": "server-opt-state", "optimizer": name, "round": str(int(round_no))}
    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}, metadata=meta)


def state_from_bytes(data: bytes, name: str, round_no: int | None = None) -> dict[str, np.ndarray]:
    """Load state saved by state_to_bytes; refuses state from another optimizer or round."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        state = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise VerificationError(f"server optimizer state is not valid safetensors: {e}") from None
    meta = header.get("__metadata__") or {}
    if meta.get("fedcli") != "server-opt-state":
        raise VerificationError("server optimizer state file is not a fedcli optimizer state")
    if meta.get("optimizer") != name:
        raise FedcliError(f"stored server optimizer state is for {meta.get('optimizer')!r}, the spec says {name!r}")
    if round_no is not None and meta.get("round") != str(int(round_no)):
        raise VerificationError(f"server optimizer state is from round {meta.get('round')}, expected {round_no}")
    return state
