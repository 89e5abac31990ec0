"""One interface for every way the coordinator combines a round's verified updates, and their registry.

The spec selects one aggregator per round (`select`): the plain and robust rules of [strategy]
(fedavg, median, trimmed_mean, krum) or, with [secagg], the masked sum and its dropout exchange
(secagg.exchange.SecureSum). The coordinator's step drives them all the same way:

    check(member, manifest)                          refuse an update this aggregator cannot take
    add(label, manifest, delta, weight, staleness)   fold it in; returns what was done to it
    result(readiness, rejected)                      (delta, "", info) when the round closes,
                                                     (None, why not, {}) while it waits
    close()                                          free temporary files
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedcli.aggregation import rules
from fedcli.aggregation.strategy import StrategySpec
from fedcli.errors import FedcliError
from fedcli.norms import clip_factor, update_norm
from fedcli.secagg.exchange import SecureSum

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcli.protocol.documents import UpdateManifest
    from fedcli.protocol.spec import Spec
    from fedcli.store import Store

Delta = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]
Readiness = tuple[bool, str]  # (can the round close, why not)
Outcome = tuple[dict[str, np.ndarray] | None, str, dict]  # (delta or None, waiting reason, manifest info)


class Aggregator(Protocol):
    """Folds one round's verified updates into the delta the server step applies."""

    def check(self, member: str, manifest: UpdateManifest) -> None:
        """Raise a FedcliError (the update's rejection) if this update cannot be part of the aggregate."""

    def add(
        self, label: str, manifest: UpdateManifest | None, delta: Delta, weight: float = 1.0, staleness: int = 0
    ) -> dict:
        """Fold in one update now (its arrays may be reused afterwards); returns the manifest's note on it."""
        ...

    def result(self, readiness: Readiness, rejected: Sequence[str] = ()) -> Outcome:
        """The aggregated delta and what was done (for the signed global manifest), or why the round waits."""
        ...

    def close(self) -> None:
        """Free what the aggregator holds; safe to call twice."""


@dataclass(frozen=True)
class RoundContext:
    """What building a round's aggregator may need (the secure sum needs the store and the key)."""

    spec: Spec
    shapes: Shapes
    round: int
    store: Store
    private: Ed25519PrivateKey
    equal_weights: bool  # DP updates withhold their row count: a plain mean, not FedAvg


# ----- the plain and robust rules of [strategy] -----


def _scale(strategy: StrategySpec, delta: Delta, staleness: int) -> tuple[float, dict]:
    """Norm bounding and the staleness discount as one factor, with the note the manifest keeps."""
    factor = 1.0
    note: dict = {}
    if strategy.max_norm > 0:
        norm = update_norm(dict(delta))
        clip = clip_factor(norm, strategy.max_norm)
        factor *= clip
        note["norm"] = round(norm, 6)
        if clip < 1:
            note["clipped_by"] = round(clip, 6)
    if staleness:
        discount = strategy.discount_for(staleness)
        factor *= discount
        note["staleness"], note["discount"] = staleness, round(discount, 6)
    return factor, note


class _Rule:
    """What the [strategy] rules share: scaling each update, no checks beyond verification, the info."""

    rule = ""

    def __init__(self, strategy: StrategySpec, shapes: Shapes, chunk_elems: int = rules.DEFAULT_CHUNK_ELEMS):
        self.strategy, self.shapes, self.chunk_elems = strategy, dict(shapes), chunk_elems
        self.labels: list[str] = []

    def check(self, member: str, manifest: UpdateManifest) -> None:
        """Verification already checked everything these rules rely on."""

    def add(
        self, label: str, manifest: UpdateManifest | None, delta: Delta, weight: float = 1.0, staleness: int = 0
    ) -> dict:
        factor, note = _scale(self.strategy, delta, staleness)
        self._fold(delta, weight, factor)
        self.labels.append(label)
        return note

    def result(self, readiness: Readiness, rejected: Sequence[str] = ()) -> Outcome:
        ready, reason = readiness
        if not ready:
            return None, reason, {}
        if not self.labels:
            raise FedcliError("no updates to aggregate")
        info: dict = {"rule": self.rule}
        if self.strategy.max_norm > 0:
            info["max_norm"] = self.strategy.max_norm
        return self._combine(info), reason, info

    def close(self) -> None:
        pass

    def _fold(self, delta: Delta, weight: float, factor: float) -> None:
        raise NotImplementedError

    def _combine(self, info: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError


class FedAvg(_Rule):
    """Weighted mean, streamed: one update in memory whatever the number of banks."""

    def __init__(
        self,
        strategy: StrategySpec,
        shapes: Shapes,
        chunk_elems: int = rules.DEFAULT_CHUNK_ELEMS,
        equal_weights: bool = False,
    ):
        super().__init__(strategy, shapes, chunk_elems)
        self.rule = "mean" if equal_weights else "fedavg"
        self.mean = rules.WeightedMean()

    def _fold(self, delta: Delta, weight: float, factor: float) -> None:
        self.mean.add(delta, weight, scale=factor)

    def _combine(self, info: dict) -> dict[str, np.ndarray]:
        return self.mean.result()


class _SpilledRule(_Rule):
    """A robust rule needs every update's slice at once: each scaled delta is spilled to a local
    temporary safetensors file and read back chunk by chunk (memory-mapped), so memory stays
    bounded by the chunk size. The robust rules are unweighted: a poisoner could claim any row count."""

    def __init__(self, strategy: StrategySpec, shapes: Shapes, chunk_elems: int = rules.DEFAULT_CHUNK_ELEMS):
        super().__init__(strategy, shapes, chunk_elems)
        self._tmp: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(prefix="fedcli-agg-")
        self._paths: list[str] = []

    def _fold(self, delta: Delta, weight: float, factor: float) -> None:
        from safetensors.numpy import save_file

        if self._tmp is None:
            raise FedcliError("the aggregate was already taken")
        path = str(Path(self._tmp.name) / f"{len(self._paths)}.safetensors")
        save_file({k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in delta.items()}, path)
        self._paths.append(path)

    def _combine(self, info: dict) -> dict[str, np.ndarray]:
        try:
            with rules.safetensors_reader(self._paths) as read:
                return self._reduce(read, len(self._paths), info)
        finally:
            self.close()

    def _reduce(self, read: rules.ReadRows, n: int, info: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class Median(_SpilledRule):
    """Coordinate-wise median (Yin et al. 2018)."""

    rule = "median"

    def _reduce(self, read: rules.ReadRows, n: int, info: dict) -> dict[str, np.ndarray]:
        return rules.coordinate_median(self.shapes, n, read, self.chunk_elems)


class TrimmedMean(_SpilledRule):
    """Coordinate-wise mean without the trim_ratio largest and smallest values."""

    rule = "trimmed_mean"

    def _reduce(self, read: rules.ReadRows, n: int, info: dict) -> dict[str, np.ndarray]:
        info["trim_ratio"] = self.strategy.trim_ratio
        return rules.trimmed_mean(self.shapes, n, read, self.strategy.trim_ratio, self.chunk_elems)


class Krum(_SpilledRule):
    """(Multi-)Krum: the plain mean of the krum_m updates closest to their neighbours (Blanchard et al. 2017)."""

    rule = "krum"

    def _reduce(self, read: rules.ReadRows, n: int, info: dict) -> dict[str, np.ndarray]:
        dists = rules.pairwise_sq_distances(self.shapes, n, read, self.chunk_elems)
        chosen = rules.krum_select(dists, self.strategy.krum_f, min(self.strategy.krum_m, n))
        info["krum_selected"] = [self.labels[i] for i in chosen]
        mean = rules.WeightedMean()  # unweighted: a poisoner could claim any num_examples
        for i in chosen:
            mean.add({k: read(i, k, 0, rules.n_rows(tuple(s))).reshape(s) for k, s in self.shapes.items()})
        return mean.result()


# ----- the registry -----

Factory = Callable[[RoundContext], Aggregator]

REGISTRY: dict[str, Factory] = {
    "fedavg": lambda ctx: FedAvg(ctx.spec.strategy, ctx.shapes, equal_weights=ctx.equal_weights),
    "median": lambda ctx: Median(ctx.spec.strategy, ctx.shapes),
    "trimmed_mean": lambda ctx: TrimmedMean(ctx.spec.strategy, ctx.shapes),
    "krum": lambda ctx: Krum(ctx.spec.strategy, ctx.shapes),
    "secagg": lambda ctx: SecureSum(ctx.store, ctx.private, ctx.spec, ctx.round, ctx.shapes),
}


def select(spec: Spec) -> str:
    """The registry name the spec selects: the masked sum under [secagg] (sync FedAvg only), else the rule."""
    return "secagg" if spec.secagg.enabled else spec.strategy.rule


def build(ctx: RoundContext) -> Aggregator:
    """The aggregator of this round, built once."""
    return REGISTRY[select(ctx.spec)](ctx)
