"""Starting a federation (signed spec, round 0) and publishing a signed global model."""

import secrets
from pathlib import Path

from fedcli import digest, keys, models
from fedcli.contract import load_toml
from fedcli.coordinator.state import CoordinatorState
from fedcli.errors import FedcliError, InputError
from fedcli.names import check_name
from fedcli.protocol import rounds, tensors
from fedcli.protocol.spec import MAX_SPEC_BYTES, Spec, dumps, parse, read_template
from fedcli.protocol.statistics import STATISTICS_KEY
from fedcli.store import Store


def init_federation(
    store: Store,
    template: Path,
    key_path: Path,
    member_pubs: list[Path],
    federation_id: str | None = None,
) -> Spec:
    """Sign the spec (filling in id, coordinator key and members) and publish round 0.

    The template is the user's input: every problem in it is one line naming the file and the
    field (exit 1), found before anything is written. Re-running after a crash completes the
    step; once round 0 is published it refuses.
    """
    if store.exists(rounds.global_keys(0)[1]):
        raise FedcliError(f"{store} already holds a federation (round 0 is published)")
    what = f"spec template {template}"
    try:  # names from the command line are checked here, so the error does not blame the template
        if federation_id is not None:
            check_name(federation_id, "--id")
        check_name(Path(key_path).stem, f"coordinator name (from the key file name {Path(key_path).name})")
    except FedcliError as e:
        raise InputError(str(e)) from None
    raw = load_toml(read_template(template), what, MAX_SPEC_BYTES)
    private, pub_b64 = keys.load_private(key_path)
    for table in ("federation", "members"):
        if not isinstance(raw.get(table, {} if table == "federation" else []), dict if table == "federation" else list):
            raise InputError(f"{what}: '{table}' must be a {'table' if table == 'federation' else 'list of tables'}")
    fed = raw.setdefault("federation", {})
    fed["id"] = federation_id or fed.get("id") or f"fed-{secrets.token_hex(4)}"
    fed["coordinator"] = {"name": Path(key_path).stem, "ed25519": pub_b64}
    members = raw.setdefault("members", [])
    seen: dict[str, Path] = {}
    for p in member_pubs:
        ident = keys.load_public(p)
        if ident.ed25519 == pub_b64:
            raise InputError(
                f"{p} is the public half of the coordinator key {key_path}: a bank's key cannot be the "
                "coordinator's (make one with `fedcli keygen coordinator`)"
            )
        if ident.ed25519 in seen:
            raise InputError(f"{p} is the same key as {seen[ident.ed25519]}: each bank is enrolled once")
        seen[ident.ed25519] = Path(p)
        if any(isinstance(m, dict) and m.get("name") == ident.name for m in members):
            raise InputError(f"member {ident.name} is enrolled twice (template and {p})")
        entry = {"name": ident.name, "ed25519": ident.ed25519}
        if ident.x25519:
            entry["x25519"] = ident.x25519
        members.append(entry)
    spec = parse(raw, what, InputError)  # validates everything before anything is written
    state = CoordinatorState.for_key(key_path, pub_b64, spec.federation_id)
    _refuse_published_statistics(store, spec)
    spec_bytes = dumps(raw)
    store.put(rounds.SPEC_KEY, spec_bytes)
    store.put(rounds.SPEC_SIG_KEY, keys.sign_bytes(private, spec_bytes).encode())
    state.start_over(_publish_round0(store, private, spec, digest.sha256(spec_bytes)))  # a new history: round 0 only
    return spec


def _refuse_published_statistics(store: Store, spec: Spec) -> None:
    """Federated statistics: round 0 is not published by init, so a finished statistics round marks a federation."""
    if spec.data.statistics == "federated" and store.exists(STATISTICS_KEY):
        raise FedcliError(f"{store} already holds a federation (its statistics are published)")


def _publish_round0(store: Store, private, spec: Spec, spec_sha: str) -> str | None:
    """Round 0 from the seed (its sha256); with federated statistics it waits for them (`fedcli stats aggregate`
    publishes it), None."""
    if spec.data.statistics == "federated":
        return None
    weights = models.initial(spec.model, spec.data.n_features)
    return publish_global(store, private, spec, spec_sha, 0, weights, prev_sha=None, contributors=[])


def publish_global(store, private, spec, spec_sha, r, weights, prev_sha, contributors, **extra) -> str:
    """Tensors first, then the signed manifest with create-only: one publisher wins a race.

    Nothing is written unless the weights are finite and the manifest meets its contract: the
    coordinator never signs a model every bank would then refuse forever.
    """
    from fedcli.contract import validate
    from fedcli.protocol.documents import GlobalManifest

    what = f"global model of round {r}"
    tensors.check_finite(weights, what, error=FedcliError)
    data = tensors.encode(weights)
    tkey, mkey = rounds.global_keys(r)
    store.put(tkey, data)
    manifest = {
        "kind": "global",
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "round": r,
        "spec_sha256": spec_sha,
        "tensors_sha256": digest.sha256(data),
        "prev_sha256": prev_sha,
        "contributors": contributors,
        "created_at": rounds.now(),
        **extra,
    }
    if spec.statistics_sha256 is not None:  # federated statistics: every global names the document in force
        manifest["statistics_sha256"] = spec.statistics_sha256
    validate(GlobalManifest, manifest, what)
    store.put(mkey, keys.sign_manifest(private, manifest), create_only=True)
    return manifest["tensors_sha256"]
