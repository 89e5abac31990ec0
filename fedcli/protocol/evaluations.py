"""Signed holdout evaluations: what each bank publishes about a global model, and how anyone reads them.

    rounds/00000N/evaluations/<member>.json   <member>'s binned scores of global N on its holdout rows

A bank that holds out rows (`[evaluation] holdout > 0`) scores the global it starts a round from on
them and publishes, signed, only a score histogram (protocol.binned): per bin, counts of negatives
and positives and three sums. No score, row or identifier of a row is in it. Summing the banks'
histograms gives federation-level metrics. Under DP (`[privacy]` on) a bank publishes only the two
counts per bin, each with Gaussian noise of std `[evaluation] noise` (sensitivity 1: one row added or
removed moves one count by 1), declares it in a `dp` record, and charges its ledger; readers refuse a
record whose declared noise is not the spec's, sum the banks' noised counts, then make them
non-negative keeping their total and round them (protocol.binned.Histogram.from_noised).

Reading is hostile-input safe: a file is counted only if it is at most MAX_MANIFEST_BYTES, signed by
the member its name says, meets the contract below, names its place (federation, round, member) and
the very global model published for that round (its tensors' SHA-256). Anything else is listed as
ignored with one line, never shown as a number.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, StringConstraints, model_validator

from fedcli.errors import ContractError, FedcliError, NotFound, VerificationError
from fedcli.keys import MAX_MANIFEST_BYTES, PublicIdentity, verify_manifest
from fedcli.protocol.binned import HISTOGRAM_FIELDS, MIN_HOLDOUT_ROWS, Histogram, bounds
from fedcli.protocol.documents import MAX_ROWS, Document, Name, Round, Sha256, Timestamp
from fedcli.protocol.rounds import FORMAT, expect, global_manifest, global_rounds, load_spec, round_dir
from fedcli.protocol.spec import Spec
from fedcli.store import Store

Counts = Annotated[list[Annotated[int, Field(ge=0, le=MAX_ROWS)]], Field(min_length=10, max_length=200)]
Sums = Annotated[list[Annotated[float, Field(ge=0, le=float(MAX_ROWS))]], Field(min_length=10, max_length=200)]
NoisedCounts = Annotated[
    list[Annotated[float, Field(ge=-float(MAX_ROWS), le=float(MAX_ROWS))]], Field(min_length=10, max_length=200)
]
SENSITIVITY = 1.0  # one holdout row added or removed moves exactly one of the 2 x bins counts by 1
NOISE_TAIL = 12.0  # a noised count below -NOISE_TAIL x its noise std is not noise (p < 1e-32): refused


def evaluation_key(r: int, member: str) -> str:
    return f"{round_dir(r)}/evaluations/{member}.json"


class BaselineHistogram(Document):
    """The same holdout rows scored by the bank's own bank-alone model ([evaluation] baseline)."""

    negatives: Counts
    positives: Counts
    score_sum: Sums
    positive_score_sum: Sums
    score_sq_sum: Sums


def _check_histogram(h, bins: int, label: str) -> None:
    """Every field has `bins` entries and every bin's sums are possible for its counts and score range."""
    if any(len(getattr(h, f)) != bins for f in HISTOGRAM_FIELDS):
        raise ValueError(f"{label}: every histogram field has exactly bins = {bins} entries")
    lo, hi = bounds(bins)
    for i in range(bins):
        n, pos = h.negatives[i] + h.positives[i], h.positives[i]
        slack = 1e-6 * (n + 1)  # the sums are rounded to 6 digits
        within = n * lo[i] - slack <= h.score_sum[i] <= n * hi[i] + slack
        within &= pos * lo[i] - slack <= h.positive_score_sum[i] <= min(pos * hi[i], h.score_sum[i]) + slack
        within &= h.score_sq_sum[i] <= h.score_sum[i] + slack
        if not within:
            raise ValueError(f"{label} bin {i}: sums impossible for its counts and score range")


class EvaluationDP(Document):
    """Under DP: the Gaussian noise on every published count, std = noise_multiplier x sensitivity."""

    mechanism: Literal["gaussian"]
    accountant: Literal["rdp"]
    noise_multiplier: Annotated[float, Field(gt=0, le=1e4)]
    sensitivity: Annotated[float, Field(gt=0, le=1e6)]


def _check_noised(doc, bins: int) -> None:
    """A DP record: counts only (no sums, no baseline), none further below zero than its noise could go."""
    assert doc.dp is not None
    if any(getattr(doc, f) is not None for f in HISTOGRAM_FIELDS[2:]) or doc.baseline is not None:
        raise ValueError("a DP evaluation carries noised counts only (no score sums, no baseline)")
    if len(doc.negatives) != bins or len(doc.positives) != bins:
        raise ValueError(f"the histogram: every count field has exactly bins = {bins} entries")
    floor = -NOISE_TAIL * doc.dp.noise_multiplier * doc.dp.sensitivity
    if min(min(doc.negatives), min(doc.positives)) < floor:
        raise ValueError(f"a noised count below {floor:g}: more negative than its declared noise explains")


class EvaluationRecord(Document):
    """A bank's signed holdout histogram of global `round` (whose tensors hash to global_sha256)."""

    kind: Literal["evaluation"]
    format: Literal[1]
    federation_id: Name
    round: Round
    member: Name
    global_sha256: Sha256
    holdout: Annotated[float, Field(gt=0, le=0.5)]
    bins: Annotated[int, Field(ge=10, le=200)]
    negatives: Counts | NoisedCounts
    positives: Counts | NoisedCounts
    score_sum: Sums | None = None  # absent under DP (noised counts only)
    positive_score_sum: Sums | None = None
    score_sq_sum: Sums | None = None
    created_at: Timestamp
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,128}$")]
    baseline: BaselineHistogram | None = None
    dp: EvaluationDP | None = None  # under DP: the noise on the counts

    @model_validator(mode="after")
    def _consistent(self):
        """Exact counts: whole numbers whose sums are possible for them (no bin may claim scores outside its
        own range), and a baseline scores the very same rows (same counts of negatives and of positives in all).
        Noised counts: _check_noised."""
        if self.dp is not None:
            _check_noised(self, self.bins)
            return self
        if any(getattr(self, f) is None for f in HISTOGRAM_FIELDS[2:]):
            raise ValueError("an evaluation without DP carries its score sums")
        if not all(type(v) is int for v in (*self.negatives, *self.positives)):
            raise ValueError("an evaluation without DP carries whole-number counts")
        _check_histogram(self, self.bins, "the histogram")
        if sum(self.negatives) + sum(self.positives) < MIN_HOLDOUT_ROWS:
            raise ValueError(f"fewer than {MIN_HOLDOUT_ROWS} holdout rows")
        if self.baseline is not None:
            _check_histogram(self.baseline, self.bins, "baseline")
            same = (sum(self.negatives), sum(self.positives)) == (
                sum(self.baseline.negatives),
                sum(self.baseline.positives),
            )
            if not same:
                raise ValueError("baseline: scores other rows than the histogram (its counts differ)")
        return self


def record(
    spec: Spec,
    r: int,
    member: str,
    global_sha: str,
    hist: Histogram,
    created_at: str,
    nonce: str,
    baseline: Histogram | None = None,
    dp_counts: dict | None = None,
) -> dict:
    """The document to sign (a plain dict, validated against EvaluationRecord before signing).

    `dp_counts`: under DP, the noised `negatives` and `positives` (binned.noised) published instead of `hist`."""
    from fedcli.contract import validate

    doc = {
        "kind": "evaluation",
        "format": FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "member": member,
        "global_sha256": global_sha,
        "holdout": spec.evaluation.holdout,
        "bins": hist.bins,
        **(hist.to_dict() if dp_counts is None else dp_counts),
        "created_at": created_at,
        "nonce": nonce,
    }
    if dp_counts is not None:
        doc["dp"] = dp_record(spec)
    if baseline is not None:
        doc["baseline"] = baseline.to_dict()
    validate(EvaluationRecord, doc, f"holdout evaluation of round {r}")
    return doc


def dp_record(spec: Spec) -> dict:
    """The `dp` field a DP evaluation must carry: exactly the spec's noise, at sensitivity 1."""
    return {
        "mechanism": "gaussian",
        "accountant": "rdp",
        "noise_multiplier": spec.evaluation.noise,
        "sensitivity": SENSITIVITY,
    }


def _check_privacy(doc: dict, spec: Spec, what: str) -> None:
    """Under DP the record must declare the spec's very noise (no less, and no more: more noise would let a bank
    push larger negative counts into the federation's sum); without DP it must not claim any."""
    dp = doc.get("dp")
    if not spec.privacy.enabled:
        if dp is not None:
            raise ContractError(f"{what}: carries a dp record but the federation has no [privacy]")
        return
    if dp is None:
        raise VerificationError(f"{what}: exact counts in a DP federation (no noise declared)", reason="weak-privacy")
    want = dp_record(spec)
    if not math.isclose(dp["noise_multiplier"], want["noise_multiplier"], rel_tol=1e-9):
        raise VerificationError(
            f"{what}: declares noise multiplier {dp['noise_multiplier']:g}, the spec's [evaluation] noise is "
            f"{want['noise_multiplier']:g}",
            reason="weak-privacy",
        )
    if not math.isclose(dp["sensitivity"], SENSITIVITY):
        raise ContractError(f"{what}: noise calibrated to sensitivity {dp['sensitivity']:g}, not {SENSITIVITY:g}")


def verified(store: Store, spec: Spec, r: int, member: str, global_sha: str) -> tuple[Histogram, Histogram | None]:
    """member's evaluation of global r and its bank-alone baseline (if any), every check passed; raises
    FedcliError (NotFound if absent)."""
    from fedcli.contract import validate

    signer, what = spec.member(member), f"holdout evaluation by {member} of round {r}"
    if signer is None:
        raise FedcliError(f"{what}: {member} is not an enrolled member", reason="not-member")
    doc = verify_manifest(store.get(evaluation_key(r, member), max_bytes=MAX_MANIFEST_BYTES), signer, what)
    validate(EvaluationRecord, doc, what)
    expect(doc, what, kind="evaluation", federation_id=spec.federation_id, round=r, member=member)
    expect(doc, what, global_sha256=global_sha, bins=spec.evaluation.bins)
    _check_privacy(doc, spec, what)
    hist = (
        Histogram.from_dict(doc) if doc.get("dp") is None else Histogram.from_noised(doc["negatives"], doc["positives"])
    )
    if hist.rows > spec.max_rows_per_member:  # its weight in the federation's sum, bounded as an update's is
        raise ContractError(f"{what}: {hist.rows:,} rows, more than max_rows_per_member ({spec.max_rows_per_member:,})")
    if doc.get("dp") is not None:  # the raw noised counts travel along: the federation sums them before rounding
        hist = NoisedHistogram.carrying(hist, doc["negatives"], doc["positives"])
    return hist, Histogram.from_dict(doc["baseline"]) if doc.get("baseline") is not None else None


def is_mine(store: Store, me: PublicIdentity, spec: Spec, r: int, global_sha: str) -> bool:
    """Whether the file at my evaluation's place is my own valid evaluation of that global."""
    try:
        verified(store, spec, r, me.name, global_sha)
    except FedcliError:
        return False
    return True


@dataclass(frozen=True)
class NoisedHistogram(Histogram):
    """A bank's noised counts after rounding and clipping (what its own metrics use), with the raw noised counts
    the federation's sum is made of."""

    raw_negatives: np.ndarray = field(default_factory=lambda: np.zeros(0))
    raw_positives: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def carrying(cls, cleaned: Histogram, negatives: list[float], positives: list[float]) -> NoisedHistogram:
        fields = (getattr(cleaned, f) for f in HISTOGRAM_FIELDS)
        raw = {"raw_negatives": np.asarray(negatives, np.float64), "raw_positives": np.asarray(positives, np.float64)}
        return cls(*fields, **raw)


@dataclass
class Evaluations:
    """Every verified holdout histogram on the store, by global round and bank, and what was ignored."""

    spec: Spec
    by_round: dict[int, dict[str, Histogram]] = field(default_factory=dict)
    baselines: dict[int, dict[str, Histogram]] = field(default_factory=dict)  # each bank alone, same rows
    ignored: list[str] = field(default_factory=list)  # one line each: round, file, why

    @property
    def rounds(self) -> list[int]:
        return sorted(r for r, banks in self.by_round.items() if banks)

    @property
    def noised(self) -> bool:
        """Under DP every histogram is noised counts: its metrics are approximate (docs/report.md)."""
        return self.spec.privacy.enabled

    def federation(self, r: int) -> Histogram:
        """The banks' histograms summed; noised ones summed raw, then rounded and clipped once."""
        parts = list(self.by_round[r].values())
        if parts and all(isinstance(h, NoisedHistogram) for h in parts):
            noisy = [h for h in parts if isinstance(h, NoisedHistogram)]
            return Histogram.from_noised(
                np.sum([h.raw_negatives for h in noisy], axis=0), np.sum([h.raw_positives for h in noisy], axis=0)
            )
        return Histogram.total(parts)

    def alone(self, r: int) -> Histogram | None:
        """Every bank's own model on its own holdout, summed: only when every bank of round r sent one."""
        mine = self.baselines.get(r, {})
        if not mine or set(mine) != set(self.by_round.get(r, {})):
            return None
        return Histogram.total(list(mine.values()))

    def why_none(self) -> str:
        """When no histogram is shown: why (from the signed spec), else ''."""
        if self.rounds:
            return ""
        if self.spec.evaluation.holdout == 0:
            return "no holdout evaluation: [evaluation] holdout is 0 in the spec (no rows held out)"
        if self.ignored:
            return "no holdout evaluation verifies (see the ignored files)"
        return "no holdout evaluation published yet (banks publish one when they train the next round, or with `fedcli holdout`)"


def collect(store: Store, pinned: PublicIdentity | None = None) -> Evaluations:
    """Read and verify every evaluation file of every published global round."""
    spec, spec_sha = load_spec(store, pinned)
    found = Evaluations(spec)
    if spec.evaluation.holdout == 0:  # no bank publishes one: nothing is read
        return found
    for r in global_rounds(store):
        prefix = f"{round_dir(r)}/evaluations/"
        names = [k[len(prefix) :] for k in store.list(prefix.rstrip("/")) if k.startswith(prefix)]
        if not names:
            continue
        sha = global_manifest(store, spec, spec_sha, r)["tensors_sha256"]
        for name in sorted(names):
            _read_one(store, found, r, name, sha)
    return found


def _read_one(store: Store, found: Evaluations, r: int, name: str, sha: str) -> None:
    shown = re.sub(r"[^\x20-\x7e]", "?", name)[:80]
    member = name[: -len(".json")] if name.endswith(".json") else ""
    if found.spec.member(member) is None:
        found.ignored.append(f"round {r}: {shown}: not a member's evaluation file")
        return
    try:
        hist, alone = verified(store, found.spec, r, member, sha)
        found.by_round.setdefault(r, {})[member] = hist
        if alone is not None:
            found.baselines.setdefault(r, {})[member] = alone
    except NotFound:
        return
    except FedcliError as e:
        found.ignored.append(f"round {r}: {shown}: {str(e)[:300]}")
