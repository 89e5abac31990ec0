"""A bank's step: verify the latest global model, train on local rows, submit a signed delta."""

import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import compression
from . import data as D
from . import keys, models
from . import privacy as P
from . import rounds as R
from . import tensors as T
from .errors import AlreadyExists, FedcliError, VerificationError
from .metrics import score
from .store import Store
from .train import fit, fit_private


@dataclass
class BankState:
    """What this bank last saw, kept next to its key: the defence against a rolled-back store."""

    path: Path
    federation_id: str | None = None
    last_round: int = -1
    last_sha256: str | None = None

    @classmethod
    def load(cls, path: Path) -> "BankState":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError) as e:
            raise FedcliError(f"bank state file {path} is unreadable ({e}); restore it from backup") from None
        return cls(path, raw.get("federation_id"), int(raw.get("last_round", -1)), raw.get("last_sha256"))

    def check(self, federation_id: str, g: R.Global) -> None:
        """Refuse a global model older than, or different from, one we already trusted."""
        if self.federation_id not in (None, federation_id):
            raise VerificationError(
                f"this key's state belongs to federation {self.federation_id}, the store holds {federation_id}"
            )
        if g.round < self.last_round:
            raise VerificationError(
                f"rollback: the store's latest global is round {g.round}, but this bank already saw round {self.last_round}"
            )
        if g.round == self.last_round and g.sha256 != self.last_sha256:
            raise VerificationError(f"the global model of round {g.round} changed since this bank last saw it")
        if g.round == self.last_round + 1 and self.last_sha256 and g.manifest.get("prev_sha256") != self.last_sha256:
            raise VerificationError(f"the global model of round {g.round} does not chain to round {self.last_round}")

    def save(self, federation_id: str, g: R.Global) -> None:
        self.federation_id, self.last_round, self.last_sha256 = federation_id, g.round, g.sha256
        body = json.dumps({"federation_id": federation_id, "last_round": g.round, "last_sha256": g.sha256}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=Path(self.path).parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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


def state_path_for(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".state.json")


def ledger_path_for(key_path: Path) -> Path:
    return Path(key_path).with_suffix(".ledger.json")


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
    private, my_pub = keys.load_private(key_path)
    spec, spec_sha = R.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(my_pub)
    if me is None:
        raise FedcliError(
            f"{key_path} (fingerprint {keys.fingerprint(keys.unb64(my_pub))}) is not enrolled in federation {spec.federation_id}"
        )
    state = BankState.load(state_path or state_path_for(key_path))
    shapes = models.shapes(spec.model, spec.data.n_features)
    base_round = R.latest_round(store)
    r = base_round + 1
    tkey, mkey = R.update_keys(r, me.name)
    if store.exists(mkey):
        return TrainResult(me.name, r, False, f"{me.name} already submitted an update for round {r}; nothing to do")
    base = R.load_global(store, spec, spec_sha, base_round, shapes)
    state.check(spec.federation_id, base)

    prep = D.prepare(D.read_table(data_path), spec.data, Path(data_path).name)
    notes = [f"{n} rows without a target value were skipped" for n in [prep.rows_dropped] if n]
    notes += [f"{c}: {n} missing or non-numeric values filled with the spec's mean" for c, n in prep.filled.items()]
    notes += [f"{c}: {n} rows with a category the spec does not declare (encoded as none)" for c, n in prep.unknown.items()]
    before = score(prep.y, models.predict(spec.model, base.tensors, prep.X))
    ps = spec.privacy
    if ps.enabled:  # refuse before any work if even this release would break the budget
        ledger = P.Ledger(ledger_path or ledger_path_for(key_path))
        budget = ps.budget_epsilon if max_epsilon is None else min(ps.budget_epsilon, max_epsilon)
        mech = P.plan(ps, len(prep.X), spec.training.batch_size, spec.training.epochs)
        ledger.check(mech, budget, ps.delta)

    # Training seed is not a secret: it only makes a bank's rerun reproducible.
    seed = int.from_bytes(hashlib.sha256(f"{spec.federation_id}/{r}/{me.name}".encode()).digest()[:4], "little")
    with Progress(TextColumn("[bold]training[/] round {task.fields[r]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                  console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("train", total=None, r=r, loss=float("nan"))
        last = [float("nan")]

        def step(done, total, loss):
            last[0] = loss
            progress.update(task, completed=done, total=total, loss=loss)

        if ps.mode == "record":
            weights, mech = fit_private(spec.model, spec.training, base.tensors, prep.X, prep.y,
                                        ps.clip, mech.noise_multiplier, step)
            loss = last[0]
        else:
            weights, loss = fit(spec.model, spec.training, base.tensors, prep.X, prep.y, seed, step,
                                prox_mu=spec.strategy.prox_mu)
    after = score(prep.y, models.predict(spec.model, weights, prep.X))
    delta = {k: weights[k] - base.tensors[k] for k in weights}
    metrics = {"loss": round(loss, 6), "auc_before": round(before["auc"], 6), "auc_after": round(after["auc"], 6)}
    charged = {}
    if ps.mode == "update":
        delta, _ = P.privatize_update(delta, ps.clip, mech.noise_multiplier)
    if ps.enabled:  # charged before anything leaves the bank: a crash after this over-counts, never under
        charged = ledger.charge(mech, round=r, federation=spec.federation_id, budget_epsilon=budget, delta=ps.delta)

    # Compression (with the bank's error-feedback residual) goes last: it only post-processes the delta.
    cmeta = spec.strategy.compression_meta
    res_path, residual = compression.residual_path(state.path), None
    if cmeta["method"] != "none":
        delta, cmeta, residual = compression.encode(delta, cmeta["method"], cmeta.get("ratio"),
                                                    compression.load_residual(res_path, shapes))
    data = T.encode(delta)
    store.put(tkey, data)
    manifest = {
        "kind": "update",
        "format": R.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "member": me.name,
        "base_sha256": base.sha256,
        "tensors_sha256": T.sha256(data),
        "num_examples": int(len(prep.X)),
        "compression": cmeta,
        "metrics": metrics,
        "created_at": R.now(),
        "nonce": secrets.token_hex(16),
    }
    if ps.enabled:  # row count and local metrics are not privatised: they stay at the bank
        del manifest["num_examples"], manifest["metrics"]
        manifest["dp"] = mech.manifest() | {"delta": ps.delta}
    try:
        store.put(mkey, keys.sign_manifest(private, manifest), create_only=True)
    except AlreadyExists:
        return TrainResult(me.name, r, False, f"{me.name} already submitted an update for round {r}; nothing to do")
    if residual is not None:
        compression.save_residual(res_path, residual)
    state.save(spec.federation_id, base)
    sent = f"{len(data):,} bytes" + ("" if cmeta["method"] == "none" else f", {cmeta['method']}")
    return TrainResult(me.name, r, True, f"submitted update for round {r} ({sent})", len(prep.X), metrics, notes,
                       charged)
