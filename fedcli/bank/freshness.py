"""Freshness for every command that uses a global model: the rollback check `train` makes, and max_round_age.

Why everywhere: a store whose newest global was deleted (or frozen in the past) must not make
`predict` score with an older model while `train` would refuse it. The check reads the newest
global's signed manifest only (not its tensors) and compares it with this bank's state for the
federation (bank.state); it needs the bank's key to find that state. A final marker
(coordinator.final) ends the federation: its last global may then be as old as it likes.
"""

from pathlib import Path

from fedcli.bank.state import BankState, bank_files, check_age, key_hex
from fedcli.protocol import final, rounds
from fedcli.protocol.spec import Spec
from fedcli.store import Store

NO_KEY_NOTE = (
    "the store was not checked against this bank's state (pass --key bank.key): a rolled-back store "
    "is refused only then"
)


def newest_global(store: Store, spec: Spec, spec_sha: str) -> rounds.Global:
    """The newest global's verified manifest (signature, spec binding), without its tensors."""
    r = rounds.latest_round(store)
    return rounds.Global(r, {}, rounds.global_manifest(store, spec, spec_sha, r))


def bank_state(spec: Spec, key_path: Path, state_path: Path | None) -> BankState:
    """This key's state in this federation (the public half is read from the private key file)."""
    from fedcli import keys

    _, pub = keys.load_private(key_path)
    return BankState.for_federation(
        bank_files(key_path, key_hex(pub), spec.federation_id, state_path), spec.federation_id
    )


def check_fresh(store: Store, spec: Spec, spec_sha: str, state: BankState | None, save: bool = False) -> rounds.Global:
    """Refuse a store older than this bank already saw, or (max_round_age) frozen in the past.

    `save`: remember the newest global (predict and evaluate move the state forward like train does)."""
    g = newest_global(store, spec, spec_sha)
    if state is not None:
        state.check(spec.federation_id, g)
    if final.load_final(store, spec, spec_sha) is None:
        check_age(g, spec.max_round_age)
    if state is not None and save:
        state.save(spec.federation_id, g)
    return g


def check_for_key(
    store: Store, spec: Spec, spec_sha: str, key_path: Path | None, state_path: Path | None, save: bool = False
) -> list[str]:
    """check_fresh with the state of `key_path` if given; the note to print when it was not."""
    state = bank_state(spec, key_path, state_path) if key_path is not None else None
    check_fresh(store, spec, spec_sha, state, save)
    return [] if key_path is not None else [NO_KEY_NOTE]


def check_store_for_key(store: Store, pinned, key_path: Path, state_path: Path | None) -> None:
    """`status --key` and `report --key`: the same rollback check as train, before showing the store's history."""
    spec, spec_sha = rounds.load_spec(store, pinned)
    check_fresh(store, spec, spec_sha, bank_state(spec, key_path, state_path))
