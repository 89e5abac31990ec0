"""The bank's DP releases as the store shows them: its own signed update manifests.

Why: the ledger is a local file, so deleting it, pointing --ledger at a fresh one or copying only
the key elsewhere would reset the privacy budget. The store keeps every update this key signed,
each with its `dp` record, so before a new release the ledger must know every one of them.
"""

import re
from pathlib import Path

from fedcli.errors import FedcliError, InputError, NotFound, NotRegular, VerificationError
from fedcli.keys import PublicIdentity, verify_manifest
from fedcli.privacy.accounting import Mechanism
from fedcli.privacy.ledger import BudgetExceeded, Ledger
from fedcli.protocol import rounds
from fedcli.protocol.spec import Spec
from fedcli.store import Store


def store_releases(store: Store, spec: Spec, me: PublicIdentity, listing: list[str] | None = None) -> dict[int, dict]:
    """Round -> `dp` record of each update manifest on the store that this key signed in this federation.

    `listing`: the store's keys under rounds/, when the caller lists once for several members."""
    return _signed_dp(store, spec, me, "updates", None, listing)


def store_evaluations(
    store: Store, spec: Spec, me: PublicIdentity, listing: list[str] | None = None
) -> dict[int, dict]:
    """Global round -> `dp` record of each DP holdout evaluation on the store signed by this key in this
    federation (bank.holdout): each one a record-level release too. `listing`: as for store_releases."""
    return _signed_dp(store, spec, me, "evaluations", "evaluation", listing)


def _signed_dp(
    store: Store, spec: Spec, me: PublicIdentity, folder: str, kind: str | None, listing: list[str] | None
) -> dict[int, dict]:
    """Round -> `dp` record of this key's signed documents under rounds/N/<folder>/ (of `kind`, when given)
    naming this federation, round and member; anything else (a forgery, a stray file) is not a release of ours."""
    pattern = re.compile(rf"rounds/(\d{{6}})/{folder}/{re.escape(me.name)}\.json")
    found: dict[int, dict] = {}
    for key in store.list("rounds") if listing is None else listing:
        m = pattern.fullmatch(key)
        if not m:
            continue
        r, what = int(m.group(1)), f"{folder[:-1]} from {me.name}"
        try:
            doc = verify_manifest(rounds.read_manifest(store, key, what), me, what)
        except (VerificationError, NotFound, NotRegular):
            continue
        place = (doc.get("federation_id"), doc.get("round"), doc.get("member"))
        if (
            place == (spec.federation_id, r, me.name)
            and kind in (None, doc.get("kind"))
            and isinstance(doc.get("dp"), dict)
        ):
            found[r] = doc["dp"]
    return found


def unrecorded_evaluations(store: Store, spec: Spec, me: PublicIdentity, ledger: Ledger) -> dict[int, dict]:
    """The DP holdout evaluations the store shows that the ledger lacks."""
    known = {
        e["round"]
        for e in ledger.entries()
        if e.get("federation") == spec.federation_id and e.get("release") == "evaluation"
    }
    return {r: dp for r, dp in store_evaluations(store, spec, me).items() if r not in known}


def unrecorded(store: Store, spec: Spec, me: PublicIdentity, ledger: Ledger) -> dict[int, dict]:
    """The releases the store shows that the ledger lacks."""
    known = {
        e["round"]
        for e in ledger.entries()
        if e.get("federation") == spec.federation_id and e.get("release") is None  # an evaluation is no update
    }
    return {r: dp for r, dp in store_releases(store, spec, me).items() if r not in known}


def cross_check(store: Store, spec: Spec, me: PublicIdentity, ledger: Ledger, key_path: object) -> None:
    """Refuse a new release while the store shows releases of this key the ledger does not hold."""
    lacking = [str(r) for r in sorted(unrecorded(store, spec, me, ledger))]
    lacking += [f"{r} (holdout evaluation)" for r in sorted(unrecorded_evaluations(store, spec, me, ledger))]
    if lacking:
        shown = ", ".join(lacking[:10]) + (" ..." if len(lacking) > 10 else "")
        raise BudgetExceeded(
            f"the store shows DP releases by this key in federation {spec.federation_id} (rounds {shown}) that "
            f"the privacy ledger {ledger.path} lacks (deleted, moved or replaced?): nothing exported; restore it "
            f"from backup, or re-enter them from the signed updates with `fedcli recover-ledger --store {store} "
            f"--key {key_path} --coordinator COORDINATOR.pub`"
        )


def recover(store: Store, spec: Spec, me: PublicIdentity, ledger: Ledger) -> list[dict]:
    """Re-enter into the ledger every release the store shows and the ledger lacks; returns the new entries."""
    ps = spec.privacy
    if not ps.enabled or ps.budget_epsilon is None:
        raise InputError(f"federation {spec.federation_id} has no differential privacy: there is nothing to recover")
    added = []
    for r, dp in sorted(unrecorded(store, spec, me, ledger).items()):
        try:
            mech = Mechanism.from_dict(dp)
            delta = float(dp.get("delta", ps.delta))
        except (FedcliError, TypeError, ValueError) as e:
            raise VerificationError(
                f"round {r}: the DP record of this bank's signed update is malformed: {e}"
            ) from None
        added.append(
            ledger.record(mech, round=r, federation=spec.federation_id, budget_epsilon=ps.budget_epsilon, delta=delta)
        )
    for r, dp in sorted(unrecorded_evaluations(store, spec, me, ledger).items()):
        added.append(_recover_evaluation(ledger, spec, r, dp))
    return added


def evaluation_mechanism(dp: dict) -> Mechanism:
    """A signed DP holdout evaluation's `dp` record as the accountant's release: one record-level Gaussian release
    of its declared noise (sample rate 1, one step)."""
    try:
        return Mechanism("record", float(dp["noise_multiplier"]), 1.0, 1, float(dp["sensitivity"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FedcliError(f"malformed DP record: {e}") from None


def _recover_evaluation(ledger: Ledger, spec: Spec, r: int, dp: dict) -> dict:
    """A DP holdout evaluation the store shows: one record-level Gaussian release of its declared noise."""
    ps = spec.privacy
    assert ps.budget_epsilon is not None
    try:
        mech = evaluation_mechanism(dp)
    except FedcliError as e:
        raise VerificationError(
            f"round {r}: the DP record of this bank's signed evaluation is malformed: {e}"
        ) from None
    return ledger.record(
        mech,
        round=r,
        federation=spec.federation_id,
        budget_epsilon=ps.budget_epsilon,
        delta=ps.delta,
        release="evaluation",
    )


def bank_ledger(spec: Spec, key_path: Path, pub_b64: str, ledger_path: Path | None) -> Ledger:
    """This key's ledger in this federation, bound to both (bank.state.bank_files chooses the file)."""
    from fedcli.bank.state import bank_files, key_hex

    files = bank_files(key_path, key_hex(pub_b64), spec.federation_id, None, ledger_path)
    return Ledger(files.ledger, (key_hex(pub_b64), spec.federation_id), files.legacy_ledger)


def recover_ledger(
    store: Store, key_path: Path, coordinator_pub: Path, ledger_path: Path | None
) -> tuple[Ledger, list[dict]]:
    """`fedcli recover-ledger`: re-enter the releases the store shows (signed by this key) into its ledger."""
    from fedcli import keys

    _, pub = keys.load_private(key_path)
    spec, _ = rounds.load_spec(store, keys.load_public(coordinator_pub))
    me = spec.member_by_key(pub)
    if me is None:
        raise InputError(f"{key_path} is not enrolled in federation {spec.federation_id}")
    ledger = bank_ledger(spec, key_path, pub, ledger_path)
    return ledger, recover(store, spec, me, ledger)
