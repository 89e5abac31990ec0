"""The coordinator's two steps: start a federation, and close a round."""

import secrets
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from . import keys, models
from . import rounds as R
from . import spec as S
from . import tensors as T
from .aggregate import FedAvg, apply
from .errors import AlreadyExists, FedcliError, VerificationError
from .store import Store


def init_federation(
    store: Store,
    template: Path,
    key_path: Path,
    member_pubs: list[Path],
    federation_id: str | None = None,
) -> S.Spec:
    """Sign the spec (filling in id, coordinator key and members) and publish round 0.

    Re-running after a crash completes the step; once round 0 is published it refuses.
    """
    if store.exists(R.global_keys(0)[1]):
        raise FedcliError(f"{store} already holds a federation (round 0 is published)")
    try:
        raw = tomllib.loads(Path(template).read_text())
    except OSError as e:
        raise FedcliError(f"cannot read spec template {template}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise FedcliError(f"spec template {template} is not valid TOML: {e}") from None
    private, pub_b64 = keys.load_private(key_path)
    fed = raw.setdefault("federation", {})
    fed["id"] = federation_id or fed.get("id") or f"fed-{secrets.token_hex(4)}"
    fed["coordinator"] = {"name": Path(key_path).stem, "ed25519": pub_b64}
    members = raw.setdefault("members", [])
    for p in member_pubs:
        ident = keys.load_public(p)
        if any(m.get("name") == ident.name for m in members):
            raise FedcliError(f"member {ident.name} is enrolled twice (template and {p})")
        members.append({"name": ident.name, "ed25519": ident.ed25519})
    spec = S.parse(raw)  # validates everything before anything is written
    spec_bytes = S.dumps(raw)
    store.put(R.SPEC_KEY, spec_bytes)
    store.put(R.SPEC_SIG_KEY, keys.sign_bytes(private, spec_bytes).encode())

    weights = models.initial(spec.model, spec.data.n_features)
    publish_global(store, private, spec, S.sha256(spec_bytes), 0, weights, prev_sha=None, contributors=[])
    return spec


def publish_global(store, private, spec, spec_sha, r, weights, prev_sha, contributors, **extra) -> str:
    """Tensors first, then the signed manifest with create-only: one publisher wins a race."""
    data = T.encode(weights)
    tkey, mkey = R.global_keys(r)
    store.put(tkey, data)
    manifest = {
        "kind": "global",
        "format": R.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "spec_sha256": spec_sha,
        "tensors_sha256": T.sha256(data),
        "prev_sha256": prev_sha,
        "contributors": contributors,
        "created_at": R.now(),
        **extra,
    }
    store.put(mkey, keys.sign_manifest(private, manifest), create_only=True)
    return manifest["tensors_sha256"]


@dataclass
class AggregateResult:
    round: int  # the round being closed
    accepted: list[dict] = field(default_factory=list)  # {"member", "num_examples", "metrics"}
    rejected: dict[str, str] = field(default_factory=dict)  # member -> reason
    pending: list[str] = field(default_factory=list)  # tensors without manifest (upload in progress)
    missing: list[str] = field(default_factory=list)  # enrolled members with nothing submitted
    published: bool = False
    waiting_reason: str = ""


def quorum_reached(spec: S.Spec, n_accepted: int, base_created_at: str) -> tuple[bool, str]:
    """All members in, or min_clients in and the deadline (if any) passed."""
    if n_accepted == len(spec.members):
        return True, ""
    if n_accepted < spec.min_clients:
        return False, f"{n_accepted} of {spec.min_clients} required updates are in"
    if spec.deadline_minutes > 0:
        started = datetime.fromisoformat(base_created_at)
        waited = (datetime.now(timezone.utc) - started).total_seconds() / 60
        if waited < spec.deadline_minutes:
            return False, (f"quorum reached ({n_accepted}/{len(spec.members)}); waiting for the rest "
                           f"until the deadline ({spec.deadline_minutes - waited:.0f} min left)")
    return True, ""


def verified_updates(store: Store, spec: S.Spec, r: int, members: list[str], base_sha: str, shapes: T.Shapes):
    """Yield (member, future of rounds.verify_update) in order, verifying one update ahead.

    A worker thread reads, hashes and checks update i+1 while the caller folds in update i
    (hashing and file reads release the GIL), so a round runs at about hashing speed. Two
    reusable read buffers alternate: memory stays O(model), and a delta's arrays are views
    that stay valid until the caller asks for the next item.
    """
    size = T.max_file_size(shapes)
    buffers = [bytearray(size) for _ in range(min(2, len(members)))]
    with ThreadPoolExecutor(max_workers=1) as pool:
        def submit(i: int):
            return pool.submit(R.verify_update, store, spec, r, members[i], base_sha, shapes, buffers[i % 2])

        pending = submit(0) if members else None
        for i, member in enumerate(members):
            current = pending
            if i + 1 < len(members):
                pending = submit(i + 1)
            yield member, current


def aggregate_round(store: Store, key_path: Path, console: Console | None = None) -> AggregateResult:
    """Verify every update for the next round, FedAvg the good ones, publish if quorum is met."""
    private, pub_b64 = keys.load_private(key_path)
    spec, spec_sha = R.load_spec(store, None)
    if pub_b64 != spec.coordinator.ed25519:
        raise VerificationError(f"{key_path} is not the coordinator key of federation {spec.federation_id}")
    shapes = models.shapes(spec.model, spec.data.n_features)
    base_round = R.latest_round(store)
    base = R.load_global(store, spec, spec_sha, base_round, shapes)
    r = base_round + 1
    result = AggregateResult(round=r)
    committed, result.pending = R.submitted_members(store, r)
    result.missing = [m.name for m in spec.members if m.name not in committed and m.name not in result.pending]

    avg = FedAvg(shapes)
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"verifying round {r}", total=len(committed))
        for member, checked in verified_updates(store, spec, r, committed, base.sha256, shapes):
            try:
                manifest, delta = checked.result()
            except FedcliError as e:  # one bad update never stops the others
                result.rejected[member] = str(e)
            else:
                avg.add(delta, float(manifest["num_examples"]))
                result.accepted.append({"member": member, "num_examples": manifest["num_examples"],
                                        "metrics": manifest.get("metrics", {})})
            progress.advance(task)
    if result.rejected:
        store.put(R.rejections_key(r), keys.canonical(result.rejected))

    ready, result.waiting_reason = quorum_reached(spec, len(result.accepted), base.manifest["created_at"])
    if not ready:
        return result
    weights = apply(base.tensors, avg.mean())
    try:
        publish_global(store, private, spec, spec_sha, r, weights, prev_sha=base.sha256,
                       contributors=result.accepted, rule="fedavg")
    except AlreadyExists:
        raise FedcliError(f"round {r} was published by another aggregate run meanwhile") from None
    result.published = True
    return result
