"""The coordinator's step: verify the round's updates, aggregate them, publish the next global.

One run is a short pipeline of named stages:

    plan_round          what the spec turns on (sync or async, DP equal weights), decided once
    collect_candidates  the updates this run looks at
    verify              check each one; fold the good ones into the round's aggregator, reject the rest
    record_rejections   sign the list of rejected updates and their reasons
    aggregate           the aggregator's result, or why the round waits
    server_step         the server optimiser turns the aggregated delta into the next global
    publish             sign and publish it (under the lease lock's fencing check)

The aggregator (plain or robust rule, or the secure masked sum) comes from one registry,
aggregation.aggregators, so no stage asks which one it is.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.progress import Progress

from fedcli import digest, keys, models
from fedcli.aggregation import aggregators, server_opt
from fedcli.aggregation.strategy import StrategySpec
from fedcli.coordinator import ending
from fedcli.coordinator.federation import publish_global
from fedcli.coordinator.state import CoordinatorState
from fedcli.errors import AlreadyExists, FedcliError, NotFound, VerificationError
from fedcli.protocol import chain, chain_position, rounds, tensors
from fedcli.protocol.documents import rejection
from fedcli.protocol.spec import Spec
from fedcli.store import Store
from fedcli.store.lock import LeaseLock

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcli.protocol.documents import UpdateManifest

Candidate = tuple[int, str, str]  # (update round, member, sha256 of the global it must be trained on)


@dataclass
class AggregateResult:
    round: int  # the round being closed
    accepted: list[dict] = field(default_factory=list)  # {"member", "num_examples", "metrics"}
    rejected: dict[str, dict] = field(default_factory=dict)  # label -> {"reason": code, "message": one line}
    pending: list[str] = field(default_factory=list)  # tensors without manifest (upload in progress)
    missing: list[str] = field(default_factory=list)  # enrolled members with nothing submitted
    published: bool = False
    waiting_reason: str = ""
    how: str = ""  # e.g. "trimmed_mean, fedadam": what the spec's strategy did
    complete: str = ""  # the federation ended (a signed final marker): why, in one line
    global_sha256: str = ""  # of the global published by this run


def quorum_reached(spec: Spec, n_accepted: int, base_created_at: str) -> tuple[bool, str]:
    """All members in, or min_clients in and the deadline (if any) passed."""
    if n_accepted == len(spec.members):
        return True, ""
    if n_accepted < spec.min_clients:
        return False, f"{n_accepted} of {spec.min_clients} required updates are in"
    if spec.deadline_minutes > 0:
        started = datetime.fromisoformat(base_created_at)
        waited = (datetime.now(UTC) - started).total_seconds() / 60
        if waited < spec.deadline_minutes:
            return False, (
                f"quorum reached ({n_accepted}/{len(spec.members)}); waiting for the rest "
                f"until the deadline ({spec.deadline_minutes - waited:.0f} min left)"
            )
    return True, ""


def verified_updates(store: Store, spec: Spec, candidates: list[Candidate], shapes: tensors.Shapes):
    """Yield ((round, member, base sha), future of rounds.verify_update) in order, one ahead.

    A worker thread reads, hashes and checks update i+1 while the caller folds in update i
    (hashing and file reads release the GIL), so a round runs at about hashing speed. Two
    reusable read buffers alternate: memory stays O(model), and a delta's arrays may be views
    that stay valid only until the caller asks for the next item.
    """
    size = tensors.max_file_size(shapes)
    buffers = [bytearray(size) for _ in range(min(2, len(candidates)))]
    with ThreadPoolExecutor(max_workers=1) as pool:

        def submit(i: int):
            u, member, base_sha = candidates[i]
            return pool.submit(rounds.verify_update, store, spec, u, member, base_sha, shapes, buffers[i % 2])

        pending = submit(0) if candidates else None
        for i, candidate in enumerate(candidates):
            current = pending
            if i + 1 < len(candidates):
                pending = submit(i + 1)
            yield candidate, current


class Quorum:
    """Synchronous rounds: every update for the next round; close at quorum (or deadline)."""

    how = ""  # what the published line adds to the rule and server

    def __init__(self, spec: Spec, base: rounds.Global):
        self.spec, self.started = spec, base.manifest["created_at"]

    def earlier_updates(self, store: Store, spec: Spec, spec_sha: str, r: int) -> list[Candidate]:
        return []

    def full(self, n_accepted: int) -> bool:
        return False

    def readiness(self, n_accepted: int) -> tuple[bool, str]:
        return quorum_reached(self.spec, n_accepted, self.started)


class Buffer:
    """Asynchronous rounds (FedBuff): the oldest `buffer_size` updates not yet used, stale ones discounted."""

    how = ", async"

    def __init__(self, strategy: StrategySpec):
        self.size, self.max_staleness = strategy.buffer_size, strategy.max_staleness

    def earlier_updates(self, store: Store, spec: Spec, spec_sha: str, r: int) -> list[Candidate]:
        """Updates of earlier rounds that no global has folded in yet, oldest first."""
        return rounds.unconsumed_updates(store, spec, spec_sha, r, self.max_staleness)

    def full(self, n_accepted: int) -> bool:
        return n_accepted >= self.size

    def readiness(self, n_accepted: int) -> tuple[bool, str]:
        return n_accepted >= self.size, f"{n_accepted} of {self.size} buffered updates are in"


@dataclass(frozen=True)
class Plan:
    """What this run does, decided once from the spec and the store: no stage tests the spec again."""

    round: int  # the round being closed
    base: rounds.Global  # the global it builds on
    shapes: tensors.Shapes
    closing: Quorum | Buffer  # which updates count and when the round can close
    equal_weights: bool  # DP updates withhold their row count

    def weight(self, manifest: UpdateManifest) -> float:
        return 1.0 if self.equal_weights else float(manifest.num_examples or 0)


def aggregate_round(store: Store, key_path: Path, console: Console | None = None) -> AggregateResult:
    """Verify updates, combine the good ones under the spec's strategy, publish when ready.

    sync: every update for the next round; publish at quorum (or deadline).
    async: the oldest `buffer_size` not yet used, stale ones (trained on older globals) discounted.
    Runs under the store's `aggregate` lease lock, so overlapping cron runs (even on two
    hosts) do the work once; a second run gets LockHeld (exit 3, try later).
    """
    private, pub_b64 = keys.load_private(key_path)
    spec, spec_sha = rounds.load_spec(store, None)
    if pub_b64 != spec.coordinator.ed25519:
        raise VerificationError(f"{key_path} is not the coordinator key of federation {spec.federation_id}")
    chain.gate(spec, rounds.latest_round(store) + 1)
    chain_position.hold(spec.chain, chain_position.coordinator_position_path(key_path))
    history = CoordinatorState.for_key(key_path, pub_b64, spec.federation_id)
    with LeaseLock(store, "aggregate", max_lease=spec.max_lease_minutes * 60) as lock:
        result = _aggregate_locked(store, private, spec, spec_sha, lock, console, history)
        if result.published:  # the round just published may be the last one
            ended = ending.end_after(store, private, spec, spec_sha, history, result.round)
            result.complete = ended.describe(spec.federation_id) if ended else ""
        return result


def _aggregate_locked(
    store: Store,
    private: Ed25519PrivateKey,
    spec: Spec,
    spec_sha: str,
    lock: LeaseLock,
    console: Console | None,
    history: CoordinatorState,
) -> AggregateResult:
    """The stages, in order; the aggregator's temporary files are gone whatever happens."""
    plan = plan_round(store, spec, spec_sha)
    ended = ending.check_and_end(store, private, spec, spec_sha, history, plan.base)  # coordinator.ending
    if ended is not None:
        return AggregateResult(round=plan.base.round, complete=ended.describe(spec.federation_id))
    result, candidates = collect_candidates(store, spec, spec_sha, plan)
    context = aggregators.RoundContext(spec, plan.shapes, plan.round, store, private, plan.equal_weights)
    aggregator = aggregators.build(context)
    try:
        verify(store, spec, plan, candidates, aggregator, result, console)
        record_rejections(store, private, spec, result)
        delta, info = aggregate(plan, aggregator, result)
    finally:
        aggregator.close()
    if delta is None:
        return result
    weights, state = server_step(store, spec, plan, delta)
    history.refuse_twice(plan.round)  # coordinator.state: never a second, different round N
    publish(store, private, spec, spec_sha, plan, lock, result, weights, state, info)
    history.record(plan.round, result.global_sha256)
    return result


def plan_round(store: Store, spec: Spec, spec_sha: str) -> Plan:
    """The round to close, the verified global it builds on, and what the spec turns on."""
    shapes = models.shapes(spec.model, spec.data.n_features)
    base_round = rounds.latest_round(store)
    base = rounds.load_global(store, spec, spec_sha, base_round, shapes)
    closing = Buffer(spec.strategy) if spec.strategy.mode == "async" else Quorum(spec, base)
    return Plan(base_round + 1, base, shapes, closing, equal_weights=spec.privacy.enabled)


def collect_candidates(store: Store, spec: Spec, spec_sha: str, plan: Plan) -> tuple[AggregateResult, list[Candidate]]:
    """The updates to verify (earlier unused ones first in async mode); who is still uploading or missing."""
    r = plan.round
    result = AggregateResult(round=r)
    committed, result.pending = rounds.submitted_members(store, r)
    result.missing = [m.name for m in spec.members if m.name not in committed and m.name not in result.pending]
    candidates = plan.closing.earlier_updates(store, spec, spec_sha, r) + [(r, m, plan.base.sha256) for m in committed]
    return result, candidates


def verify(
    store: Store,
    spec: Spec,
    plan: Plan,
    candidates: list[Candidate],
    aggregator: aggregators.Aggregator,
    result: AggregateResult,
    console: Console | None,
) -> None:
    """Check each candidate and fold the good ones in; one bad update never stops the others."""
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"verifying round {plan.round}", total=len(candidates))
        for (u, member, _), checked in verified_updates(store, spec, candidates, plan.shapes):
            if plan.closing.full(len(result.accepted)):
                break  # FedBuff: the rest wait for the next round
            label = member if u == plan.round else f"{member} (round {u})"
            try:
                manifest, delta = checked.result()
                aggregator.check(member, manifest)
                size = store.size(rounds.update_keys(u, member)[0])
            except FedcliError as e:  # rejected with its reason
                result.rejected[label] = rejection(e, store.url)
            else:
                note = aggregator.add(label, manifest, delta, plan.weight(manifest), staleness=plan.round - u)
                result.accepted.append(_contributor(member, manifest, size, u, plan.round, note))
            progress.advance(task)


def record_rejections(store: Store, private: Ed25519PrivateKey, spec: Spec, result: AggregateResult) -> None:
    """Sign this run's rejections: the latest word, even "none now" once a list exists."""
    if result.rejected or store.exists(rounds.rejections_key(result.round)):
        rounds.write_rejections(store, private, spec, result.round, result.rejected)


def aggregate(
    plan: Plan, aggregator: aggregators.Aggregator, result: AggregateResult
) -> tuple[dict[str, np.ndarray] | None, dict]:
    """The aggregated delta and what was done (for the manifest), or None with why the round waits."""
    readiness = plan.closing.readiness(len(result.accepted))
    delta, result.waiting_reason, info = aggregator.result(readiness, sorted(result.rejected))
    return delta, info


def _contributor(member: str, manifest: UpdateManifest, size: int, u: int, r: int, note: dict) -> dict:
    """The global manifest's entry for one accepted update."""
    entry = {
        "member": member,
        "num_examples": manifest.num_examples or 0,
        "metrics": dict(manifest.metrics or {}),
        "bytes": size,
    }
    if u != r:
        entry["update_round"] = u
    if note:
        entry["aggregation"] = note
    return entry


def server_step(store: Store, spec: Spec, plan: Plan, delta: dict) -> tuple[dict, dict]:
    """The server optimiser applied to the base global; a non-finite result is refused, never signed."""
    strategy, r = spec.strategy, plan.round
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, in one line
        weights, state = server_opt.server_step(
            strategy.server,
            plan.base.tensors,
            delta,
            _server_state(store, spec, plan.base, plan.shapes),
            strategy.server_params,
        )
    tensors.check_finite(weights, f"round {r}: the aggregated global model", error=FedcliError)
    tensors.check_finite(state, f"round {r}: the server optimizer state", error=FedcliError)
    return weights, state


def publish(
    store: Store,
    private: Ed25519PrivateKey,
    spec: Spec,
    spec_sha: str,
    plan: Plan,
    lock: LeaseLock,
    result: AggregateResult,
    weights: dict,
    state: dict,
    info: dict,
) -> None:
    """Store the server optimiser state, then sign and publish the next global (if the lease still holds)."""
    strategy, r, info = spec.strategy, plan.round, dict(info)
    rule = info.pop("rule")
    extra = {"rule": rule, "mode": strategy.mode, "server_optimizer": strategy.server, **info}
    lock.check()  # fencing: a run whose lease ran out must not publish
    if state:
        data = server_opt.state_to_bytes(strategy.server, state, r)
        store.put(rounds.server_state_key(r), data)
        extra["server_state_sha256"] = digest.sha256(data)
    try:
        result.global_sha256 = publish_global(
            store, private, spec, spec_sha, r, weights, prev_sha=plan.base.sha256, contributors=result.accepted, **extra
        )
    except AlreadyExists:
        raise FedcliError(f"round {r} was published by another aggregate run meanwhile") from None
    result.published = True
    result.how = f"rule {rule}, server {strategy.server}" + plan.closing.how


def _server_state(store: Store, spec: Spec, base: rounds.Global, shapes: tensors.Shapes) -> dict:
    """The server optimiser state the base global was published with, checked against its signed sha256."""
    sha = base.manifest.get("server_state_sha256")
    if not sha:
        return {}
    what = f"server optimizer state of round {base.round}"
    key = rounds.server_state_key(base.round)
    try:
        data = store.get(key, max_bytes=2 * tensors.max_file_size(shapes))
    except NotFound:
        raise VerificationError(f"{what} is missing from the store", reason="missing") from None
    if digest.sha256(data) != sha:
        raise VerificationError(f"{what} does not match the sha256 in the signed global manifest", reason="bad-hash")
    return server_opt.state_from_bytes(data, spec.strategy.server, base.round)
