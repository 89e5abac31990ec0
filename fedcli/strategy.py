"""The spec's [strategy] section, and how the coordinator combines verified updates under it.

    [strategy]
    mode = "sync"            # sync: quorum or deadline; async: fold in K updates, stale ones discounted
    rule = "fedavg"          # fedavg | median | trimmed_mean | krum
    max_norm = 0.0           # > 0: scale every update down to this L2 norm first (norm bounding)
    trim_ratio = 0.1         # trimmed_mean: fraction dropped at each end
    krum_f = 1               # krum: Byzantine banks tolerated
    krum_m = 1               # krum: updates averaged (1 = Krum, > 1 = multi-Krum)
    prox_mu = 0.0            # FedProx proximal term at the banks
    [strategy.server]        # server optimiser and its parameters (see server_opt.DEFAULTS)
    optimizer = "fedavg"     # fedavg | fedavgm | fedadam | fedyogi
    [strategy.compression]
    method = "none"          # none | int8 | topk (error feedback kept at the bank)
    ratio = 0.01             # topk: fraction of coordinates sent
    [strategy.async]         # used when mode = "async"
    buffer_size = 3          # publish once this many updates are in
    max_staleness = 4        # older updates are ignored
    discount = "polynomial"  # polynomial | hinge | constant
    exponent = 0.5           # polynomial: (1+s)^-exponent; hinge: slope
    hinge_after = 4          # hinge: no discount up to this staleness

Every setting is in the signed spec, so a bank can check what the coordinator will do.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import aggregate as ar
from . import compression, server_opt
from .errors import FedcliError

MODES = ("sync", "async")
RULES = ("fedavg", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class StrategySpec:
    mode: str = "sync"
    rule: str = "fedavg"
    max_norm: float = 0.0
    trim_ratio: float = 0.1
    krum_f: int = 1
    krum_m: int = 1
    prox_mu: float = 0.0
    server: str = "fedavg"
    server_params: dict = field(default_factory=dict, compare=False)
    compression: str = "none"
    topk_ratio: float = 0.01
    buffer_size: int = 2
    max_staleness: int = 4
    discount: str = "polynomial"
    exponent: float = 0.5
    hinge_after: int = 4

    @property
    def compression_meta(self) -> dict:
        return compression.check(self.compression, self.topk_ratio if self.compression == "topk" else None)

    def discount_for(self, staleness: int) -> float:
        return ar.staleness_discount(staleness, self.discount, self.exponent, self.hinge_after)


def _err(msg: str) -> FedcliError:
    return FedcliError(f"federation spec: [strategy] {msg}")


def _take(table: dict, key: str, kind, where: str, default):
    if key not in table:
        return default
    v = table[key]
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _err(f"{where}'{key}' must be a number")
        return float(v)
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise _err(f"{where}'{key}' must be an integer")
    if kind is str and not isinstance(v, str):
        raise _err(f"{where}'{key}' must be a string")
    return v


def _known(table: dict, keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise _err(f"{where}unknown setting {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def parse(table: dict | None, n_members: int, min_clients: int) -> StrategySpec:
    """Validate the [strategy] table (absent = plain synchronous FedAvg)."""
    t = table or {}
    if not isinstance(t, dict):
        raise _err("must be a table")
    _known(t, {"mode", "rule", "max_norm", "trim_ratio", "krum_f", "krum_m", "prox_mu", "server", "compression", "async"}, "")
    d = StrategySpec()
    mode = _take(t, "mode", str, "", d.mode)
    if mode not in MODES:
        raise _err(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    rule = _take(t, "rule", str, "", d.rule)
    if rule not in RULES:
        raise _err(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    max_norm = _take(t, "max_norm", float, "", d.max_norm)
    if max_norm < 0:
        raise _err("max_norm must be >= 0 (0 = no norm bounding)")
    trim_ratio = _take(t, "trim_ratio", float, "", d.trim_ratio)
    if not 0 <= trim_ratio < 0.5:
        raise _err("trim_ratio must be in [0, 0.5)")
    krum_f, krum_m = _take(t, "krum_f", int, "", d.krum_f), _take(t, "krum_m", int, "", d.krum_m)
    if krum_f < 0 or krum_m < 1:
        raise _err("krum_f must be >= 0 and krum_m >= 1")
    prox_mu = _take(t, "prox_mu", float, "", d.prox_mu)
    if prox_mu < 0:
        raise _err("prox_mu must be >= 0")

    s = t.get("server", {})
    if not isinstance(s, dict):
        raise _err("server must be a table")
    server = _take(s, "optimizer", str, "server.", d.server)
    params = {k: v for k, v in s.items() if k != "optimizer"}
    try:
        server_opt.check_params(server, params)
    except FedcliError as e:
        raise _err(str(e)) from None

    c = t.get("compression", {})
    if not isinstance(c, dict):
        raise _err("compression must be a table")
    _known(c, {"method", "ratio"}, "compression.")
    method = _take(c, "method", str, "compression.", d.compression)
    ratio = _take(c, "ratio", float, "compression.", d.topk_ratio)
    try:
        compression.check(method, ratio if method == "topk" else None)
    except FedcliError as e:
        raise _err(str(e)) from None

    a = t.get("async", {})
    if not isinstance(a, dict):
        raise _err("async must be a table")
    _known(a, {"buffer_size", "max_staleness", "discount", "exponent", "hinge_after"}, "async.")
    buffer_size = _take(a, "buffer_size", int, "async.", min(d.buffer_size, n_members))
    max_staleness = _take(a, "max_staleness", int, "async.", d.max_staleness)
    if not 1 <= buffer_size <= n_members:
        raise _err(f"async.buffer_size must be between 1 and the number of members ({n_members})")
    if max_staleness < 0:
        raise _err("async.max_staleness must be >= 0")
    out = StrategySpec(
        mode=mode, rule=rule, max_norm=max_norm, trim_ratio=trim_ratio, krum_f=krum_f, krum_m=krum_m,
        prox_mu=prox_mu, server=server, server_params=params, compression=method, topk_ratio=ratio,
        buffer_size=buffer_size, max_staleness=max_staleness,
        discount=_take(a, "discount", str, "async.", d.discount),
        exponent=_take(a, "exponent", float, "async.", d.exponent),
        hinge_after=_take(a, "hinge_after", int, "async.", d.hinge_after),
    )
    try:
        out.discount_for(0)
    except FedcliError as e:
        raise _err(str(e)) from None
    fewest = buffer_size if mode == "async" else min_clients
    if rule == "krum" and fewest < 2 * krum_f + 3:
        what = "async.buffer_size" if mode == "async" else "min_clients"
        raise _err(f"krum with krum_f={krum_f} needs at least {2 * krum_f + 3} updates per round; raise {what} (now {fewest})")
    return out


class Combiner:
    """Folds verified, decoded deltas into one aggregated delta under the strategy's rule.

    FedAvg streams (one update in memory). The robust rules need every update's slice at
    once, so each delta is spilled to a local temporary safetensors file and the rule reads
    them back chunk by chunk (memory-mapped): memory stays bounded by the chunk size.
    """

    def __init__(self, strategy: StrategySpec, shapes: dict[str, tuple[int, ...]], chunk_elems: int = ar.DEFAULT_CHUNK_ELEMS):
        self.s, self.shapes, self.chunk_elems = strategy, dict(shapes), chunk_elems
        self.mean = ar.WeightedMean()
        self.names: list[str] = []
        self.weights: list[float] = []
        self.notes: dict[str, dict] = {}
        self._tmp = None if strategy.rule == "fedavg" else tempfile.TemporaryDirectory(prefix="fedcli-agg-")
        self._paths: list[Path] = []

    def add(self, name: str, delta: dict[str, np.ndarray], num_examples: float, staleness: int = 0) -> None:
        """Add one update: norm bounding and staleness discount become one scale factor."""
        factor = 1.0
        note: dict = {}
        if self.s.max_norm > 0:
            norm = ar.l2_norm(delta)
            clip = ar.clip_factor(norm, self.s.max_norm)
            factor *= clip
            note["norm"] = round(norm, 6)
            if clip < 1:
                note["clipped_by"] = round(clip, 6)
        if staleness:
            disc = self.s.discount_for(staleness)
            factor *= disc
            note["staleness"], note["discount"] = staleness, round(disc, 6)
        if self._tmp is None:
            self.mean.add(delta, num_examples, scale=factor)
        else:
            from safetensors.numpy import save_file

            path = Path(self._tmp.name) / f"{len(self._paths)}.safetensors"
            scaled = {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in delta.items()}
            save_file(scaled, str(path))
            self._paths.append(path)
        self.names.append(name)
        self.weights.append(float(num_examples))
        self.notes[name] = note

    def result(self) -> tuple[dict[str, np.ndarray], dict]:
        """(aggregated delta, what the rule did: for the signed global manifest)."""
        n = len(self.names)
        if n == 0:
            raise FedcliError("no updates to aggregate")
        info: dict = {"rule": self.s.rule}
        if self.s.max_norm > 0:
            info["max_norm"] = self.s.max_norm
        if self._tmp is None:
            return self.mean.result(), info
        try:
            with ar.safetensors_reader(self._paths) as read:
                if self.s.rule == "median":
                    return ar.coordinate_median(self.shapes, n, read, self.chunk_elems), info
                if self.s.rule == "trimmed_mean":
                    info["trim_ratio"] = self.s.trim_ratio
                    return ar.trimmed_mean(self.shapes, n, read, self.s.trim_ratio, self.chunk_elems), info
                dists = ar.pairwise_sq_distances(self.shapes, n, read, self.chunk_elems)
                chosen = ar.krum_select(dists, self.s.krum_f, min(self.s.krum_m, n))
                info["krum_selected"] = [self.names[i] for i in chosen]
                mean = ar.WeightedMean()  # unweighted: a poisoner could claim any num_examples
                for i in chosen:
                    mean.add({k: read(i, k, 0, ar.n_rows(tuple(s))).reshape(s) for k, s in self.shapes.items()})
                return mean.result(), info
        finally:
            self.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
