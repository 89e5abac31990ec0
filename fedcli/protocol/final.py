"""The end of a federation: `final.json`, a coordinator-signed marker that no round follows the last global.

Why: without an end, a DP federation dead-ends (banks out of budget, one still spending epsilon on
a round that can never reach quorum, aggregate waiting forever). Once the planned rounds (`[federation]
rounds`) or the DP budget are used up, the coordinator signs this marker; `train` then says the
federation is complete and spends nothing, `aggregate` exits 0 saying so, `status` shows it.
It names the last global by round and sha256, and is bound to the spec like every signed document.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedcli.errors import NotFound, VerificationError
from fedcli.keys import verify_manifest
from fedcli.protocol import rounds
from fedcli.protocol.spec import Spec
from fedcli.store import Store

FINAL_KEY = "final.json"
REASONS = {"rounds": "the planned rounds are done", "budget": "the privacy budget is used up"}


@dataclass(frozen=True)
class Final:
    round: int  # the last global model
    global_sha256: str
    reason: Literal["rounds", "budget"]
    created_at: str

    def describe(self, federation_id: str) -> str:
        return (
            f"federation {federation_id} is complete: {REASONS[self.reason]}; its final model is the global of "
            f"round {self.round} (sha256 {self.global_sha256[:12]}…, {self.created_at})"
        )


def _document():
    """The marker's contract (pydantic imported only where a marker is read or written)."""
    from typing import Annotated

    from pydantic import Field

    from fedcli.protocol.documents import Document, Name, Round, Sha256, Timestamp

    class FinalMarker(Document):
        kind: Literal["final"]
        format: Literal[1]
        federation_id: Name
        spec_sha256: Sha256
        round: Round
        global_sha256: Sha256
        reason: Literal["rounds", "budget"]
        detail: Annotated[str, Field(max_length=500)] = ""
        created_at: Timestamp

    return FinalMarker


def load_final(store: Store, spec: Spec, spec_sha: str) -> Final | None:
    """The verified final marker, None if the federation has not ended; a marker that fails any check is refused."""
    from fedcli.contract import validate

    what = "final marker"
    try:
        data = rounds.read_manifest(store, FINAL_KEY, what)
    except NotFound:
        return None
    doc = validate(_document(), verify_manifest(data, spec.coordinator, what), what)
    rounds.expect(doc, what, kind="final", federation_id=spec.federation_id, spec_sha256=spec_sha)
    g = rounds.global_manifest(store, spec, spec_sha, doc.round)
    if g["tensors_sha256"] != doc.global_sha256:
        raise VerificationError(f"{what}: names another global model of round {doc.round} than the store holds")
    return Final(doc.round, doc.global_sha256, doc.reason, doc.created_at)


def publish_final(
    store: Store, private, spec: Spec, spec_sha: str, g: rounds.Global, reason: str, detail: str
) -> Final:
    """Sign and publish the marker (create-only: a second run finds the first one's)."""
    from fedcli.contract import validate
    from fedcli.errors import AlreadyExists
    from fedcli.keys import sign_manifest

    doc = {
        "kind": "final",
        "format": rounds.FORMAT,
        "federation_id": spec.federation_id,
        "spec_sha256": spec_sha,
        "round": g.round,
        "global_sha256": g.sha256,
        "reason": reason,
        "detail": detail[:500],
        "created_at": rounds.now(),
    }
    validate(_document(), doc, "final marker")
    try:
        store.put(FINAL_KEY, sign_manifest(private, doc), create_only=True)
    except AlreadyExists:
        pass
    found = load_final(store, spec, spec_sha)
    if found is None:
        raise VerificationError("final marker: written, then not found on the store", reason="missing")
    return found


def final_status(store: Store, pinned) -> str:
    """`fedcli status`: one line saying the federation ended, or "" while it runs. A marker that does not
    verify is shown as such (like an unverified rejections.json), never as the end."""
    spec, spec_sha = rounds.load_spec(store, pinned)
    try:
        found = load_final(store, spec, spec_sha)
    except VerificationError as e:
        return f"unverified: {FINAL_KEY} is not the coordinator's signed end, ignored: {e}"
    return found.describe(spec.federation_id) if found else ""
