"""A bank's part of the statistics round: count, sum and square its columns, protect them as the spec says, sign, upload.

Only aggregates leave the bank (rows, and per feature a count, a sum and a sum of squares, and a count
per category level), never a row. With [privacy] they carry Gaussian noise charged to the bank's ledger
as one record-level release; with [secagg] they are masked so the coordinator only reads their sum.
Every check (keys, spec, columns, values, budget) runs before the one write; re-running is a no-op.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedcli import keys
from fedcli.bank.plan import BankPlan
from fedcli.bank.state import ledger_path_for
from fedcli.errors import AlreadyExists, FedcliError, InputError, VerificationError
from fedcli.privacy.accounting import Mechanism
from fedcli.protocol import rounds
from fedcli.protocol import statistics as stats
from fedcli.protocol.spec import CategoricalFeature, NumericFeature, Spec
from fedcli.store import Store

MAX_VALUE = stats.MAX_VALUE  # a number beyond this is a unit or column mix-up (the spec's own bound on a mean)


@dataclass
class SubmitResult:
    member: str
    submitted: bool
    message: str
    rows: int = 0
    notes: list[str] = field(default_factory=list)
    privacy: dict = field(default_factory=dict)  # the ledger entry charged, under DP


@dataclass
class Tally:
    """What one pass over the table counts, in the column's own units (plain) or public-range units."""

    rows: int = 0
    numeric: dict[str, list[float]] = field(default_factory=dict)  # name -> [count, sum, sum of squares]
    levels: dict[str, Counter] = field(default_factory=dict)  # name -> level -> rows
    histograms: dict[str, np.ndarray] = field(default_factory=dict)  # binned numeric name -> rows per bin
    clipped: Counter = field(default_factory=Counter)  # numeric name -> values clipped to the public range


def pending_for(store: Store, coordinator_pub: Path) -> bool:
    """Whether the federation's statistics round is still open (train then submits a contribution instead).
    Any failure to tell is False: train's own checks then report it."""
    try:
        spec, _ = rounds.load_spec(store, keys.load_public(coordinator_pub))
    except FedcliError:
        return False
    return stats.pending(spec) and not store.exists(rounds.global_keys(0)[1])  # else train's checks refuse


def submit(
    store: Store,
    key_path: Path,
    data_path: Path,
    coordinator_pub: Path,
    ledger_path: Path | None = None,
    max_epsilon: float | None = None,
) -> SubmitResult:
    """Count this bank's table and upload its signed contribution to the statistics round."""
    private, my_pub = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(my_pub)
    if me is None:
        raise FedcliError(f"{key_path} is not enrolled in federation {spec.federation_id}")
    if not stats.federated(spec):
        raise InputError(f"federation {spec.federation_id} declares its statistics in the spec: nothing to submit")
    if not stats.pending(spec):
        return SubmitResult(me.name, False, "the federation's statistics are published; nothing to do")
    if store.exists(rounds.global_keys(0)[1]):
        raise VerificationError(
            "round 0 is published but the federation's statistics document is missing: refusing to trust this store",
            reason="missing",
        )
    key = stats.contribution_key(spec_sha, me.name)
    if store.exists(key):
        stats.verify_contribution(store, spec, spec_sha, me.name)  # a file under my name must be mine
        return SubmitResult(me.name, False, f"{me.name} already submitted its statistics; nothing to do")
    plan = BankPlan.decide(spec, key_path, ledger_path or ledger_path_for(key_path), max_epsilon)
    tally = count_table(spec, data_path)
    if tally.rows > spec.max_rows_per_member:
        raise InputError(f"{data_path} has {tally.rows:,} rows, more than the spec's max_rows_per_member")
    contribution, mechanism = encode(spec, spec_sha, me.name, tally, plan)
    charged = {}
    if mechanism is not None and plan.privacy is not None:  # charged before anything leaves the bank
        charged = plan.privacy.ledger.charge(
            mechanism,
            round=0,
            federation=spec.federation_id,
            budget_epsilon=plan.privacy.budget_epsilon,
            delta=plan.privacy.table.delta,
        )
    try:
        store.put(key, keys.sign_manifest(private, contribution), create_only=True)
    except AlreadyExists:
        stats.verify_contribution(store, spec, spec_sha, me.name)
        return SubmitResult(me.name, False, f"{me.name} already submitted its statistics; nothing to do")
    how = {"plain": "", "noised": " with DP noise", "masked": ", masked for secure aggregation"}[stats.encoding(spec)]
    notes = [
        f"{n:,} value(s) of {c} lie outside its public range (counted at its ends)"
        for c, n in tally.clipped.items()
        if n
    ]
    return SubmitResult(me.name, True, f"submitted statistics of {tally.rows:,} rows{how}", tally.rows, notes, charged)


# --------------------------------------------------------------------------- counting


def count_table(spec: Spec, data_path: Path) -> Tally:
    """One streamed pass: every declared column must be there; numbers in range of a float, categories as text."""
    from fedcli.bank import sources, tables

    table = sources.open_table(data_path)
    names = [f.name for f in spec.data.numeric] + [c.name for c in spec.data.categorical]
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise InputError(f"{table.name} lacks columns the federation spec needs: {', '.join(missing)}")
    tally = Tally(
        numeric={f.name: [0.0, 0.0, 0.0] for f in spec.data.numeric},
        levels={c.name: Counter() for c in spec.data.categorical},
    )
    unit = stats.encoding(spec) != "plain"
    for batch in table.batches(names):
        columns = tables.columns_of(batch)
        tally.rows += batch.num_rows
        for f in spec.data.numeric:
            values, _ = tables._numbers(columns[f.name], f.name, table.name)
            _add_numbers(tally, f, values, table.name, unit)
        for c in spec.data.categorical:
            _add_levels(tally, c, columns[c.name])
    if not tally.rows:
        raise InputError(f"{table.name} has no rows")
    return tally


def _add_numbers(tally: Tally, f: NumericFeature, values: np.ndarray, source: str, unit: bool) -> None:
    present = values[~np.isnan(values)]
    absurd = ~np.isfinite(present) | (np.abs(present) > MAX_VALUE)
    if absurd.any():
        raise InputError(
            f"{source}: column {f.name} holds {int(absurd.sum())} value(s) beyond ±{MAX_VALUE:g} "
            f"(e.g. {float(present[absurd][0]):g}); fix them or leave the cells empty"
        )
    if unit or f.bins:  # public-range units: every value in [-1, 1], so one row moves a sum by at most 1
        centre, half = stats.unit_scale(f)
        u = (present - centre) / half
        tally.clipped[f.name] += int((np.abs(u) > 1).sum())
        u = np.clip(u, -1.0, 1.0)
        if f.bins:
            counts, _ = np.histogram(u, bins=f.bins, range=(-1.0, 1.0))
            tally.histograms[f.name] = tally.histograms.get(f.name, np.zeros(f.bins, np.int64)) + counts
        if unit:
            present = u
    sums = tally.numeric[f.name]
    sums[0] += len(present)
    sums[1] += float(present.sum())
    sums[2] += float(np.square(present).sum())


def _add_levels(tally: Tally, c: CategoricalFeature, col) -> None:
    """Rows per level as training will match them: the candidates through the one-hot rule, else the text seen."""
    from fedcli.bank import tables

    counts = tally.levels[c.name]
    if c.levels:
        onehot = tables._one_hot(col, c)
        for level, n in zip(c.levels, onehot.sum(axis=0), strict=True):
            counts[level] += int(n)
        return
    series = tables._series(col).dropna()
    for value, n in series.astype(str).value_counts().items():
        text = str(value)
        if text.strip() and len(text) <= 256:  # a level is 1-256 characters, like the spec's
            counts[text] += int(n)


# --------------------------------------------------------------------------- encoding


def encode(spec: Spec, spec_sha: str, member: str, tally: Tally, plan: BankPlan) -> tuple[dict, Mechanism | None]:
    """The contribution document (unsigned) and, under DP, the release to charge."""
    doc: dict = {
        "kind": stats.CONTRIBUTION_KIND,
        "format": stats.FORMAT,
        "federation_id": spec.federation_id,
        "member": member,
        "spec_sha256": spec_sha,
        "created_at": rounds.now(),
        "nonce": secrets.token_hex(16),
    }
    kind = stats.encoding(spec)
    if kind == "plain":
        doc["rows"] = tally.rows
        doc["numeric"] = {n: {"count": int(s[0]), "sum": s[1], "sum_squares": s[2]} for n, s in tally.numeric.items()}
        for name, counts in tally.histograms.items():
            doc["numeric"][name]["histogram"] = [int(c) for c in counts]
        doc["categorical"] = {
            c.name: dict(tally.levels[c.name].most_common(c.max_levels)) for c in spec.data.categorical
        }
        _check(doc)
        return doc, None
    vector = _vector(spec, tally)
    mechanism = None
    if spec.privacy.enabled:
        vector, mechanism = _noised(spec, vector, plan)
        doc["dp"] = {
            "mechanism": "gaussian",
            "accountant": "rdp",
            "noise_multiplier": spec.data.statistics_noise,
            "sensitivity": stats.sensitivity(spec.data),
        }
    if kind == "noised":
        doc["values"] = [float(v) for v in vector]
    else:
        doc["masked"], doc["secagg"] = _masked(spec, member, vector, plan)
    _check(doc)
    return doc, mechanism


def _check(doc: dict) -> None:
    """The bank never signs what the coordinator would refuse (e.g. too many levels for the size bound)."""
    from fedcli.contract import validate

    validate(stats.Contribution, doc, "this bank's statistics contribution", InputError)
    if len(keys.canonical(doc)) > keys.MAX_MANIFEST_BYTES - 200:
        raise InputError(
            "this bank's statistics contribution is larger than 64 KiB: lower max_levels or declare fewer features"
        )


def _vector(spec: Spec, tally: Tally) -> np.ndarray:
    values = [float(tally.rows)]
    for f in spec.data.numeric:
        values += tally.numeric[f.name]
    for c in spec.data.categorical:
        values += [float(tally.levels[c.name][level]) for level in c.levels]
    for f in spec.data.numeric:
        values += [float(x) for x in tally.histograms.get(f.name, np.zeros(f.bins))]
    return np.asarray(values, dtype=np.float64)


def _noised(spec: Spec, vector: np.ndarray, plan: BankPlan) -> tuple[np.ndarray, Mechanism]:
    """Gaussian noise of std z * sensitivity on every entry (z split across banks with secagg's shared noise)."""
    from fedcli.randomness import secure_numpy_rng
    from fedcli.secagg import masking

    z = spec.data.statistics_noise
    mechanism = Mechanism("record", z, 1.0, 1, stats.sensitivity(spec.data))
    if plan.privacy is not None:
        plan.privacy.ledger.check(mechanism, plan.privacy.budget_epsilon, plan.privacy.table.delta)
    member_z = (
        masking.member_noise_multiplier(z, spec.secagg.noise, max(2, spec.min_clients)) if spec.secagg.enabled else z
    )
    noise = secure_numpy_rng().normal(0.0, member_z * stats.sensitivity(spec.data), vector.shape)
    return vector + noise, mechanism


def _masked(spec: Spec, member: str, vector: np.ndarray, plan: BankPlan) -> tuple[str, dict]:
    """The vector in units of max_rows_per_member (so within [-1, 1]), fixed point, pairwise masked for round 0."""
    from fedcli.secagg import masking

    if plan.mask_key is None:
        raise VerificationError("secure aggregation is on but this bank has no mask key")
    scale = masking.fixed_point_scale(1.0, len(spec.members))
    unit = vector / spec.max_rows_per_member
    coarse = masking.quantize(unit, 1.0, scale)
    # Two words per value: the fixed point leaves ~max_rows_per_member / scale rows per step (about 100 at
    # 4 members), so the second word carries what the first rounded off, in steps of 1/scale of a step.
    fine = masking.quantize((unit - masking.dequantize(coarse, scale)) * scale, 1.0, scale)
    quantized = np.concatenate([coarse, fine])
    roster = {m.name: m.mask_key() for m in spec.members}
    masked = masking.mask_update(quantized, spec.federation_id, stats.MASK_ROUND, member, plan.mask_key, roster)
    text = base64.b64encode(masked.astype("<u4").tobytes()).decode("ascii")
    if not math.isfinite(scale):
        raise FedcliError("secure aggregation's fixed-point scale is not finite")
    return text, {"scale": scale, "unit": spec.max_rows_per_member}


def propose_types(section: dict, with_levels: bool) -> dict:
    """`fedcli schema`'s draft for federated statistics: column names and types only (no bank's means or stds);
    with_levels keeps the level names seen as candidates ([privacy] and [secagg] need them)."""
    out = {"target": section["target"], "positive": section["positive"], "statistics": "federated"}
    out["numeric"] = [{"name": f["name"]} for f in section["numeric"]]
    out["categorical"] = [
        {"name": c["name"], "levels": c["levels"]} if with_levels and c["levels"] else {"name": c["name"]}
        for c in section["categorical"]
    ]
    return out
