"""Differential privacy for bank updates: clipping, Gaussian noise, accounting, and the ledger.

Two modes (see docs/privacy.md for what each protects and what it does not):

- ``update``: the bank clips the L2 norm of its whole update delta to ``clip`` and adds
  Gaussian noise of std ``noise_multiplier * clip`` before export. Unit of privacy: the
  bank's whole contribution to a round (its update versus a zero update).
- ``record``: the bank trains with DP-SGD (Opacus: per-example clipping, Gaussian noise,
  Poisson sampling). Unit of privacy: one customer record, even against the coordinator.

Accounting is never hand-written: every release is a (subsampled) Gaussian mechanism
described by ``(noise_multiplier, sample_rate, steps)`` and Opacus's RDP accountant composes
all of them. The ledger is the bank's local, append-only record of what it released; the
budget check runs against the ledger *before* an update leaves the bank.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import secrets
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Literal, Optional

import numpy as np
from pydantic import BaseModel, Field, model_validator

from fedcli.contract import strict_config
from fedcli.errors import ExitCode, FedcliError, VerificationError

if TYPE_CHECKING:  # torch is heavy; import it only where tensors are touched
    import torch

MODES = ("none", "update", "record")
ACCOUNTANT = "rdp"  # Opacus RDPAccountant; conservative and composes across mixed mechanisms
# Opacus's default RDP orders plus large ones: small-noise or many-step settings otherwise hit
# the top order and report a looser (still valid) epsilon.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 512, 1024]


class BudgetExceeded(FedcliError):
    """Exporting would push the bank past its configured (epsilon, delta) budget."""

    exit_code = ExitCode.BUDGET
    reason = "budget"


# --------------------------------------------------------------------------- randomness


def secure_numpy_rng() -> np.random.Generator:
    """A numpy PCG64 generator seeded with 128 bits from the OS CSPRNG (``secrets``).

    Why: the guarantee of the Gaussian mechanism holds only if the adversary cannot predict
    the noise. A fixed or time-based seed would let anyone who knows it subtract the noise.
    PCG64 is not itself a CSPRNG, but its 128-bit state is drawn fresh from the OS for every
    release and never stored, so the noise cannot be replayed or predicted.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def secure_torch_generator() -> "torch.Generator":
    """A torch generator seeded from the OS CSPRNG (64 bits: the most ``manual_seed`` takes).

    Used for Opacus's Poisson sampling and gradient noise. Opacus's own ``secure_mode`` needs
    torchcsprng, which has no build for Python 3.11 / torch 2.x; a fresh secret seed per
    training run is the best the installed stack offers (see docs/privacy.md, Randomness).
    """
    import torch

    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(64))
    return gen


# --------------------------------------------------------------------------- update-level DP


def update_norm(update: dict[str, np.ndarray]) -> float:
    """L2 norm of all arrays of an update taken together, computed in float64."""
    total = 0.0
    for name, a in update.items():
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise FedcliError(f"update tensor {name!r} is not floating point; it cannot be clipped and noised")
        total += float(np.sum(a.astype(np.float64) ** 2))
    return math.sqrt(total)


def clip_update(update: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the whole update so its L2 norm is at most ``clip``; returns (clipped, norm before).

    The bound is enforced after casting back to each array's dtype (float32 rounding could
    otherwise overshoot by ~1e-7), because the sensitivity the accountant assumes must hold exactly.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise FedcliError(f"clip must be a positive number, got {clip}")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise FedcliError("update contains NaN or infinite values")
    if norm <= clip:
        return {k: np.array(v, copy=True) for k, v in update.items()}, norm
    factor = clip / norm
    while True:
        clipped = {k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype) for k, v in update.items()}
        if update_norm(clipped) <= clip:
            return clipped, norm
        factor *= 1 - 1e-7


def add_gaussian_noise(
    update: dict[str, np.ndarray], std: float, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Add N(0, std^2) to every coordinate of the update.

    Each noise value is the sum of four standard normals divided by two (std 1), drawn in
    float64 and added before casting back: the mitigation Opacus uses against floating-point
    attacks on naive Gaussian samplers (Holohan & Braghin 2021; Jin et al. 2022).
    ``rng`` defaults to a fresh :func:`secure_numpy_rng`; pass one only in tests.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise FedcliError(f"noise std must be a non-negative number, got {std}")
    rng = rng or secure_numpy_rng()
    out = {}
    for name, a in update.items():
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise FedcliError(f"update tensor {name!r} is not floating point; it cannot be noised")
        noise = rng.standard_normal((4, *a.shape)).sum(axis=0) / 2.0
        out[name] = (a.astype(np.float64) + std * noise).astype(a.dtype)
    return out


def privatize_update(
    update: dict[str, np.ndarray], clip: float, noise_multiplier: float
) -> tuple[dict[str, np.ndarray], dict]:
    """Clip the whole update to ``clip`` and add Gaussian noise of std ``noise_multiplier*clip``.

    Returns the noised update and the manifest's ``dp`` record (no epsilon: that is the
    ledger's job, since it depends on every round the bank has joined). The raw norm, and
    whether clipping bit, are data-dependent and deliberately left out of the record.
    """
    mech = Mechanism(mode="update", noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1, clip=clip)
    clipped, _ = clip_update(update, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip), mech.manifest()


# --------------------------------------------------------------------------- accounting


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
    def from_dict(cls, d: dict) -> "Mechanism":
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


# --------------------------------------------------------------------------- federation policy


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

    def noise_for(self, sample_rate: float = 1.0, steps_per_round: int = 1) -> float:
        """The noise multiplier a bank uses (record mode: pass its DP-SGD schedule)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return noise_multiplier_for(self.target_epsilon, self.delta, self.rounds, sample_rate, steps_per_round)


def plan(ps: PrivacySpec, n_rows: int, batch_size: int, epochs: int) -> Mechanism:
    """The mechanism a bank's next release will be, known before training (for the budget check)."""
    if ps.mode == "update":
        return Mechanism("update", ps.noise_for(), 1.0, 1, ps.clip)
    if ps.mode == "record":
        q, steps = dp_sgd_schedule(n_rows, batch_size, epochs)
        return Mechanism("record", ps.noise_for(q, steps), q, steps, ps.clip)
    raise FedcliError("this federation does not use differential privacy")


class PrivacyTable(BaseModel):
    """[privacy]: which differential privacy every update must carry, and each bank's budget."""

    model_config = strict_config()

    mode: Literal["none", "update", "record"] = Field(
        "none", description="none; update (a bank's whole contribution per round); record (one customer row, DP-SGD)")
    clip: float = Field(1.0, gt=0, le=1e6, description="L2 clipping bound: of the whole update (update) or per example (record)")
    noise_multiplier: Optional[float] = Field(
        None, gt=0, le=1e4, description="fixed Gaussian noise multiplier; give this or target_epsilon, not both")
    target_epsilon: Optional[float] = Field(
        None, gt=0, le=1e4, description="epsilon that `rounds` rounds may cost; each bank derives its noise multiplier")
    rounds: int = Field(10, ge=1, le=100_000, description="rounds the target_epsilon is spread over")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of (epsilon, delta)-DP; keep it far below 1/rows")
    budget_epsilon: Optional[float] = Field(
        None, gt=0, le=1e5, description="cap on a bank's ledger at delta, over all rounds (default: target_epsilon)")

    @model_validator(mode="after")
    def _one_noise_source(self):
        if self.mode != "none" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(f"needs exactly one of noise_multiplier or target_epsilon for mode {self.mode}")
        if self.mode != "none" and self.budget_epsilon is None and self.target_epsilon is None:
            raise ValueError("needs budget_epsilon with a fixed noise_multiplier")
        return self


def privacy_spec(table: PrivacyTable) -> PrivacySpec:
    """The PrivacySpec a validated [privacy] table stands for (an unreachable target fails here, not at a bank)."""
    ps = PrivacySpec(mode=table.mode, clip=float(table.clip), noise_multiplier=_float(table.noise_multiplier),
                     target_epsilon=_float(table.target_epsilon), rounds=table.rounds, delta=float(table.delta),
                     budget_epsilon=_float(table.budget_epsilon))
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
    from .contract import validate

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


# --------------------------------------------------------------------------- ledger


class Ledger:
    """A bank's local privacy ledger: one JSON file, one entry per released update.

    Each entry: round, federation, mode, the mechanism's parameters, the delta used, the
    cumulative epsilon after it, and the time. Every release is charged, including a re-run
    of the same round (fresh noise on the same data is a second release). ``charge`` is
    meant to run *before* the update is exported: a crash afterwards over-counts, never
    under-counts. Writes are atomic (temp file + fsync + rename) and serialised by a lock
    file, so overlapping cron runs cannot lose an entry.

    Composition covers every entry of the same mode, across all federations, because the
    same bank data may be used in several of them; update and record epsilons protect
    different units and are kept apart.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> list[dict]:
        """Every release so far; a damaged ledger is refused, never read as an empty history."""
        from .contract import load_json, validate
        from .errors import InputError
        from .localdocs import MAX_LEDGER_BYTES, LedgerFile, read_bounded

        what = f"privacy ledger {self.path}"
        try:
            data = read_bounded(self.path, MAX_LEDGER_BYTES, "privacy ledger")
            if data is None:
                return []
            doc = validate(LedgerFile, load_json(data, what, MAX_LEDGER_BYTES, InputError), what, InputError)
        except FedcliError as e:
            raise InputError(f"{e}: it is unreadable, and fedcli refuses to guess what was spent; "
                             "restore it from backup") from None
        return [e.model_dump() for e in doc.entries]

    def mechanisms(self, mode: str) -> list[Mechanism]:
        return [Mechanism.from_dict(e) for e in self.entries() if e.get("mode") == mode]

    def spent(self, mode: str, delta: float) -> float:
        """Epsilon spent so far in ``mode`` at ``delta``, composed over the whole history."""
        return epsilon(self.mechanisms(mode), delta)

    def summary(self) -> list[dict]:
        """Per mode: releases, epsilon spent now and the budget, at the latest entry's delta."""
        rows = []
        for mode in ("update", "record"):
            entries = [e for e in self.entries() if e.get("mode") == mode]
            if entries:
                last = entries[-1]
                rows.append({"mode": mode, "releases": len(entries), "delta": last["delta"],
                             "epsilon": self.spent(mode, last["delta"]), "budget_epsilon": last["budget_epsilon"]})
        return rows

    def check(self, mech: Mechanism, budget_epsilon: float, delta: float) -> float:
        """Epsilon after also releasing ``mech``; raises BudgetExceeded if over budget."""
        history = self.mechanisms(mech.mode)
        after = epsilon([*history, mech], delta)
        if after > budget_epsilon:
            before = epsilon(history, delta)
            raise BudgetExceeded(
                f"privacy budget exceeded: exporting would bring {mech.mode}-level epsilon from "
                f"{before:.3g} to {after:.3g} (budget {budget_epsilon:g} at delta={delta:g}); update not exported"
            )
        return after

    def charge(self, mech: Mechanism, *, round: int, federation: str, budget_epsilon: float, delta: float) -> dict:
        """Check the budget and append the release to the ledger, atomically; returns the entry."""
        with self._locked():
            after = self.check(mech, budget_epsilon, delta)
            entry = {
                "round": int(round),
                "federation": federation,
                "mode": mech.mode,
                "noise_multiplier": float(mech.noise_multiplier),
                "sample_rate": float(mech.sample_rate),
                "steps": int(mech.steps),
                "clip": float(mech.clip),
                "delta": float(delta),
                "epsilon_after": float(after),
                "budget_epsilon": float(budget_epsilon),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self._write([*self.entries(), entry])
        return entry

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, entries: list[dict]) -> None:
        """Validated against the ledger's contract, then written atomically (localdocs.write_atomic)."""
        from .localdocs import LedgerFile, write_atomic

        doc = LedgerFile.model_validate({"version": 1, "accountant": ACCOUNTANT, "entries": entries})
        write_atomic(self.path, json.dumps(doc.model_dump(), indent=2).encode(), self.path.name + ".")


# --------------------------------------------------------------------------- record-level DP (DP-SGD)


def train_dp_sgd(
    model: "torch.nn.Module",
    x: "torch.Tensor",
    y: "torch.Tensor",
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    noise_multiplier: float,
    loss_fn: "torch.nn.Module | None" = None,
    on_step: "Callable[[int, int, float], None] | None" = None,
) -> Mechanism:
    """Train ``model`` in place with DP-SGD (Opacus) and return the mechanism to charge.

    The optimizer is Adam, as in the non-private loop; Adam only post-processes the noised
    gradients, so the guarantee is DP-SGD's.
    Per-example gradients are clipped to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` is added to their sum; batches are Poisson-sampled
    with rate batch_size/len(x), as the RDP analysis assumes. Sampling and noise come from
    generators seeded with fresh OS randomness, and the optimizer's ``secure_mode`` noise
    (sum of four Gaussians) is switched on against floating-point attacks.
    The default loss is BCEWithLogits for a binary target (model output of shape (n,) or (n, 1)).
    ``on_step(done, total, loss)`` is called after each step (total is the expected count).
    """
    import torch
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    if len(x) == 0 or len(x) != len(y):
        raise FedcliError("DP-SGD needs a non-empty dataset with one label per row")
    if not noise_multiplier > 0 or not max_grad_norm > 0:
        raise FedcliError("DP-SGD needs a positive noise multiplier and max_grad_norm")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FedcliError(f"model is not compatible with DP-SGD: {errors[0]}")
    loss_fn = loss_fn or torch.nn.BCEWithLogitsLoss()
    loader = DataLoader(
        TensorDataset(x, y), batch_size=min(batch_size, len(x)), shuffle=True, generator=secure_torch_generator()
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # as fedcli.train.fit: same lr meaning
    with warnings.catch_warnings():  # "Secure RNG turned off": we pass secret-seeded generators
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=secure_torch_generator(),
    )
    dp_optimizer.secure_mode = True  # the 4-sample noise; our generator is already secret-seeded
    dp_model.train()
    with warnings.catch_warnings():  # torch's full-backward-hook notice on input layers is noise here
        warnings.simplefilter("ignore", UserWarning)
        _dp_sgd_epochs(dp_model, dp_optimizer, dp_loader, epochs, loss_fn, on_step)
    dp_model._close()  # remove hooks and grad_sample attributes; ``model`` holds the trained weights
    hist = engine.accountant.history
    if len(hist) != 1:
        raise FedcliError(f"unexpected DP-SGD history {hist}")
    z, q, steps = hist[0]
    return Mechanism(mode="record", noise_multiplier=float(z), sample_rate=float(q), steps=int(steps), clip=max_grad_norm)


def _dp_sgd_epochs(dp_model, dp_optimizer, dp_loader, epochs, loss_fn, on_step) -> None:
    done, total = 0, epochs * len(dp_loader)
    for _ in range(epochs):
        for xb, yb in dp_loader:
            dp_optimizer.zero_grad(set_to_none=True)
            out = dp_model(xb)
            if out.dim() == 2 and out.shape[1] == 1 and yb.dim() == 1:
                out = out.squeeze(1)
            # An empty Poisson batch still takes a (pure-noise) step, as the accountant assumes.
            loss = loss_fn(out, yb.to(out.dtype)) if len(xb) else out.sum() * 0.0
            loss.backward()
            dp_optimizer.step()
            done += 1
            if on_step:
                on_step(done, total, float(loss))
