"""The federation spec (TOML): who is in, which model, which features, how to train.

The coordinator signs it at `fedcli init`; every bank verifies it against the pinned
coordinator key before using anything in it, so preprocessing and hyper-parameters are
identical everywhere and cannot be changed behind a bank's back.
"""

import hashlib
import math
import tomllib
from dataclasses import dataclass, field

import tomli_w

from .errors import FedcliError
from .keys import PublicIdentity
from .names import check_name
from .privacy import PrivacySpec, parse_privacy
from .strategy import StrategySpec
from .strategy import parse as parse_strategy

MODEL_KINDS = ("logreg", "mlp")


@dataclass(frozen=True)
class NumericFeature:
    name: str
    mean: float
    std: float


@dataclass(frozen=True)
class CategoricalFeature:
    name: str
    levels: tuple[str, ...]


@dataclass(frozen=True)
class DataSpec:
    target: str
    positive: str
    numeric: tuple[NumericFeature, ...]
    categorical: tuple[CategoricalFeature, ...]

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


@dataclass(frozen=True)
class SecAggSpec:
    """[secagg]: pairwise-masked updates so the coordinator sees only their sum."""

    enabled: bool = False
    clip: float = 10.0  # each update coordinate is clipped to [-clip, clip] before fixed point
    noise: str = "full"  # DP noise per bank: "full" or "shared" (see docs/security.md)


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

    def member(self, name: str) -> PublicIdentity | None:
        return next((m for m in self.members if m.name == name), None)

    def member_by_key(self, ed25519_b64: str) -> PublicIdentity | None:
        return next((m for m in self.members if m.ed25519 == ed25519_b64), None)


def _get(table: dict, key: str, kind, where: str, default=None):
    if key not in table:
        if default is None:
            raise FedcliError(f"federation spec: [{where}] needs '{key}'")
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
    if not ok:
        raise FedcliError(f"federation spec: [{where}] '{key}' has the wrong type ({type(value).__name__})")
    return value


def _positive(value, name: str, where: str):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise FedcliError(f"federation spec: [{where}] '{name}' must be a positive number")
    return value


def parse(raw: dict) -> Spec:
    """Validate a spec dict and build a Spec; every problem names the field."""
    fed = _get(raw, "federation", dict, "federation")
    fid = check_name(_get(fed, "id", str, "federation"), "federation id")
    coord = _get(fed, "coordinator", dict, "federation")
    coordinator = PublicIdentity(
        name=check_name(_get(coord, "name", str, "federation.coordinator"), "coordinator name"),
        ed25519=_get(coord, "ed25519", str, "federation.coordinator"),
    )
    coordinator.key()

    members = []
    for m in _get(raw, "members", list, "members"):
        ident = PublicIdentity(name=check_name(_get(m, "name", str, "members"), "member name"),
                               ed25519=_get(m, "ed25519", str, "members"),
                               x25519=_get(m, "x25519", str, "members", default=""))
        ident.key()
        if ident.x25519:
            ident.mask_key()
        members.append(ident)
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise FedcliError("federation spec: member names must be unique")
    if len({m.ed25519 for m in members}) != len(members):
        raise FedcliError("federation spec: two members share a public key")
    if not members:
        raise FedcliError("federation spec: no members enrolled")

    min_clients = _get(fed, "min_clients", int, "federation", default=min(2, len(members)))
    if not 1 <= min_clients <= len(members):
        raise FedcliError(f"federation spec: min_clients must be between 1 and the number of members ({len(members)})")
    deadline = _get(fed, "deadline_minutes", (int, float), "federation", default=0)
    max_rows = _get(fed, "max_rows_per_member", int, "federation", default=100_000_000)
    if deadline < 0:
        raise FedcliError("federation spec: deadline_minutes must be >= 0")

    m = _get(raw, "model", dict, "model")
    kind = _get(m, "kind", str, "model")
    if kind not in MODEL_KINDS:
        raise FedcliError(f"federation spec: [model] kind must be one of {', '.join(MODEL_KINDS)}")
    hidden = tuple(_get(m, "hidden", list, "model", default=[32]))
    if kind == "mlp" and (not hidden or any(not isinstance(h, int) or h <= 0 for h in hidden)):
        raise FedcliError("federation spec: [model] hidden must be a list of positive integers")
    model = ModelSpec(kind=kind, hidden=hidden, seed=_get(m, "seed", int, "model", default=0))

    d = _get(raw, "data", dict, "data")
    numeric = []
    for f in _get(d, "numeric", list, "data", default=[]):
        nf = NumericFeature(name=_get(f, "name", str, "data.numeric"),
                            mean=float(_get(f, "mean", (int, float), "data.numeric")),
                            std=float(_get(f, "std", (int, float), "data.numeric")))
        _positive(nf.std, f"std of {nf.name}", "data.numeric")
        if not math.isfinite(nf.mean):
            raise FedcliError(f"federation spec: mean of {nf.name} must be finite")
        numeric.append(nf)
    categorical = []
    for f in _get(d, "categorical", list, "data", default=[]):
        levels = tuple(str(x) for x in _get(f, "levels", list, "data.categorical"))
        if not levels or len(set(levels)) != len(levels):
            raise FedcliError(f"federation spec: levels of {f.get('name')} must be non-empty and unique")
        categorical.append(CategoricalFeature(name=_get(f, "name", str, "data.categorical"), levels=levels))
    cols = [f.name for f in numeric] + [f.name for f in categorical]
    if not cols:
        raise FedcliError("federation spec: [data] declares no features")
    if len(set(cols)) != len(cols):
        raise FedcliError("federation spec: a feature is declared twice")
    target = _get(d, "target", str, "data")
    if target in cols:
        raise FedcliError(f"federation spec: the target {target!r} is also declared as a feature")
    data = DataSpec(target=target, positive=str(_get(d, "positive", (str, int), "data")),
                    numeric=tuple(numeric), categorical=tuple(categorical))

    t = _get(raw, "training", dict, "training", default={})
    training = TrainingSpec(
        epochs=_get(t, "epochs", int, "training", default=5),
        batch_size=_get(t, "batch_size", int, "training", default=64),
        lr=float(_get(t, "lr", (int, float), "training", default=0.01)),
    )
    if training.epochs < 1 or training.batch_size < 1:
        raise FedcliError("federation spec: [training] epochs and batch_size must be >= 1")
    _positive(training.lr, "lr", "training")

    privacy = parse_privacy(raw.get("privacy"))
    strategy = parse_strategy(raw.get("strategy"), len(members), min_clients)
    if strategy.prox_mu > 0 and privacy.mode == "record":
        raise FedcliError("federation spec: [strategy] prox_mu (FedProx) is not supported with record-level DP "
                          "(DP-SGD); use [privacy] mode = \"update\" or prox_mu = 0")
    secagg = _parse_secagg(_get(raw, "secagg", dict, "secagg", default={}), members, min_clients, privacy.mode,
                           strategy)
    return Spec(federation_id=fid, coordinator=coordinator, min_clients=min_clients,
                deadline_minutes=float(deadline), max_rows_per_member=max_rows, model=model, data=data, training=training,
                members=tuple(members), raw=raw, privacy=privacy, strategy=strategy, secagg=secagg)


def _parse_secagg(t: dict, members: list[PublicIdentity], min_clients: int, privacy_mode: str,
                  strategy: StrategySpec) -> SecAggSpec:
    """Secure aggregation needs every member's X25519 key and at least 2 survivors per round."""
    from .secagg import fixed_point_scale, member_noise_multiplier

    enabled = _get(t, "enabled", bool, "secagg", default=False)
    clip = float(_positive(_get(t, "clip", (int, float), "secagg", default=SecAggSpec.clip), "clip", "secagg"))
    noise = _get(t, "noise", str, "secagg", default=SecAggSpec.noise)
    if not enabled:
        return SecAggSpec(False, clip, noise)
    member_noise_multiplier(1.0, noise, max(2, min_clients))  # validates the mode
    if noise == "shared" and privacy_mode != "update":
        raise FedcliError('federation spec: [secagg] noise = "shared" splits update-level DP noise across banks; '
                          'it needs [privacy] mode = "update"')
    if strategy.mode != "sync" or strategy.rule != "fedavg" or strategy.max_norm > 0 or strategy.compression != "none":
        raise FedcliError("federation spec: [secagg] needs [strategy] mode = \"sync\", rule = \"fedavg\", no max_norm and "
                          "no compression: the coordinator only sees the sum, never one update (server optimisers and "
                          "prox_mu are fine)")
    missing = [m.name for m in members if not m.x25519]
    if missing:
        raise FedcliError(f"federation spec: [secagg] is enabled but {', '.join(missing)} enrolled no x25519 key "
                          "(re-run `fedcli keygen` and enrol the new .pub)")
    if len({m.x25519 for m in members}) != len(members):
        raise FedcliError("federation spec: two members share an x25519 key")
    if len(members) < 2 or min_clients < 2:
        raise FedcliError("federation spec: [secagg] needs at least 2 members and min_clients >= 2 "
                          "(a sum of one update is that update)")
    fixed_point_scale(clip, len(members))  # fails early if the roster cannot fit in 32 bits
    return SecAggSpec(True, clip, noise)


def loads(data: bytes, what: str = "federation spec") -> Spec:
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedcliError(f"{what} is not valid TOML: {e}") from None
    return parse(raw)


def dumps(raw: dict) -> bytes:
    return tomli_w.dumps(raw).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


from .spec_summary import summary  # noqa: E402,F401  STUB (bank branch): replaced by the spec branch
