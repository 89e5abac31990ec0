"""A bank's step: verify the latest global model, train on local rows, submit a signed delta.

`train_round` is a sequence of stages: verify base -> prepare data -> plan privacy -> train ->
privatize -> encode (compress or mask) -> submit. What the spec turns on is decided once
(bank.plan); each stage reads the plan and does one thing. Every check that can fail runs
before the first write to the store, so a refusal leaves nothing behind.
"""

import contextlib
import math
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedcli import digest, keys, models
from fedcli.bank import holdout
from fedcli.bank.checks import check_own_manifest, refuse_non_finite, require_finite
from fedcli.bank.plan import BankPlan, Release
from fedcli.bank.state import BankState, ledger_path_for, state_path_for
from fedcli.errors import AlreadyExists, FedcliError
from fedcli.keys import PublicIdentity
from fedcli.metrics import MANIFEST_METRICS, score
from fedcli.privacy import noise, policy
from fedcli.protocol import compression, rounds, tensors
from fedcli.protocol.spec import Spec, summary
from fedcli.protocol.tensors import Shapes
from fedcli.secagg import exchange
from fedcli.store import Store

Arrays = dict[str, np.ndarray]


@dataclass
class TrainResult:
    """What `fedcli train` reports: submitted or not, and why."""

    member: str
    round: int
    submitted: bool
    message: str
    num_examples: int = 0
    metrics: dict = field(default_factory=dict)
    data_notes: list[str] = field(default_factory=list)
    privacy: dict = field(default_factory=dict)  # the ledger entry charged for this release


def train_round(
    store: Store,
    key_path: Path,
    data_path: Path,
    coordinator_pub: Path,
    state_path: Path | None = None,
    console: Console | None = None,
    ledger_path: Path | None = None,
    max_epsilon: float | None = None,
) -> TrainResult:
    """One round at a bank. Every check that can fail (keys, spec, global model, table, labels,
    training, finiteness, budget) runs before the first write to the store, so a refusal leaves
    nothing behind; the ledger is charged last before the upload (a crash after it over-counts)."""
    job = open_round(store, key_path, coordinator_pub, state_path, console or Console(stderr=True))
    plan = BankPlan.decide(job.spec, key_path, ledger_path or ledger_path_for(key_path), max_epsilon)
    if store.exists(job.manifest_key):
        return resume(job, plan)
    base = verify_base(job, plan)
    data = prepare_data(job, base, Path(data_path))
    data, evaluation = holdout.split(job, base, data)  # [evaluation] holdout: rows never trained on
    release = plan_privacy(job, plan, data)
    trained = train(job, base, data, release)
    delta = privatize(plan, base, trained.weights)
    encoded = encode(job, plan, delta)
    return holdout.publish_after_training(job, evaluation, submit(job, base, data, trained, encoded))


# --------------------------------------------------------------------------- what every stage reads


@dataclass(frozen=True)
class BankRound:
    """Who this bank is and which round it works on, fixed before any stage runs."""

    store: Store
    spec: Spec
    spec_sha: str
    me: PublicIdentity
    private: Ed25519PrivateKey
    state: BankState
    shapes: Shapes
    round: int  # one past the latest published global, which this round trains from
    console: Console

    @property
    def base_round(self) -> int:
        return self.round - 1

    @property
    def tensors_key(self) -> str:
        return rounds.update_keys(self.round, self.me.name)[0]

    @property
    def manifest_key(self) -> str:
        return rounds.update_keys(self.round, self.me.name)[1]

    def nothing_to_do(self) -> TrainResult:
        message = f"{self.me.name} already submitted an update for round {self.round}; nothing to do"
        return TrainResult(self.me.name, self.round, False, message)


def open_round(
    store: Store, key_path: Path, coordinator_pub: Path, state_path: Path | None, console: Console
) -> BankRound:
    """Load the keys, the signed spec (this key must be enrolled) and the bank's state; find the round."""
    private, my_pub = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(my_pub)
    if me is None:
        raise FedcliError(
            f"{key_path} (fingerprint {keys.fingerprint(keys.unb64(my_pub))}) is not enrolled in federation {spec.federation_id}"
        )
    state = BankState.load(state_path or state_path_for(key_path))
    shapes = models.shapes(spec.model, spec.data.n_features)
    next_round = rounds.latest_round(store) + 1
    return BankRound(store, spec, spec_sha, me, private, state, shapes, next_round, console)


def resume(job: BankRound, plan: BankPlan) -> TrainResult:
    """My update for this round is already on the store; with secure aggregation, the second
    exchange (revealing seeds shared with members declared dropped) may be due."""
    check_own_manifest(job.store, job.spec, job.round, job.me, job.manifest_key)
    if plan.mask_key is None:
        return job.nothing_to_do()
    message = exchange.publish_recovery(job.store, job.spec, job.round, job.me.name, job.private, plan.mask_key)
    return TrainResult(job.me.name, job.round, False, message) if message else job.nothing_to_do()


# --------------------------------------------------------------------------- stage 1: verify base


def verify_base(job: BankRound, plan: BankPlan) -> rounds.Global:
    """The latest global model, verified and not rolled back from what this bank last saw."""
    if plan.mask_key is not None:
        exchange.refuse_if_dropped(job.store, job.spec, job.round, job.me.name)
    base = rounds.load_global(job.store, job.spec, job.spec_sha, job.base_round, job.shapes)
    job.state.check(job.spec.federation_id, base)
    job.console.print(
        "[bold]in force:[/] " + escape("; ".join(f"{k}: {v}" for k, v in summary(job.spec))),
        highlight=False,
        soft_wrap=True,
    )
    return base


# --------------------------------------------------------------------------- stage 2: prepare data


@dataclass(frozen=True)
class LocalData:
    """The bank's rows as model inputs, what preprocessing did to them, and the global model's metrics on them."""

    X: np.ndarray
    y: np.ndarray
    source: str  # the file or folder name, for messages
    notes: list[str]
    before: dict[str, float]  # metrics.score of the global model it starts from


def prepare_data(job: BankRound, base: rounds.Global, data_path: Path) -> LocalData:
    """Read and preprocess the table as the spec declares (streamed: only X and y stay), and score the global model on it."""
    from fedcli.bank import sources, tables  # pandas and pyarrow: only once there is a table to read

    table = sources.open_table(data_path)
    source = table.name
    status = job.console.status(f"reading {escape(source)}") if job.console.is_terminal else contextlib.nullcontext()
    with status:
        prep = tables.prepare(table, job.spec.data, source)
    notes = tables.notes(prep, source)
    labels = prep.labels()
    try:
        before = score(labels, models.predict(job.spec.model, base.tensors, prep.X))
    except FedcliError as e:
        if e.reason != "not-finite":
            raise
        refuse_non_finite(f"the global model's scores on {source} are not finite", base)
    return LocalData(prep.X, labels, source, notes, before)


# --------------------------------------------------------------------------- stage 3: plan privacy


def plan_privacy(job: BankRound, plan: BankPlan, data: LocalData) -> Release | None:
    """The DP release this round will make, refused now if even it would break the budget."""
    if plan.privacy is None:
        return None
    training = job.spec.training
    mechanism = policy.plan(plan.privacy.table, len(data.X), training.batch_size, training.epochs)
    release = Release(mechanism, plan.privacy)
    release.check()
    return release


# --------------------------------------------------------------------------- stage 4: train


@dataclass(frozen=True)
class Trained:
    weights: Arrays
    metrics: dict[str, float]  # loss and metrics.MANIFEST_METRICS before/after, rounded; they stay at the bank under DP
    release: Release | None  # with DP-SGD, the mechanism that actually ran


class TrainingBar:
    """The progress bar a terminal shows while the bank trains; it keeps the last batch's loss."""

    def __init__(self, console: Console, round_: int, total: int):
        self.progress = Progress(
            TextColumn(f"[bold]training[/] round {round_}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.total = total
        self.last_loss = float("nan")

    def __enter__(self) -> "TrainingBar":
        self.progress.start()
        self.task = self.progress.add_task("train", total=self.total, loss="")
        return self

    def __exit__(self, *exc_info) -> None:
        self.progress.stop()

    def step(self, done: int, total: int, loss: float) -> None:
        self.last_loss = loss
        self.progress.update(self.task, completed=done, total=max(total, done), loss=f"loss {loss:.4f}")


def train(job: BankRound, base: rounds.Global, data: LocalData, release: Release | None) -> Trained:
    """Train from the global model (DP-SGD under record-level DP), then refuse anything not finite."""
    if release is not None and release.dp_sgd:
        weights, loss, release = _train_dp_sgd(job, base, data, release)
    else:
        weights, loss = _train(job, base, data)
    return Trained(weights, _measure(job, base, data, weights, loss), release)


def _train(job: BankRound, base: rounds.Global, data: LocalData) -> tuple[Arrays, float]:
    from fedcli.bank.training import fit  # heavy (torch); imported only when there is work

    spec = job.spec
    batches = -(-len(data.X) // spec.training.batch_size)
    # Not a secret: the seed only makes a bank's rerun of a round reproducible.
    seed = int.from_bytes(
        bytes.fromhex(digest.sha256(f"{spec.federation_id}/{job.round}/{job.me.name}".encode())[:8]), "little"
    )
    with TrainingBar(job.console, job.round, spec.training.epochs * batches) as bar:
        return fit(
            spec.model, spec.training, base.tensors, data.X, data.y, seed, bar.step, prox_mu=spec.strategy.prox_mu
        )


def _train_dp_sgd(
    job: BankRound, base: rounds.Global, data: LocalData, release: Release
) -> tuple[Arrays, float, Release]:
    from fedcli.bank.training import fit_private  # heavy (torch, Opacus); imported only when there is work

    spec, planned = job.spec, release.mechanism
    with TrainingBar(job.console, job.round, planned.steps) as bar:
        weights, ran = fit_private(
            spec.model, spec.training, base.tensors, data.X, data.y, planned.clip, planned.noise_multiplier, bar.step
        )
    return weights, bar.last_loss, replace(release, mechanism=ran)


def _measure(job: BankRound, base: rounds.Global, data: LocalData, weights: Arrays, loss: float) -> dict[str, float]:
    """The round's metrics for the manifest, rounded: the last epoch's loss, and AUC, PR-AUC and recall at
    1 % FPR of the global model it started from (before) and of the trained one (after). PR-AUC and recall
    are what a rare class such as fraud is judged on; AUC alone looks good on them too easily.
    Non-finite weights or metrics are refused."""
    require_finite("the trained weights", weights, base)
    before = data.before
    after = score(data.y, models.predict(job.spec.model, weights, data.X))
    metrics = {"loss": loss}
    for key in MANIFEST_METRICS:
        metrics |= {f"{key}_before": before[key], f"{key}_after": after[key]}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        refuse_non_finite(f"training produced non-finite {', '.join(bad)} on {data.source}", base)
    return {k: round(v, 6) for k, v in metrics.items()}


# --------------------------------------------------------------------------- stage 5: privatize


def privatize(plan: BankPlan, base: rounds.Global, weights: Arrays) -> Arrays:
    """The delta from the global model, clipped and noised under update-level DP."""
    delta = {k: weights[k] - base.tensors[k] for k in weights}
    if plan.update_noise is not None:
        delta, _ = noise.privatize_update(delta, plan.update_noise.clip, plan.update_noise.multiplier)
    require_finite("the update", delta, base)
    return delta


# --------------------------------------------------------------------------- stage 6: encode


@dataclass(frozen=True)
class Encoded:
    payload: bytes  # the safetensors file to upload
    compression: dict  # the manifest's compression record
    residual: Arrays | None = None  # compression's error feedback, saved once the update is committed
    extra: dict = field(default_factory=dict)  # more manifest fields (secure aggregation's record)
    notes: list[str] = field(default_factory=list)


def encode(job: BankRound, plan: BankPlan, delta: Arrays) -> Encoded:
    """Compression or secure aggregation's masking (the spec never allows both) post-processes the delta."""
    if plan.compressed:
        return _compress(job, plan, delta)
    if plan.mask_key is not None:
        return _mask(job, plan, delta)
    return Encoded(tensors.encode(delta), plan.compression)


def _compress(job: BankRound, plan: BankPlan, delta: Arrays) -> Encoded:
    """Compress the delta plus the residual the last compressed update left behind (error feedback)."""
    previous = compression.load_residual(compression.residual_path(job.state.path), job.shapes)
    compressed, meta, residual = compression.encode(
        delta, plan.compression["method"], plan.compression.get("ratio"), previous
    )
    return Encoded(tensors.encode(compressed), meta, residual)


def _mask(job: BankRound, plan: BankPlan, delta: Arrays) -> Encoded:
    """Mask the delta with pairwise seeds so the coordinator only ever sees the sum of updates."""
    exchange.refuse_if_dropped(job.store, job.spec, job.round, job.me.name)  # again: training took a while
    masked, record, clipped = exchange.mask_delta(job.spec, job.round, job.me.name, plan.mask_key, delta)
    if plan.update_noise is not None:
        record["member_noise_multiplier"] = plan.update_noise.multiplier
    notes = []
    if clipped:
        notes.append(f"secure aggregation: {clipped} update values beyond ±{job.spec.secagg.clip} were clipped")
    return Encoded(tensors.encode(masked), plan.compression, extra={"secagg": record}, notes=notes)


# --------------------------------------------------------------------------- stage 7: submit


def submit(job: BankRound, base: rounds.Global, data: LocalData, trained: Trained, encoded: Encoded) -> TrainResult:
    """Sign, charge the ledger, upload (tensors, then the create-only manifest), then save local state."""
    signed = keys.sign_manifest(job.private, update_manifest(job, base, data, trained, encoded))
    release = trained.release
    charged = release.charge(job.round, job.spec.federation_id) if release is not None else {}
    if not upload(job, encoded.payload, signed):
        return job.nothing_to_do()
    if encoded.residual is not None:
        compression.save_residual(compression.residual_path(job.state.path), encoded.residual)
    job.state.save(job.spec.federation_id, base)
    method = encoded.compression["method"]
    sent = f"{len(encoded.payload):,} bytes" + ("" if method == "none" else f", {method}")
    message = f"submitted update for round {job.round} ({sent})"
    return TrainResult(
        job.me.name, job.round, True, message, len(data.X), trained.metrics, data.notes + encoded.notes, charged
    )


def update_manifest(job: BankRound, base: rounds.Global, data: LocalData, trained: Trained, encoded: Encoded) -> dict:
    """The update's manifest; under DP, row count and local metrics stay at the bank (they are not privatised)."""
    manifest = {
        "kind": "update",
        "format": rounds.FORMAT,
        "federation_id": job.spec.federation_id,
        "round": job.round,
        "member": job.me.name,
        "base_sha256": base.sha256,
        "tensors_sha256": digest.sha256(encoded.payload),
        "num_examples": int(len(data.X)),
        "compression": encoded.compression,
        "metrics": trained.metrics,
        "created_at": rounds.now(),
        "nonce": secrets.token_hex(16),
        **encoded.extra,
    }
    if trained.release is not None:
        del manifest["num_examples"], manifest["metrics"]
        manifest["dp"] = trained.release.manifest()
    return manifest


def upload(job: BankRound, payload: bytes, signed: bytes) -> bool:
    """The first writes: tensors, then the manifest that commits them. False if a run of mine got there first."""
    job.store.put(job.tensors_key, payload)
    try:
        job.store.put(job.manifest_key, signed, create_only=True)
    except AlreadyExists:  # another run got there first: it counts only if it is ours
        check_own_manifest(job.store, job.spec, job.round, job.me, job.manifest_key)
        return False
    except FedcliError:
        with contextlib.suppress(FedcliError):  # best effort: leave no tensors without a manifest
            job.store.delete(job.tensors_key)
        raise
    return True
