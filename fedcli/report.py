"""`fedcli report`: each bank's numbers per round, and the privacy budget spent, as a picture.

Everything comes from the signed update manifests on the store (each signature is checked
against the member's key in the spec and each manifest against its contract, protocol/documents.py; a
manifest that fails is listed, never plotted; so is a rejections.json that is not signed by the
coordinator: "rejected" is only ever the coordinator's verified word). The
output is a PNG and a self-contained HTML page (the PNG embedded, plus a table of the
numbers) that a risk committee can open offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _epsilons(entries: list[Entry], delta: float) -> None:
    """Fill in epsilon where manifests carry DP parameters but not the epsilon itself.

    Uses fedcli.privacy's accountant (if this install has it) over every update the bank
    released so far, in round order: the same composition its local ledger makes.
    """
    try:
        from fedcli.privacy import accounting
    except ImportError:
        return
    released: dict[str, list] = {}
    for e in sorted(entries, key=lambda e: e.round):
        if e.dp is None or e.status == "invalid":
            continue
        try:
            released.setdefault(e.member, []).append(accounting.Mechanism.from_dict(e.dp))
            if e.epsilon is None:
                e.epsilon = accounting.epsilon(released[e.member], _number(e.dp.get("delta")) or delta)
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
        _epsilons(entries, _number(privacy.get("delta")) or 1e-5)
    has_dp, has_eps = any(e.dp is not None for e in entries), any(e.epsilon is not None for e in entries)
    note = "" if has_eps else ("DP recorded, but no epsilon could be computed here" if has_dp else "no DP recorded")
    rounds = sorted({e.round for e in entries})
    return Report(
        spec.federation_id,
        [m.name for m in spec.members],
        rounds,
        entries,
        published,
        _number(privacy.get("budget_epsilon")),
        note,
    )


# The before/after panels: manifest key stem, title, y label. PR-AUC and recall at a low false-positive
# rate are what a rare class (fraud) is judged on: AUC alone stays high while the alerts are mostly false.
RANKING_PANELS = (
    ("auc", "local AUC per bank", "ROC AUC on the bank's own rows"),
    ("pr_auc", "local PR-AUC per bank (no skill: the bank's positive rate)", "average precision"),
    ("recall_at_1pct_fpr", "local recall at 1% false-positive rate", "share of positives alerted"),
)


def plot(rep: Report) -> bytes:
    """Six panels as PNG bytes, per bank per round: AUC, PR-AUC, recall at 1 % FPR, loss, rows, privacy budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(rep.members)}
    good = [e for e in rep.entries if e.status != "invalid"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 12), dpi=110)
    fig.suptitle(
        f"federation {rep.federation_id}: {len(rep.published) - 1 if rep.published else 0} rounds "
        f"published, {len(rep.members)} banks",
        fontsize=14,
    )
    (ax_auc, ax_pr), (ax_recall, ax_loss), (ax_rows, ax_eps) = axes
    for ax, (stem, title, ylabel) in zip((ax_auc, ax_pr, ax_recall), RANKING_PANELS, strict=True):
        _before_after_panel(ax, rep.members, good, colors, stem, title, ylabel)
    _loss_panel(ax_loss, rep.members, good, colors)
    _rows_panel(ax_rows, rep.members, good, colors)
    _privacy_panel(ax_eps, rep, good, colors)
    for ax in axes.flat:
        _round_axis(ax, rep)
    if not good:
        _say(ax_auc, "no verified updates on the store yet")
    else:
        for ax, key in ((ax_auc, "auc_after"), (ax_pr, "pr_auc_after"), (ax_recall, "recall_at_1pct_fpr_after")):
            _why_empty(ax, good, key)
        _why_empty(ax_loss, good, "loss")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in rep.members]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


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


def _loss_panel(ax, members: list[str], good: list[Entry], colors: dict) -> None:
    for m in members:
        x, y = _series(good, m, "loss")
        ax.plot(x, y, "o-", color=colors[m], label=m)
    ax.set_title("local training loss (last epoch)")
    ax.set_ylabel("binary cross-entropy")


def _rows_panel(ax, members: list[str], good: list[Entry], colors: dict) -> None:
    """Rows per bank per round, side by side; DP updates do not disclose them."""
    width = 0.8 / max(1, len(members))
    any_rows = False
    for i, m in enumerate(members):
        pts = [(e.round, e.rows) for e in good if e.member == m and e.rows is not None]
        if pts:
            any_rows = True
            ax.bar(
                [r + (i - (len(members) - 1) / 2) * width for r, _ in pts],
                [n for _, n in pts],
                width=width,
                color=colors[m],
                label=m,
            )
    ax.set_title("rows each bank trained on")
    ax.set_ylabel("rows")
    if not any_rows:
        _say(ax, "no row counts in the manifests\n(DP updates do not disclose them)")


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rep.rounds:
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
    """An empty panel that says why it is empty (and shows no meaningless y scale)."""
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.35")


def _heading(key: str) -> str:
    """auc_before -> 'auc before'; recall_at_1pct_fpr_after -> 'recall at 1% FPR after'."""
    return html.escape(
        key.replace("recall_at_1pct_fpr", "recall at 1% FPR").replace("_before", " before").replace("_after", " after")
    )


def _cell(value, fmt: str = "{:.4f}") -> str:
    return "" if value is None else html.escape(fmt.format(value))


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
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; color: #222; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #ccc; padding: 3px 9px; text-align: right; }}
th {{ background: #f2f2f2; }} td:nth-child(2), td:nth-child(3), td:last-child {{ text-align: left; }}
.accepted {{ color: #1a7f37; }} .rejected, .invalid {{ color: #c62828; font-weight: bold; }} .submitted {{ color: #9a6700; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Federation {html.escape(rep.federation_id)}</h1>
<p>{len(rep.members)} banks ({html.escape(", ".join(rep.members))}); published rounds:
{html.escape(", ".join(map(str, rep.published)) or "none")}. Every number below comes from a signed
update manifest whose signature was checked against the bank's enrolled key.</p>
<img alt="metrics per round per bank" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">
<p>{privacy}</p>
<p>Metrics are each bank's own, on its own rows: "before" scores the global model it started from, "after"
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
