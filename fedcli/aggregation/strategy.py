"""The spec's [strategy] section: its contract (StrategyTable) and what it decides (StrategySpec).

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

from dataclasses import dataclass, field
from typing import Literal

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
    server: ServerTable = Field(default_factory=lambda: ServerTable.model_validate({}), description="server optimiser")
    compression: CompressionTable = Field(
        default_factory=lambda: CompressionTable.model_validate({}), description="update compression"
    )
    async_: AsyncTable = Field(
        default_factory=lambda: AsyncTable.model_validate({}), alias="async", description="asynchronous aggregation"
    )


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
