"""When a federation ends: the planned rounds are done, or too few banks can still afford a DP release.

The coordinator decides it from signed documents only: the spec (`[federation] rounds`, `[privacy]`)
and each bank's signed update manifests and DP holdout evaluations with their `dp` records, priced by
the same accountant the banks' ledgers use. It then signs the final marker (protocol.final), and remembers it in its state.
"""

from __future__ import annotations

from fedcli.bank.releases import evaluation_mechanism, store_evaluations, store_releases
from fedcli.coordinator.state import CoordinatorState
from fedcli.errors import FedcliError
from fedcli.privacy.accounting import Mechanism, epsilon
from fedcli.protocol import final, rounds
from fedcli.protocol.spec import Spec
from fedcli.store import Store


def why_end(store: Store, spec: Spec, latest: int) -> tuple[str, str] | None:
    """(reason, detail) if the federation should end after global `latest`, else None."""
    if spec.rounds is not None and latest >= spec.rounds:
        return "rounds", f"{latest} of {spec.rounds} planned rounds published"
    if spec.privacy.enabled and spec.privacy.budget_epsilon is not None:
        able = _able_members(store, spec, latest + 1)
        if len(able) < spec.min_clients:
            return "budget", (
                f"only {len(able)} of {len(spec.members)} members can still afford a DP release "
                f"(quorum {spec.min_clients})"
            )
    return None


def _able_members(store: Store, spec: Spec, open_round: int) -> list[str]:
    """Members that are in the open round already, or whose next release (like their last) fits the budget."""
    budget, delta = spec.privacy.budget_epsilon or 0.0, spec.privacy.delta
    able, listing = [], store.list("rounds")
    for member in spec.members:
        released = store_releases(store, spec, member, listing)
        if open_round in released or not released:
            able.append(member.name)
            continue
        try:
            mechs = [Mechanism.from_dict(released[r]) for r in sorted(released)]
            evals = _evaluations(store, spec, member, listing)
            after = epsilon([*mechs, *evals, mechs[-1], *evals[-1:]], delta)  # spent, and the next round's
        except (FedcliError, ArithmeticError, ValueError):
            continue  # a release the accountant cannot price: it cannot be afforded either
        if after <= budget:
            able.append(member.name)
    return able


def _evaluations(store: Store, spec: Spec, member, listing: list[str]) -> list[Mechanism]:
    """The member's signed DP holdout evaluations (bank.holdout): record-level releases, so they count
    against a record-level budget too (an update-level budget is of another unit, the bank's whole update)."""
    if spec.privacy.mode != "record":
        return []
    found = store_evaluations(store, spec, member, listing)
    return [evaluation_mechanism(found[r]) for r in sorted(found)]


def end_if_due(
    store: Store, private, spec: Spec, spec_sha: str, state: CoordinatorState, latest: rounds.Global
) -> final.Final | None:
    """The final marker: already there (or remembered and re-published), or signed now if the end is due."""
    found = final.load_final(store, spec, spec_sha)
    if found is None and state.final is not None and state.final[0] == latest.round:
        found = final.publish_final(store, private, spec, spec_sha, latest, state.final[1], "re-published")
    if found is None:
        due = why_end(store, spec, latest.round)
        if due is None:
            return None
        found = final.publish_final(store, private, spec, spec_sha, latest, *due)
    state.record_final(found.round, found.reason)
    return found


def check_and_end(
    store: Store, private, spec: Spec, spec_sha: str, state: CoordinatorState, base: rounds.Global
) -> final.Final | None:
    """Before a round: the store is not behind this coordinator's state, and the federation has not ended."""
    state.check_store(base.round, base.sha256)
    state.record(base.round, base.sha256)  # a round found signed on the store (e.g. after a crash)
    return end_if_due(store, private, spec, spec_sha, state, base)


def end_after(store: Store, private, spec: Spec, spec_sha: str, state: CoordinatorState, r: int) -> final.Final | None:
    """After publishing round r: sign the end if it is due."""
    g = rounds.Global(r, {}, rounds.global_manifest(store, spec, spec_sha, r))
    return end_if_due(store, private, spec, spec_sha, state, g)
