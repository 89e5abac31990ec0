"""A bank's hold on the spec chain: the versions it trusted (forks, rollback) and the policy it agreed to.

Kept in its own small file next to the bank state (NAME.state.chain.json), apart from the state
file other steps own. A new version that weakens differential privacy, drops secure aggregation
or changes the model is refused (nothing is sent) until the bank accepts exactly that version
(`fedcli train --accept-spec-version K`) after seeing the difference. A coordinator, or anyone
holding its key, cannot turn a bank's protections off behind its back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcli.errors import InputError, VerificationError
from fedcli.protocol.chain import Chain, Version, gate
from fedcli.protocol.chain_position import ChainPositionFile, check_position, load_position, save_position
from fedcli.protocol.spec import Spec


def position_path_for(state_path: Path) -> Path:
    state_path = Path(state_path)
    return state_path.with_name(state_path.name.removesuffix(".json") + ".chain.json")


@dataclass(frozen=True)
class Weakening:
    setting: str
    old: str
    new: str


def pin(spec: Spec, spec_sha: str, me: str, state_path: Path, accept: int | None, console: Console, r: int = 0) -> None:
    """Refuse a forked or rolled-back chain, and a version that weakens this bank's policy unless accepted;
    wait (exit 3) while a version that applies to round r awaits countersignatures."""
    walked = spec.chain
    if not isinstance(walked, Chain):
        return
    gate(spec, r)
    path = position_path_for(state_path)
    pos = load_position(path)
    current = next(v for v in walked.versions if v.sha == spec_sha)
    policy = _trusted(walked, pos, spec) if pos is not None else _joined(walked, me, current)
    if current.number > policy.number:
        weaker = weakening(policy.spec, current.spec)
        if weaker:
            console.print(difference_table(policy, current, weaker))
        if weaker and accept != current.number:
            raise VerificationError(
                f"spec version {current.number} weakens what this bank agreed to in version {policy.number} "
                f"({weaker[0].setting}: {weaker[0].old} -> {weaker[0].new}); nothing was sent. To accept it, "
                f"run again with --accept-spec-version {current.number}",
                reason="weak-privacy",
            )
        policy = current
    elif accept is not None and accept != policy.number:
        raise InputError(f"--accept-spec-version {accept}: version {current.number} is in force, not {accept}")
    latest = walked.latest
    save_position(
        path,
        ChainPositionFile(
            federation_id=spec.federation_id,
            version=latest.number,
            sha256=latest.sha,
            policy_version=policy.number,
            policy_sha256=policy.sha,
        ),
    )


def _trusted(walked: Chain, pos: ChainPositionFile, spec: Spec) -> Version:
    """The versions this bank trusted must still be on the chain, unchanged; its policy version."""
    check_position(walked, pos, spec.federation_id)
    found = walked.version(pos.policy_version or pos.version)
    assert found is not None  # check_position found it
    return found


def _joined(walked: Chain, me: str, current: Version) -> Version:
    """A bank with no record agrees to the first version that enrolled it (up to the one in force)."""
    for v in walked.versions[: current.number]:
        if v.spec.member(me) is not None:
            return v
    return current


def weakening(old: Spec, new: Spec) -> list[Weakening]:
    """What a new version weakens, setting by setting: DP, secure aggregation, the model."""
    found = _privacy_weakening(old, new)
    if old.secagg.enabled and not new.secagg.enabled:
        found.append(Weakening("secure aggregation", "on", "off"))
    elif old.secagg.enabled and (old.secagg.noise, new.secagg.noise) == ("full", "shared"):
        found.append(Weakening("secure aggregation noise", "full", "shared"))
    if old.model != new.model or old.data != new.data:
        found.append(Weakening("model", _model(old), _model(new)))
    return found


def _privacy_weakening(old: Spec, new: Spec) -> list[Weakening]:
    a, b = old.privacy, new.privacy
    if not a.enabled:
        return []
    if not b.enabled:
        return [Weakening("differential privacy", a.mode, "off")]
    found = []
    if a.mode != b.mode:
        found.append(Weakening("DP mode", a.mode, b.mode))
    if a.budget_epsilon is not None and (b.budget_epsilon is None or b.budget_epsilon > a.budget_epsilon):
        found.append(Weakening("DP budget epsilon", f"{a.budget_epsilon:g}", _g(b.budget_epsilon)))
    if b.delta > a.delta:
        found.append(Weakening("DP delta", f"{a.delta:g}", f"{b.delta:g}"))
    if b.clip > a.clip:
        found.append(Weakening("DP clip", f"{a.clip:g}", f"{b.clip:g}"))
    if _noise_weaker(a, b):
        found.append(Weakening("DP noise", _noise(a), _noise(b)))
    return found


def _noise_weaker(a, b) -> bool:
    if a.noise_multiplier is not None and b.noise_multiplier is not None:
        return b.noise_multiplier < a.noise_multiplier
    if a.target_epsilon is not None and b.target_epsilon is not None:
        return b.target_epsilon / b.rounds > a.target_epsilon / a.rounds or b.target_epsilon > a.target_epsilon
    return True  # from a fixed multiplier to a target or back: not comparable, so the bank decides


def _noise(p) -> str:
    if p.noise_multiplier is not None:
        return f"multiplier {p.noise_multiplier:g}"
    return f"target epsilon {p.target_epsilon:g} over {p.rounds} rounds"


def _g(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _model(spec: Spec) -> str:
    m = spec.model
    shape = f", hidden {list(m.hidden)}" if m.kind == "mlp" else ""
    return f"{m.kind} on {spec.data.n_features} features{shape}, seed {m.seed}"


def difference_table(old: Version, new: Version, weaker: list[Weakening]) -> Table:
    table = Table(title=f"spec version {new.number} weakens what this bank agreed to (version {old.number})")
    table.add_column("setting", style="bold")
    table.add_column(f"version {old.number}")
    table.add_column(f"version {new.number}", style="yellow")
    for w in weaker:
        table.add_row(escape(w.setting), escape(w.old), escape(w.new))
    return table
