"""The spec's [privacy] table: the DP every update must carry, a bank's plan, and the coordinator's check.

See docs/privacy.md for what each mode protects and what it does not.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from fedcli.contract import strict_config
from fedcli.errors import FedcliError, VerificationError
from fedcli.privacy.accounting import Mechanism, dp_sgd_schedule, epsilon, noise_multiplier_for


@dataclass(frozen=True)
class PrivacySpec:
    """The spec's [privacy] table: which DP every update must carry, and each bank's budget.

    Either ``noise_multiplier`` is fixed, or ``target_epsilon`` is what ``rounds`` rounds may
    cost (each bank then derives its noise multiplier; in record mode from its own row count).
    ``budget_epsilon`` caps what a bank's ledger may reach, at ``delta``, over all rounds.
    """

    mode: str = "none"
    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int = 10
    delta: float = 1e-5
    budget_epsilon: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def noise_for(self, sample_rate: float = 1.0, steps_per_round: int = 1, beside: Mechanism | None = None) -> float:
        """The noise multiplier a bank uses (record mode: pass its DP-SGD schedule).

        `beside`: another release of the same privacy unit the bank makes every round (the holdout
        evaluation under DP, bank.holdout): a target epsilon then covers both over `rounds` rounds,
        so the evaluations never eat the budget the planned training rounds need.
        """
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None  # the contract: one of the two
        if beside is None:
            return noise_multiplier_for(self.target_epsilon, self.delta, self.rounds, sample_rate, steps_per_round)
        return noise_multiplier_beside(
            self.target_epsilon, self.delta, self.rounds, sample_rate, steps_per_round, beside
        )


def plan(ps: PrivacySpec, n_rows: int, batch_size: int, epochs: int, beside: Mechanism | None = None) -> Mechanism:
    """The mechanism a bank's next release will be, known before training (for the budget check).

    `beside`: a record-level release made every round next to training (PrivacySpec.noise_for)."""
    if ps.mode == "update":
        return Mechanism("update", ps.noise_for(), 1.0, 1, ps.clip)
    if ps.mode == "record":
        q, steps = dp_sgd_schedule(n_rows, batch_size, epochs)
        return Mechanism("record", ps.noise_for(q, steps, beside), q, steps, ps.clip)
    raise FedcliError("this federation does not use differential privacy")


@functools.lru_cache(maxsize=64)  # pure; a bisection over the accountant
def noise_multiplier_beside(
    target_epsilon: float, delta: float, rounds: int, sample_rate: float, steps_per_round: int, beside: Mechanism
) -> float:
    """Smallest DP-SGD noise multiplier (to 1 %) so `rounds` rounds of training and of `beside` stay within the target."""
    alone = epsilon([replace(beside, steps=beside.steps * rounds)], delta)
    if alone >= target_epsilon:
        raise FedcliError(
            f"the holdout evaluations alone would cost epsilon {alone:.3g} over {rounds} rounds, at least the "
            f"target {target_epsilon:g} (delta={delta:g}): raise [evaluation] noise or [privacy] target_epsilon"
        )

    def cost(z: float) -> float:
        training = Mechanism("record", z, sample_rate, steps_per_round * rounds, 1.0)
        return epsilon([training, replace(beside, steps=beside.steps * rounds)], delta)

    low = noise_multiplier_for(target_epsilon, delta, rounds, sample_rate, steps_per_round)  # training alone
    high = low * 2
    while cost(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise FedcliError(f"cannot reach epsilon={target_epsilon} at delta={delta} beside the holdout evaluations")
    while high - low > 0.01 * low:
        mid = (low + high) / 2
        low, high = (low, mid) if cost(mid) <= target_epsilon else (mid, high)
    return high


class PrivacyTable(BaseModel):
    """[privacy]: which differential privacy every update must carry, and each bank's budget."""

    model_config = strict_config()

    mode: Literal["none", "update", "record"] = Field(
        "none", description="none; update (a bank's whole contribution per round); record (one customer row, DP-SGD)"
    )
    clip: float = Field(
        1.0, gt=0, le=1e6, description="L2 clipping bound: of the whole update (update) or per example (record)"
    )
    noise_multiplier: float | None = Field(
        None, gt=0, le=1e4, description="fixed Gaussian noise multiplier; give this or target_epsilon, not both"
    )
    target_epsilon: float | None = Field(
        None, gt=0, le=1e4, description="epsilon that `rounds` rounds may cost; each bank derives its noise multiplier"
    )
    rounds: int = Field(10, ge=1, le=100_000, description="rounds the target_epsilon is spread over")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; keep it far below 1/rows")
    budget_epsilon: float | None = Field(
        None, gt=0, le=1e5, description="cap on a bank's ledger at delta, over all rounds (default: target_epsilon)"
    )

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.mode != "none" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"needs exactly one of noise_multiplier or target_epsilon for mode {self.mode}")
        if self.mode != "none" and self.budget_epsilon is None and self.target_epsilon is None:
            raise ValueError("needs budget_epsilon with a fixed noise_multiplier")
        return self


def privacy_spec(table: PrivacyTable) -> PrivacySpec:
    """The PrivacySpec a validated [privacy] table stands for (an unreachable target fails here, not at a bank)."""
    ps = PrivacySpec(
        mode=table.mode,
        clip=float(table.clip),
        noise_multiplier=_float(table.noise_multiplier),
        target_epsilon=_float(table.target_epsilon),
        rounds=table.rounds,
        delta=float(table.delta),
        budget_epsilon=_float(table.budget_epsilon),
    )
    if not ps.enabled:
        return ps
    if ps.budget_epsilon is None:
        ps = PrivacySpec(**{**asdict(ps), "budget_epsilon": ps.target_epsilon})
    if ps.target_epsilon is not None and ps.mode == "update":
        ps.noise_for()
    return ps


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def parse_privacy(table: dict | None) -> PrivacySpec:
    """Validate a [privacy] table on its own (the spec validates it as part of the whole document)."""
    from fedcli.contract import validate

    doc = validate(PrivacyTable, {} if table is None else table, "federation spec: [privacy]", FedcliError)
    return privacy_spec(doc)


def check_declared(dp: dict | None, ps: PrivacySpec, what: str) -> Mechanism | None:
    """Coordinator side: reject an update whose manifest declares weaker DP than the spec requires.

    The declaration is signed by the bank, so a bank that lies is identifiable, but this check
    cannot prove the noise was drawn: it stops misconfigured banks, not malicious ones.
    """
    if not ps.enabled:
        return None if dp is None else _mechanism(dp, what)
    if dp is None:
        raise VerificationError(f"{what}: declares no differential privacy; the federation requires {ps.mode}-level DP")
    mech = _mechanism(dp, what)
    if mech.mode != ps.mode:
        raise VerificationError(f"{what}: declares {mech.mode}-level DP; the federation requires {ps.mode}-level DP")
    if mech.mode == "update" and (mech.sample_rate != 1.0 or mech.steps != 1):
        raise VerificationError(f"{what}: update-level DP cannot claim subsampling or several steps")
    if ps.noise_multiplier is not None and mech.noise_multiplier < ps.noise_multiplier:
        raise VerificationError(
            f"{what}: noise multiplier {mech.noise_multiplier:g} is below the required {ps.noise_multiplier:g}"
        )
    if ps.target_epsilon is not None:
        planned = Mechanism(mech.mode, mech.noise_multiplier, mech.sample_rate, mech.steps * ps.rounds, mech.clip)
        eps = epsilon([planned], ps.delta)
        if eps > ps.target_epsilon * (1 + 1e-9):
            raise VerificationError(
                f"{what}: its DP would cost epsilon {eps:.3g} over {ps.rounds} rounds, "
                f"more than the required {ps.target_epsilon:g} (delta={ps.delta:g})"
            )
    return mech


def _mechanism(dp, what: str) -> Mechanism:
    if not isinstance(dp, dict):
        raise VerificationError(f"{what}: manifest dp field is not an object")
    try:
        return Mechanism.from_dict(dp)
    except FedcliError as e:
        raise VerificationError(f"{what}: {e}") from None
