"""The coordinator's step: verify the round's updates, aggregate them, publish the next global."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from fedcli import digest, keys, models
from fedcli.aggregation import server_opt
from fedcli.aggregation.strategy import Combiner
from fedcli.coordinator.federation import publish_global
from fedcli.errors import AlreadyExists, FedcliError, NotFound, VerificationError
from fedcli.protocol import rounds, tensors
from fedcli.protocol.documents import rejection
from fedcli.protocol.spec import Spec
from fedcli.store import Store
from fedcli.store.lock import LeaseLock


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


def verified_updates(store: Store, spec: Spec, candidates: list[tuple[int, str, str]], shapes: tensors.Shapes):
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
    with LeaseLock(store, "aggregate") as lock:
        return _aggregate_locked(store, private, spec, spec_sha, lock, console)


def _aggregate_locked(store, private, spec, spec_sha, lock: LeaseLock, console) -> AggregateResult:
    strat = spec.strategy
    shapes = models.shapes(spec.model, spec.data.n_features)
    base_round = rounds.latest_round(store)
    base = rounds.load_global(store, spec, spec_sha, base_round, shapes)
    r = base_round + 1
    result = AggregateResult(round=r)
    committed, result.pending = rounds.submitted_members(store, r)
    result.missing = [m.name for m in spec.members if m.name not in committed and m.name not in result.pending]
    candidates = [(r, m, base.sha256) for m in committed]
    if strat.mode == "async":
        candidates = rounds.unconsumed_updates(store, spec, spec_sha, r, strat.max_staleness) + candidates

    combiner = Combiner(strat, shapes)
    secure = spec.secagg.enabled  # then the coordinator only ever decodes the sum (sync, fedavg only)
    if secure:
        from fedcli.secagg import exchange

        drops = exchange.load_drops(store, spec, r)
        masked = exchange.MaskedSum(spec, shapes)
    try:
        with Progress(console=console or Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"verifying round {r}", total=len(candidates))
            for (u, member, base_sha), checked in verified_updates(store, spec, candidates, shapes):
                if strat.mode == "async" and len(result.accepted) == strat.buffer_size:
                    break  # FedBuff: the rest wait for the next round
                label = member if u == r else f"{member} (round {u})"
                try:
                    manifest, delta = checked.result()
                    if secure:
                        masked.check(member, manifest, drops)
                    size = store.size(rounds.update_keys(u, member)[0])
                except FedcliError as e:  # one bad update never stops the others: it is rejected with its reason
                    result.rejected[label] = rejection(e, store.url)
                else:
                    # DP updates withhold their row count: equal weights
                    weight = 1.0 if spec.privacy.enabled else float(manifest.num_examples)
                    if secure:
                        masked.add(member, manifest, delta)
                    else:
                        combiner.add(label, delta, weight, staleness=r - u)
                    entry = {
                        "member": member,
                        "num_examples": manifest.num_examples or 0,
                        "metrics": dict(manifest.metrics or {}),
                        "bytes": size,
                    }
                    if u != r:
                        entry["update_round"] = u
                    if combiner.notes.get(label):
                        entry["aggregation"] = combiner.notes[label]
                    result.accepted.append(entry)
                progress.advance(task)
        if result.rejected or store.exists(rounds.rejections_key(r)):  # the latest word, even "none now"
            rounds.write_rejections(store, private, spec, r, result.rejected)

        if strat.mode == "async":
            ready = len(result.accepted) >= strat.buffer_size
            result.waiting_reason = f"{len(result.accepted)} of {strat.buffer_size} buffered updates are in"
        else:
            quorum = quorum_reached(spec, len(result.accepted), base.manifest["created_at"])
            ready, result.waiting_reason = quorum
            if secure:  # all in, or the dropout exchange (declare, wait for recovery shares, unmask)
                delta, result.waiting_reason, sec_info = exchange.close_round(
                    store, private, spec, r, masked, drops, sorted(result.rejected), quorum
                )
                ready = delta is not None
        if not ready:
            return result
        delta, info = (delta, {"rule": "secagg-mean", **sec_info}) if secure else combiner.result()
    finally:
        combiner.close()
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below, in one line
        weights, state = server_opt.server_step(
            strat.server, base.tensors, delta, _server_state(store, spec, base, shapes), strat.server_params
        )
    tensors.check_finite(weights, f"round {r}: the aggregated global model", error=FedcliError)  # refuse, never sign
    tensors.check_finite(state, f"round {r}: the server optimizer state", error=FedcliError)
    rule = info.pop("rule")
    extra = {
        "rule": "mean" if rule == "fedavg" and spec.privacy.enabled else rule,
        "mode": strat.mode,
        "server_optimizer": strat.server,
        **info,
    }
    lock.check()  # fencing: a run whose lease ran out must not publish
    if state:
        data = server_opt.state_to_bytes(strat.server, state, r)
        store.put(rounds.server_state_key(r), data)
        extra["server_state_sha256"] = digest.sha256(data)
    try:
        publish_global(
            store, private, spec, spec_sha, r, weights, prev_sha=base.sha256, contributors=result.accepted, **extra
        )
    except AlreadyExists:
        raise FedcliError(f"round {r} was published by another aggregate run meanwhile") from None
    result.published = True
    result.how = f"rule {extra['rule']}, server {strat.server}" + (", async" if strat.mode == "async" else "")
    return result


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
