"""A bank's step: verify the latest global model, train on local rows, submit a signed delta."""

import contextlib
import hashlib
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fedcli import digest, keys, models
from fedcli.bank import tables
from fedcli.bank.state import BankState, ledger_path_for, state_path_for
from fedcli.bank.training import fit, fit_private
from fedcli.errors import AlreadyExists, FedcliError, NotRegular, StoreError, VerificationError
from fedcli.metrics import score
from fedcli.privacy import noise, policy
from fedcli.privacy.ledger import Ledger
from fedcli.protocol import compression, rounds
from fedcli.protocol.spec import summary
from fedcli.protocol.tensors import encode
from fedcli.store import Store


@dataclass
class TrainResult:
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
    console = console or Console(stderr=True)
    private, my_pub = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(my_pub)
    if me is None:
        raise FedcliError(
            f"{key_path} (fingerprint {keys.fingerprint(keys.unb64(my_pub))}) is not enrolled in federation {spec.federation_id}"
        )
    state = BankState.load(state_path or state_path_for(key_path))
    shapes = models.shapes(spec.model, spec.data.n_features)
    base_round = rounds.latest_round(store)
    r = base_round + 1
    tkey, mkey = rounds.update_keys(r, me.name)
    secure = spec.secagg.enabled
    if secure:
        from fedcli.secagg import exchange

        mask_key = keys.load_mask_key(key_path)
    if store.exists(mkey):
        check_own_manifest(store, spec, r, me, mkey)
        # Secure aggregation's second exchange: reveal seeds with members declared dropped.
        msg = exchange.publish_recovery(store, spec, r, me.name, private, mask_key) if secure else None
        return TrainResult(
            me.name, r, False, msg or f"{me.name} already submitted an update for round {r}; nothing to do"
        )
    if secure:
        exchange.refuse_if_dropped(store, spec, r, me.name)
    base = rounds.load_global(store, spec, spec_sha, base_round, shapes)
    state.check(spec.federation_id, base)
    console.print(
        "[bold]in force:[/] " + escape("; ".join(f"{k}: {v}" for k, v in summary(spec))),
        highlight=False,
        soft_wrap=True,
    )

    source = Path(data_path).name
    with console.status(f"reading {escape(source)}") if console.is_terminal else contextlib.nullcontext():
        prep = tables.prepare(tables.read_table(data_path), spec.data, source)
    notes = tables.notes(prep, source)
    try:
        before = score(prep.y, models.predict(spec.model, base.tensors, prep.X))
    except FedcliError as e:
        if e.reason != "not-finite":
            raise
        refuse_non_finite(f"the global model's scores on {source} are not finite", base)
    ps = spec.privacy
    if ps.enabled:  # refuse before any work if even this release would break the budget
        ledger = Ledger(ledger_path or ledger_path_for(key_path))
        budget = ps.budget_epsilon if max_epsilon is None else min(ps.budget_epsilon, max_epsilon)
        mech = policy.plan(ps, len(prep.X), spec.training.batch_size, spec.training.epochs)
        ledger.check(mech, budget, ps.delta)

    # Training seed is not a secret: it only makes a bank's rerun reproducible.
    seed = int.from_bytes(hashlib.sha256(f"{spec.federation_id}/{r}/{me.name}".encode()).digest()[:4], "little")
    batches = -(-len(prep.X) // spec.training.batch_size)
    expected = mech.steps if ps.mode == "record" else spec.training.epochs * batches
    with Progress(
        TextColumn(f"[bold]training[/] round {r}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("train", total=expected, loss="")
        last = [float("nan")]

        def step(done, total, loss):
            last[0] = loss
            progress.update(task, completed=done, total=max(total, done), loss=f"loss {loss:.4f}")

        if ps.mode == "record":
            weights, mech = fit_private(
                spec.model, spec.training, base.tensors, prep.X, prep.y, ps.clip, mech.noise_multiplier, step
            )
            loss = last[0]
        else:
            weights, loss = fit(
                spec.model, spec.training, base.tensors, prep.X, prep.y, seed, step, prox_mu=spec.strategy.prox_mu
            )
    require_finite("the trained weights", weights, base)
    after = score(prep.y, models.predict(spec.model, weights, prep.X))
    metrics = {"loss": loss, "auc_before": before["auc"], "auc_after": after["auc"]}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        refuse_non_finite(f"training produced non-finite {', '.join(bad)} on {source}", base)
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    delta = {k: weights[k] - base.tensors[k] for k in weights}
    if ps.mode == "update":  # with secure aggregation and shared noise, each bank adds its share
        nm = exchange.member_noise(spec, mech.noise_multiplier) if secure else mech.noise_multiplier
        delta, _ = noise.privatize_update(delta, ps.clip, nm)
    require_finite("the update", delta, base)

    # Compression (with the bank's error-feedback residual) only post-processes the delta; secure
    # aggregation's masking (never combined with compression) comes after it.
    cmeta = spec.strategy.compression_meta
    res_path, residual = compression.residual_path(state.path), None
    if cmeta["method"] != "none":
        delta, cmeta, residual = compression.encode(
            delta, cmeta["method"], cmeta.get("ratio"), compression.load_residual(res_path, shapes)
        )
    extra = {}
    if secure:
        exchange.refuse_if_dropped(store, spec, r, me.name)  # again: training took a while
        delta, extra["secagg"], clipped = exchange.mask_delta(spec, r, me.name, mask_key, delta)
        if ps.mode == "update":
            extra["secagg"]["member_noise_multiplier"] = nm
        if clipped:
            notes.append(f"secure aggregation: {clipped} update values beyond ±{spec.secagg.clip} were clipped")
    data = encode(delta)
    manifest = {
        "kind": "update",
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "member": me.name,
        "base_sha256": base.sha256,
        "tensors_sha256": digest.sha256(data),
        "num_examples": int(len(prep.X)),
        "compression": cmeta,
        "metrics": metrics,
        "created_at": rounds.now(),
        "nonce": secrets.token_hex(16),
        **extra,
    }
    if ps.enabled:  # row count and local metrics are not privatised: they stay at the bank
        del manifest["num_examples"], manifest["metrics"]
        manifest["dp"] = mech.manifest() | {"delta": ps.delta}
    signed = keys.sign_manifest(private, manifest)

    charged = {}
    if ps.enabled:  # charged before anything leaves the bank: a crash after this over-counts, never under
        charged = ledger.charge(mech, round=r, federation=spec.federation_id, budget_epsilon=budget, delta=ps.delta)
    store.put(tkey, data)  # the first write: tensors, then the manifest that commits them
    try:
        store.put(mkey, signed, create_only=True)
    except AlreadyExists:  # another run got there first: it counts only if it is ours
        check_own_manifest(store, spec, r, me, mkey)
        return TrainResult(me.name, r, False, f"{me.name} already submitted an update for round {r}; nothing to do")
    except FedcliError:
        with contextlib.suppress(FedcliError):  # best effort: leave no tensors without a manifest
            store.delete(tkey)
        raise
    if residual is not None:
        compression.save_residual(res_path, residual)
    state.save(spec.federation_id, base)
    sent = f"{len(data):,} bytes" + ("" if cmeta["method"] == "none" else f", {cmeta['method']}")
    return TrainResult(
        me.name, r, True, f"submitted update for round {r} ({sent})", len(prep.X), metrics, notes, charged
    )


# Standardised features give weights of order 1; a global weight beyond this is a broken or
# poisoned model (one member's huge but finite update), not something a bank's table causes.
GLOBAL_WEIGHT_ALARM = 1e6


def require_finite(what: str, tensors: dict, base=None) -> None:
    """NaN or infinity in weights or an update is refused before it can be signed or sent."""
    bad = [k for k, v in tensors.items() if not np.all(np.isfinite(v))]
    if bad:
        refuse_non_finite(f"{what} hold non-finite values (in {', '.join(bad[:3])})", base)


def refuse_non_finite(problem: str, base=None) -> None:
    """Nothing is submitted; blame the global model when its weights are absurd, else the table."""
    largest = max((float(np.max(np.abs(v))) for v in base.tensors.values() if v.size), default=0.0) if base else 0.0
    if largest > GLOBAL_WEIGHT_ALARM:
        raise VerificationError(
            f"{problem}: nothing was submitted. The global model of round {base.round} has weights up to "
            f"{largest:.3g}, so training on it overflows: it is broken or poisoned by one member's update; "
            "tell the coordinator (a [strategy] max_norm bounds every update)",
            reason="not-finite",
        )
    raise FedcliError(f"{problem}: nothing was submitted (check the table for extreme values)", reason="not-finite")


def check_own_manifest(store: Store, spec, r: int, me, mkey: str) -> None:
    """An update manifest under my name counts as mine only if my key signed it for this round."""
    what = f"update manifest for {me.name}"
    try:
        manifest = keys.verify_manifest(rounds.read_manifest(store, mkey, what), me, what)
    except StoreError as e:
        if not isinstance(e, NotRegular):
            raise
        manifest = None
    except FedcliError:
        manifest = None
    if manifest is None:
        raise VerificationError(
            f"an update manifest for {me.name} that this key did not sign sits at {mkey}; "
            "ask the coordinator to remove it",
            reason="bad-signature",
        )
    try:
        rounds.expect(manifest, what, kind="update", federation_id=spec.federation_id, round=r, member=me.name)
    except FedcliError:
        raise VerificationError(
            f"an update manifest at {mkey} was signed by this key for another round or "
            "federation (a replayed copy); ask the coordinator to remove it",
            reason="wrong-round",
        ) from None
