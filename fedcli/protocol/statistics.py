"""Federated feature statistics: the documents of the statistics round and how the spec's data section is filled.

Why: a spec drafted from one bank's sample leaks that bank's means, stds and categories to every
member. With `[data] statistics = "federated"` the spec names only columns and types; before round
1, each bank uploads a signed contribution (counts, sums, sums of squares per numeric feature,
counts per category level) and the coordinator publishes one signed statistics document with the
means, stds and levels every bank then standardises with.

    statistics/<spec sha256[:16]>/<member>.json   a bank's signed contribution (create-only)
    statistics/statistics.json                    the coordinator's signed result (create-only)

Binding: the statistics document names the federation and the spec's sha256, and every global
manifest (round 0 onwards) names the statistics document's sha256, so a bank that verifies a
global also verifies the means and stds it preprocesses with.

Three encodings of a contribution, chosen by the spec:
- plain (no [privacy], no [secagg]): per-feature sums in the column's own units, levels by name;
- noised ([privacy]): a vector in a fixed layout (below), values in public-range units, with
  Gaussian noise added at the bank (a record-level release charged to its ledger);
- masked ([secagg]): the same vector, divided by max_rows_per_member, fixed point and pairwise
  masked with round number 0 (no update round uses it), so only the sum is ever readable.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from fedcli.contract import strict_config, validate
from fedcli.digest import sha256
from fedcli.errors import ContractError, FedcliError, NotFound, VerificationError
from fedcli.keys import MAX_MANIFEST_BYTES, verify_manifest
from fedcli.protocol.spec import MAX_FEATURES, CategoricalFeature, DataSpec, NumericFeature, Spec
from fedcli.store import Store

STATISTICS_KEY = "statistics/statistics.json"
CONTRIBUTION_KIND = "statistics-contribution"
STATISTICS_KIND = "statistics"
FORMAT = 1
MAX_ROWS = 10**10
MAX_VALUE = 1e15  # a bank refuses numbers beyond this (a unit or column mix-up), so sums are bounded by it
MASK_ROUND = 0  # secure aggregation's pairwise seeds for the statistics round: no update round is 0

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Count = Annotated[int, Field(ge=0, le=MAX_ROWS)]
Finite = Annotated[float, Field(ge=-1e30, le=1e30)]
Timestamp = Annotated[str, StringConstraints(max_length=40)]


class _Doc(BaseModel):
    model_config = strict_config()


class NumericSums(_Doc):
    """One numeric column at one bank: how many cells held a number, their sum and sum of squares."""

    count: Count
    sum: Finite
    sum_squares: Annotated[float, Field(ge=0, le=1e30)]
    histogram: Annotated[list[Count], Field(max_length=1000)] | None = None  # rows per bin over the range (bins > 0)


class StatisticsDP(_Doc):
    """The Gaussian noise a bank added to its vector: noise std = noise_multiplier * sensitivity."""

    mechanism: Literal["gaussian"]
    accountant: Literal["rdp"]
    noise_multiplier: Annotated[float, Field(gt=0, le=1e6)]
    sensitivity: Annotated[float, Field(gt=0, le=1e6)]


class StatisticsSecAgg(_Doc):
    """The fixed point a masked vector was encoded with (the spec decides both; checked against it)."""

    scale: Annotated[float, Field(gt=0)]
    unit: Annotated[int, Field(ge=1, le=MAX_ROWS)]  # the vector was divided by this (max_rows_per_member)


class Contribution(_Doc):
    """A bank's signed contribution to the statistics round."""

    kind: Literal["statistics-contribution"]
    format: Literal[1]
    federation_id: Name
    member: Name
    spec_sha256: Sha256
    created_at: Timestamp
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]
    rows: Count | None = None  # plain
    numeric: Annotated[dict[Text, NumericSums], Field(max_length=MAX_FEATURES)] | None = None  # plain
    categorical: (
        Annotated[dict[Text, Annotated[dict[Text, Count], Field(max_length=1000)]], Field(max_length=MAX_FEATURES)]
        | None
    ) = None
    values: Annotated[list[Finite], Field(max_length=4 * MAX_FEATURES)] | None = None  # noised, no secagg
    masked: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=120_000)] | None = None
    dp: StatisticsDP | None = None
    secagg: StatisticsSecAgg | None = None


class NumericResult(_Doc):
    name: Text
    mean: Annotated[float, Field(ge=-1e15, le=1e15)]
    std: Annotated[float, Field(gt=0, le=1e15)]
    count: Annotated[float, Field(ge=0, le=1e12)]  # noised under DP: not an integer
    deciles: Annotated[list[Annotated[float, Field(ge=-1e15, le=1e15)]], Field(min_length=9, max_length=9)] | None = (
        None  # 10 %, 20 %, ... 90 % quantiles from the pooled histogram (bins > 0): cut points for binning
    )


class CategoricalResult(_Doc):
    name: Text
    levels: Annotated[list[Text], Field(min_length=1, max_length=1000)]


class StatisticsDocument(_Doc):
    """The coordinator's signed statistics: what fills the spec's data section for every bank."""

    kind: Literal["statistics"]
    format: Literal[1]
    federation_id: Name
    spec_sha256: Sha256
    created_at: Timestamp
    contributors: Annotated[list[Name], Field(min_length=1, max_length=1000)]
    rows: Annotated[float, Field(ge=0, le=1e12)]
    encoding: Literal["plain", "noised", "masked"]
    numeric: Annotated[list[NumericResult], Field(max_length=MAX_FEATURES)]
    categorical: Annotated[list[CategoricalResult], Field(max_length=MAX_FEATURES)]


# --------------------------------------------------------------------------- where things are


def contributions_prefix(spec_sha: str) -> str:
    """A fresh folder per spec: contributions to another spec (a re-run init) are never mistaken for these."""
    return f"statistics/{spec_sha[:16]}"


def contribution_key(spec_sha: str, member: str) -> str:
    return f"{contributions_prefix(spec_sha)}/{member}.json"


def federated(spec: Spec) -> bool:
    return spec.data.statistics == "federated"


def pending(spec: Spec) -> bool:
    """Federated statistics not published yet: no global model may exist, no bank may train."""
    return federated(spec) and spec.statistics_sha256 is None


def encoding(spec: Spec) -> str:
    if spec.secagg.enabled:
        return "masked"
    return "noised" if spec.privacy.enabled else "plain"


# --------------------------------------------------------------------------- the vector layout


def layout(data: DataSpec) -> list[str]:
    """Entry names of the noised and masked vector: rows, then count, sum, sum of squares per numeric
    feature (in public-range units), then the count of every candidate level. Fixed by the spec."""
    names = ["rows"]
    for f in data.numeric:
        names += [f"{f.name}:count", f"{f.name}:sum", f"{f.name}:sum_squares"]
    for c in data.categorical:
        names += [f"{c.name}={level}" for level in c.levels]
    for f in data.numeric:
        names += [f"{f.name}#bin{k}" for k in range(f.bins)]
    return names


def sensitivity(data: DataSpec) -> float:
    """L2 change of the vector when one row is added or removed: 1 (rows), at most 1 each for a numeric
    feature's count, |sum| and sum of squares (values in [-1, 1]), 1 per categorical feature, and 1 per
    binned feature's histogram."""
    binned = sum(1 for f in data.numeric if f.bins)
    return math.sqrt(1 + 3 * len(data.numeric) + len(data.categorical) + binned)


def unit_scale(f: NumericFeature) -> tuple[float, float]:
    """(centre, half width) of a numeric feature's public range: u = (x - centre) / half width lies in [-1, 1]."""
    if f.range is None:
        raise FedcliError(f"[data] numeric feature {f.name!r} has no range")
    low, high = f.range
    return (low + high) / 2, (high - low) / 2


# --------------------------------------------------------------------------- reading and checking


def verify_contribution(store: Store, spec: Spec, spec_sha: str, member: str) -> Contribution:
    """One bank's contribution: bounded read, its member's signature, contract, place and encoding.

    Refused (with a reason code): a non-member, a forged or foreign signature, an oversized or
    malformed file, a contribution to another federation or spec (a replay), a layout or encoding
    other than the spec's, DP weaker than the spec's.
    """
    what = f"statistics contribution from {member}"
    signer = spec.member(member)
    if signer is None:
        raise VerificationError(f"{what}: {member!r} is not an enrolled member", reason="not-member")
    try:
        data = store.get(contribution_key(spec_sha, member), max_bytes=MAX_MANIFEST_BYTES)
    except NotFound:
        raise VerificationError(f"{what}: missing", reason="missing") from None
    doc = validate(Contribution, verify_manifest(data, signer, what), what)
    for name, want in (("kind", CONTRIBUTION_KIND), ("federation_id", spec.federation_id), ("member", member)):
        if getattr(doc, name) != want:
            raise VerificationError(
                f"{what}: {name} is {getattr(doc, name)!r}, expected {want!r}", reason="wrong-round"
            )
    if doc.spec_sha256 != spec_sha:
        raise VerificationError(f"{what}: made for another spec (a replay?)", reason="wrong-round")
    _check_encoding(doc, spec, what)
    return doc


def _check_encoding(doc: Contribution, spec: Spec, what: str) -> None:
    kind = encoding(spec)
    fields = {"plain": doc.rows is not None, "noised": doc.values is not None, "masked": doc.masked is not None}
    if [k for k, present in fields.items() if present] != [kind]:
        raise ContractError(f"{what}: not encoded as the spec requires ({kind})")
    if kind == "plain":
        _check_plain(doc, spec, what)
        return
    if spec.privacy.enabled and (doc.dp is None or doc.dp.noise_multiplier < spec.data.statistics_noise):
        raise VerificationError(f"{what}: weaker noise than the spec's statistics_noise", reason="weak-privacy")
    if spec.privacy.enabled and not math.isclose(doc.dp.sensitivity, sensitivity(spec.data)):  # type: ignore[union-attr]
        raise ContractError(f"{what}: noise calibrated to another sensitivity than the spec's")
    if kind == "noised" and len(doc.values or ()) != len(layout(spec.data)):
        raise ContractError(f"{what}: {len(doc.values or ())} values, the spec's layout has {len(layout(spec.data))}")
    if kind == "masked" and (doc.secagg is None or doc.secagg.unit != spec.max_rows_per_member):
        raise ContractError(f"{what}: masked with another unit than the spec's max_rows_per_member")


def _check_plain(doc: Contribution, spec: Spec, what: str) -> None:
    numeric, categorical = doc.numeric or {}, doc.categorical or {}
    want_numeric = [f.name for f in spec.data.numeric]
    want_categorical = [c.name for c in spec.data.categorical]
    if sorted(numeric) != sorted(want_numeric) or sorted(categorical) != sorted(want_categorical):
        raise ContractError(f"{what}: its columns are not the spec's")
    rows = doc.rows or 0
    if rows > spec.max_rows_per_member:
        raise ContractError(f"{what}: {rows:,} rows, more than the spec's max_rows_per_member")
    bins = {f.name: f.bins for f in spec.data.numeric}
    for name, sums in numeric.items():
        if len(sums.histogram or ()) != bins[name] or sum(sums.histogram or ()) > rows:
            raise ContractError(f"{what}: column {name}'s histogram does not have the spec's {bins[name]} bins")
        if sums.count > rows:
            raise ContractError(f"{what}: column {name} counts more values than rows")
        if not _possible(sums):
            raise ContractError(f"{what}: column {name}'s sums cannot come from numbers within ±{MAX_VALUE:g}")
    for c in spec.data.categorical:
        counts = categorical[c.name]
        if len(counts) > c.max_levels or sum(counts.values()) > rows:
            raise ContractError(f"{what}: column {c.name} reports more levels or rows than allowed")
        if c.levels and set(counts) - set(c.levels):
            raise ContractError(f"{what}: column {c.name} reports levels the spec does not list")


def _possible(sums: NumericSums) -> bool:
    """Sums that `count` numbers within ±MAX_VALUE can have: |sum| <= count * MAX_VALUE, sum of squares at most
    count * MAX_VALUE**2 and at least sum**2 / count (Cauchy-Schwarz). A bank cannot blow up a pooled std."""
    n = sums.count
    if n == 0:
        return sums.sum == 0 and sums.sum_squares == 0
    slack = 1 + 1e-9  # float rounding of honest sums
    return (
        abs(sums.sum) <= n * MAX_VALUE * slack
        and sums.sum_squares <= n * MAX_VALUE**2 * slack
        and sums.sum * sums.sum <= n * sums.sum_squares * slack
    )


def load_statistics(store: Store, spec: Spec, spec_sha: str) -> tuple[StatisticsDocument, str] | None:
    """The coordinator's signed statistics document and its sha256; None while it is not published."""
    what = "statistics document"
    try:
        data = store.get(STATISTICS_KEY, max_bytes=MAX_MANIFEST_BYTES)
    except NotFound:
        return None
    doc = validate(StatisticsDocument, verify_manifest(data, spec.coordinator, what), what)
    if doc.kind != STATISTICS_KIND or doc.federation_id != spec.federation_id or doc.spec_sha256 != spec_sha:
        raise VerificationError(f"{what}: made for another federation or spec", reason="wrong-round")
    return doc, sha256(data)


def resolve(store: Store, spec: Spec, spec_sha: str) -> Spec:
    """The spec with its data section filled from the verified statistics document (unchanged when
    statistics are declared, or still pending)."""
    if not federated(spec):
        return spec
    found = load_statistics(store, spec, spec_sha)
    return spec if found is None else apply(spec, *found)


def apply(spec: Spec, doc: StatisticsDocument, doc_sha: str) -> Spec:
    """The spec's data section with the document's means, stds and levels; its features must be the spec's."""
    what = "statistics document"
    data = spec.data
    if [n.name for n in doc.numeric] != [f.name for f in data.numeric] or [c.name for c in doc.categorical] != [
        c.name for c in data.categorical
    ]:
        raise ContractError(f"{what}: its features are not the spec's")
    categorical = []
    for c, result in zip(data.categorical, doc.categorical, strict=True):
        if len(set(result.levels)) != len(result.levels) or len(result.levels) > c.max_levels:
            raise ContractError(f"{what}: levels of {c.name} are repeated or more than max_levels")
        if c.levels and set(result.levels) - set(c.levels):
            raise ContractError(f"{what}: levels of {c.name} are not among the spec's candidates")
        categorical.append(CategoricalFeature(c.name, tuple(result.levels), c.max_levels))
    numeric = tuple(replace(f, mean=r.mean, std=r.std) for f, r in zip(data.numeric, doc.numeric, strict=True))
    filled = replace(data, numeric=numeric, categorical=tuple(categorical))
    if filled.n_features > MAX_FEATURES:
        raise ContractError(f"{what}: {filled.n_features} model inputs, more than {MAX_FEATURES}")
    return replace(spec, data=filled, statistics_sha256=doc_sha)


def check_global(spec: Spec, manifest: dict, what: str) -> None:
    """A global model under federated statistics must name the statistics document in force."""
    if not federated(spec):
        return
    if spec.statistics_sha256 is None:
        raise VerificationError(
            f"{what} exists but the federation's statistics document does not: refusing to trust this store",
            reason="missing",
        )
    if manifest.get("statistics_sha256") != spec.statistics_sha256:
        raise VerificationError(f"{what}: names another statistics document than the store's", reason="bad-hash")


def contributors(store: Store, spec_sha: str) -> list[str]:
    """Names under which a contribution file exists (unverified: `fedcli stats aggregate` checks each)."""
    prefix = contributions_prefix(spec_sha) + "/"
    names = [k[len(prefix) :].removesuffix(".json") for k in store.list(prefix.rstrip("/")) if k.endswith(".json")]
    return sorted(n for n in names if n.isprintable())
