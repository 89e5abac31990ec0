"""A bank's holdout: rows it never trains on, and its signed evaluation of each global model on them.

Which rows are held out is decided by a keyed hash of each row's feature values (after the spec's
preprocessing; the key is the federation id), not by position: the same rows are held out every round
even if the table is re-sorted or grows, identical rows fall on the same side (no row is both trained
on and scored), and a label that matures (good today, bad next month) does not move its row.

Each round the bank scores the global it starts from on its holdout and publishes, signed, only a
score histogram (protocol.binned, protocol.evaluations): the federation sums them into holdout
metrics per round. Under DP it publishes only the histogram's counts, each with Gaussian noise of
std `[evaluation] noise` (one row moves one count by 1), as one record-level release charged to its
ledger before the write (refused, exit 6, nothing written, past the budget); the bank still sees its
own exact numbers, nobody else does. The bank-alone baseline stays at the bank under DP.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from fedcli import digest, keys
from fedcli.bank.kernel import probabilities
from fedcli.errors import AlreadyExists, FedcliError, InputError, VerificationError
from fedcli.metrics import score
from fedcli.privacy.accounting import Mechanism
from fedcli.privacy.ledger import BudgetExceeded, Ledger
from fedcli.protocol import evaluations, rounds
from fedcli.protocol.binned import MIN_HOLDOUT_ROWS, Histogram, noised
from fedcli.protocol.evaluations import SENSITIVITY, evaluation_key
from fedcli.protocol.spec import Spec
from fedcli.store import Store

if TYPE_CHECKING:
    from fedcli.bank.plan import BankPlan
    from fedcli.bank.rows import HeldOut
    from fedcli.bank.step import BankRound, LocalData, TrainResult

_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, on every row at once (uint64 arithmetic wraps)."""
    h = (h ^ (h >> np.uint64(30))) * _C1
    h = (h ^ (h >> np.uint64(27))) * _C2
    return h ^ (h >> np.uint64(31))


def holdout_rows(federation_id: str, X: np.ndarray, share: float) -> np.ndarray:
    """True for the rows held out: a keyed 64-bit hash of the row's features below share x 2**64.

    Not a secret (anyone with the spec and a row can recompute it); it only has to be stable and
    spread evenly. O(rows x features), one column at a time.
    """
    key = int(digest.sha256(f"fedcli-holdout-v1/{federation_id}".encode())[:16], 16)
    bits = np.ascontiguousarray(np.asarray(X, dtype=np.float32) + np.float32(0)).view(np.uint32)  # -0.0 -> 0.0
    with np.errstate(over="ignore"):
        h = np.full(len(bits), key, dtype=np.uint64)
        for j in range(bits.shape[1]):
            h = _mix(h ^ (bits[:, j].astype(np.uint64) + np.uint64(j + 1) * _C1))
    return (h >> np.uint64(11)).astype(np.float64) < share * float(1 << 53)


@dataclass(frozen=True)
class Holdout:
    """One global model scored on this bank's holdout: exact local metrics, and the histogram to publish."""

    round: int  # the global model's round
    global_sha256: str
    rows: int
    positives: int
    metrics: dict[str, float]  # exact, on the holdout rows: metrics.score plus brier
    histogram: Histogram
    withheld: str = ""  # why the histogram is not published ("" when it is)
    baseline: Histogram | None = None  # the same rows scored by the bank-alone model ([evaluation] baseline)

    def line(self) -> str:
        m = self.metrics
        shown = ", ".join(
            f"{k} {m[k]:.4f}" for k in ("auc", "pr_auc", "ks", "brier") if math.isfinite(m.get(k, math.nan))
        )
        if self.baseline is not None and math.isfinite(alone := self.baseline.metrics()["auc"]):
            shown += f"; this bank alone: auc ≈ {alone:.4f}"
        return f"holdout of {self.rows:,} rows ({self.positives:,} positive), global of round {self.round}: " + (
            shown or "metrics n/a (one class only)"
        )


def score_holdout(spec: Spec, base: rounds.Global, y: np.ndarray, p: np.ndarray, federation_dp: bool) -> Holdout:
    """The holdout's metrics and histogram, and whether the histogram may leave the bank."""
    exact = score(y, p) | {"brier": float(np.mean((p.astype(np.float64) - y) ** 2)) if len(y) else math.nan}
    withheld = ""
    if not federation_dp and len(y) < MIN_HOLDOUT_ROWS:  # under DP the noise covers a small holdout too
        withheld = f"only {len(y)} holdout rows (fewer than {MIN_HOLDOUT_ROWS}): a histogram would nearly show them"
    hist = Histogram.of(y, p, spec.evaluation.bins)
    return Holdout(base.round, base.sha256, len(y), int(np.sum(y != 0)), exact, hist, withheld)


def selector(spec: Spec) -> Callable[[np.ndarray], np.ndarray] | None:
    """The rows this spec holds out (None: none): decided row by row, so a streamed table is split chunk by chunk."""
    share = spec.evaluation.holdout
    if share == 0:
        return None
    return lambda X: holdout_rows(spec.federation_id, X, share)


def notes(spec: Spec, source: str, training_rows: int, held: HeldOut | None) -> list[str]:
    """The split's note; refused when nothing is left to train on."""
    if held is None:
        return []
    n = training_rows + len(held.y)
    if training_rows == 0:
        raise InputError(f"{source}: every one of its {n} rows falls in the holdout; nothing left to train on")
    out = [f"holdout: {len(held.y):,} of {n:,} rows held out (never trained on), training on {training_rows:,}"]
    if spec.evaluation.baseline and held.X is None:
        out.append("no bank-alone baseline this round: the holdout is bigger than the rows bank.rows holds at once")
    return out


def evaluate(job: BankRound, base: rounds.Global, data: LocalData) -> Holdout | None:
    """The global model it starts from, scored on the rows held out (None when the spec holds out nothing)."""
    from fedcli.bank.checks import refuse_non_finite

    held = data.held
    if held is None:
        return None
    if not np.all(np.isfinite(held.scores)):
        refuse_non_finite(f"the global model's scores on {data.source} are not finite", base)
    scored = score_holdout(job.spec, base, held.y, held.scores, job.spec.privacy.enabled)
    if job.spec.evaluation.baseline and not scored.withheld and not job.spec.privacy.enabled and held.X is not None:
        scored = replace(scored, baseline=_alone(job, base.round, data, held.X, held.y))
    return scored


def _alone(job: BankRound, r: int, train: LocalData, X: np.ndarray, y: np.ndarray) -> Histogram | None:
    """The bank-alone model after r rounds (bank.baseline), scored on the same holdout rows."""
    from fedcli.bank import baseline

    p = probabilities(job.spec.model, baseline.model_at(job, r, train.rows), X)
    if not np.all(np.isfinite(p)):  # the bank's own model diverged: no baseline this round, the rest goes on
        return None
    return Histogram.of(y, p, job.spec.evaluation.bins)


@dataclass(frozen=True)
class Charge:
    """Under DP: the ledger an evaluation is charged to, the budget it must stay within, at delta."""

    ledger: Ledger
    budget_epsilon: float
    delta: float

    @classmethod
    def of(cls, spec: Spec, ledger: Ledger, plan: BankPlan | None = None) -> Charge | None:
        """The train step's plan (with the bank's --max-epsilon), else the spec's budget; None without DP."""
        if plan is not None and plan.privacy is not None:
            return cls(plan.privacy.ledger, plan.privacy.budget_epsilon, plan.privacy.table.delta)
        ps = spec.privacy
        if not ps.enabled or ps.budget_epsilon is None:
            return None
        return cls(ledger, ps.budget_epsilon, ps.delta)


def mechanism(spec: Spec) -> Mechanism:
    """One evaluation under DP: a Gaussian mechanism on the counts (sample rate 1, one step), record level."""
    return Mechanism("record", spec.evaluation.noise, 1.0, 1, SENSITIVITY)


def _noised_counts(spec: Spec, holdout: Holdout, charge: Charge | None) -> dict:
    """Check the budget (BudgetExceeded, nothing charged) and draw the noise; the caller charges after signing."""
    r = holdout.round
    if charge is None:
        raise FedcliError(f"holdout evaluation of round {r}: a DP federation but no privacy ledger to charge")
    try:
        charge.ledger.check(mechanism(spec), charge.budget_epsilon, charge.delta)
    except BudgetExceeded as e:
        said = str(e).replace("exporting would bring", "publishing it would bring").replace("; update not exported", "")
        raise BudgetExceeded(f"holdout evaluation of round {r} not published, nothing charged: {said}") from None
    from fedcli.randomness import secure_numpy_rng

    h = holdout.histogram
    return noised(h.negatives, h.positives, spec.evaluation.noise * SENSITIVITY, secure_numpy_rng())


def publish(
    store: Store,
    spec: Spec,
    me: keys.PublicIdentity,
    private: Ed25519PrivateKey,
    holdout: Holdout,
    charge: Charge | None = None,
) -> str:
    """Sign and write the holdout histogram (create-only); one line saying what happened. Under DP: noised
    counts, the ledger charged just before the write (a crash between over-counts, never under-counts)."""
    r = holdout.round
    if holdout.withheld:
        return f"holdout evaluation of round {r} not published: {holdout.withheld}"
    if spec.privacy.enabled and store.exists(evaluation_key(r, me.name)):  # a re-run: no second release
        return _already(store, spec, me, holdout)
    dp_counts = _noised_counts(spec, holdout, charge) if spec.privacy.enabled else None
    doc = evaluations.record(
        spec,
        r,
        me.name,
        holdout.global_sha256,
        holdout.histogram,
        rounds.now(),
        secrets.token_hex(16),
        holdout.baseline,
        dp_counts,
    )
    signed = keys.sign_manifest(private, doc)
    entry = {}
    if dp_counts is not None and charge is not None:
        entry = charge.ledger.charge(
            mechanism(spec),
            round=r,
            federation=spec.federation_id,
            budget_epsilon=charge.budget_epsilon,
            delta=charge.delta,
            release="evaluation",
        )
    try:
        store.put(evaluation_key(r, me.name), signed, create_only=True)
    except AlreadyExists:
        return _already(store, spec, me, holdout)
    if entry:
        return (
            f"published the signed holdout evaluation of round {r} (noised counts only, noise multiplier "
            f"{spec.evaluation.noise:g}; record-level epsilon now {entry['epsilon_after']:.3g} of "
            f"{entry['budget_epsilon']:g})"
        )
    return f"published the signed holdout evaluation of round {r} ({holdout.rows:,} rows, binned scores only)"


def _already(store: Store, spec: Spec, me: keys.PublicIdentity, holdout: Holdout) -> str:
    """My evaluation's place is taken: by my own valid file (a no-op), or by someone else's (refused)."""
    r = holdout.round
    if evaluations.is_mine(store, me, spec, r, holdout.global_sha256):
        return f"holdout evaluation of round {r} already published"
    raise VerificationError(
        f"{evaluation_key(r, me.name)} holds a file that is not {me.name}'s valid evaluation of round {r}: "
        "someone else wrote there (left in place; readers ignore it)"
    )


def publish_after_training(
    job: BankRound, holdout: Holdout | None, result: TrainResult, plan: BankPlan | None = None
) -> TrainResult:
    """The train step's last stage: the update is committed; publishing the evaluation may fail on its own
    (under DP, past the budget: the update went out, the evaluation does not)."""
    if holdout is None:
        return result
    try:
        message = publish(job.store, job.spec, job.me, job.private, holdout, Charge.of(job.spec, job.ledger, plan))
    except FedcliError as e:
        message = f"holdout evaluation of round {holdout.round} not published ({e}); `fedcli holdout` retries"
    result.data_notes += [holdout.line(), message]
    return result


def evaluate_latest(
    store: Store,
    key_path: Path,
    data_path: Path,
    coordinator_pub: Path,
    state_path: Path | None = None,
    publish_it: bool = True,
    console: Console | None = None,
    max_epsilon: float | None = None,
) -> tuple[Holdout, str]:
    """`fedcli holdout`: score the latest verified global on this bank's holdout; publish its histogram."""
    from fedcli.bank.step import open_round, prepare_data

    job = open_round(store, key_path, coordinator_pub, state_path, console or Console(stderr=True))
    if job.spec.evaluation.holdout == 0:
        raise InputError("the spec holds out no rows ([evaluation] holdout is 0): there is no holdout to evaluate on")
    if max_epsilon is not None and not job.spec.privacy.enabled:  # as train: a budget the spec cannot honour
        raise InputError(
            f"--max-epsilon {max_epsilon:g} was given, but federation {job.spec.federation_id}'s spec has no "
            "differential privacy: the evaluation would leave without noise; nothing was published"
        )
    base = rounds.load_global(job.store, job.spec, job.spec_sha, job.base_round, job.shapes)
    job.state.check(job.spec.federation_id, base)
    holdout = evaluate(job, base, prepare_data(job, base, Path(data_path)))
    assert holdout is not None  # the spec holds out rows
    if not publish_it:
        return holdout, "not published (--no-publish)"
    if job.spec.privacy.enabled:  # the ledger must know every release the store shows (bank.releases)
        from fedcli.bank import releases

        releases.cross_check(job.store, job.spec, job.me, job.ledger, key_path)
    charge = Charge.of(job.spec, job.ledger)
    if charge is not None and max_epsilon is not None:  # the bank's own policy can only lower the budget
        charge = replace(charge, budget_epsilon=min(charge.budget_epsilon, max_epsilon))
    return holdout, publish(job.store, job.spec, job.me, job.private, holdout, charge)
