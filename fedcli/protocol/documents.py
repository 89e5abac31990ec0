"""The round documents' contracts: one strict pydantic class per signed JSON file of a round.

A document from the store is trusted only in this order: size bound (Store.get), depth bound
and parse (contract.load_json inside keys.verify_manifest), signature over the canonical JSON,
then `parse` here into its class. Unknown keys are refused with their path and a "did you mean";
every number has a type and a range, every float is finite. The classes only check: the JSON
that is signed is still built as a plain dict (so its bytes are what they always were) and is
validated against its class before the coordinator signs it.

pydantic is imported when this module is, and only the commands that read rounds import it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator

from fedcli.contract import strict_config
from fedcli.errors import REASONS, FedcliError

FORMAT = 1
MAX_ROWS = 10**10  # the largest max_rows_per_member a spec may declare; the spec's own bound is checked after
MAX_MESSAGE = 1000  # characters of a rejection message kept in rejections.json

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # names.check_name's rule
# An update's label: the name its file has on the store (which a planted file may make anything
# printable: status escapes it), plus " (round N)" for an older update folded in by async rounds.
LABEL_PATTERN = r"^[^\x00-\x1f\x7f]{1,200}$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Field(ge=0, le=999_999)]
UpdateRound = Annotated[int, Field(ge=1, le=999_999)]
Count = Annotated[int, Field(ge=0, le=MAX_ROWS)]
Positive = Annotated[float, Field(gt=0)]
Token = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{1,200}={0,2}$")]
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")]
MAX_METRIC = 1e12  # no loss or score is near it; a value beyond it would only wreck status and report's scales
RATES = ("auc", "pr_auc", "ks", "recall", "precision")  # metric names starting so are fractions of 1


def _bounded_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric within ±MAX_METRIC, and every rate (AUC, PR-AUC, recall, ...) within [0, 1].
    Names are open (an older or newer bank may report others), values never are."""
    for name, value in metrics.items():
        if name.startswith(RATES) and not 0 <= value <= 1:
            raise ValueError(f"{name} is {value:g}: a rate lies between 0 and 1")
        if abs(value) > MAX_METRIC:
            raise ValueError(f"{name} is {value:g}: beyond ±{MAX_METRIC:g}")
    return metrics


Metrics = Annotated[dict[MetricName, float], Field(max_length=32), AfterValidator(_bounded_metrics)]


def _iso_time(text: str) -> str:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("is not an ISO 8601 time") from None
    if when.tzinfo is None:  # deadlines subtract it from an aware "now"
        raise ValueError("has no time zone (fedcli writes UTC, e.g. 2026-01-01T00:00:00+00:00)")
    return text


Timestamp = Annotated[str, StringConstraints(max_length=40), AfterValidator(_iso_time)]


class Document(BaseModel):
    model_config = strict_config()


# --- update manifest (a bank's signed commit marker) ---------------------------------------


class DPRecord(Document):
    """The `dp` field: privacy.Mechanism.manifest() plus the spec's delta."""

    mode: Literal["update", "record"]
    mechanism: Literal["gaussian", "dp-sgd"]
    accountant: Literal["rdp"]
    clip: Annotated[float, Field(gt=0, le=1e6)]
    noise_multiplier: Annotated[float, Field(gt=0, le=1e6)]
    sample_rate: Annotated[float, Field(ge=1e-12, le=1)]
    steps: Annotated[int, Field(ge=1, le=10**9)]
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None  # the bank adds the spec's; the spec's is what counts


class Compression(Document):
    """compression.check()'s metadata: the method, and topk's ratio."""

    method: Literal["none", "int8", "topk"]
    ratio: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _ratio_iff_topk(self):
        if (self.ratio is not None) != (self.method == "topk"):
            raise ValueError("ratio is given exactly when method is topk")
        return self


class SecAggRecord(Document):
    """The `secagg` field of a masked update: fixed-point parameters and seed commitments by peer."""

    clip: Positive
    scale: Positive
    noise: Literal["full", "shared"]
    commitments: Annotated[dict[Name, Sha256], Field(max_length=10_000)]
    member_noise_multiplier: Positive | None = None
    # double masking (secagg.sharing): t, the commitment to the self-mask seed, its shares sealed per member
    threshold: Annotated[int, Field(ge=3, le=10_000)] | None = None
    self_commitment: Sha256 | None = None
    shares: Annotated[dict[Name, Base64], Field(max_length=10_000)] | None = None
    # t-of-n shares of every pairwise seed, sealed per member in rounds/N/pairshares/<member>.bin (secagg.pairshares)
    pair_shares_sha256: Sha256 | None = None


class UpdateManifest(Document):
    kind: Literal["update"]
    format: Literal[1]
    federation_id: Name
    round: UpdateRound
    member: Name
    base_sha256: Sha256
    tensors_sha256: Sha256
    num_examples: Annotated[int, Field(ge=1, le=MAX_ROWS)] | None = None  # absent under DP
    compression: Compression | None = None  # absent means none
    metrics: Metrics | None = None  # absent under DP
    created_at: Timestamp
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]
    dp: DPRecord | None = None
    secagg: SecAggRecord | None = None
    spec_sha256: Sha256 | None = None  # the spec version it was made under (protocol.chain); older banks omit it


# --- global manifest (the coordinator's signed aggregate) -----------------------------------


class Aggregation(Document):
    """What the strategy did to one update (strategy.Combiner notes)."""

    norm: Annotated[float, Field(ge=0)] | None = None
    clipped_by: Annotated[float, Field(gt=0, le=1)] | None = None
    staleness: Annotated[int, Field(ge=1, le=999_999)] | None = None
    discount: Annotated[float, Field(ge=0)] | None = None


class Contributor(Document):
    member: Name
    num_examples: Count  # 0 under DP (withheld)
    metrics: Metrics
    bytes: Annotated[int, Field(ge=0, le=1 << 40)]
    update_round: UpdateRound | None = None
    aggregation: Aggregation | None = None


class GlobalSecAgg(Document):
    dropped: Annotated[list[Name], Field(max_length=10_000)]
    scale: Positive
    drops_sha256: Sha256 | None = None


class GlobalManifest(Document):
    kind: Literal["global"]
    format: Literal[1]
    federation_id: Name
    round: Round
    spec_sha256: Sha256
    tensors_sha256: Sha256
    prev_sha256: Sha256 | None  # None only for round 0
    contributors: Annotated[list[Contributor], Field(max_length=10_000)]
    created_at: Timestamp
    rule: Literal["fedavg", "mean", "median", "trimmed_mean", "krum", "secagg-mean"] | None = None  # None: round 0
    mode: Literal["sync", "async"] | None = None
    server_optimizer: Token | None = None
    server_state_sha256: Sha256 | None = None
    max_norm: Positive | None = None
    trim_ratio: Annotated[float, Field(ge=0, le=0.5)] | None = None
    krum_selected: Annotated[list[Label], Field(max_length=10_000)] | None = None
    secagg: GlobalSecAgg | None = None
    statistics_sha256: Sha256 | None = None  # federated statistics: the signed statistics document in force

    @model_validator(mode="after")
    def _chain(self):
        if (self.prev_sha256 is None) != (self.round == 0):
            raise ValueError("prev_sha256 is null exactly for round 0")
        return self


# --- secure aggregation's dropout exchange ----------------------------------------------------


class DropDeclaration(Document):
    kind: Literal["secagg-drops"]
    format: Literal[1]
    federation_id: Name
    round: UpdateRound
    survivors: Annotated[dict[Name, Sha256], Field(max_length=10_000)]
    dropped: Annotated[list[Name], Field(max_length=10_000)]
    created_at: Timestamp
    base_sha256: Sha256 | None = None  # the global every survivor trained on (survivors check it)
    threshold: Annotated[int, Field(ge=3, le=10_000)] | None = None


class RecoveryShares(Document):
    kind: Literal["secagg-recovery"]
    format: Literal[1]
    federation_id: Name
    round: UpdateRound
    member: Name
    drops_sha256: Sha256
    seeds: Annotated[dict[Name, Base64], Field(max_length=10_000)]
    created_at: Timestamp
    self_shares: Annotated[dict[Name, Base64], Field(max_length=10_000)] = Field(default_factory=dict)
    # survivor -> dropped -> my share of the pairwise seed that survivor holds with the dropped member
    pair_shares: Annotated[
        dict[Name, Annotated[dict[Name, Base64], Field(max_length=10_000)]], Field(max_length=10_000)
    ] = Field(default_factory=dict)


# --- rejections (the coordinator's signed word on refused updates) --------------------------


def _known_reason(code: str) -> str:
    if code not in REASONS:
        raise ValueError(f"is not a known reason code ({', '.join(sorted(REASONS))})")
    return code


class Rejection(Document):
    reason: Annotated[str, AfterValidator(_known_reason)]
    message: Annotated[str, StringConstraints(max_length=MAX_MESSAGE)]


class Rejections(Document):
    kind: Literal["rejections"]
    format: Literal[1]
    federation_id: Name
    round: UpdateRound
    entries: Annotated[dict[Label, Rejection], Field(max_length=100_000)]
    created_at: Timestamp


def rejection(e: FedcliError, store_url: str = "") -> dict:
    """One rejections.json entry from the error that refused an update.

    The store's own location (a coordinator's local path) is not every bank's business: replaced.
    """
    message = str(e).replace(store_url, "the store") if store_url else str(e)
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return {"reason": e.reason, "message": message}
