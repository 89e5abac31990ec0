"""The coordinator's part of the statistics round: verify contributions, sum them, publish the statistics and round 0.

A contribution that fails a check (signature, contract, place, encoding, DP) is refused with its
reason and left out; the round publishes once the spec's quorum (`min_clients`) is in, or, with
secure aggregation, once every member is in (the masks only cancel over the whole roster: a bank
that never contributes blocks the statistics round, and the coordinator waits, exit 3).
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcli import digest, keys, models
from fedcli.contract import validate
from fedcli.errors import AlreadyExists, ContractError, FedcliError, InputError, VerificationError
from fedcli.names import check_name
from fedcli.protocol import rounds
from fedcli.protocol import statistics as stats
from fedcli.protocol.spec import Spec
from fedcli.store import Store


@dataclass
class StatsResult:
    """What `fedcli stats aggregate` reports."""

    published: bool
    message: str
    waiting: bool = False  # quorum not reached: the message says why (exit 3)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, dict] = field(default_factory=dict)  # member -> {"reason", "message"}
    missing: list[str] = field(default_factory=list)
    document: stats.StatisticsDocument | None = None


def pending(store: Store) -> bool:
    """Whether this store's federation still needs its statistics round (aggregate then runs it instead).
    Any failure to tell is False: aggregate's own checks then report it."""
    try:
        spec, _ = rounds.load_spec(store, None)
    except FedcliError:
        return False
    return stats.federated(spec) and (stats.pending(spec) or not store.exists(rounds.global_keys(0)[1]))


def aggregate(store: Store, key_path: Path) -> StatsResult:
    """Verify the contributions, and at quorum publish the signed statistics document and round 0's global."""
    private, pub_b64 = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, None)
    if pub_b64 != spec.coordinator.ed25519:
        raise VerificationError(f"{key_path} is not the coordinator key of federation {spec.federation_id}")
    if not stats.federated(spec):
        raise InputError(f"federation {spec.federation_id} declares its statistics in the spec: no statistics round")
    if not stats.pending(spec):
        published = _publish_round0(store, private, spec, spec_sha)
        message = "published round 0" if published else "the statistics and round 0 are published; nothing to do"
        return StatsResult(published, message)
    result, docs = collect(store, spec, spec_sha)
    result.message = _waiting_for(spec, docs)
    if result.message:
        result.waiting = True
        return result
    document = combine(spec, spec_sha, docs)
    data = keys.sign_manifest(private, document)
    try:
        store.put(stats.STATISTICS_KEY, data, create_only=True)
    except AlreadyExists:
        raise FedcliError("the statistics were published by another run meanwhile") from None
    resolved = stats.apply(
        spec, validate(stats.StatisticsDocument, document, "statistics document"), digest.sha256(data)
    )
    _publish_round0(store, private, resolved, spec_sha)
    result.published = True
    result.document = validate(stats.StatisticsDocument, document, "statistics document")
    result.message = (
        f"published the statistics of {len(docs)} contributions ({stats.encoding(spec)}) and round 0's global model"
    )
    return result


def _publish_round0(store: Store, private, spec: Spec, spec_sha: str) -> bool:
    from fedcli.coordinator.federation import publish_global

    if store.exists(rounds.global_keys(0)[1]):
        return False
    weights = models.initial(spec.model, spec.data.n_features)
    try:
        publish_global(store, private, spec, spec_sha, 0, weights, prev_sha=None, contributors=[])
    except AlreadyExists:
        return False
    return True


# --------------------------------------------------------------------------- verify


def collect(store: Store, spec: Spec, spec_sha: str) -> tuple[StatsResult, dict[str, stats.Contribution]]:
    """Every contribution on the store, verified; refused ones with their reason."""
    result = StatsResult(False, "")
    docs: dict[str, stats.Contribution] = {}
    prefix = stats.contributions_prefix(spec_sha) + "/"
    for key in sorted(store.list(prefix.rstrip("/"))):
        name = key[len(prefix) :].removesuffix(".json")
        try:
            check_name(name, "member")
            doc = stats.verify_contribution(store, spec, spec_sha, name)
            if doc.masked is not None:
                _unmasked_words(doc, spec, f"statistics contribution from {name}")
            docs[name] = doc
        except FedcliError as e:
            if e.exit_code == 5:  # the store itself failed: not the contribution's fault
                raise
            label = name if name.isprintable() else repr(name)
            result.rejected[label[:200]] = {"reason": e.reason, "message": str(e)}
    result.accepted = sorted(docs)
    result.missing = [m.name for m in spec.members if m.name not in docs and m.name not in result.rejected]
    return result, docs


def _waiting_for(spec: Spec, docs: dict) -> str:
    """Why the statistics round cannot publish yet ("" when it can)."""
    have = len(docs)
    if stats.encoding(spec) == "masked" and have < len(spec.members):
        return f"statistics round: {have} of {len(spec.members)} valid contributions in; secure aggregation needs every member's"
    if have < spec.min_clients:
        return f"statistics round: {have} valid contribution(s), quorum is {spec.min_clients}"
    if spec.deadline_minutes > 0 and have < len(spec.members) and not _deadline_passed(spec, docs):
        return f"statistics round: {have} of {len(spec.members)} in; waiting for the rest until the deadline"
    return ""


def _deadline_passed(spec: Spec, docs: dict[str, stats.Contribution]) -> bool:
    from datetime import UTC, datetime

    try:
        first = min(datetime.fromisoformat(d.created_at) for d in docs.values())
        return (datetime.now(UTC) - first).total_seconds() >= spec.deadline_minutes * 60
    except (TypeError, ValueError):  # an unreadable time: do not wait on it
        return True


def _unmasked_words(doc: stats.Contribution, spec: Spec, what: str) -> np.ndarray:
    """A masked contribution's uint32 words: the spec's length and fixed point, or refused."""
    from fedcli.secagg import masking

    try:
        raw = base64.b64decode(doc.masked or "", validate=True)
    except ValueError:
        raise ContractError(f"{what}: masked values are not base64") from None
    n = 2 * len(stats.layout(spec.data))  # two words per value (bank.statistics._masked)
    if len(raw) != 4 * n:
        raise ContractError(f"{what}: {len(raw) // 4} masked values, the spec's layout has {n}", reason="secagg")
    if doc.secagg is None or doc.secagg.scale != masking.fixed_point_scale(1.0, len(spec.members)):
        raise ContractError(f"{what}: masked with another fixed point than the spec's", reason="secagg")
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


# --------------------------------------------------------------------------- combine


def combine(spec: Spec, spec_sha: str, docs: dict[str, stats.Contribution]) -> dict:
    """The statistics document (unsigned): means, stds and levels from the summed contributions."""
    kind = stats.encoding(spec)
    if kind == "plain":
        rows, numeric, levels = _sum_plain(spec, docs)
    else:
        rows, numeric, levels = _from_vector(spec, _sum_vector(spec, docs), len(docs))
    document = {
        "kind": stats.STATISTICS_KIND,
        "format": stats.FORMAT,
        "federation_id": spec.federation_id,
        "spec_sha256": spec_sha,
        "created_at": rounds.now(),
        "contributors": sorted(docs),
        "rows": max(0.0, float(rows)),
        "encoding": kind,
        "numeric": numeric,
        "categorical": [
            {"name": c.name, "levels": _levels(spec, c.name, c.max_levels, levels[c.name], len(docs))}
            for c in spec.data.categorical
        ],
    }
    validate(stats.StatisticsDocument, document, "statistics document", FedcliError)
    return document


def _sum_plain(spec: Spec, docs: dict[str, stats.Contribution]) -> tuple[float, list[dict], dict[str, Counter]]:
    rows = sum(d.rows or 0 for d in docs.values())
    numeric = []
    for f in spec.data.numeric:
        parts = [(d.numeric or {})[f.name] for d in docs.values()]
        n = sum(p.count for p in parts)
        total, squares = math.fsum(p.sum for p in parts), math.fsum(p.sum_squares for p in parts)
        numeric.append(_moments(f.name, n, total, squares, None, 0.0))
        if f.bins:
            histogram = np.sum([np.asarray(p.histogram, dtype=np.float64) for p in parts], axis=0)
            numeric[-1]["deciles"] = deciles(histogram, stats.unit_scale(f))
    levels: dict[str, Counter] = {c.name: Counter() for c in spec.data.categorical}
    for d in docs.values():
        for name, counts in (d.categorical or {}).items():
            levels[name].update(counts)
    return rows, numeric, levels


def _sum_vector(spec: Spec, docs: dict[str, stats.Contribution]) -> np.ndarray:
    """The sum of the banks' vectors: plain float addition (noised), or the masked words' sum decoded."""
    from fedcli.secagg import masking

    if stats.encoding(spec) == "noised":
        return np.sum([np.asarray(d.values, dtype=np.float64) for d in docs.values()], axis=0)
    words = [_unmasked_words(d, spec, f"statistics contribution from {m}") for m, d in docs.items()]
    scale = masking.fixed_point_scale(1.0, len(spec.members))
    total = masking.dequantize(masking.sum_masked(words), scale)
    coarse, fine = np.split(total, 2)  # the values, and what their fixed point rounded off (in 1/scale steps)
    return (coarse + fine / scale) * spec.max_rows_per_member


def _from_vector(spec: Spec, v: np.ndarray, contributors: int) -> tuple[float, list[dict], dict[str, Counter]]:
    """Moments in public-range units; under DP a variance is never taken below what the noise can resolve."""
    numeric = []
    noise = spec.data.statistics_noise * stats.sensitivity(spec.data) * math.sqrt(contributors)
    for i, f in enumerate(spec.data.numeric):
        n, total, squares = (float(x) for x in v[1 + 3 * i : 4 + 3 * i])
        floor = noise / n if spec.privacy.enabled and n > 0 else 0.0
        numeric.append(_moments(f.name, n, total, squares, stats.unit_scale(f), floor))
    levels: dict[str, Counter] = {}
    at = 1 + 3 * len(spec.data.numeric)
    for c in spec.data.categorical:
        levels[c.name] = Counter({lvl: float(x) for lvl, x in zip(c.levels, v[at : at + len(c.levels)], strict=True)})
        at += len(c.levels)
    for f, result in zip(spec.data.numeric, numeric, strict=True):
        if f.bins:
            result["deciles"] = deciles(v[at : at + f.bins], stats.unit_scale(f))
            at += f.bins
    return float(v[0]), numeric, levels


def deciles(histogram: np.ndarray, unit: tuple[float, float]) -> list[float] | None:
    """The 10 %, ..., 90 % quantiles of a histogram over the public range, linear within a bin; None when it
    holds no rows. Noised counts are summed as they are (clipping each at 0 would pile the noise of empty
    bins into the tails) and the running total is then made non-decreasing."""
    counts = np.asarray(histogram, dtype=np.float64)
    cumulative = np.maximum.accumulate(np.concatenate([[0.0], np.cumsum(counts)]))
    total = float(cumulative[-1])
    if not total > 0 or not math.isfinite(total):
        return None
    centre, half = unit
    edges = np.linspace(-1.0, 1.0, len(counts) + 1)
    at = np.interp(np.arange(1, 10) / 10 * total, cumulative, edges)  # cumulative is non-decreasing
    return [float(centre + half * u) for u in at]


def _moments(name: str, n: float, total: float, squares: float, unit: tuple[float, float] | None, floor: float) -> dict:
    """Mean and sample std from count, sum and sum of squares: in the column's own units (unit None), or in
    public-range units (unit = (centre, half width)), where the mean stays in the range and the std within it.

    A variance at or below `floor` (the noise's own spread under DP) becomes `floor`; a constant column
    (variance 0 without DP) gets std 1 in its own units, or half its public range."""
    if not (math.isfinite(n) and n >= 2):
        raise FedcliError(
            f"column {name}: fewer than 2 numbers across the contributions ({n:.3g}); "
            "the statistics round cannot fill its mean and std"
        )
    centre, half = unit or (0.0, 1.0)
    mean_u = total / n
    var_u = (squares - n * mean_u * mean_u) / (n - 1)
    var_u = max(var_u, floor) if math.isfinite(var_u) else floor
    if unit is not None:  # values in [-1, 1]: noise or a forged sum cannot move the mean out or blow the std up
        mean_u, var_u = min(1.0, max(-1.0, mean_u)), min(var_u, 1.0)
    mean = centre + half * mean_u
    std = half * math.sqrt(var_u) if var_u > 0 else half
    if not (math.isfinite(mean) and abs(mean) <= 1e15 and 0 < std <= 1e15):
        raise FedcliError(f"column {name}: its mean or std is out of range ({mean:g}, {std:g})")
    return {"name": name, "mean": mean, "std": std, "count": max(0.0, min(n, 1e12))}


def _levels(spec: Spec, name: str, max_levels: int, counts: Counter, contributors: int) -> list[str]:
    """Levels with at least min_level_count rows across the federation, the most frequent max_levels, by name."""
    kept = [(lvl, n) for lvl, n in counts.items() if n >= spec.data.min_level_count]
    kept.sort(key=lambda item: (-item[1], item[0]))
    levels = sorted(lvl for lvl, _ in kept[:max_levels])
    if not levels:
        raise FedcliError(
            f"column {name}: no level has {spec.data.min_level_count} rows across the {contributors} "
            "contributions; lower [data] min_level_count or check the column"
        )
    return levels
