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

Every setting is in the signed spec, so a bank can check what the coordinator will do. The
contract (types, ranges, defaults) is StrategyTable below; docs/spec.md is generated from it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from fedcli.aggregation import rules, server_opt
from fedcli.contract import strict_config, validate
from fedcli.errors import FedcliError
from fedcli.protocol import compression


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
        return rules.staleness_discount(staleness, self.discount, self.exponent, self.hinge_after)


def _err(msg: str) -> FedcliError:
    return FedcliError(f"[strategy] {msg}")


class ServerTable(BaseModel):
    """[strategy.server]: the server optimiser and any of its parameters (unset ones take server_opt.DEFAULTS)."""

    model_config = strict_config()

    optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi"] = Field(
        "fedavg", description="how the coordinator applies the aggregated delta to the global model"
    )
    lr: float | None = Field(
        None, gt=0, le=10, description="server learning rate (fedavg/fedavgm: 1.0, fedadam/fedyogi: 0.01)"
    )
    momentum: float | None = Field(None, ge=0, lt=1, description="fedavgm only (default 0.9)")
    beta1: float | None = Field(None, ge=0, lt=1, description="fedadam/fedyogi only (default 0.9)")
    beta2: float | None = Field(None, ge=0, lt=1, description="fedadam/fedyogi only (default 0.99)")
    tau: float | None = Field(None, gt=0, le=1, description="fedadam/fedyogi only: adaptivity (default 0.001)")

    @property
    def params(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.model_dump(exclude={"optimizer"}).items() if v is not None}

    @model_validator(mode="after")
    def _known_params(self):
        try:
            server_opt.check_params(self.optimizer, self.params)
        except FedcliError as e:
            raise ValueError(str(e)) from None
        return self


class CompressionTable(BaseModel):
    """[strategy.compression]: how banks shrink updates on the wire (error feedback kept at the bank)."""

    model_config = strict_config()

    method: Literal["none", "int8", "topk"] = Field(
        "none", description="none | int8 (8-bit quantised) | topk (largest coordinates)"
    )
    ratio: float = Field(0.01, gt=0, le=1, description="topk: fraction of coordinates sent")


class AsyncTable(BaseModel):
    """[strategy.async]: buffered asynchronous aggregation (used when mode = "async")."""

    model_config = strict_config()

    buffer_size: int | None = Field(
        None, ge=1, le=10_000, description="publish once this many updates are in (default min(2, members))"
    )
    max_staleness: int = Field(4, ge=0, le=10_000, description="updates trained on an older global are ignored")
    discount: Literal["polynomial", "hinge", "constant"] = Field(
        "polynomial", description="weight of a stale update: (1+s)^-exponent, hinge, or none"
    )
    exponent: float = Field(0.5, ge=0, le=100, description="polynomial: the exponent; hinge: the slope")
    hinge_after: int = Field(4, ge=0, le=10_000, description="hinge: no discount up to this staleness")


class StrategyTable(BaseModel):
    """[strategy]: how the coordinator combines verified updates (absent = synchronous FedAvg)."""

    model_config = strict_config()

    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: quorum or deadline; async: fold in buffer_size updates"
    )
    rule: Literal["fedavg", "median", "trimmed_mean", "krum"] = Field("fedavg", description="aggregation rule")
    max_norm: float = Field(0.0, ge=0, le=1e12, description="> 0: scale every update down to this L2 norm first")
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: fraction dropped at each end")
    krum_f: int = Field(1, ge=0, le=1000, description="krum: Byzantine banks tolerated")
    krum_m: int = Field(1, ge=1, le=1000, description="krum: updates averaged (1 = Krum, > 1 = multi-Krum)")
    prox_mu: float = Field(0.0, ge=0, le=1000, description="FedProx proximal term at the banks (0 = off)")
    server: ServerTable = Field(default_factory=ServerTable, description="server optimiser")
    compression: CompressionTable = Field(default_factory=CompressionTable, description="update compression")
    async_: AsyncTable = Field(default_factory=AsyncTable, alias="async", description="asynchronous aggregation")


def build(t: StrategyTable, n_members: int, min_clients: int) -> StrategySpec:
    """The StrategySpec of a validated table, after the checks that need the roster."""
    a = t.async_
    buffer_size = min(2, n_members) if a.buffer_size is None else a.buffer_size
    if buffer_size > n_members:
        raise _err(f"async.buffer_size must be between 1 and the number of members ({n_members})")
    fewest = buffer_size if t.mode == "async" else min_clients
    if t.rule == "krum" and fewest < 2 * t.krum_f + 3:
        what = "async.buffer_size" if t.mode == "async" else "min_clients"
        raise _err(
            f"krum with krum_f={t.krum_f} needs at least {2 * t.krum_f + 3} updates per round; raise {what} (now {fewest})"
        )
    return StrategySpec(
        mode=t.mode,
        rule=t.rule,
        max_norm=float(t.max_norm),
        trim_ratio=float(t.trim_ratio),
        krum_f=t.krum_f,
        krum_m=t.krum_m,
        prox_mu=float(t.prox_mu),
        server=t.server.optimizer,
        server_params=t.server.params,
        compression=t.compression.method,
        topk_ratio=float(t.compression.ratio),
        buffer_size=buffer_size,
        max_staleness=a.max_staleness,
        discount=a.discount,
        exponent=float(a.exponent),
        hinge_after=a.hinge_after,
    )


def parse(table: dict | None, n_members: int, min_clients: int) -> StrategySpec:
    """Validate a [strategy] table on its own (the spec validates it as part of the whole document)."""
    t = validate(StrategyTable, {} if table is None else table, "federation spec: [strategy]", FedcliError)
    try:
        return build(t, n_members, min_clients)
    except FedcliError as e:
        raise FedcliError(f"federation spec: {e}") from None


class Combiner:
    """Folds verified, decoded deltas into one aggregated delta under the strategy's rule.

    FedAvg streams (one update in memory). The robust rules need every update's slice at
    once, so each delta is spilled to a local temporary safetensors file and the rule reads
    them back chunk by chunk (memory-mapped): memory stays bounded by the chunk size.
    """

    def __init__(
        self, strategy: StrategySpec, shapes: dict[str, tuple[int, ...]], chunk_elems: int = rules.DEFAULT_CHUNK_ELEMS
    ):
        self.s, self.shapes, self.chunk_elems = strategy, dict(shapes), chunk_elems
        self.mean = rules.WeightedMean()
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
            norm = rules.l2_norm(delta)
            clip = rules.clip_factor(norm, self.s.max_norm)
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
            with rules.safetensors_reader(self._paths) as read:
                if self.s.rule == "median":
                    return rules.coordinate_median(self.shapes, n, read, self.chunk_elems), info
                if self.s.rule == "trimmed_mean":
                    info["trim_ratio"] = self.s.trim_ratio
                    return rules.trimmed_mean(self.shapes, n, read, self.s.trim_ratio, self.chunk_elems), info
                dists = rules.pairwise_sq_distances(self.shapes, n, read, self.chunk_elems)
                chosen = rules.krum_select(dists, self.s.krum_f, min(self.s.krum_m, n))
                info["krum_selected"] = [self.names[i] for i in chosen]
                mean = rules.WeightedMean()  # unweighted: a poisoner could claim any num_examples
                for i in chosen:
                    mean.add({k: read(i, k, 0, rules.n_rows(tuple(s))).reshape(s) for k, s in self.shapes.items()})
                return mean.result(), info
        finally:
            self.close()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
