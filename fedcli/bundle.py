"""Air-gap bundles: one signed archive carries the files that must cross between two stores.

Out (coordinator -> banks): the signed spec, every global manifest and rejections list, and
the latest global tensors (and, with secure aggregation, the open round's drop declaration).
In (bank -> coordinator): that bank's committed update for the open round (and its recovery
shares once it published them). The archive is a plain tar holding

    bundle.json      canonical JSON index: kind, federation, signer, every file's key, size, sha256
    bundle.sig       Ed25519 signature of the signer over "fedcli-bundle-v1\\n" + bundle.json
    files/<key>      the files, at their store keys

Import verifies the signature (coordinator pinned by the importer, or a member named in the
destination's verified spec), that each signer only carries its own kind of file, every
size and hash, and refuses conflicts before writing anything. It then writes like every
other writer: tensors first, manifests (create-only) last. Importing twice is a no-op.
Nothing is ever extracted to disk or unpickled: members are read into memory by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import keys
from . import rounds as R
from .errors import AlreadyExists, FedcliError, NotFound, Oversize, VerificationError
from .names import check_key
from .spec import Spec
from .store import Store

BUNDLE_DOMAIN = b"fedcli-bundle-v1\n"
FORMAT = 1
MAX_INDEX_BYTES = 1 << 20
MAX_BUNDLE_BYTES = 4 << 30  # refuse absurd archives before reading them into memory
_COORD_KEYS = re.compile(
    r"^(federation\.toml(\.sig)?|rounds/\d{6}/(global\.(json|safetensors)|rejections\.json|secagg/drops\.json))$"
)
_SPEC_KEYS = (R.SPEC_KEY, R.SPEC_SIG_KEY)


def _member_keys(member: str) -> re.Pattern:
    m = re.escape(member)
    return re.compile(rf"^rounds/\d{{6}}/(updates/{m}\.(json|safetensors)|secagg/recovery/{m}\.json)$")


@dataclass
class BundleResult:
    path: Path
    signer: str
    role: str  # "coordinator" or "member"
    federation_id: str
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- export ---------------------------------------------------------------------------


def export_bundle(store: Store, key_path: Path, out: Path) -> BundleResult:
    """Pack what the holder of key_path must send: the coordinator's globals, or a bank's update."""
    private, pub_b64 = keys.load_private(key_path)
    spec, _ = R.load_spec(store, None)
    if pub_b64 == spec.coordinator.ed25519:
        role, signer, wanted = "coordinator", spec.coordinator.name, _coordinator_files(store)
    else:
        me = spec.member_by_key(pub_b64)
        if me is None:
            raise FedcliError(f"{key_path} is neither the coordinator nor a member of federation {spec.federation_id}")
        role, signer, wanted = "member", me.name, _member_files(store, me.name)
    files = {k: store.get(k, max_bytes=MAX_BUNDLE_BYTES) for k in wanted}
    index = {
        "kind": "bundle",
        "format": FORMAT,
        "federation_id": spec.federation_id,
        "signer": signer,
        "role": role,
        "created_at": R.now(),
        "files": [{"key": k, "size": len(v), "sha256": _sha(v)} for k, v in files.items()],
    }
    body = keys.canonical(index)
    sig = keys.sign_bytes(private, body, BUNDLE_DOMAIN).encode()
    _write_tar(out, [("bundle.json", body), ("bundle.sig", sig)] + [(f"files/{k}", v) for k, v in files.items()])
    return BundleResult(Path(out), signer, role, spec.federation_id, written=list(files))


def _coordinator_files(store: Store) -> list[str]:
    rounds = R.global_rounds(store)
    if not rounds:
        raise FedcliError(f"{store} has no global model yet: run `fedcli init` first")
    keys_ = list(_SPEC_KEYS)
    for r in rounds:
        if store.exists(R.rejections_key(r)):
            keys_.append(R.rejections_key(r))
    keys_.append(R.global_keys(rounds[-1])[0])  # the latest model's tensors, before the manifests
    keys_ += [R.global_keys(r)[1] for r in rounds]
    drops = f"{R.round_dir(rounds[-1] + 1)}/secagg/drops.json"  # secure aggregation's dropouts
    if store.exists(drops):
        keys_.append(drops)
    return keys_


def _member_files(store: Store, member: str) -> list[str]:
    r = R.latest_round(store) + 1
    tkey, mkey = R.update_keys(r, member)
    if not store.exists(mkey):
        raise FedcliError(f"{member} has no committed update for round {r} in {store}: run `fedcli train` first")
    files = [tkey, mkey]
    recovery = f"{R.round_dir(r)}/secagg/recovery/{member}.json"  # secure aggregation's dropouts
    if store.exists(recovery):
        files.append(recovery)
    return files


def _write_tar(out: Path, entries: list[tuple[str, bytes]]) -> None:
    """Write atomically (temp file, fsync, rename) with fixed metadata, so a half-copied bundle never looks whole."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".bundle-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for name, data in entries:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        raise FedcliError(f"cannot write bundle {out}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- import ---------------------------------------------------------------------------


def import_bundle(store: Store, path: Path, coordinator_pub: Path | None = None) -> BundleResult:
    """Verify a bundle and write its files into store; files already there unchanged are skipped.

    Only the small signed index is read before its signature checks out; file contents are
    read after their sizes matched the index, so a forged archive cannot make us load gigabytes.
    """
    path = Path(path)
    pinned = keys.load_public(coordinator_pub) if coordinator_pub else None
    spec = _store_spec(store, pinned)
    try:
        with tarfile.open(path, mode="r:") as tar:  # uncompressed only: no decompression bombs
            members = _members(tar, path)
            body, sig = (_read(tar, members.pop(n, None), n, path) for n in ("bundle.json", "bundle.sig"))
            index, listed = _parse_index(body, path)
            role, signer = _signer(spec, pinned, index["signer"], path)
            keys.verify_bytes(body, sig.decode("ascii", "replace"), signer, f"bundle {path.name}", BUNDLE_DOMAIN)

            # From here on the index is authentic: the archive must match it exactly.
            if set(members) != {f"files/{k}" for k in listed}:
                raise VerificationError(f"{path}: archive files differ from the signed index")
            allowed = _COORD_KEYS if role == "coordinator" else _member_keys(signer.name)
            entries = {}
            for key, meta in listed.items():
                check_key(key)
                if not allowed.match(key):
                    raise VerificationError(f"{path}: {signer.name} may not write {key}")
                info = members[f"files/{key}"]
                if info.size != meta.get("size"):
                    raise VerificationError(f"{path}: {key} does not match its size in the signed index")
                data = _read(tar, info, key, path)
                if _sha(data) != meta.get("sha256"):
                    raise VerificationError(f"{path}: {key} does not match its sha256 in the signed index")
                entries[key] = data
    except FileNotFoundError:
        raise FedcliError(f"bundle {path} does not exist") from None
    except (tarfile.TarError, EOFError):
        raise VerificationError(f"{path} is not a readable bundle (truncated or not a tar archive)") from None
    except OSError as e:
        raise FedcliError(f"cannot read bundle {path}: {e.strerror}") from None

    if spec is None:  # an empty store: the bundle must bring the spec, signed by the pinned coordinator
        spec = _bundle_spec(entries, pinned, path)
    if index.get("federation_id") != spec.federation_id:
        raise VerificationError(
            f"{path} is for federation {index.get('federation_id')!r}, the store holds {spec.federation_id!r}"
        )
    result = BundleResult(path, signer.name, role, spec.federation_id)
    _write(store, entries, result)
    return result


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Headers only: regular files named bundle.json, bundle.sig or files/..., each once."""
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise VerificationError(f"{path} is larger than {MAX_BUNDLE_BYTES >> 30} GiB")
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar:
        if not m.isreg():
            raise VerificationError(f"{path}: {m.name} is not a regular file")
        if m.name in members or (m.name not in ("bundle.json", "bundle.sig") and not m.name.startswith("files/")):
            raise VerificationError(f"{path}: unexpected or repeated member {m.name!r}")
        members[m.name] = m
    return members


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo | None, name: str, path: Path) -> bytes:
    if info is None:
        raise VerificationError(f"{path} is not a fedcli bundle (no {name})")
    if name in ("bundle.json", "bundle.sig") and info.size > MAX_INDEX_BYTES:
        raise VerificationError(f"{path}: {name} is too large")
    f = tar.extractfile(info)
    data = f.read() if f else b""
    if len(data) != info.size:
        raise VerificationError(f"{path} is truncated ({name} is incomplete)")
    return data


def _parse_index(body: bytes, path: Path) -> tuple[dict, dict[str, dict]]:
    try:
        index = json.loads(body)
        if not isinstance(index["signer"], str):
            raise TypeError
        listed = {f["key"]: f for f in index["files"]}
    except (ValueError, KeyError, TypeError):
        raise VerificationError(f"{path}: bundle index is malformed") from None
    if index.get("kind") != "bundle" or index.get("format") != FORMAT:
        raise VerificationError(f"{path}: not a format-{FORMAT} fedcli bundle")
    return index, listed


def _store_spec(store: Store, pinned: keys.PublicIdentity | None) -> Spec | None:
    """The destination's verified spec, or None for an empty store."""
    if not store.exists(R.SPEC_KEY):
        return None
    return R.load_spec(store, pinned)[0]


def _signer(spec: Spec | None, pinned, name: str, path: Path) -> tuple[str, keys.PublicIdentity]:
    if spec is None:
        if pinned is None:
            raise FedcliError(
                f"{path}: the store holds no federation yet; pass --coordinator coordinator.pub to import the first bundle"
            )
        if name != pinned.name:
            raise VerificationError(f"{path} is signed by {name!r}, not by the pinned coordinator {pinned.name!r}")
        return "coordinator", pinned
    if name == spec.coordinator.name:
        return "coordinator", spec.coordinator
    member = spec.member(name)
    if member is None:
        raise VerificationError(f"{path} is signed by {name!r}, who is not in federation {spec.federation_id}")
    return "member", member


def _bundle_spec(entries: dict[str, bytes], pinned, path: Path) -> Spec:
    from .spec import verified

    if R.SPEC_KEY not in entries or R.SPEC_SIG_KEY not in entries:
        raise VerificationError(f"{path} does not carry the federation spec the empty store needs")
    return verified(entries[R.SPEC_KEY], entries[R.SPEC_SIG_KEY], pinned, f"federation spec in {path}")


def _write(store: Store, entries: dict[str, bytes], result: BundleResult) -> None:
    """Check every conflict first, then write: spec, tensors, rejections, manifests (commit markers) last."""
    todo = []
    for key, data in entries.items():
        try:
            current = store.get(key, max_bytes=len(data))
        except NotFound:
            current = None
        except Oversize:
            current = b""  # larger than ours: different
        if current == data:
            result.unchanged.append(key)
        elif current is None or key.endswith("rejections.json"):  # new, or the coordinator's latest word
            todo.append(key)
        elif key.endswith(".safetensors") and not _committed(store, key):
            todo.append(key)  # left over by a crashed upload: nothing refers to it yet
        else:
            raise VerificationError(f"the store already holds a different {key}; not overwritten, nothing imported")

    def rank(key: str) -> tuple:
        kind = 0 if key in _SPEC_KEYS else 1 if key.endswith(".safetensors") else 2 if key.endswith("rejections.json") else 3
        return (kind, key)

    for key in sorted(todo, key=rank):
        manifest = key.endswith(".json") and not key.endswith("rejections.json")
        try:
            store.put(key, entries[key], create_only=manifest)
        except AlreadyExists:  # another import won the race with, by construction, a manifest of its own
            if store.get(key, max_bytes=len(entries[key]) + 1) != entries[key]:
                raise VerificationError(f"the store already holds a different {key}; not overwritten") from None
            result.unchanged.append(key)
            continue
        result.written.append(key)


def _committed(store: Store, tensors_key: str) -> bool:
    """True if a tensor file already has its manifest: then it must not change."""
    return store.exists(tensors_key[: -len(".safetensors")] + ".json")
