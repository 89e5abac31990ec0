"""What the spec turns on at a bank, decided once per round, so the stages of bank.step never ask the spec again.

Differential privacy (none, update-level noise, record-level DP-SGD), secure aggregation (masking with
the bank's X25519 key) and compression are read from the signed spec here, into one frozen plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcli import keys
from fedcli.errors import FedcliError, InputError
from fedcli.privacy.accounting import Mechanism
from fedcli.privacy.ledger import Ledger
from fedcli.privacy.policy import PrivacySpec
from fedcli.protocol.spec import Spec
from fedcli.secagg import exchange


@dataclass(frozen=True)
class UpdateNoise:
    """Update-level DP: the whole delta is clipped to `clip` and noised with this bank's multiplier."""

    clip: float
    multiplier: float  # the spec's, or this bank's share of it when secure aggregation shares the noise


@dataclass(frozen=True)
class PrivacyPlan:
    """Differential privacy at this bank: the spec's [privacy] table and the ledger every release is charged to."""

    table: PrivacySpec
    ledger: Ledger
    budget_epsilon: float  # the spec's budget, lowered by the bank's own --max-epsilon


@dataclass(frozen=True)
class Release:
    """The DP release of this round: its mechanism, checked against the budget before training, charged last."""

    mechanism: Mechanism
    privacy: PrivacyPlan

    @property
    def dp_sgd(self) -> bool:
        return self.mechanism.mode == "record"

    def check(self) -> None:
        """Refuse before any work if even this release would break the budget."""
        self.privacy.ledger.check(self.mechanism, self.privacy.budget_epsilon, self.privacy.table.delta)

    def charge(self, round_: int, federation_id: str) -> dict:
        """Append the release to the ledger (before anything leaves the bank: a crash after over-counts)."""
        return self.privacy.ledger.charge(
            self.mechanism,
            round=round_,
            federation=federation_id,
            budget_epsilon=self.privacy.budget_epsilon,
            delta=self.privacy.table.delta,
        )

    def manifest(self) -> dict:
        """The update manifest's `dp` field."""
        return self.mechanism.manifest() | {"delta": self.privacy.table.delta}


@dataclass(frozen=True)
class BankPlan:
    """What this round does beyond plain training; None means the feature is off."""

    privacy: PrivacyPlan | None  # differential privacy and its ledger
    update_noise: UpdateNoise | None  # update-level DP (record-level DP noises gradients while training)
    mask_key: X25519PrivateKey | None  # secure aggregation: the bank's X25519 key masks its update
    compression: dict  # the manifest's compression record; method "none" sends float32 as trained

    @property
    def compressed(self) -> bool:
        return self.compression["method"] != "none"

    @classmethod
    def decide(cls, spec: Spec, key_path: Path, ledger_path: Path | Ledger, max_epsilon: float | None) -> BankPlan:
        """Read the spec's switches once. The only I/O: the X25519 key, when secure aggregation is on.

        `ledger_path`: the ledger file, or a Ledger already bound to this key and federation."""
        mask_key = keys.load_mask_key(key_path) if spec.secagg.enabled else None
        ledger = ledger_path if isinstance(ledger_path, Ledger) else Ledger(ledger_path)
        privacy, update_noise = _privacy(spec, ledger, max_epsilon, mask_key)
        return cls(privacy, update_noise, mask_key, spec.strategy.compression_meta)


def _privacy(
    spec: Spec, ledger: Ledger, max_epsilon: float | None, mask_key: X25519PrivateKey | None
) -> tuple[PrivacyPlan | None, UpdateNoise | None]:
    """Differential privacy's part of the plan: the ledger and budget, and the noise of update-level DP."""
    ps = spec.privacy
    if not ps.enabled:
        if max_epsilon is not None:  # the bank asked for a budget the spec cannot honour: nothing leaves
            raise InputError(
                f"--max-epsilon {max_epsilon:g} was given, but federation {spec.federation_id}'s spec has no "
                "differential privacy ([privacy] is off): an update would leave without DP; nothing was sent "
                "(drop --max-epsilon to train without DP)"
            )
        return None, None
    if ps.budget_epsilon is None:  # privacy_spec fills it in from target_epsilon; unreachable from a parsed spec
        raise FedcliError("[privacy] needs budget_epsilon with a fixed noise_multiplier")
    budget = ps.budget_epsilon if max_epsilon is None else min(ps.budget_epsilon, max_epsilon)
    privacy = PrivacyPlan(ps, ledger, budget)
    update_noise = None
    if ps.mode == "update":  # with secure aggregation and shared noise, each bank adds its share
        multiplier = ps.noise_for()
        update_noise = UpdateNoise(
            ps.clip, exchange.member_noise(spec, multiplier) if mask_key is not None else multiplier
        )
    return privacy, update_noise
