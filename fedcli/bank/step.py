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
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedcli import digest, keys, models
from fedcli.bank import freshness, holdout, pinning, releases
from fedcli.bank.checks import check_own_manifest, refuse_non_finite, require_finite
from fedcli.bank.kernel import probabilities
from fedcli.bank.plan import BankPlan, Release
from fedcli.bank.state import BankState, bank_files, key_hex
from fedcli.errors import AlreadyExists, FedcliError
from fedcli.keys import PublicIdentity
from fedcli.metrics import MANIFEST_METRICS, score
from fedcli.privacy import noise, policy
from fedcli.privacy.ledger import Ledger
from fedcli.protocol import compression, final, rounds, tensors
from fedcli.protocol.spec import Spec, summary
from fedcli.protocol.tensors import Shapes
from fedcli.secagg import exchange, reveals
from fedcli.store import Store

if TYPE_CHECKING:  # bank.rows reads tables (pyarrow, pandas): imported once there is a table to read
    from fedcli.bank.rows import HeldOut, LocalRows

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
    accept_spec_version: int | None = None,
) -> TrainResult:
    """One round at a bank. Every check that can fail (keys, spec, global model, table, labels,
    training, finiteness, budget) runs before the first write to the store, so a refusal leaves
    nothing behind; the ledger is charged last before the upload (a crash after it over-counts)."""
    job = open_round(store, key_path, coordinator_pub, state_path, console or Console(stderr=True), ledger_path)
    ended = final.load_final(store, job.spec, job.spec_sha)
    if ended is not None:  # the coordinator signed the end: nothing to train, nothing to spend
        job.state.saw_final(job.spec.federation_id, ended.round)
        message = ended.describe(job.spec.federation_id) + "; nothing trained, no privacy budget spent"
        return TrainResult(job.me.name, job.round, False, message)
    job.state.check_not_ended()  # a deleted final marker must not reopen the federation
    freshness.check_fresh(store, job.spec, job.spec_sha, job.state)  # rollback and max_round_age, before anything
    plan = BankPlan.decide(job.spec, key_path, job.ledger, max_epsilon)
    pinning.pin(job.spec, job.spec_sha, job.me.name, job.state.path, accept_spec_version, job.console, job.round)
    if plan.privacy is not None:  # the ledger must know every release the store shows (bank.releases)
        releases.cross_check(store, job.spec, job.me, job.ledger, key_path)
    if store.exists(job.manifest_key):
        return resume(job, plan)
    base = verify_base(job, plan)
    data = prepare_data(job, base, Path(data_path))
    evaluation = holdout.evaluate(job, base, data)  # [evaluation] holdout: the global on rows never trained on
    release = plan_privacy(job, plan, data)
    trained = train(job, base, data, release)
    delta = privatize(plan, base, trained.weights)
    encoded = encode(job, plan, delta, base.sha256)
    return holdout.publish_after_training(job, evaluation, submit(job, base, data, trained, encoded), plan)


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
    ledger: Ledger  # this key's ledger in this federation (bank.state.bank_files), bound to both

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
    store: Store,
    key_path: Path,
    coordinator_pub: Path,
    state_path: Path | None,
    console: Console,
    ledger_path: Path | None = None,
) -> BankRound:
    """Load the keys, the signed spec (this key must be enrolled) and the bank's state; find the round."""
    private, my_pub = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(my_pub)
    if me is None:
        raise FedcliError(
            f"{key_path} (fingerprint {keys.fingerprint(keys.unb64(my_pub))}) is not enrolled in federation {spec.federation_id}"
        )
    files = bank_files(key_path, key_hex(my_pub), spec.federation_id, state_path, ledger_path)
    state = BankState.for_federation(files, spec.federation_id)
    shapes = models.shapes(spec.model, spec.data.n_features)
    next_round = rounds.latest_round(store) + 1
    ledger = releases.bank_ledger(spec, key_path, my_pub, ledger_path)
    return BankRound(store, spec, spec_sha, me, private, state, shapes, next_round, console, ledger)


def resume(job: BankRound, plan: BankPlan) -> TrainResult:
    """My update for this round is already on the store; with secure aggregation, the second
    exchange (revealing seeds shared with members declared dropped) may be due."""
    check_own_manifest(job.store, job.spec, job.round, job.me, job.manifest_key)
    if plan.mask_key is None:
        return job.nothing_to_do()
    record = reveals.record_path_for(job.state.path)  # what this bank revealed, per round (never both secrets)
    message = exchange.publish_recovery(job.store, job.spec, job.round, job.me.name, job.private, plan.mask_key, record)
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
    """The rows this round trains on (bank.rows: in memory or re-read per epoch), the global model's metrics on
    them, and the rows held out for evaluation ([evaluation] holdout)."""

    rows: "LocalRows"
    source: str  # the file or folder name, for messages
    before: dict[str, float]  # metrics.score of the global model it starts from, on the training rows
    notes: list[str]
    held: "HeldOut | None" = None

    @property
    def y(self) -> np.ndarray:
        return self.rows.y

    def __len__(self) -> int:
        return len(self.rows)


def prepare_data(job: BankRound, base: rounds.Global, data_path: Path) -> LocalData:
    """Read and preprocess the table as the spec declares, scoring the global model on each chunk as it goes."""
    from fedcli.bank import rows, sources  # pandas and pyarrow: only once there is a table to read

    table = sources.open_table(data_path)
    source = table.name
    selector = holdout.selector(job.spec)
    status = job.console.status(f"reading {escape(source)}") if job.console.is_terminal else contextlib.nullcontext()
    with status:
        scorer = lambda X: probabilities(job.spec.model, base.tensors, X)  # noqa: E731
        local, scores, held = rows.read(table, job.spec.data, scorer, selector)
    notes = list(local.notes) + holdout.notes(job.spec, source, len(local), held)
    try:
        before = score(local.y, scores)
    except FedcliError as e:
        if e.reason != "not-finite":
            raise
        refuse_non_finite(f"the global model's scores on {source} are not finite", base)
    return LocalData(local, source, before, notes, held)


# --------------------------------------------------------------------------- stage 3: plan privacy


def plan_privacy(job: BankRound, plan: BankPlan, data: LocalData) -> Release | None:
    """The DP release this round will make, refused now if even it would break the budget."""
    if plan.privacy is None:
        return None
    training = job.spec.training
    beside = holdout.mechanism(job.spec) if data.held is not None else None  # DP holdout evaluations, each round
    mechanism = policy.plan(plan.privacy.table, len(data), training.batch_size, training.epochs, beside)
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
    from fedcli.bank.training import fit_stream

    spec = job.spec
    batches = -(-len(data) // spec.training.batch_size)
    # Not a secret: the seed only makes a bank's rerun of a round reproducible.
    seed = int.from_bytes(
        bytes.fromhex(digest.sha256(f"{spec.federation_id}/{job.round}/{job.me.name}".encode())[:8]), "little"
    )
    with TrainingBar(job.console, job.round, spec.training.epochs * batches) as bar:
        epochs = data.rows.epochs(seed, spec.training.batch_size)
        return fit_stream(
            spec.model, spec.training, base.tensors, epochs, len(data), seed, bar.step, prox_mu=spec.strategy.prox_mu
        )


def _train_dp_sgd(
    job: BankRound, base: rounds.Global, data: LocalData, release: Release
) -> tuple[Arrays, float, Release]:
    from fedcli.bank.training import fit_private  # heavy (torch, Opacus); imported only when there is work

    spec, planned = job.spec, release.mechanism
    with TrainingBar(job.console, job.round, planned.steps) as bar:
        weights, ran = fit_private(
            spec.model,
            spec.training,
            base.tensors,
            data.rows.matrix(),
            data.y,
            planned.clip,
            planned.noise_multiplier,
            bar.step,
        )
    return weights, bar.last_loss, replace(release, mechanism=ran)


def _measure(job: BankRound, base: rounds.Global, data: LocalData, weights: Arrays, loss: float) -> dict[str, float]:
    """The round's metrics for the manifest, rounded: the last epoch's loss, and AUC, PR-AUC and recall at
    1 % FPR of the global model it started from (before) and of the trained one (after). PR-AUC and recall
    are what a rare class such as fraud is judged on; AUC alone looks good on them too easily.
    Non-finite weights or metrics are refused."""
    require_finite("the trained weights", weights, base)
    before = data.before
    after = score(data.y, data.rows.scores(lambda X: probabilities(job.spec.model, weights, X)))
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


def encode(job: BankRound, plan: BankPlan, delta: Arrays, base_sha: str = "") -> Encoded:
    """Compression or secure aggregation's masking (the spec never allows both) post-processes the delta."""
    if plan.compressed:
        return _compress(job, plan, delta)
    if plan.mask_key is not None:
        return _mask(job, plan, delta, base_sha)
    return Encoded(tensors.encode(delta), plan.compression)


def _compress(job: BankRound, plan: BankPlan, delta: Arrays) -> Encoded:
    """Compress the delta plus the residual the last compressed update left behind (error feedback)."""
    previous = compression.load_residual(compression.residual_path(job.state.path), job.shapes)
    compressed, meta, residual = compression.encode(
        delta, plan.compression["method"], plan.compression.get("ratio"), previous
    )
    return Encoded(tensors.encode(compressed), meta, residual)


def _mask(job: BankRound, plan: BankPlan, delta: Arrays, base_sha: str) -> Encoded:
    """Mask the delta with pairwise seeds so the coordinator only ever sees the sum of updates."""
    exchange.refuse_if_dropped(job.store, job.spec, job.round, job.me.name)  # again: training took a while
    masked, record, clipped, pair_file = exchange.mask_delta(
        job.spec, job.round, job.me.name, plan.mask_key, delta, base_sha
    )
    exchange.put_pair_shares(job.store, job.round, job.me.name, pair_file)  # before the manifest that names it
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
        job.state.path.parent.mkdir(parents=True, exist_ok=True)
        compression.save_residual(compression.residual_path(job.state.path), encoded.residual)
    job.state.save(job.spec.federation_id, base)
    method = encoded.compression["method"]
    sent = f"{len(encoded.payload):,} bytes" + ("" if method == "none" else f", {method}")
    message = f"submitted update for round {job.round} ({sent})"
    return TrainResult(
        job.me.name, job.round, True, message, len(data), trained.metrics, data.notes + encoded.notes, charged
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
        "num_examples": len(data),
        "compression": encoded.compression,
        "metrics": trained.metrics,
        "created_at": rounds.now(),
        "nonce": secrets.token_hex(16),
        "spec_sha256": job.spec_sha,
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
