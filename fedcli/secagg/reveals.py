"""A bank's own record of what it revealed in each secure-aggregation round, kept next to its key.

Why: the coordinator (or anyone with write access to the store) can delete a recovery file and
a drop declaration and write new ones. For each member a survivor may reveal its share of that
member's self-mask seed (member survived) or its pairwise seed with it (member dropped); both
together unmask the member's update. The store cannot be trusted to remember which one was
revealed, so the bank remembers: one survivor set per round, and never the other kind for a member.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedcli.errors import InputError, VerificationError

MAX_RECORD_BYTES = 4 << 20


def record_path_for(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".secagg-reveals.json")


def _load(path: Path) -> dict:
    from fedcli.contract import load_json
    from fedcli.files import read_bounded

    what = "secure-aggregation reveal record"
    data = read_bounded(path, MAX_RECORD_BYTES, what)
    if data is None:
        return {}
    doc = load_json(data, f"{what} {path}", MAX_RECORD_BYTES, InputError)
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise InputError(f"{what} {path} is damaged; restore it from backup (never delete it: it guards your updates)")
    return doc


def check_and_record(
    path: Path, federation: str, round_: int, drops_sha: str, self_for: Iterable[str], pair_for: Iterable[str]
) -> None:
    """Refuse a second survivor set for a round, or a reveal of the other kind for any member; then record.

    Written before the reveal leaves the bank, so a crash between the two errs on the safe side.
    """
    from fedcli.files import write_atomic

    record, key = _load(path), f"{federation}/{round_}"
    self_for, pair_for = sorted(set(self_for)), sorted(set(pair_for))
    past = record.get(key)
    if past is not None:
        if past.get("drops_sha256") != drops_sha:
            raise VerificationError(
                f"round {round_} now shows a different survivor set than the one this bank already acted on: "
                "two survivor sets for one round; revealing again could unmask a member, so nothing is revealed",
                reason="secagg",
            )
        both = (set(past.get("self", [])) & set(pair_for)) | (set(past.get("pair", [])) & set(self_for))
        if both:
            raise VerificationError(
                f"round {round_}: this bank already revealed the other secret of {', '.join(sorted(both))}; "
                "revealing both would unmask it",
                reason="secagg",
            )
    record[key] = {"drops_sha256": drops_sha, "self": self_for, "pair": pair_for}
    path.parent.mkdir(parents=True, exist_ok=True)  # the per-federation folder is made on first use
    write_atomic(path, json.dumps(record, sort_keys=True, indent=1).encode(), ".secagg-reveals.")
