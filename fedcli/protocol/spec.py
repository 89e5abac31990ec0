"""The federation spec (TOML): who is in, which model, which features, how to train.

The coordinator signs it at `fedcli init`; every bank verifies it against the pinned
coordinator key before using anything in it, so preprocessing and hyper-parameters are
identical everywhere and cannot be changed behind a bank's back.

The contract is one strict pydantic model per table, composed into `SpecDocument`: unknown
keys and tables are refused with a "did you mean", every number has a type and a range.
docs/spec.md is generated from these models (`python -m fedcli.specdoc`), so it cannot drift.
Rules that need more than one table (quorum against the roster, secure aggregation against
the strategy) live in `_build`, which turns the validated document into the `Spec` the rest
of fedcli uses.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, field_validator, model_validator

from fedcli.aggregation.strategy import StrategySpec, StrategyTable
from fedcli.aggregation.strategy import build as build_strategy
from fedcli.contract import check_size, load_toml, strict_config, validate
from fedcli.errors import ContractError, FedcliError, InputError, VerificationError
from fedcli.keys import PublicIdentity, verify_bytes
from fedcli.names import check_name
from fedcli.privacy.policy import PrivacySpec, PrivacyTable, privacy_spec

MODEL_KINDS = ("logreg", "mlp")
MAX_SPEC_BYTES = 1 << 20  # a spec with 10,000 features is ~0.5 MiB
MAX_SIG_BYTES = 1024
MAX_MEMBERS = 1000
MAX_FEATURES = 10_000
NO_DP = "no differential privacy"
NO_SECAGG = "off"


# --------------------------------------------------------------------------- field types


def _name(value: str) -> str:
    try:
        return check_name(value, "name")
    except FedcliError as e:
        raise ValueError(str(e)) from None


def _ed25519(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"is not a 32-byte Ed25519 public key ({len(raw)} bytes)")
    PublicIdentity("key", value).key()
    return value


def _x25519(value: str) -> str:
    if value:
        from fedcli.keys import x25519_from_text

        try:
            x25519_from_text(value)
        except (FedcliError, ValueError):
            raise ValueError("is not a base64 X25519 public key of 32 bytes") from None
    return value


Name = Annotated[str, AfterValidator(_name)]
Ed25519Key = Annotated[str, AfterValidator(_ed25519)]
X25519Key = Annotated[str, StringConstraints(max_length=64), AfterValidator(_x25519)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
HiddenWidth = Annotated[int, Field(ge=1, le=4096)]


# --------------------------------------------------------------------------- the document


class CoordinatorTable(BaseModel):
    """[federation.coordinator]: filled in by `fedcli init` from --key; banks pin this key."""

    model_config = strict_config()

    name: Name = Field(description="coordinator name (the key file's stem)")
    ed25519: Ed25519Key = Field(description="base64 Ed25519 public key that signs the spec and every global")


class FederationTable(BaseModel):
    """[federation]: identity, quorum and the bound on a bank's declared row count."""

    model_config = strict_config()

    id: Name = Field(description="federation id (init: --id, else this, else random)")
    coordinator: CoordinatorTable = Field(description="filled in by init")
    min_clients: int | None = Field(
        None,
        ge=1,
        le=MAX_MEMBERS,
        description="valid updates needed to publish; at most the number of members (default min(2, members))",
    )
    deadline_minutes: float = Field(
        0, ge=0, le=525_600, description="0: publish at quorum; else wait this long for the rest unless all are in"
    )
    max_rows_per_member: int = Field(
        100_000_000, ge=1, le=10**10, description="largest num_examples an update may declare (its FedAvg weight)"
    )
    rounds: int | None = Field(
        None,
        ge=1,
        le=999_999,
        description="planned rounds: after publishing this round the coordinator signs a final marker (default: no end)",
    )
    max_round_age: float | None = Field(
        None,
        gt=0,
        le=87_600,
        description="hours: banks refuse a store whose newest global is older (a store frozen in the past); "
        "default: no limit",
    )
    max_lease_minutes: float = Field(
        120, gt=0, le=10_080, description="longest aggregate lock lease; a longer one is invalid and may be taken over"
    )
    roster_countersign: int = Field(
        0,
        ge=0,
        le=MAX_MEMBERS,
        description="members of this version who must countersign the next version's roster change (0: none)",
    )


class MemberTable(BaseModel):
    """[[members]]: one per bank; init appends one per --member .pub file."""

    model_config = strict_config()

    name: Name = Field(description="bank name; its updates live under updates/<name>")
    ed25519: Ed25519Key = Field(description="base64 Ed25519 public key that signs the bank's updates")
    x25519: X25519Key = Field(
        "", description="base64 X25519 key for secure aggregation masks (required when [secagg] is enabled)"
    )


class ModelTable(BaseModel):
    """[model]: the architecture every bank trains."""

    model_config = strict_config()

    kind: Literal["logreg", "mlp"] = Field(description="logistic regression or a multi-layer perceptron")
    hidden: list[HiddenWidth] = Field(
        default_factory=lambda: [32], min_length=1, max_length=16, description="mlp: hidden layer widths, each 1..4096"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="round 0's weights are reproducible from this seed")


class NumericFeatureTable(BaseModel):
    """[[data.numeric]]: a column standardised as (x - mean) / std at every bank."""

    model_config = strict_config()

    name: Text = Field(description="column name")
    mean: float | None = Field(
        None,
        ge=-1e15,
        le=1e15,
        description="declared mean (missing values become this); omit with federated statistics",
    )
    std: float | None = Field(
        None, gt=0, le=1e15, description="declared standard deviation; omit with federated statistics"
    )
    range: list[Annotated[float, Field(ge=-1e15, le=1e15)]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="federated statistics with [privacy] or [secagg]: public bounds [low, high]; values are clipped to them",
    )
    bins: int = Field(
        0, ge=0, le=1000, description="federated statistics: histogram bins over range, to publish deciles (0: none)"
    )

    @field_validator("range")
    @classmethod
    def _ordered(cls, bounds: list[float] | None) -> list[float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError("must be [low, high] with low < high")
        return bounds

    @model_validator(mode="after")
    def _binned_over_range(self):
        if self.bins and self.range is None:
            raise ValueError("bins needs a range = [low, high] to bin over")
        return self


class CategoricalFeatureTable(BaseModel):
    """[[data.categorical]]: a column one-hot encoded over its declared levels (others: all zero)."""

    model_config = strict_config()

    name: Text = Field(description="column name")
    levels: list[Text] | None = Field(
        None,
        min_length=1,
        max_length=MAX_FEATURES,
        description="category values as text, unique (federated statistics: the candidate levels, optional without "
        "[privacy] and [secagg])",
    )
    max_levels: int = Field(30, ge=1, le=1000, description="federated statistics: keep at most this many levels")

    @field_validator("levels")
    @classmethod
    def _unique(cls, levels: list[str] | None) -> list[str] | None:
        if levels is not None and len(set(levels)) != len(levels):
            twice = next(x for x in levels if levels.count(x) > 1)
            raise ValueError(f"must be unique ({twice!r} appears twice)")
        return levels


class DataTable(BaseModel):
    """[data]: the label and the declared preprocessing, identical at every bank (draft it with `fedcli schema`)."""

    model_config = strict_config()

    target: Text = Field(description="label column")
    positive: Text | int = Field(description="label value of the positive class")
    numeric: list[NumericFeatureTable] = Field(
        default_factory=list, max_length=MAX_FEATURES, description="numeric features"
    )
    categorical: list[CategoricalFeatureTable] = Field(
        default_factory=list, max_length=MAX_FEATURES, description="categorical features"
    )
    statistics: Literal["declared", "federated"] = Field(
        "declared",
        description="declared: means, stds and levels are in this file; federated: a statistics round before "
        "round 1 fills them from every bank's counts and sums (docs/data.md)",
    )
    min_level_count: int = Field(
        10, ge=1, le=10**9, description="federated statistics: a level is kept only if this many rows have it"
    )
    statistics_noise: float = Field(
        5.0, gt=0, le=1e6, description="federated statistics with [privacy]: Gaussian noise multiplier on the counts"
    )

    @model_validator(mode="after")
    def _statistics(self):
        if self.statistics == "federated":
            given = [f.name for f in self.numeric if f.mean is not None or f.std is not None]
            if given:
                raise ValueError(
                    f'declares a mean or std for {given[0]!r} but statistics = "federated" computes them: remove them'
                )
            return self
        missing = [f.name for f in self.numeric if f.mean is None or f.std is None]
        missing += [c.name for c in self.categorical if c.levels is None]
        if missing:
            raise ValueError(
                f'declares no mean, std or levels for {missing[0]!r}: give them, or set statistics = "federated"'
            )
        return self

    @model_validator(mode="after")
    def _features(self):
        cols = [f.name for f in self.numeric] + [f.name for f in self.categorical]
        if not cols:
            raise ValueError("declares no features ([[data.numeric]] or [[data.categorical]])")
        if len(set(cols)) != len(cols):
            raise ValueError(f"declares the feature {next(c for c in cols if cols.count(c) > 1)!r} twice")
        if self.target in cols:
            raise ValueError(f"has its target {self.target!r} also declared as a feature")
        n = len(self.numeric) + sum(len(c.levels or ()) or c.max_levels for c in self.categorical)
        if n > MAX_FEATURES:
            raise ValueError(f"declares {n} model inputs (numeric + one-hot levels); at most {MAX_FEATURES}")
        return self


class TrainingTable(BaseModel):
    """[training]: local training at every bank, per round."""

    model_config = strict_config()

    epochs: int = Field(5, ge=1, le=10_000, description="local epochs per round")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="mini-batch size")
    lr: float = Field(0.01, gt=0, le=10, description="local learning rate (Adam)")
    pos_weight: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="weight of the positive class in the loss, e.g. negatives/positives for a rare class",
    )


class SecAggTable(BaseModel):
    """[secagg]: pairwise-masked updates so the coordinator sees only their sum."""

    model_config = strict_config()

    enabled: bool = Field(False, description="turn secure aggregation on (needs every member's x25519 key)")
    clip: float = Field(
        10.0, gt=0, le=1e6, description="each update coordinate is clipped to [-clip, clip] before fixed point"
    )
    noise: Literal["full", "shared"] = Field(
        "full", description="update-level DP noise per bank: full at every bank, or shared across banks"
    )
    threshold: int = Field(
        0,
        ge=0,
        le=MAX_MEMBERS,
        description="t of the t-of-n key sharing: fewest survivors a round may unmask with; 0 means max(3, n // 2 + 1)",
    )


class EvaluationTable(BaseModel):
    """[evaluation]: federated evaluation on rows each bank holds out (never trained on)."""

    model_config = strict_config()

    holdout: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="share of each bank's rows held out by a keyed hash of the row (stable across rounds, never "
        "trained on); each bank publishes signed binned scores of the global it starts from. 0: off",
    )
    bins: int = Field(50, ge=10, le=200, description="score bins of the published holdout histograms")
    baseline: bool = Field(
        False,
        description="each bank also trains a model on its own training rows only (same epochs per round, never "
        "sent) and publishes its holdout histogram beside the federated one: federated vs each bank alone",
    )
    noise: float = Field(
        5.0,
        ge=0.5,
        le=1e4,
        description="with [privacy]: Gaussian noise multiplier on each published holdout count (sensitivity 1: one "
        "row moves one count by 1); each evaluation is one record-level release charged to the bank's ledger",
    )


class SpecDocument(BaseModel):
    """The whole federation spec: federation.toml."""

    model_config = strict_config()

    federation: FederationTable
    members: list[MemberTable] = Field(min_length=1, max_length=MAX_MEMBERS, description="enrolled banks")
    model: ModelTable
    data: DataTable
    training: TrainingTable = Field(default_factory=TrainingTable)
    privacy: PrivacyTable = Field(default_factory=PrivacyTable)
    secagg: SecAggTable = Field(default_factory=SecAggTable)
    strategy: StrategyTable = Field(default_factory=StrategyTable)
    evaluation: EvaluationTable = Field(default_factory=EvaluationTable)


# --------------------------------------------------------------------------- what the code uses


@dataclass(frozen=True)
class NumericFeature:
    name: str
    mean: float
    std: float
    range: tuple[float, float] | None = None  # federated statistics: public bounds the values are clipped to
    bins: int = 0  # federated statistics: histogram bins over range, for deciles (0: none)


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    levels: tuple[str, ...]
    max_levels: int = 30  # federated statistics: at most this many levels are kept


@dataclass(frozen=True)
class DataSpec:
    target: str
    positive: str
    numeric: tuple[NumericFeature, ...]
    categorical: tuple[CategoricalFeature, ...]
    statistics: str = "declared"  # or "federated": means, stds, levels come from the statistics round
    min_level_count: int = 10  # federated: rows a level needs across the federation to be kept
    statistics_noise: float = 5.0  # federated with [privacy]: Gaussian noise multiplier on counts and sums

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(c.levels) for c in self.categorical)


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "logreg"
    hidden: tuple[int, ...] = (32,)
    seed: int = 0


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 0.01
    pos_weight: float = 1.0  # weight of the positive class in the BCE loss


@dataclass(frozen=True)
class SecAggSpec:
    """[secagg]: pairwise-masked updates so the coordinator sees only their sum."""

    enabled: bool = False
    clip: float = 10.0  # each update coordinate is clipped to [-clip, clip] before fixed point
    noise: str = "full"  # DP noise per bank: "full" or "shared" (see docs/security.md)
    threshold: int = 3  # t: self-mask seeds are shared t-of-n; no survivor set smaller than t is unmasked


@dataclass(frozen=True)
class EvaluationSpec:
    """[evaluation]: the share of rows each bank holds out (0: off) and the histogram's bins."""

    holdout: float = 0.0
    bins: int = 50
    baseline: bool = False  # each bank also scores a model trained on its own rows only
    noise: float = 5.0  # with [privacy]: Gaussian noise multiplier on the published counts (sensitivity 1)


@dataclass(frozen=True)
class Spec:
    federation_id: str
    coordinator: PublicIdentity
    min_clients: int
    deadline_minutes: float
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec
    members: tuple[PublicIdentity, ...]
    raw: dict = field(repr=False, compare=False)
    max_rows_per_member: int = 100_000_000  # bounds num_examples in update manifests (FedAvg weight)
    secagg: SecAggSpec = SecAggSpec()
    strategy: StrategySpec = field(default_factory=StrategySpec)
    privacy: PrivacySpec = PrivacySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    document: Any = field(default=None, repr=False, compare=False)  # the validated SpecDocument
    rounds: int | None = None  # planned rounds; then the coordinator publishes a signed final marker
    max_round_age: float | None = None  # hours; banks refuse an older newest global
    max_lease_minutes: float = 120.0  # a lock lease longer than this is invalid
    roster_countersign: int = 0  # t of n members countersign a roster change of the next version
    chain: Any = field(default=None, repr=False, compare=False)  # protocol.chain.Chain it was read from
    statistics_sha256: str | None = None  # federated statistics: the signed statistics document filling `data`

    def member(self, name: str) -> PublicIdentity | None:
        return next((m for m in self.members if m.name == name), None)

    def member_by_key(self, ed25519_b64: str) -> PublicIdentity | None:
        return next((m for m in self.members if m.ed25519 == ed25519_b64), None)


def parse(raw: Any, what: str = "federation spec", error: type[FedcliError] = FedcliError) -> Spec:
    """Validate a parsed spec against the contract and build a Spec; every problem is one line naming the field."""
    doc = validate(SpecDocument, raw, what, error)
    try:
        return _build(doc, raw)
    except FedcliError as e:
        raise error(f"{what}: {e}") from None


def _build(doc: SpecDocument, raw: dict) -> Spec:
    """The rules that span tables: roster, quorum, privacy against strategy, secure aggregation."""
    fed = doc.federation
    coordinator = PublicIdentity(name=fed.coordinator.name, ed25519=fed.coordinator.ed25519)
    members = tuple(PublicIdentity(name=m.name, ed25519=m.ed25519, x25519=m.x25519) for m in doc.members)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise FedcliError(f"member names must be unique ({next(n for n in names if names.count(n) > 1)!r} twice)")
    if len({m.ed25519 for m in members}) != len(members):
        raise FedcliError("two members share a public key")
    if coordinator.ed25519 in {m.ed25519 for m in members}:
        raise FedcliError(
            f"the coordinator's key is also member {coordinator_member(coordinator, members)}'s key: "
            "the coordinator must have its own key"
        )
    min_clients = min(2, len(members)) if fed.min_clients is None else fed.min_clients
    if min_clients > len(members):
        raise FedcliError(f"[federation] min_clients must be between 1 and the number of members ({len(members)})")

    if fed.roster_countersign > len(members):
        raise FedcliError(f"[federation] roster_countersign must be at most the number of members ({len(members)})")
    privacy = privacy_spec(doc.privacy)
    strategy = build_strategy(doc.strategy, len(members), min_clients)
    if strategy.prox_mu > 0 and privacy.mode == "record":
        raise FedcliError(
            "[strategy] prox_mu (FedProx) is not supported with record-level DP "
            '(DP-SGD); use [privacy] mode = "update" or prox_mu = 0'
        )
    secagg = _secagg(doc.secagg, members, min_clients, privacy.mode, strategy)

    data = _data(doc.data, privacy.enabled or secagg.enabled)
    m, t = doc.model, doc.training
    return Spec(
        federation_id=fed.id,
        coordinator=coordinator,
        min_clients=min_clients,
        deadline_minutes=float(fed.deadline_minutes),
        max_rows_per_member=fed.max_rows_per_member,
        model=ModelSpec(kind=m.kind, hidden=tuple(m.hidden), seed=m.seed),
        data=data,
        training=TrainingSpec(epochs=t.epochs, batch_size=t.batch_size, lr=float(t.lr), pos_weight=float(t.pos_weight)),
        members=members,
        raw=raw,
        privacy=privacy,
        strategy=strategy,
        secagg=secagg,
        evaluation=EvaluationSpec(
            float(doc.evaluation.holdout), doc.evaluation.bins, doc.evaluation.baseline, float(doc.evaluation.noise)
        ),
        document=doc,
        rounds=fed.rounds,
        max_round_age=fed.max_round_age,
        max_lease_minutes=float(fed.max_lease_minutes),
        roster_countersign=fed.roster_countersign,
    )


def _data(d: DataTable, protected: bool) -> DataSpec:
    """The data section; with federated statistics, placeholders (mean 0, std 1) until the statistics round fills them."""
    federated = d.statistics == "federated"
    if federated and protected:
        unbounded = [f.name for f in d.numeric if f.range is None] + [c.name for c in d.categorical if not c.levels]
        if unbounded:
            raise FedcliError(
                f"[data] federated statistics with [privacy] or [secagg] need a range for every numeric feature and "
                f"candidate levels for every categorical one ({unbounded[0]!r} has none)"
            )
    return DataSpec(
        target=d.target,
        positive=str(d.positive),
        numeric=tuple(
            NumericFeature(
                f.name,
                0.0 if f.mean is None else float(f.mean),
                1.0 if f.std is None else float(f.std),
                None if f.range is None else (float(f.range[0]), float(f.range[1])),
                f.bins,
            )
            for f in d.numeric
        ),
        categorical=tuple(CategoricalFeature(f.name, tuple(f.levels or ()), f.max_levels) for f in d.categorical),
        statistics=d.statistics,
        min_level_count=d.min_level_count,
        statistics_noise=float(d.statistics_noise),
    )


def coordinator_member(coordinator: PublicIdentity, members) -> str:
    return next(m.name for m in members if m.ed25519 == coordinator.ed25519)


def _secagg(
    t: SecAggTable, members: tuple[PublicIdentity, ...], min_clients: int, privacy_mode: str, strategy: StrategySpec
) -> SecAggSpec:
    """Secure aggregation needs every member's X25519 key and at least 2 survivors per round."""
    from fedcli.secagg.masking import fixed_point_scale

    if not t.enabled:
        return SecAggSpec(False, float(t.clip), t.noise, t.threshold or 3)
    if t.noise == "shared" and privacy_mode != "update":
        raise FedcliError(
            '[secagg] noise = "shared" splits update-level DP noise across banks; it needs [privacy] mode = "update"'
        )
    if strategy.mode != "sync" or strategy.rule != "fedavg" or strategy.max_norm > 0 or strategy.compression != "none":
        raise FedcliError(
            '[secagg] needs [strategy] mode = "sync", rule = "fedavg", no max_norm and '
            "no compression: the coordinator only sees the sum, never one update (server optimisers and "
            "prox_mu are fine)"
        )
    missing = [m.name for m in members if not m.x25519]
    if missing:
        raise FedcliError(
            f"[secagg] is enabled but {', '.join(missing)} enrolled no x25519 key "
            "(re-run `fedcli keygen` and enrol the new .pub)"
        )
    if len({m.x25519 for m in members}) != len(members):
        raise FedcliError("[secagg] two members share an x25519 key")
    if len(members) < 2 or min_clients < 2:
        raise FedcliError("[secagg] needs at least 2 members and min_clients >= 2 (a sum of one update is that update)")
    fixed_point_scale(t.clip, len(members))  # fails early if the roster cannot fit in 32 bits
    return SecAggSpec(True, float(t.clip), t.noise, _threshold(t.threshold, len(members)))


def _threshold(asked: int, n: int) -> int:
    """t of the t-of-n sharing (0: max(3, n // 2 + 1)); a roster that can never muster t survivors is refused."""
    t = asked or max(3, n // 2 + 1)
    if t < 3:
        raise FedcliError(
            f"[secagg] threshold must be at least 3, got {t} (a sum of two updates reveals both to either bank)"
        )
    if t > n:
        raise FedcliError(
            f"[secagg] threshold is {t} but only {n} members are enrolled: no round could ever be unmasked "
            "(secure aggregation needs at least 3 banks)"
        )
    return t


# --------------------------------------------------------------------------- bytes in, bytes out


def loads(data: bytes, what: str = "federation spec", error: type[FedcliError] = FedcliError) -> Spec:
    """Parse and validate spec bytes (size and depth bounded first). Unsigned bytes: use `verified`."""
    return parse(load_toml(data, what, MAX_SPEC_BYTES, error), what, error)


def verified(data: bytes, signature: bytes, pinned: PublicIdentity | None, what: str = "federation spec") -> Spec:
    """The spec from the store: the signature over the raw bytes is checked before the contract.

    With a pinned key, nothing is parsed before the signature verifies. Without one (status,
    aggregate, bundle export), the only thing read from the unverified bytes is the key the
    spec names, through the bounded TOML reader; the document is validated only once that
    key's signature verifies. Every failure is one line and exit 4.
    """
    check_size(len(data), MAX_SPEC_BYTES, what)
    check_size(len(signature), MAX_SIG_BYTES, f"{what} signature")
    sig = signature.decode("ascii", "replace")
    if pinned is not None:
        try:
            verify_bytes(data, sig, pinned, what)
        except VerificationError:
            raise VerificationError(
                f"{what}: signature does not verify with the pinned coordinator key "
                f"{pinned.fingerprint}: refusing to trust this store (another federation's, or tampered)"
            ) from None
        raw = load_toml(data, what, MAX_SPEC_BYTES, ContractError)
        spec = parse(raw, what, ContractError)
        if spec.coordinator.ed25519 != pinned.ed25519:
            raise VerificationError(
                f"the federation spec names coordinator key {spec.coordinator.fingerprint}, "
                f"but you pinned {pinned.fingerprint}: refusing to trust this store"
            )
        return spec
    raw = load_toml(data, what, MAX_SPEC_BYTES, ContractError)
    coordinator = raw.get("federation", {}).get("coordinator", {}) if isinstance(raw.get("federation"), dict) else {}
    key = coordinator.get("ed25519") if isinstance(coordinator, dict) else None
    if not isinstance(key, str):
        raise ContractError(f"{what} names no coordinator key ([federation.coordinator] ed25519)")
    verify_bytes(data, sig, PublicIdentity("the named coordinator", key), what)
    return parse(raw, what, ContractError)


def read_template(path: Path) -> bytes:
    """A user's spec template: a regular file of at most MAX_SPEC_BYTES, checked before reading."""
    from fedcli.files import read_bounded

    data = read_bounded(Path(path), MAX_SPEC_BYTES, "spec template", InputError)
    if data is None:
        raise InputError(f"cannot read spec template {path}: No such file or directory")
    return data


def dumps(raw: dict) -> bytes:
    return tomli_w.dumps(raw).encode("utf-8")


# --------------------------------------------------------------------------- what is in force


def summary(spec: Spec) -> list[tuple[str, str]]:
    """(setting, plain words) rows of what this spec puts in force: printed by init, train and `spec show`.

    A value starting with NO_DP or NO_SECAGG means a protection is off (callers show it in yellow).
    """
    m, p, s, sa, t = spec.model, spec.privacy, spec.strategy, spec.secagg, spec.training
    model = f"{m.kind} on {spec.data.n_features} features"
    if spec.data.statistics == "federated" and spec.statistics_sha256 is None:
        model = f"{m.kind} on {len(spec.data.numeric)} numeric and {len(spec.data.categorical)} categorical columns"
    if m.kind == "mlp":
        model += f", hidden layers {', '.join(map(str, m.hidden))}"
    training = f"{t.epochs} epochs, batch size {t.batch_size}, learning rate {t.lr:g}"
    if t.pos_weight != 1:
        training += f", positive class weight {t.pos_weight:g}"
    if p.enabled:
        unit = (
            "record-level (DP-SGD, one customer row)" if p.mode == "record" else "update-level (a bank's whole update)"
        )
        noise = (
            f"noise multiplier {p.noise_multiplier:g}"
            if p.noise_multiplier is not None
            else f"target epsilon {p.target_epsilon:g} over {p.rounds} rounds"
        )
        dp = f"{unit}: budget epsilon {p.budget_epsilon:g} at delta {p.delta:g}, clip {p.clip:g}, {noise}"
    else:
        dp = NO_DP
    if sa.enabled:
        secagg = (
            f"on: the coordinator sees only the sum; clip {sa.clip:g}, DP noise {sa.noise}, threshold {sa.threshold}"
        )
    else:
        secagg = f"{NO_SECAGG}: the coordinator sees each bank's update"
    strategy = f"{s.mode}, rule {s.rule}, server optimiser {s.server}"
    if s.server_params:
        strategy += " (" + ", ".join(f"{k} {v:g}" for k, v in s.server_params.items()) + ")"
    if s.max_norm > 0:
        strategy += f", updates scaled to L2 norm <= {s.max_norm:g}"
    if s.prox_mu > 0:
        strategy += f", FedProx mu {s.prox_mu:g}"
    if s.mode == "async":
        strategy += (
            f", publish every {s.buffer_size} updates, ignore staleness > {s.max_staleness} ({s.discount} discount)"
        )
    compression = {"none": "none", "int8": "int8 (8-bit quantised updates)"}.get(
        s.compression, f"topk: {s.topk_ratio:g} of the coordinates"
    )
    quorum = f"{spec.min_clients} of {len(spec.members)} members"
    quorum += (
        f", or all of them within {spec.deadline_minutes:g} minutes"
        if spec.deadline_minutes > 0
        else ", publish as soon as reached"
    )
    return [
        ("model", model),
        ("training", training),
        ("differential privacy", dp),
        ("secure aggregation", secagg),
        ("strategy", strategy),
        ("compression", compression),
        ("quorum", quorum),
        ("max rows per member", f"{spec.max_rows_per_member:,}"),
        *_lifetime(spec),
        ("holdout evaluation", _holdout_summary(spec)),
        *_statistics_summary(spec),
        *(
            [("roster changes", f"countersigned by {spec.roster_countersign} members")]
            if spec.roster_countersign
            else []
        ),
    ]


def _lifetime(spec: Spec) -> list[tuple[str, str]]:
    """The planned end and the freshness bound, when the spec sets them."""
    rows = []
    if spec.rounds is not None:
        rows.append(("planned rounds", f"{spec.rounds}, then a signed final marker ends the federation"))
    if spec.max_round_age is not None:
        rows.append(("max round age", f"{spec.max_round_age:g} hours: an older newest global is refused"))
    return rows


def _holdout_summary(spec: Spec) -> str:
    share = spec.evaluation.holdout
    if share == 0:
        return "off: no rows held out, no federated evaluation"
    published = f"each bank publishes signed {spec.evaluation.bins}-bin score histograms of the global it starts from"
    if spec.privacy.enabled:
        published += (
            f", counts only, with Gaussian noise (multiplier {spec.evaluation.noise:g}, sensitivity 1), each one a "
            "record-level release charged to the bank's ledger"
        )
    alone = "; each bank also scores a model trained on its own rows alone" if spec.evaluation.baseline else ""
    if spec.evaluation.baseline and spec.privacy.enabled:
        alone += " (kept at the bank under DP)"
    return f"{share * 100:g}% of each bank's rows held out, never trained on; {published}{alone}"


def _statistics_summary(spec: Spec) -> list[tuple[str, str]]:
    """A row only for federated statistics (declared ones are the spec's own numbers)."""
    if spec.data.statistics != "federated":
        return []
    if spec.statistics_sha256 is None:
        return [("feature statistics", "federated: pending (each bank runs `fedcli stats submit`)")]
    return [("feature statistics", f"federated: statistics document {spec.statistics_sha256[:12]}")]


def settings(spec: Spec) -> list[tuple[str, str, bool]]:
    """Every setting of the spec as (key, value, set in the file?) rows, defaults resolved (`spec show`)."""
    doc: SpecDocument = spec.document
    derived = {
        "federation.min_clients": spec.min_clients,
        "strategy.async.buffer_size": spec.strategy.buffer_size,
        "privacy.budget_epsilon": spec.privacy.budget_epsilon,
    }
    server = _server_params(spec.strategy)
    rows: list[tuple[str, str, bool]] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, f in type(model).model_fields.items():
            key = f"{prefix}{f.alias or name}"
            value = getattr(model, name)
            explicit = name in model.model_fields_set
            if key in ("members", "federation.coordinator", "data.numeric", "data.categorical"):
                continue
            if isinstance(value, BaseModel):
                walk(value, key + ".")
                continue
            if prefix == "strategy.server." and name != "optimizer":
                if name not in server:
                    continue
                value = server[name]
            value = derived.get(key, value)
            if value is None:
                continue
            rows.append((key, _show(value), explicit))

    walk(doc, "")
    pending = spec.data.statistics == "federated" and spec.statistics_sha256 is None
    for numeric in spec.data.numeric:
        shown = "pending (federated statistics)" if pending else f"mean {numeric.mean:g}, std {numeric.std:g}"
        rows.append((f"data.numeric {numeric.name}", shown, True))
    for categorical in spec.data.categorical:
        levels = categorical.levels
        shown = "pending (federated statistics)" if pending else f"{len(levels)} levels: {', '.join(levels)}"
        rows.append((f"data.categorical {categorical.name}", shown, True))
    return rows


def _server_params(strategy: StrategySpec) -> dict[str, float]:
    from fedcli.aggregation.server_opt import check_params

    return check_params(strategy.server, strategy.server_params)


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
