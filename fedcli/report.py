"""`fedcli report`: what a validator keeps: holdout performance round by round, calibration, score
distributions, the privacy budget spent and who contributed, as a PNG and a self-contained HTML page.

Holdout numbers come from the banks' signed evaluation files (protocol.evaluations: binned scores of
each global model on rows the bank never trains on; the federation's are the banks' histograms summed).
Everything else comes from the signed update manifests (each signature checked against the member's key
in the spec and each manifest against its contract, protocol/documents.py; a manifest that fails is
listed, never plotted; so is a rejections.json that is not signed by the coordinator: "rejected" is only
ever the coordinator's verified word). Every panel with nothing to show says why. How to read it:
docs/report.md.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcli.errors import FedcliError
from fedcli.keys import PublicIdentity, verify_manifest
from fedcli.metrics import MANIFEST_METRICS
from fedcli.protocol.rounds import (
    global_manifest,
    global_rounds,
    load_rejections,
    load_spec,
    read_manifest,
    spec_for_round,
    submitted_members,
    update_keys,
)
from fedcli.protocol.spec import Spec
from fedcli.store import Store

if TYPE_CHECKING:  # pydantic is imported lazily, only by the commands that read documents
    from fedcli.protocol.documents import UpdateManifest
    from fedcli.protocol.evaluations import Evaluations

METRICS = ("loss", *(f"{stem}_{when}" for stem in MANIFEST_METRICS for when in ("before", "after")))


@dataclass
class Entry:
    """One bank's update in one round, as its signed manifest states it."""

    round: int
    member: str
    status: str  # accepted, rejected, submitted (round still open) or invalid (signature or contract failed)
    rows: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None  # privacy budget spent so far, when DP is recorded
    dp: dict | None = None
    note: str = ""


@dataclass
class Report:
    federation_id: str
    members: list[str]
    rounds: list[int]
    entries: list[Entry]
    published: list[int]
    budget: float | None  # the spec's epsilon budget, if it declares one
    dp_note: str  # what the privacy panel says when there is no epsilon to plot
    holdout: Evaluations | None = None  # the banks' verified holdout histograms, by global round


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _epsilons(entries: list[Entry], delta: float, evaluations: dict[str, dict[int, dict]] | None = None) -> None:
    """Fill in epsilon where manifests carry DP parameters but not the epsilon itself.

    Uses fedcli.privacy's accountant (if this install has it) over every update the bank
    released so far, in round order, and every DP holdout evaluation it signed before that
    round's update (`evaluations`: member -> global round -> dp record; record-level DP only):
    the same composition its local ledger makes.
    """
    try:
        from fedcli.bank.releases import evaluation_mechanism
        from fedcli.privacy import accounting
    except ImportError:
        return
    released: dict[str, list] = {}
    for e in sorted(entries, key=lambda e: e.round):
        if e.dp is None or e.status == "invalid":
            continue
        try:
            released.setdefault(e.member, []).append(accounting.Mechanism.from_dict(e.dp))
            evals = (evaluations or {}).get(e.member, {})
            before = [evaluation_mechanism(d) for g, d in sorted(evals.items()) if g < e.round]
            if e.epsilon is None:
                e.epsilon = accounting.epsilon([*released[e.member], *before], _number(e.dp.get("delta")) or delta)
        except (FedcliError, ImportError, ValueError, TypeError):
            return


def _verified_update(store: Store, spec: Spec, r: int, member: str) -> UpdateManifest:
    """A member's update manifest of round r, its signature and contract checked."""
    from fedcli.contract import validate
    from fedcli.protocol.documents import UpdateManifest

    signer, what = spec_for_round(spec, None, r)[0].member(member), f"update from {member} in round {r}"
    if signer is None:
        raise FedcliError(f"{member} is not an enrolled member")
    signed = verify_manifest(read_manifest(store, update_keys(r, member)[1], what), signer, what)
    return validate(UpdateManifest, signed, what)


def _dp_evaluations(store: Store, spec: Spec) -> dict[str, dict[int, dict]]:
    """Each member's signed DP holdout evaluations (record-level releases, like DP-SGD's)."""
    if spec.privacy.mode != "record":
        return {}
    from fedcli.bank.releases import store_evaluations

    listing = store.list("rounds")
    return {m.name: store_evaluations(store, spec, m, listing) for m in spec.members}


def collect(store: Store, pinned: PublicIdentity | None = None) -> Report:
    """Read every round's update manifests and what the coordinator decided about them."""
    spec, spec_sha = load_spec(store, pinned)
    published = global_rounds(store)
    last = published[-1] if published else 0
    used = set()  # (round the update was made for, member): async rounds may fold in older updates
    for g_round in published:
        g = global_manifest(store, spec, spec_sha, g_round)
        used |= {(c.get("update_round", g_round), c["member"]) for c in g["contributors"]}
    entries = []
    for r in range(1, last + 2):
        found = load_rejections(store, spec, r)
        rejected = found.entries if found and found.verified else {}
        committed, _ = submitted_members(store, r)
        for member in committed:
            status = "accepted" if (r, member) in used else "rejected" if member in rejected else "submitted"
            try:
                m = _verified_update(store, spec, r, member)
            except FedcliError as e:
                entries.append(Entry(r, member, "invalid", note=str(e)))
                continue
            metrics = {k: m.metrics[k] for k in METRICS if m.metrics and k in m.metrics}
            dp = m.dp.model_dump(exclude_none=True) if m.dp else None
            why = rejected.get(member)
            note = f"{why['reason']}: {why['message']}" if why else ""
            if found and not found.verified and not note:
                note = "rejections.json of this round is unverified (not the coordinator's signed word)"
            entries.append(Entry(r, member, status, m.num_examples, metrics, None, dp, note))
    privacy = spec.raw.get("privacy", {}) if isinstance(spec.raw.get("privacy"), dict) else {}
    if any(e.dp is not None and e.epsilon is None for e in entries):
        _epsilons(entries, _number(privacy.get("delta")) or 1e-5, _dp_evaluations(store, spec))
    has_dp, has_eps = any(e.dp is not None for e in entries), any(e.epsilon is not None for e in entries)
    note = "" if has_eps else ("DP recorded, but no epsilon could be computed here" if has_dp else "no DP recorded")
    rounds = sorted({e.round for e in entries})
    from fedcli.protocol.evaluations import collect as collect_evaluations

    return Report(
        spec.federation_id,
        [m.name for m in spec.members],
        rounds,
        entries,
        published,
        _number(privacy.get("budget_epsilon")) or (spec.privacy.budget_epsilon if spec.privacy.enabled else None),
        note,
        collect_evaluations(store, pinned),
    )


# Holdout panels: metric key, title, y label. AUC, KS and PR-AUC come from binned scores (approximate,
# docs/report.md); PR-AUC's no-skill level is the positive rate, drawn as a dotted line.
HOLDOUT_PANELS = (
    ("auc", "holdout ROC AUC of each global model", "ROC AUC (binned, approximate)"),
    ("ks", "holdout KS of each global model", "KS (binned, approximate)"),
    ("pr_auc", "holdout PR-AUC of each global model", "average precision (binned, approximate)"),
)
FEDERATION = "federation"  # the banks' histograms summed
NO_BASELINE = (
    "no bank-alone baseline: [evaluation] baseline is off in the spec\n"
    "(examples/compare_local.py measures each bank alone on the demo's shared holdout)"
)
WITH_BASELINE = (
    "dashed: each bank's own model, trained on its rows alone\n(same epochs per round; grey dashed: all of them summed)"
)


def plot(rep: Report) -> bytes:
    """Eight panels as PNG bytes: holdout AUC, KS, PR-AUC over rounds; calibration; score distribution per bank;
    ε spent against the budget; updates accepted and rejected per round; AUC on training rows before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(rep.members)}
    colors[FEDERATION] = (0.0, 0.0, 0.0, 1.0)
    good = [e for e in rep.entries if e.status != "invalid"]
    fig, axes = plt.subplots(4, 2, figsize=(13, 19), dpi=100)
    fig.suptitle(
        f"federation {rep.federation_id}: {len(rep.published) - 1 if rep.published else 0} rounds "
        f"published, {len(rep.members)} banks",
        fontsize=15,
    )
    (ax_auc, ax_ks), (ax_pr, ax_cal), (ax_dist, ax_eps), (ax_updates, ax_local) = axes
    for ax, (key, title, ylabel) in zip((ax_auc, ax_ks, ax_pr), HOLDOUT_PANELS, strict=True):
        _holdout_panel(ax, rep, colors, key, title, ylabel)
    _calibration_panel(ax_cal, rep, colors)
    _distribution_panel(ax_dist, rep, colors)
    _privacy_panel(ax_eps, rep, good, colors)
    _round_axis(ax_eps, rep)
    _updates_panel(ax_updates, rep)
    _round_axis(ax_updates, rep)
    _before_after_panel(
        ax_local, rep.members, good, colors, "auc", "AUC on each bank's own training rows (not a holdout)", "ROC AUC"
    )
    _round_axis(ax_local, rep)
    if not good:
        _say(ax_local, "no verified updates on the store yet")
    else:
        _why_empty(ax_local, good, "auc_after")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in rep.members]
    handles.append(plt.Line2D([], [], color="black", linewidth=3, label="federation (banks summed)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _holdout_rounds(rep: Report) -> list[int]:
    return rep.holdout.rounds if rep.holdout is not None else []


def _holdout_why(rep: Report) -> str:
    if rep.holdout is None:
        return "no holdout evaluation read"
    return rep.holdout.why_none().replace(": ", ":\n", 1)


def _holdout_panel(ax, rep: Report, colors: dict, key: str, title: str, ylabel: str) -> None:
    """A holdout metric per global round: the federation thick, each bank thin; PR-AUC's no-skill line dotted."""
    noised = " [DP: noised counts]" if rep.holdout is not None and rep.holdout.noised else ""
    ax.set_title(f"{title}{noised}\n(on rows the banks never train on; x: the global model of that round)", fontsize=11)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("global model of round")
    ax.grid(alpha=0.3)
    rounds = _holdout_rounds(rep)
    if not rounds:
        _say(ax, _holdout_why(rep))
        return
    found = rep.holdout
    assert found is not None
    fed = [(r, found.federation(r).metrics()) for r in rounds]
    ax.plot([r for r, _ in fed], [m[key] for _, m in fed], "o-", color="black", linewidth=3, label=FEDERATION)
    for member in rep.members:
        pts = [(r, found.by_round[r][member].metrics()[key]) for r in rounds if member in found.by_round[r]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[member], alpha=0.75, linewidth=1.2)
        pts = [(r, h.metrics()[key]) for r in rounds if (h := found.baselines.get(r, {}).get(member)) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", color=colors[member], alpha=0.75, linewidth=1)
    alone = [(r, h.metrics()[key]) for r in rounds if (h := found.alone(r)) is not None]
    ax.plot([p[0] for p in alone], [p[1] for p in alone], "--", color="0.45", linewidth=2.5)
    if key == "pr_auc":
        ax.plot([r for r, _ in fed], [m["positive_rate"] for _, m in fed], ":", color="0.4")
        ax.text(
            rounds[-1],
            fed[-1][1]["positive_rate"],
            "no skill (bad rate) ",
            va="top",
            ha="right",
            fontsize=8,
            color="0.3",
        )
    if key == "auc":
        said = WITH_BASELINE if found.spec.evaluation.baseline else NO_BASELINE
        ax.text(0.98, 0.03, said, transform=ax.transAxes, fontsize=8, color="0.35", va="bottom", ha="right")
    _holdout_axis(ax, rounds)


def _holdout_axis(ax, rounds: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(rounds) - 0.4, max(rounds) + 0.4)


def _calibration_panel(ax, rep: Report, colors: dict) -> None:
    """Reliability curve of the latest evaluated global: mean score against observed bad rate, per bin."""
    ax.set_xlabel("mean predicted score in the bin")
    ax.set_ylabel("observed positive rate in the bin")
    ax.grid(alpha=0.3)
    rounds = _holdout_rounds(rep)
    if not rounds:
        ax.set_title("calibration (reliability curve)", fontsize=11)
        _say(ax, _holdout_why(rep))
        return
    found, r = rep.holdout, rounds[-1]
    assert found is not None
    total = found.federation(r)
    m = total.metrics()
    ax.set_title(
        f"calibration of the global model of round {r} on the holdout{' [DP: noised]' if found.noised else ''}\n"
        f"federation: Brier {m['brier']:.4f}, ECE {m['ece']:.4f} (points: bins with ≥ 10 rows)",
        fontsize=11,
    )
    ax.plot([0, 1], [0, 1], ":", color="0.5", label="perfect calibration")
    for member, hist in sorted(found.by_round[r].items()):
        x, y, _ = hist.reliability(min_rows=10)
        ax.plot(x, y, "o-", color=colors.get(member, "0.5"), alpha=0.4, markersize=3, linewidth=1)
    x, y, n = total.reliability(min_rows=10)
    ax.scatter(x, y, s=12 + 60 * n / max(n.max(), 1), color="black", zorder=3)
    ax.plot(x, y, "-", color="black", linewidth=2.5)
    top = max(float(x.max()) if len(x) else 0.0, float(y.max()) if len(y) else 0.0)
    ax.set_xlim(0, min(1.0, top * 1.08 + 0.02))
    ax.set_ylim(0, min(1.0, top * 1.08 + 0.02))
    ax.legend(loc="upper left", fontsize=8)


def _distribution_panel(ax, rep: Report, colors: dict) -> None:
    """Each bank's share of holdout rows per score bin (latest evaluated global), on a log-odds axis."""
    from fedcli.protocol.binned import LOGIT_LIMIT

    ax.set_xlabel("score (log-odds scale)")
    ax.set_ylabel("share of the bank's holdout rows")
    ax.grid(alpha=0.3)
    rounds = _holdout_rounds(rep)
    if not rounds:
        ax.set_title("score distribution per bank", fontsize=11)
        _say(ax, _holdout_why(rep))
        return
    found, r = rep.holdout, rounds[-1]
    assert found is not None
    noised = " [DP: noised]" if rep.holdout is not None and rep.holdout.noised else ""
    ax.set_title(f"score distribution per bank, global model of round {r}, holdout rows{noised}", fontsize=11)
    bins = found.spec.evaluation.bins
    step = 2 * LOGIT_LIMIT / (bins - 2)
    mids = -LOGIT_LIMIT - step / 2 + step * np.arange(bins)
    x = 1 / (1 + np.exp(-mids))
    used = np.flatnonzero(found.federation(r).count > 0)
    ax.set_xscale("logit")
    ax.set_xlim(x[max(used[0] - 1, 0)], x[min(used[-1] + 1, bins - 1)])  # the bins some bank has rows in
    for member, hist in sorted(found.by_round[r].items()):
        share = hist.count / max(hist.rows, 1)
        rate = hist.n_pos / max(hist.rows, 1)
        ax.plot(
            x, share, "-", color=colors.get(member, "0.5"), label=f"{member}: {hist.rows:,} rows, bad rate {rate:.1%}"
        )
    ax.legend(loc="upper left", fontsize=8)


def _updates_panel(ax, rep: Report) -> None:
    """Per round: updates accepted, rejected by the coordinator, not verifiable, still waiting (stacked)."""
    kinds = (
        ("accepted", "#1a7f37"),
        ("rejected", "#c62828"),
        ("invalid", "#6d1b1b"),
        ("submitted", "#d4a017"),
    )
    ax.set_title("updates per round: contributors and rejections", fontsize=11)
    ax.set_ylabel("updates")
    if not rep.entries:
        _say(ax, "no updates on the store yet")
        return
    bottom = np.zeros(len(rep.rounds))
    for status, color in kinds:
        counts = np.array([sum(e.round == r and e.status == status for e in rep.entries) for r in rep.rounds])
        if counts.any():
            label = {"invalid": "invalid (signature or contract)", "submitted": "submitted (round open)"}.get(
                status, status
            )
            ax.bar(rep.rounds, counts, bottom=bottom, color=color, width=0.6, label=label)
        bottom += counts
    ax.axhline(len(rep.members), color="0.4", linestyle=":", linewidth=1)
    ax.set_ylim(0, max(len(rep.members), int(bottom.max())) + 1)
    ax.legend(loc="lower right", fontsize=8)


def _series(entries: list[Entry], member: str, key: str) -> tuple[list[int], list[float]]:
    """One bank's metric `key` by round, in round order."""
    pts = sorted((e.round, e.metrics[key]) for e in entries if e.member == member and key in e.metrics)
    return [p[0] for p in pts], [p[1] for p in pts]


def _why_empty(ax, good: list[Entry], key: str) -> None:
    """A panel no manifest has numbers for says why: DP withholds metrics; an older fedcli did not report this one."""
    if any(key in e.metrics for e in good):
        return
    if any(e.metrics for e in good):
        _say(ax, "not in these updates' manifests\n(made by an older fedcli)")
    else:
        _say(ax, "no metrics in the manifests\n(DP updates withhold them)")


def _before_after_panel(ax, members: list[str], good: list[Entry], colors: dict, stem: str, title: str, ylabel: str):
    """A metric after local training (solid) and of the global model the bank started from (dashed)."""
    for m in members:
        x, y = _series(good, m, f"{stem}_after")
        ax.plot(x, y, "o-", color=colors[m], label=m)
        x, y = _series(good, m, f"{stem}_before")
        ax.plot(x, y, "o--", color=colors[m], alpha=0.45, markersize=3)
    ax.set_title(f"{title}\n(solid: after local training; dashed: the global model it started from)", fontsize=11)
    ax.set_ylabel(ylabel)


def _privacy_panel(ax, rep: Report, good: list[Entry], colors: dict) -> None:
    """Cumulative epsilon per bank against the spec's budget, or why there is none to plot."""
    spent = [(e.member, e.round, e.epsilon) for e in good if e.epsilon is not None]
    ax.set_title("privacy budget spent (cumulative ε per bank)")
    ax.set_ylabel("ε")
    if not spent:
        _say(ax, rep.dp_note)
        return
    for m in rep.members:
        pts = sorted((r, eps) for member, r, eps in spent if member == m)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[m], label=m)
    if rep.budget is not None:
        ax.axhline(rep.budget, color="black", linestyle=":", label=f"budget ε={rep.budget:g}")
        ax.legend(loc="upper left", fontsize=8)
    top = max([eps for _, _, eps in spent] + ([rep.budget] if rep.budget is not None else []))
    ax.set_ylim(0, top * 1.15 or 1)


def _round_axis(ax, rep: Report) -> None:
    """Integer rounds on x; an open round (still collecting updates) shaded, its numbers may change."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    if not rep.rounds:  # no update yet: no scale to show
        ax.set_xticks([])
        return
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(rep.rounds) - 0.6, max(rep.rounds) + 0.6)
    for r in rep.rounds:
        if r not in rep.published:
            ax.axvspan(r - 0.5, r + 0.5, color="0.92", zorder=0)
            ax.text(
                r,
                0.98,
                "open round",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=8,
                color="0.35",
            )


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty (and shows no meaningless scale)."""
    ax.set_yticks([])
    if not ax.lines and not ax.patches:
        ax.set_xticks([])
    lines = [part for line in text.splitlines() for part in textwrap.wrap(line, 52) or [""]]  # fits half the figure
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35")


def _heading(key: str) -> str:
    """auc_before -> 'auc before'; recall_at_1pct_fpr_after -> 'recall at 1% FPR after'."""
    return html.escape(
        key.replace("recall_at_1pct_fpr", "recall at 1% FPR").replace("_before", " before").replace("_after", " after")
    )


def _cell(value, fmt: str = "{:.4f}") -> str:
    return "" if value is None else html.escape(fmt.format(value))


HOLDOUT_COLUMNS = ("rows", "bad rate", "AUC ≈", "KS ≈", "PR-AUC ≈", "Brier", "ECE")


def _holdout_cells(hist) -> list[str]:
    m = hist.metrics()
    return [
        f"{hist.rows:,}",
        *(_nan_cell(m[k]) for k in ("positive_rate", "auc", "ks", "pr_auc", "brier", "ece")),
    ]


ALONE_COLUMNS = ("AUC ≈", "KS ≈", "PR-AUC ≈")


def _alone_cells(hist) -> list[str]:
    """The bank-alone model's ranking metrics; blank when there is none (baseline off, or not sent)."""
    if hist is None:
        return ["" for _ in ALONE_COLUMNS]
    m = hist.metrics()
    return [_nan_cell(m[k]) for k in ("auc", "ks", "pr_auc")]


def _nan_cell(value: float) -> str:
    return "n/a" if value != value else f"{value:.4f}"  # NaN: one class only


def _table(head: list[str], body: list[list[str]]) -> str:
    """An HTML table; every cell is already escaped."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="numbers">\n<tr>{th}</tr>\n{trs}\n</table>'


def holdout_section(rep: Report) -> str:
    """The holdout tables: the federation per round, each bank per round, the latest calibration bins."""
    found = rep.holdout
    if found is None or not found.rounds:
        why = found.why_none() if found is not None else "no holdout evaluation read"
        section = f'<p class="why">{html.escape(why)}.</p>'
    else:
        fed_rows = [
            [
                str(r),
                f"{len(found.by_round[r])}/{len(rep.members)}",
                *_holdout_cells(found.federation(r)),
                *_alone_cells(found.alone(r)),
            ]
            for r in found.rounds
        ]
        bank_rows = [
            [
                str(r),
                html.escape(m),
                *_holdout_cells(found.by_round[r][m]),
                *_alone_cells(found.baselines.get(r, {}).get(m)),
            ]
            for r in found.rounds
            for m in rep.members
            if m in found.by_round[r]
        ]
        alone = [html.escape(f"{k} alone") for k in ALONE_COLUMNS]
        section = (
            "<h3>Federation (the banks' histograms summed; alone: every bank's own model, summed)</h3>"
            + _table(["global of round", "banks", *map(html.escape, HOLDOUT_COLUMNS), *alone], fed_rows)
            + "<h3>Each bank (alone: its own model, trained on its rows only)</h3>"
            + _table(["global of round", "bank", *map(html.escape, HOLDOUT_COLUMNS), *alone], bank_rows)
            + _calibration_table(found)
        )
    ignored = ""
    if found is not None and found.ignored:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in found.ignored)
        ignored = f'<p class="bad">Evaluation files ignored (never shown as numbers):</p><ul>{items}</ul>'
    return section + ignored


CALIBRATION_GROUP = 20  # rows: the calibration table merges neighbouring bins up to this many (few rows say little)


def _calibration_table(found) -> str:
    from fedcli.protocol.binned import bounds

    r = found.rounds[-1]
    total = found.federation(r)
    lo, hi = bounds(total.bins)
    groups: list[list[float]] = []  # [low edge, high edge, rows, score sum, positives]
    open_group: list[float] | None = None
    for i in np.flatnonzero(total.count > 0):
        if open_group is None:
            open_group = [lo[i], hi[i], 0, 0.0, 0]
        open_group[1:] = [
            hi[i],
            open_group[2] + total.count[i],
            open_group[3] + total.score_sum[i],
            open_group[4] + total.positives[i],
        ]
        if open_group[2] >= CALIBRATION_GROUP:
            groups.append(open_group)
            open_group = None
    if open_group is not None:  # the last few rows join the group below them
        if groups:
            last = groups[-1]
            groups[-1] = [last[0], open_group[1], *(a + b for a, b in zip(last[2:], open_group[2:], strict=True))]
        else:
            groups.append(open_group)
    rows = [[f"{g[0]:.4f} – {g[1]:.4f}", f"{int(g[2]):,}", f"{g[3] / g[2]:.4f}", f"{g[4] / g[2]:.4f}"] for g in groups]
    return (
        f"<h3>Calibration of the global model of round {r} (federation; neighbouring bins merged to at least "
        f"{CALIBRATION_GROUP} rows)</h3>" + _table(["score range", "rows", "mean score", "observed bad rate"], rows)
    )


def updates_table(rep: Report) -> str:
    """Per round: how many updates were accepted, rejected, invalid or still waiting."""
    kinds = ("accepted", "rejected", "invalid", "submitted")
    body = [
        [str(r), *(str(sum(e.round == r and e.status == k for e in rep.entries)) for k in kinds)] for r in rep.rounds
    ]
    return _table(["round", *kinds], body)


def _dp_words(rep: Report) -> str:
    """Under DP the holdout numbers come from noised counts: say so, with the noise and what it costs."""
    if rep.holdout is None or not rep.holdout.noised:
        return ""
    z = rep.holdout.spec.evaluation.noise
    return (
        f" Differential privacy: each bank published only its counts, each with Gaussian noise of std {z:g} rows "
        "(one record-level release charged to its ledger per evaluation; `fedcli privacy` lists them). The federation "
        "sums the noised counts, clips negative ones to 0 keeping the total, rounds them and takes every row's score "
        "as its bin's centre: every metric here, Brier and ECE included, is approximate (docs/report.md)."
    )


def _baseline_words(rep: Report) -> str:
    if rep.holdout is not None and rep.holdout.spec.evaluation.baseline and rep.holdout.noised:
        return "The bank-alone baseline stays at each bank under DP (its model is not trained with DP)." + _dp_words(
            rep
        )
    if rep.holdout is not None and rep.holdout.spec.evaluation.baseline:
        return (
            "Each bank also trains a model on its own training rows alone ([evaluation] baseline: same round-0 "
            "weights, same epochs per round, never sent) and scores it on the same holdout rows: the 'alone' columns."
        )
    return NO_BASELINE.replace("\n", " ").capitalize() + "." + _dp_words(rep)


def page(rep: Report, png: bytes) -> str:
    """A self-contained HTML page: the figure inline (base64) and every number in a table."""
    rows = []
    for e in sorted(rep.entries, key=lambda e: (e.round, e.member)):
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{c}</td>"
                for c in (
                    e.round,
                    html.escape(e.member),
                    f'<span class="{e.status}">{e.status}</span>',
                    _cell(e.rows, "{:d}"),
                    *(_cell(e.metrics.get(k)) for k in METRICS),
                    _cell(e.epsilon, "{:.3f}"),
                    html.escape(e.note),
                )
            )
            + "</tr>"
        )
    privacy = (
        f"Privacy: {html.escape(rep.dp_note)}."
        if rep.dp_note
        else "Privacy: ε is the cumulative budget each bank had spent after that round"
        + (f" (budget ε={rep.budget:g})." if rep.budget is not None else ".")
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>fedcli report: {html.escape(rep.federation_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 9px; text-align: right; }}
th {{ background: #f2f2f2; }} td:nth-child(2), td:nth-child(3), td:last-child {{ text-align: left; }}
.accepted {{ color: #1a7f37; }} .rejected, .invalid, .bad {{ color: #c62828; font-weight: bold; }} .submitted {{ color: #9a6700; }}
td:nth-child(-n+3) {{ white-space: nowrap; }} .why {{ color: #555; font-style: italic; }} table.numbers td {{ text-align: right; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Federation {html.escape(rep.federation_id)}</h1>
<p>{len(rep.members)} banks ({html.escape(", ".join(rep.members))}); published rounds:
{html.escape(", ".join(map(str, rep.published)) or "none")}. Every number below comes from a document signed by
the bank that made it, checked against the bank's enrolled key. How to read this page: docs/report.md.</p>
<img alt="holdout metrics, calibration, score distributions, privacy budget and updates per round" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<h2>Holdout evaluation</h2>
<p>Each bank holds out a fixed share of its rows (chosen by a keyed hash of the row, the same rows every round)
and never trains on them. It scores each global model on them and publishes only binned counts, signed; the
federation's numbers are the banks' bins summed. AUC, KS and PR-AUC from bins are approximate (rows in one bin
count as tied); the Brier score is exact; ECE is measured over these bins. {html.escape(_baseline_words(rep))}</p>
{holdout_section(rep)}
<h2>Updates per round</h2>
{updates_table(rep)}
<p>{privacy}</p>
<h2>Each update as its bank signed it</h2>
<p>Metrics are each bank's own, on its own training rows: "before" scores the global model it started from, "after"
the model it trained. PR-AUC's no-skill level is the bank's positive rate, so compare it across rounds
rather than across banks. An empty cell: DP updates withhold metrics, and an older fedcli reported only
loss and AUC.</p>
<table>
<tr><th>round</th><th>bank</th><th>status</th><th>rows</th>{"".join(f"<th>{_heading(k)}</th>" for k in METRICS)}<th>ε spent</th><th>note</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def write_report(store: Store, out: Path, pinned: PublicIdentity | None = None) -> tuple[Path, Path, Report]:
    """Write OUT (HTML) and OUT with suffix .png; return both paths and the data."""
    rep = collect(store, pinned)
    png = plot(rep)
    out = Path(out)
    html_path, png_path = out.with_suffix(".html"), out.with_suffix(".png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        png_path.write_bytes(png)
        html_path.write_text(page(rep, png), encoding="utf-8")
    except OSError as e:
        raise FedcliError(f"cannot write the report to {out.parent}: {e.strerror or e}") from None
    return html_path, png_path, rep
