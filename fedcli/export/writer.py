"""Verify, build in memory, then write: a refused export leaves the output folder as it was.

The global model passes the checks `fedcli predict` makes (spec signature against the pinned key,
manifest signature, spec binding, tensor hash and shapes); its lineage is every earlier signed
global manifest, each verified the same way and chained by prev_sha256. Only when all of that and
the ONNX graph's own checker pass is anything written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcli import digest, keys
from fedcli.errors import InputError, VerificationError
from fedcli.files import write_atomic

FILES = ("model.onnx", "model_card.json", "model_card.md")


@dataclass(frozen=True)
class Exported:
    round: int
    folder: Path
    files: tuple[str, ...]
    tensors_sha256: str
    evaluated_rows: int | None


def check_folder(out: Path, force: bool) -> None:
    """A folder that does not exist yet (its parent must), or an empty one; with force, one with files."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    if not out.exists() and not out.parent.is_dir():
        raise InputError(f"cannot write {out}: no folder {out.parent}")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out} is not empty: pass --force to replace {', '.join(FILES)} in it")


def lineage(store, spec, spec_sha: str, last: int) -> list[dict]:
    """The verified global manifests of rounds 0..last, each chained to the one before."""
    from fedcli.protocol import rounds

    out: list[dict] = []
    for r in range(last + 1):
        manifest = rounds.global_manifest(store, spec, spec_sha, r)
        if out and manifest["prev_sha256"] != out[-1]["tensors_sha256"]:
            raise VerificationError(
                f"global model of round {r} does not chain to round {r - 1} (prev_sha256 differs): do not trust the store",
                reason="bad-hash",
            )
        out.append(manifest)
    return out


def export(
    store, coordinator_pub: Path, out: Path, force: bool = False, data: Path | None = None, round_=None, prior=None
):
    """Write model.onnx, model_card.json and model_card.md for the verified global model into `out`; with
    `prior` (a metrics.PriorCorrection) its shift is added to the last layer's bias, and the holdout
    evaluation is of the corrected scores, as `predict` and `evaluate` with the same options give."""
    from fedcli.bank.inference import evaluate, verified_global
    from fedcli.export import card, graph
    from fedcli.metrics import evaluation_json
    from fedcli.protocol import rounds

    check_folder(out, force)
    spec, g, _fresh = verified_global(store, coordinator_pub, round_)
    _, spec_sha = rounds.load_spec(store, keys.load_public(coordinator_pub))
    chain = lineage(store, spec, spec_sha, g.round)
    if chain[-1]["tensors_sha256"] != g.sha256:
        raise VerificationError(f"global model of round {g.round} changed while it was read", reason="bad-hash")
    meta = {"federation_id": spec.federation_id, "round": str(g.round), "tensors_sha256": g.sha256}
    shift = prior.shift(spec.training.pos_weight) if prior is not None else 0.0
    onnx_bytes = graph.build(spec, g.tensors, meta, shift).SerializeToString()
    ev = None
    if data is not None:
        _, _, result, _ = evaluate(store, coordinator_pub, data, g.round, prior)
        ev = {"data": Path(data).name, **evaluation_json(result)}
    corrected = prior.describe(spec.training.pos_weight) if prior is not None else None
    doc = card.card(spec, spec_sha, chain, digest.sha256(onnx_bytes), ev, corrected)
    blobs = {"model.onnx": onnx_bytes, "model_card.json": card.to_json(doc), "model_card.md": card.to_markdown(doc)}
    try:
        out.mkdir(exist_ok=True)
        for name, blob in blobs.items():
            write_atomic(out / name, blob, f".{name}.")
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
    return Exported(g.round, out, FILES, g.sha256, ev["rows"] if ev else None)
