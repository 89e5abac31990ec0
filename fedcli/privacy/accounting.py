"""Privacy accounting: every release is a (subsampled) Gaussian mechanism, composed by Opacus's RDP accountant.

Never hand-written: ``(noise_multiplier, sample_rate, steps)`` describes each release and
the accountant composes all of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from fedcli.errors import FedcliError

MODES = ("none", "update", "record")


ACCOUNTANT = "rdp"  # Opacus RDPAccountant; conservative and composes across mixed mechanisms


# Opacus's default RDP orders plus large ones: small-noise or many-step settings otherwise hit
# the top order and report a looser (still valid) epsilon.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024]


@dataclass(frozen=True)
class Mechanism:
    """One release: ``steps`` compositions of a Gaussian mechanism with Poisson ``sample_rate``.

    update mode: noise_multiplier z, sample_rate 1, steps 1 per round (std z*clip, sensitivity clip).
    record mode: the DP-SGD run of one round (per-example clip, Opacus's sample rate and steps).
    """

    mode: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip: float

    def __post_init__(self):
        if self.mode not in ("update", "record"):
            raise FedcliError(f"unknown DP mode {self.mode!r} (expected update or record)")
        if not self.noise_multiplier > 0 or not math.isfinite(self.noise_multiplier):
            raise FedcliError(f"noise multiplier must be positive, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise FedcliError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise FedcliError(f"steps must be a positive integer, got {self.steps}")
        if not self.clip > 0:
            raise FedcliError(f"clip must be positive, got {self.clip}")

    def manifest(self) -> dict:
        """The ``dp`` field of a signed update manifest."""
        return {
            "mode": self.mode,
            "mechanism": "gaussian" if self.mode == "update" else "dp-sgd",
            "accountant": ACCOUNTANT,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Mechanism:
        try:
            return cls(
                mode=str(d["mode"]),
                noise_multiplier=float(d["noise_multiplier"]),
                sample_rate=float(d["sample_rate"]),
                steps=int(d["steps"]),
                clip=float(d["clip"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FedcliError(f"malformed DP record: {e}") from None


def epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of all ``mechanisms`` (Opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if not 0 < delta < 1:
        raise FedcliError(f"delta must be in (0, 1), got {delta}")
    steps: dict[tuple[float, float], int] = {}  # identical mechanisms compose by adding steps
    for m in mechanisms:
        steps[(m.noise_multiplier, m.sample_rate)] = steps.get((m.noise_multiplier, m.sample_rate), 0) + int(m.steps)
    acc = RDPAccountant()
    acc.history = [(z, q, n) for (z, q), n in steps.items()]
    return float(acc.get_epsilon(delta=delta, alphas=ALPHAS)) if acc.history else 0.0


def epsilon_update_level(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` update-level releases with noise multiplier z (no subsampling)."""
    return epsilon([Mechanism("update", noise_multiplier, 1.0, rounds, 1.0)], delta)


def epsilon_dp_sgd(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of DP-SGD with Poisson sampling rate ``sample_rate`` for ``steps`` steps."""
    return epsilon([Mechanism("record", noise_multiplier, sample_rate, steps, 1.0)], delta)


def dp_sgd_schedule(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) that :func:`train_dp_sgd` will use on ``n`` rows, as Opacus computes them.

    Known before training, so the budget can be checked (and a target epsilon turned into a
    noise multiplier) before any work is done.
    """
    if n < 1 or batch_size < 1 or epochs < 1:
        raise FedcliError("DP-SGD needs at least one row, batch_size >= 1 and epochs >= 1")
    batches = math.ceil(n / min(batch_size, n))
    return 1.0 / batches, epochs * batches


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, and a binary search over the accountant
def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, sample_rate: float = 1.0, steps_per_round: int = 1
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) so ``rounds`` rounds stay within the target.

    Update mode: defaults (sample_rate 1, one step per round). Record mode: pass DP-SGD's
    sample rate and steps per round. Uses Opacus's ``get_noise_multiplier`` (RDP).
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0 or rounds < 1:
        raise FedcliError("target epsilon must be positive and rounds at least 1")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=rounds * steps_per_round,
                accountant=ACCOUNTANT,
                epsilon_tolerance=0.01,
                alphas=ALPHAS,
            )
        )
    except ValueError as e:
        raise FedcliError(f"cannot reach epsilon={target_epsilon} at delta={delta}: {e}") from None
