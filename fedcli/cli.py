"""fedcli's command line: parse, call one function, print with rich.

Heavy modules (torch, pandas, the workflows) are imported inside commands so that
`fedcli --help` starts fast.
"""

import contextlib
import os
from pathlib import Path

import typer
from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from fedcli.errors import ExitCode, FedcliError

app = typer.Typer(
    help="File-based federated learning for banks: signed, privacy-protected updates through a shared folder or object store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

StoreOpt = typer.Option(..., "--store", "-s", help="Shared folder or s3://bucket/prefix.")
CoordOpt = typer.Option(..., "--coordinator", "-c", help="Pinned coordinator public key file (coordinator.pub).")
LedgerOpt = typer.Option(
    None,
    "--ledger",
    help="Privacy ledger file (default: next to the key; share one across federations on the same data).",
)


@contextlib.contextmanager
def failures():
    """Turn every failure into one line and an exit code cron can branch on; never a traceback.

    Expected failures (FedcliError) carry their own exit code. Anything else is a bug in fedcli:
    one line saying so, exit 1, and FEDCLI_DEBUG=1 shows the traceback for the bug report.
    """
    try:
        yield
    except FedcliError as e:
        label = "[bold yellow]waiting:[/]" if e.exit_code == ExitCode.WAITING else "[bold red]error:[/]"
        err.print(f"{label} {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] nothing was committed after the last completed write", highlight=False)
        raise typer.Exit(130) from None
    except MemoryError:
        err.print("[bold red]error:[/] out of memory (an input is larger than this machine can hold)", highlight=False)
        raise typer.Exit(ExitCode.ERROR) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as e:
        if os.environ.get("FEDCLI_DEBUG") or hasattr(e, "exit_code"):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        err.print(
            f"[bold red]internal error:[/] {escape(type(e).__name__)}: {escape(first)} (a bug in fedcli: please "
            "report it; FEDCLI_DEBUG=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(ExitCode.ERROR) from None


PinOpt = typer.Option(
    None,
    "--coordinator",
    "-c",
    help="Pinned coordinator public key (coordinator.pub): check the store is the real federation.",
)


BankKeyOpt = typer.Option(
    None, "--key", "-k", help="A bank's key: refuse a store older than this bank already saw (as train does)."
)
BankStateOpt = typer.Option(None, "--state", help="Bank state file (default: chosen from the key and federation).")


def _pinned(coordinator: Path | None):
    """The pinned coordinator identity, or None (the store vouches for itself: say so once it loaded)."""
    from fedcli.keys import load_public

    return load_public(coordinator) if coordinator is not None else None


def _unpinned_note(pinned) -> None:
    if pinned is not None:
        return
    err.print(
        "[yellow]note:[/] the store's identity was not pinned: signatures were checked against the "
        "coordinator key the spec names itself (pass --coordinator coordinator.pub to check it is the real one)",
        highlight=False,
        soft_wrap=True,
    )


def _store(location: str):
    from fedcli.store import open_store

    return open_store(location)


@app.command()
def keygen(
    name: str = typer.Argument(..., help="Member or coordinator name, e.g. bank-a."),
    out_dir: Path = typer.Option(Path("."), "--out", "-o", help="Folder for NAME.key and NAME.pub."),
    encrypt: bool = typer.Option(
        False, "--encrypt", help="Protect the private key with a passphrase (prompted, or from FEDCLI_PASSPHRASE)."
    ),
):
    """Make keys: NAME.key (Ed25519 signing), NAME.x25519.key (secure aggregation), both 0600, and NAME.pub (send this one)."""
    from fedcli import keys

    with failures():
        passphrase = None
        if encrypt:
            passphrase = os.environ.get(keys.PASSPHRASE_ENV) or typer.prompt(
                "Passphrase", hide_input=True, confirmation_prompt=True
            )
        elif os.environ.get(keys.PASSPHRASE_ENV):
            err.print(
                f"[yellow]warning:[/] {keys.PASSPHRASE_ENV} is set but --encrypt was not given: "
                "the keys are written unencrypted",
                highlight=False,
                soft_wrap=True,
            )
        key_path, pub_path, ident = keys.generate(name, out_dir, passphrase)
    out.print(
        f"private key: {escape(str(key_path))} (keep it here; mode 0600{', encrypted' if encrypt else ''})",
        soft_wrap=True,
    )
    out.print(
        f"mask key:    {escape(str(keys.x25519_path_for(key_path)))} (secure aggregation; same protection)",
        soft_wrap=True,
    )
    out.print(f"public key:  {escape(str(pub_path))}", soft_wrap=True)
    out.print(f"fingerprint: [bold]{ident.fingerprint}[/] (compare it out of band)", soft_wrap=True)


@app.command()
def schema(
    data: Path = typer.Argument(..., help="CSV or Parquet table with representative rows."),
    target: str = typer.Option(..., "--target", help="Label column."),
    positive: str = typer.Option(
        ...,
        "--positive",
        help="Label value that counts as the positive class (e.g. bad). "
        'A number (1) is compared as a number: 1, 1.0, "1" and true all match. '
        "Text is compared after stripping spaces, ignoring case: bad matches BAD.",
    ),
    levels: bool = typer.Option(
        False,
        "--levels",
        help="Also list the category names seen, as candidate levels ([privacy] and [secagg] need them).",
    ),
    declared: bool = typer.Option(
        False, "--declared", help="Draft means, stds and levels from this table instead (they leak its statistics)."
    ),
):
    """Draft the spec's data section from a table: column names and types, for federated statistics.

    The means, stds and levels are then computed by the statistics round from every bank (docs/data.md);
    --declared drafts them from this one table instead. Warns when no row (or every row) matches
    --positive; refuses a column that mixes numbers and text.
    """
    from fedcli.bank import tables
    from fedcli.bank.statistics import propose_types
    from fedcli.protocol.spec import dumps

    with failures():
        df = tables.read_table(data)
        section, warnings = tables.infer_schema(df, target, positive)
        section = section if declared else propose_types(section, levels)
    if df.attrs.get("separator", ",") != ",":
        _notes([f"{data.name} is separated by {tables.separator_name(df.attrs['separator'])}"])
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    out.print(dumps({"data": section}).decode(), highlight=False, markup=False)


@app.command()
def init(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix to create the federation in."),
    spec: Path = typer.Option(..., "--spec", help="Spec template (TOML): model, data, training, federation."),
    key: Path = typer.Option(..., "--key", "-k", help="Coordinator private key."),
    member: list[Path] = typer.Option([], "--member", "-m", help="A member's .pub file; repeat per bank."),
    federation_id: str | None = typer.Option(
        None, "--id", help="Federation id (default: from the template, else random)."
    ),
):
    """Coordinator: sign the federation spec and publish round 0's global model."""
    from fedcli.coordinator.federation import init_federation

    with failures():
        s = init_federation(_store(store), spec, key, member, federation_id)
    out.print(roster_table(s))
    out.print(in_force_table(s))
    if s.data.statistics == "federated":
        out.print(
            f"Federation {escape(s.federation_id)} opened its statistics round: each bank runs `fedcli stats submit` "
            "(or `fedcli train`), then `fedcli stats aggregate` publishes the statistics and round 0.",
            soft_wrap=True,
        )
        return
    out.print(f"Round 0 of federation {escape(s.federation_id)} published.")


def roster_table(spec) -> Table:
    """Who signs what: the coordinator and every member with the fingerprint to compare out of band."""
    table = Table(title=f"federation {escape(spec.federation_id)}")
    for col in ("role", "name", "fingerprint"):
        table.add_column(col)
    table.add_row("coordinator", escape(spec.coordinator.name), spec.coordinator.fingerprint)
    for m in spec.members:
        table.add_row("member", escape(m.name), m.fingerprint)
    return table


def in_force_table(spec) -> Table:
    """What the signed spec puts in force, in plain words (init, train, spec show); protections that are off in yellow."""
    from fedcli.protocol.spec import NO_DP, NO_SECAGG, summary

    table = Table(title="in force", show_header=False)
    table.add_column("setting", style="bold")
    table.add_column("value")
    for label, value in summary(spec):
        weak = value.startswith((NO_DP, NO_SECAGG + ":"))
        table.add_row(label, f"[yellow]{escape(value)}[/]" if weak else escape(value))
    return table


@app.command()
def train(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key."),
    data: Path = typer.Option(..., "--data", "-d", help="Training table: CSV, Parquet file or folder, s3://..."),
    coordinator: Path = CoordOpt,
    state: Path | None = typer.Option(None, "--state", help="Bank state file (default: next to the key)."),
    ledger: Path | None = LedgerOpt,
    max_epsilon: float | None = typer.Option(
        None,
        "--max-epsilon",
        min=0.0,
        help="This bank's own privacy budget, if stricter than the spec's budget_epsilon.",
    ),
    accept_spec_version: int | None = typer.Option(
        None,
        "--accept-spec-version",
        min=2,
        help="Accept this spec version although it weakens DP, drops secure aggregation or changes the model.",
    ),
):
    """Bank: verify the latest global model, train locally and submit a signed update.

    Every check (table, labels, both classes, finite loss, metrics and weights, budget) runs
    before the first write to the store: a refusal leaves nothing behind and charges nothing.
    Exit codes: 1 the table or a key is refused; 4 a check of the store failed (including an
    update manifest under this bank's name that its key did not sign); 6 exporting would
    exceed this bank's privacy budget (nothing was exported).
    """
    from fedcli.bank.step import train_round

    if _stats_submitted(store, key, data, coordinator, ledger, max_epsilon):
        return  # the statistics round was open: this run contributed to it instead of training
    with failures():
        res = train_round(_store(store), key, data, coordinator, state, err, ledger, max_epsilon, accept_spec_version)
    _notes(res.data_notes)
    if not res.submitted:
        out.print(res.message, soft_wrap=True)
        return
    out.print(_update_table(res))
    if res.privacy:
        p = res.privacy
        out.print(
            f"privacy: {p['mode']}-level DP (noise multiplier {p['noise_multiplier']:.3g}); epsilon spent "
            f"{p['epsilon_after']:.3g} of budget {p['budget_epsilon']:g} at delta={p['delta']:g}",
            soft_wrap=True,
        )
    out.print(res.message, soft_wrap=True)


def _update_table(res) -> Table:
    """The update's metrics on this bank's rows: one row for the global model it started from (the
    manifest's *_before), one for the model trained here (*_after); the rest (loss) in the title."""
    stems = [k.removesuffix("_before") for k in res.metrics if k.endswith("_before")]
    others = ", ".join(f"{k} {v:.4f}" for k, v in res.metrics.items() if not k.endswith(("_before", "_after")))
    title = f"{res.member}: update for round {res.round} ({res.num_examples:,} rows" + (
        f", {others})" if others else ")"
    )
    table = Table(title=title, min_width=min(len(title) + 4, 100))
    table.add_column("model on this bank's rows")
    for stem in stems:
        table.add_column(stem, justify="right")
    for when, label in (("before", "global model it started from"), ("after", "trained here")):
        table.add_row(label, *(_rate(res.metrics.get(f"{stem}_{when}", float("nan"))) for stem in stems))
    return table


@app.command()
def aggregate(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="Coordinator private key."),
):
    """Coordinator: verify submitted updates, aggregate, publish the next global model.

    Exit codes: 0 published, 3 waiting for quorum, 4 verification failure, 5 store error, 1 other error.
    """
    from fedcli.coordinator.step import aggregate_round

    if _stats_aggregated(store, key):
        return  # the statistics round was open: this run closed it (or waits for it)
    with failures():
        res = aggregate_round(_store(store), key, err)
    if res.complete and not res.published:  # the federation ended: nothing to wait for
        out.print(f"[green]{escape(res.complete)}[/]", soft_wrap=True)
        return
    table = Table(title=f"round {res.round}")
    for col in ("member", "status", "rows / reason"):
        table.add_column(col)
    for a in res.accepted:
        table.add_row(escape(a["member"]), "[green]accepted[/]", str(a["num_examples"] or "withheld (DP)"))
    for m, why in res.rejected.items():
        table.add_row(escape(m), "[red]rejected[/]", escape(f"{why['reason']}: {why['message']}"))
    for m in res.pending:
        table.add_row(escape(m), "[yellow]incomplete[/]", "tensors without manifest (upload in progress or crashed)")
    for m in res.missing:
        table.add_row(escape(m), "[dim]missing[/]", "")
    out.print(table)
    for m, why in res.rejected.items():
        err.print(
            f"[red]rejected[/] {escape(m)} ({why['reason']}): {escape(why['message'])}", highlight=False, soft_wrap=True
        )
    if res.published:
        out.print(
            f"[green]published global model of round {res.round}[/] from {len(res.accepted)} updates ({res.how})",
            soft_wrap=True,
        )
        if res.complete:
            out.print(f"[green]{escape(res.complete)}[/]", soft_wrap=True)
    else:
        out.print(f"[yellow]waiting:[/] {escape(res.waiting_reason)}", soft_wrap=True)
        raise typer.Exit(ExitCode.WAITING)


@app.command()
def status(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path | None = PinOpt,
    key: Path | None = BankKeyOpt,
    state: Path | None = BankStateOpt,
):
    """Rounds, who submitted, rejections and mean metrics (everything shown is signature-checked)."""
    from fedcli.protocol.evaluations import collect
    from fedcli.protocol.rounds import history

    with failures():
        pinned = _pinned(coordinator)
        st = _store(store)
        if key is not None:
            from fedcli.bank.freshness import check_store_for_key

            check_store_for_key(st, pinned, key, state)
        spec, rows = history(st, pinned)
        from fedcli.protocol.final import final_status

        ended = final_status(st, pinned)
        holdouts = collect(st, pinned)
    _unpinned_note(pinned)
    table = Table(
        title=escape(f"federation {spec.federation_id}: {len(spec.members)} members, quorum {spec.min_clients}"),
        caption="auc, pr_auc before and loss: means over the round's updates; before: the global model each bank "
        "started from, scored on its own rows (empty: no update reported them, e.g. under DP)",
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("round", "right"),
        ("global", "left"),
        ("updates in", "right"),
        ("rows", "right"),
        ("auc\nbefore", "right"),  # two short lines: the table fits 80 columns
        ("pr_auc\nbefore", "right"),
        ("loss", "right"),
        ("other", "left"),
    )
    for col, just in columns:
        table.add_column(col, justify=just)
    problems = Table(title="rejected or incomplete updates")
    for col in ("round", "member", "reason"):
        problems.add_column(col)
    for row in rows:
        waiting = [m for m in row.submitted if m not in row.contributors and m not in row.rejected]
        other = [f"{len(waiting)} submitted"] if waiting else []
        other += [f"[yellow]{len(row.pending)} incomplete[/]"] if row.pending else []
        other += [f"[red]{len(row.rejected)} rejected[/]"] if row.rejected else []
        other += ["[red]rejections unverified[/]"] if row.unverified else []
        other += [f"[red]{len(row.unsigned)} unsigned[/]"] if row.unsigned else []
        table.add_row(
            str(row.round),
            "[green]published[/]" if row.published else "[yellow]open[/]",
            (f"{len(row.contributors)}/{len(spec.members)}" if row.round else "(initial)")
            + (f"\n{row.bytes_in:,} B" if row.bytes_in else ""),  # bytes the banks uploaded: the wire cost
            str(row.examples) if row.examples else "",
            *(f"{row.metrics[k]:.4f}" if k in row.metrics else "" for k in ("auc_before", "pr_auc_before", "loss")),
            ", ".join(other),
        )
        for m, why in row.rejected.items():
            problems.add_row(str(row.round), escape(m), escape(f"{why['reason']}: {why['message']}"))
        for m in row.pending:
            problems.add_row(str(row.round), escape(m), "tensors without manifest (upload in progress or crashed)")
        for name in row.unsigned:
            problems.add_row(
                str(row.round),
                escape(name),
                "unsigned: no member signed this update manifest for this round (not counted; aggregate rejects it)",
            )
        if row.unverified:
            problems.add_row(
                str(row.round),
                "[red](unverified)[/]",
                escape(f"rejections.json is not the coordinator's signed word, ignored: {row.unverified}"),
            )
    out.print(table)
    if problems.row_count:
        out.print(problems)
    if ended:
        out.print(f"[{'red' if ended.startswith('unverified') else 'green'}]{escape(ended)}[/]", soft_wrap=True)
    if spec.data.statistics == "federated" and spec.statistics_sha256 is None:
        out.print("no round yet: the statistics round is open (`fedcli stats show` lists who contributed)")
    _holdout_status(holdouts)


def _holdout_status(found) -> None:
    """status: each evaluated global's holdout metrics for the federation (the banks' histograms summed) and per bank."""
    for line in found.ignored:
        err.print(f"[yellow]ignored evaluation:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if not found.rounds:
        out.print(escape(found.why_none()), soft_wrap=True)
        return
    fed = Table(
        title="holdout: each global model on the rows the banks never train on (federation = banks summed)"
        + (" [DP: noised counts]" if found.noised else ""),
        caption="auc, ks, pr_auc from binned scores (approximate); brier exact; ece over the bins"
        if not found.noised
        else f"DP: every count noised (multiplier {found.spec.evaluation.noise:g}), summed, made non-negative, rounded, "
        "scores at bin centres: every metric approximate (docs/report.md)",
    )
    for col in ("round", "banks", "rows", "bad rate", "auc", "ks", "pr_auc", "brier", "ece"):
        fed.add_column(col, justify="right")
    members = found.spec.members
    banks = Table(
        title="holdout AUC per bank (approximate; blank: that bank published no evaluation)",
        caption=escape("in brackets: that bank's own model, trained on its rows alone ([evaluation] baseline)")
        if found.baselines
        else None,
    )
    banks.add_column("round", justify="right")
    for m in members:
        banks.add_column(escape(m.name), justify="right")
    for r in found.rounds:
        total, mine = found.federation(r), found.by_round[r]
        m = total.metrics()
        fed.add_row(
            str(r),
            f"{len(mine)}/{len(members)}",
            f"{total.rows:,}",
            *(_rate(m[k]) for k in ("positive_rate", "auc", "ks", "pr_auc", "brier", "ece")),
        )
        alone = found.baselines.get(r, {})
        banks.add_row(str(r), *(_bank_auc(mine.get(b.name), alone.get(b.name)) for b in members))
    out.print(fed)
    out.print(banks)


def _bank_auc(hist, alone) -> str:
    """One bank's holdout AUC of the global, and of its own bank-alone model in brackets when it sent one."""
    if hist is None:
        return ""
    if alone is None:
        return _rate(hist.metrics()["auc"])
    return f"{_rate(hist.metrics()['auc'], '{:.3f}')} ({_rate(alone.metrics()['auc'], '{:.3f}')})"  # fits 80 columns


@app.command()
def privacy(
    key: Path | None = typer.Option(None, "--key", "-k", help="This bank's private key (the ledger sits next to it)."),
    ledger: Path | None = LedgerOpt,
):
    """Bank: show the privacy ledger, every DP release and the epsilon spent against the budget."""
    from fedcli.bank.state import ledger_for_key
    from fedcli.privacy.ledger import Ledger

    with failures():
        if ledger is None:
            if key is None:
                raise FedcliError("give --key or --ledger")
            ledger = ledger_for_key(key)
        led = Ledger(ledger)
        entries, summary = led.entries(), led.summary()
    table = Table(
        title=f"privacy ledger {led.path.name}", caption="z: noise multiplier, q: sample rate, ε: cumulative per mode"
    )
    for col in ("federation", "round", "mode", "z", "q", "steps", "clip", "ε after"):
        table.add_column(col, justify="left" if col in ("federation", "mode") else "right", no_wrap=True)
    for e in entries:
        table.add_row(
            e["federation"],
            str(e["round"]),
            e["mode"] + ("·eval" if e.get("release") == "evaluation" else ""),
            f"{e['noise_multiplier']:.4g}",
            f"{e['sample_rate']:.3g}",
            str(e["steps"]),
            f"{e['clip']:g}",
            f"{e['epsilon_after']:.4g}",
        )
    out.print(table)
    if not entries:
        out.print("no DP release recorded yet")
    for s in summary:
        left = s["budget_epsilon"] - s["epsilon"]
        evals = sum(1 for e in entries if e["mode"] == s["mode"] and e.get("release") == "evaluation")
        out.print(
            f"{s['mode']}-level: epsilon {s['epsilon']:.4g} spent of budget {s['budget_epsilon']:g} at "
            f"delta={s['delta']:g} over {s['releases']} release(s)"
            + (f" ({evals} of them holdout evaluations, mode ·eval)" if evals else "")
            + f"; {max(left, 0):.4g} left",
            soft_wrap=True,
        )


@app.command()
def report(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    output: Path = typer.Option(
        Path("fedcli-report.html"),
        "--out",
        "-o",
        help="HTML page to write; the PNG goes next to it with the same name.",
    ),
    coordinator: Path | None = PinOpt,
    key: Path | None = BankKeyOpt,
    state: Path | None = BankStateOpt,
):
    """Plot each bank's AUC, PR-AUC, recall at 1 % FPR, loss and rows per round, and the privacy budget
    spent: a PNG and an HTML page."""
    from fedcli.report import write_report

    with failures():
        pinned = _pinned(coordinator)
        st = _store(store)
        if key is not None:
            from fedcli.bank.freshness import check_store_for_key

            check_store_for_key(st, pinned, key, state)
        html_path, png_path, rep = write_report(st, output, pinned)
    _unpinned_note(pinned)
    out.print(f"{len(rep.entries)} updates over {len(rep.rounds)} rounds -> {html_path} and {png_path}")


def _notes(notes: list[str]) -> None:
    """Preprocessing notes, one line per kind (data.notes summarises them per run)."""
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)


def _rate(value: float, fmt: str = "{:.4f}") -> str:
    """A metric for a table; n/a where it is undefined (the notes under the table say why)."""
    return "n/a" if value != value else fmt.format(value)  # NaN is the only value not equal to itself


def _meanings(ev) -> dict[str, str]:
    """What each headline metric says, in the words a fraud or credit team uses."""
    from fedcli.metrics import ALERT_RATES, FPR_LIMITS, budget, pct, precision_key, recall_key

    base = _rate(ev.metrics["positive_rate"])
    words = {
        "auc": "ranking over all thresholds (0.5: random)",
        "pr_auc": f"average precision over recall levels (no skill: the positive rate, {base})",
        "ks": "largest gap between the score distributions of positives and negatives",
        "positive_rate": f"{ev.positives:,} positives in {ev.rows:,} rows",
    }
    for a in FPR_LIMITS:
        words[recall_key(a)] = f"share of positives alerted while at most {pct(a)} of negatives are"
    for r in ALERT_RATES:
        words[precision_key(r)] = f"share of positives among the top {pct(r)} of scores ({budget(r, ev.rows):,} alerts)"
    return words


def _threshold(value) -> str:
    """Every digit of the score (in the scores' own type), so `score >= threshold` reproduces the counts."""
    return "none alerted" if value == float("inf") else str(value)


def _evaluation_tables(title: str, ev) -> tuple[Table, Table]:
    """The headline metrics, then the operating points behind them (the threshold table)."""
    headline = Table(title=title, min_width=len(title) + 4)  # a title wider than the columns is not wrapped
    headline.add_column("metric")
    headline.add_column("value", justify="right")
    headline.add_column("what it says")
    meanings = _meanings(ev)
    for key, value in ev.metrics.items():
        headline.add_row(key, _rate(value), meanings.get(key, ""))
    for key, value, words in _risk_rows(ev):
        headline.add_row(key, value, words)
    points = Table(title="operating points: an alert is a row scored at or above the threshold", pad_edge=False)
    for col in ("rule", "threshold", "alerts", "TP", "FP", "precision", "recall", "FPR"):
        points.add_column(col, justify="left" if col == "rule" else "right", no_wrap=col in ("rule", "threshold"))
    for op in ev.table:
        points.add_row(
            op.rule,
            _threshold(op.threshold),
            f"{op.alerts:,}",
            f"{op.tp:,}",
            f"{op.fp:,}",
            _rate(op.precision),
            _rate(op.recall),
            _rate(op.fpr),
        )
    return headline, points


def _risk_rows(ev) -> list[tuple[str, str, str]]:
    """The headline's calibration and credit rows (docs/risk.md says how to read each)."""
    rows = []
    if ev.credit is not None:
        k = ev.credit
        rows += [
            ("ks_score", _rate(k.ks_score, "{:.6g}"), "KS is reached alerting every row scored at or above this"),
            ("gini", _rate(k.gini), "2 AUC - 1: the accuracy ratio (0: random, 1: perfect ranking)"),
        ]
    if ev.calibration is not None:
        c = ev.calibration
        rows += [
            (
                "mean_score",
                _rate(c.mean_score),
                f"the positive rate if scores were probabilities (is {_rate(c.positive_rate)})",
            ),
            ("brier", _rate(c.brier), "mean squared gap between score and outcome (0: perfect)"),
            ("ece", _rate(c.ece), f"mean |observed rate - mean score| over {len(c.bins)} equal-width score bins"),
        ]
    return rows


def _reliability_table(ev) -> Table:
    table = Table(title="reliability: is a score of p a p chance? (equal-width bins; empty bins left out)")
    for col in ("scores", "rows", "mean score", "observed rate", "observed - mean"):
        table.add_column(col, justify="right")
    for b in ev.calibration.bins if ev.calibration is not None else []:
        if b.rows:
            span = f"{'[' if b.low == 0 else '('}{b.low:.1f}, {b.high:.1f}]"
            table.add_row(span, f"{b.rows:,}", f"{b.mean_score:.4f}", f"{b.observed_rate:.4f}", f"{b.gap:+.4f}")
    return table


def _bands_table(ev) -> Table:
    table = Table(title="score bands: deciles of rows by score, highest (riskiest) first; a tie is never split")
    for col in ("band", "from", "to", "rows", "bads", "bad rate", "cum rows", "cum bad rate", "bads so far"):
        table.add_column(col, justify="right", no_wrap=col in ("from", "to"))
    for b in ev.credit.bands if ev.credit is not None else []:
        table.add_row(
            str(b.band),
            f"{b.low:.4f}",
            f"{b.high:.4f}",
            f"{b.rows:,}",
            f"{b.positives:,}",
            f"{b.bad_rate:.4f}",
            f"{b.cum_share_of_rows:.1%}",
            f"{b.cum_bad_rate:.4f}",
            _rate(b.cum_share_of_bads, "{:.1%}"),
        )
    return table


RecalOpts = {
    "undo_pos_weight": typer.Option(
        False, "--undo-pos-weight", help="Divide the odds by the spec's pos_weight (docs/risk.md)."
    ),
    "base_rate": typer.Option(
        None, "--base-rate", help="Prior correction to this positive rate (needs --train-rate; undoes pos_weight too)."
    ),
    "train_rate": typer.Option(
        None, "--train-rate", help="Positive rate of the rows the model was trained on (all banks'), for --base-rate."
    ),
}


def _prior(undo_pos_weight: bool, base_rate: float | None, train_rate: float | None):
    """The requested prior correction, checked before any work (None: scores as the model gives them)."""
    from fedcli.metrics import PriorCorrection, prior_shift

    if not undo_pos_weight and base_rate is None and train_rate is None:
        return None
    prior_shift(1.0, base_rate, train_rate)  # refuses a lone or out-of-range rate with one line
    return PriorCorrection(True, base_rate, train_rate)


def _prior_note(store: str, coordinator: Path, prior) -> None:
    if prior is None:
        return
    from fedcli import keys
    from fedcli.protocol.rounds import load_spec

    spec, _ = load_spec(_store(store), keys.load_public(coordinator))
    err.print(f"[yellow]note:[/] scores prior-corrected: {prior.describe(spec.training.pos_weight)}", soft_wrap=True)


@app.command()
def evaluate(
    store: str = StoreOpt,
    coordinator: Path = CoordOpt,
    data: Path = typer.Option(..., "--data", "-d", help="Labelled table: CSV, Parquet file or folder, s3://..."),
    round_: int | None = typer.Option(None, "--round", help="Round to evaluate (default: latest)."),
    json_out: Path | None = typer.Option(None, "--out", "-o", help="Also write every number as JSON to this file."),
    undo_pos_weight: bool = RecalOpts["undo_pos_weight"],
    base_rate: float | None = RecalOpts["base_rate"],
    train_rate: float | None = RecalOpts["train_rate"],
    key: Path | None = BankKeyOpt,
    state: Path | None = BankStateOpt,
):
    """Score a verified global model on a labelled table: AUC, PR-AUC, KS, recall at 0.1 % and 1 % FPR,
    precision in the top 0.1 % and 1 % of scores, a threshold table (docs/fraud.md), calibration (Brier,
    ECE, reliability), Gini and score bands (docs/risk.md)."""
    from fedcli.bank.inference import evaluate as run

    with failures():
        prior = _prior(undo_pos_weight, base_rate, train_rate)
        if json_out is not None and not json_out.parent.is_dir():  # before the work, not after
            raise FedcliError(f"cannot write {json_out}: no folder {json_out.parent}")
        r, n, ev, notes = run(_store(store), coordinator, data, round_, prior, key, state)
        if json_out is not None:
            _write_evaluation(json_out, r, data, ev, prior, store, coordinator)
    _notes(notes)
    with failures():
        _prior_note(store, coordinator, prior)
    headline, points = _evaluation_tables(f"global model of round {r} on {escape(data.name)} ({n:,} rows)", ev)
    out.print(headline)
    if points.row_count:
        out.print(points)
    for extra in (_reliability_table(ev), _bands_table(ev)):
        if extra.row_count:
            out.print(extra)
    _notes(ev.notes)
    if json_out is not None:
        out.print(f"every number -> {escape(str(json_out))}", soft_wrap=True)


def _write_evaluation(path: Path, r: int, data: Path, ev, prior, store: str, coordinator: Path) -> None:
    import json

    from fedcli import keys
    from fedcli.files import write_atomic
    from fedcli.metrics import evaluation_json
    from fedcli.protocol.rounds import global_manifest, load_spec

    where = _store(store)
    spec, sha = load_spec(where, keys.load_public(coordinator))
    doc = {
        "federation_id": spec.federation_id,
        "round": r,
        "tensors_sha256": global_manifest(where, spec, sha, r)["tensors_sha256"],  # which model these numbers are of
        "data": str(data),
        "prior_correction": prior.describe(spec.training.pos_weight) if prior is not None else None,
        **evaluation_json(ev),
    }
    if not path.parent.is_dir():
        raise FedcliError(f"cannot write {path}: no folder {path.parent}")
    try:
        write_atomic(path, (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode(), f".{path.name}.")
    except OSError as e:
        raise FedcliError(f"cannot write {path}: {e.strerror or e}") from None


@app.command()
def predict(
    store: str = StoreOpt,
    coordinator: Path = CoordOpt,
    data: Path = typer.Option(..., "--data", "-d", help="Table to score: CSV, Parquet file or folder, s3://..."),
    output: Path = typer.Option(..., "--out", "-o", help="CSV to write: the input plus a score column."),
    round_: int | None = typer.Option(None, "--round", help="Round to use (default: latest)."),
    undo_pos_weight: bool = RecalOpts["undo_pos_weight"],
    base_rate: float | None = RecalOpts["base_rate"],
    train_rate: float | None = RecalOpts["train_rate"],
    key: Path | None = BankKeyOpt,
    state: Path | None = BankStateOpt,
):
    """Write the probability of the positive class for each row, from a verified global model (optionally
    prior-corrected: docs/risk.md)."""
    from fedcli.bank.inference import predict as run

    with failures():
        prior = _prior(undo_pos_weight, base_rate, train_rate)
        r, n, notes = run(_store(store), coordinator, data, output, round_, prior, key, state)
        _prior_note(store, coordinator, prior)
    _notes(notes)
    out.print(f"scored {n} rows with the global model of round {r} -> {escape(str(output))}")


@app.command("check-store")
def check_store(store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix.")):
    """Check a store is reachable and refuses to overwrite on create-only writes (run once at setup)."""
    from fedcli.store import check_create_only

    with failures():
        s = _store(store)
        check_create_only(s)
    out.print(f"[green]ok:[/] {s} is reachable, writable and honours create-only writes", soft_wrap=True)


spec_app = typer.Typer(
    help="The federation spec: what every bank and the coordinator have agreed to.", no_args_is_help=True
)
app.add_typer(spec_app, name="spec")


@spec_app.command("show")
def spec_show(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path | None = typer.Option(
        None,
        "--coordinator",
        "-c",
        help="Pinned coordinator public key (coordinator.pub); without it the spec is only checked against the key it names itself.",
    ),
):
    """Verify the store's spec and print every setting, what is in force and the member roster."""
    from fedcli import keys
    from fedcli.protocol.rounds import load_spec
    from fedcli.protocol.spec import settings

    with failures():
        pinned = keys.load_public(coordinator) if coordinator is not None else None
        spec, sha = load_spec(_store(store), pinned)
        rows = settings(spec)
    table = Table(title=f"federation spec {escape(spec.federation_id)}", caption=f"sha256 {sha}")
    for col in ("setting", "value", "source"):
        table.add_column(col)
    for key, value, explicit in rows:
        table.add_row(escape(key), escape(value), "spec" if explicit else "[dim]default[/]")
    out.print(table)
    out.print(in_force_table(spec))
    out.print(roster_table(spec))
    _chain_line(spec, sha)
    if pinned is None:
        out.print(
            "[yellow]signature checked against the key named in the spec itself (not pinned)[/]: "
            "pass --coordinator coordinator.pub to check it is the coordinator you expect",
            soft_wrap=True,
        )
    else:
        out.print(f"[green]signature verified[/] with the pinned coordinator key {pinned.fingerprint}", soft_wrap=True)


bundle_app = typer.Typer(help="Air gap: carry the files that must cross in one signed archive.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


def _bundle_table(res, verb: str) -> None:
    table = Table(title=f"bundle {res.path.name}: signed by {res.signer} ({res.role}), federation {res.federation_id}")
    table.add_column("file")
    table.add_column("status")
    for k in res.written:
        table.add_row(k, f"[green]{verb}[/]")
    for k in res.unchanged:
        table.add_row(k, "[dim]already there[/]")
    out.print(table)
    for line in getattr(res, "skipped", ()):
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


@bundle_app.command("export")
def bundle_export(
    store: str = StoreOpt,
    key: Path = typer.Option(
        ..., "--key", "-k", help="Your private key: the coordinator's exports the global model, a bank's its update."
    ),
    output: Path = typer.Option(..., "--out", "-o", help="Bundle file to write (e.g. on removable media)."),
):
    """Pack what must cross the air gap: coordinator -> spec, statistics, globals, end; bank -> its own signed files."""
    from fedcli.store.bundle import export_bundle

    with failures():
        res = export_bundle(_store(store), key, output)
    _bundle_table(res, "exported")


@bundle_app.command("import")
def bundle_import(
    bundle: Path = typer.Argument(..., help="Bundle file made by `fedcli bundle export`."),
    store: str = StoreOpt,
    coordinator: Path | None = typer.Option(
        None, "--coordinator", "-c", help="Pinned coordinator public key (banks; required for an empty store)."
    ),
):
    """Verify a bundle's signature and hashes, then write its files; importing twice changes nothing."""
    from fedcli.store.bundle import import_bundle

    with failures():
        res = import_bundle(_store(store), bundle, coordinator)
    _bundle_table(res, "imported")


@app.command()
def scorecard(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path = CoordOpt,
    pdo: float = typer.Option(20.0, "--pdo", help="Points that double the good:bad odds."),
    base_score: float = typer.Option(600.0, "--base-score", help="The score at the base odds."),
    base_odds: float = typer.Option(50.0, "--base-odds", help="Good:bad odds at the base score (50: 50 to 1)."),
    output: Path | None = typer.Option(None, "--out", "-o", help="Also write it to this .csv or .json file."),
    round_: int | None = typer.Option(None, "--round", help="Round to use (default: latest)."),
    undo_pos_weight: bool = RecalOpts["undo_pos_weight"],
    base_rate: float | None = RecalOpts["base_rate"],
    train_rate: float | None = RecalOpts["train_rate"],
):
    """A logistic global model as a points table: base points, points per unit and per band of each numeric
    feature (the spec's standardisation folded in), points per level (docs/risk.md)."""
    from fedcli import scorecard as sc

    with failures():
        prior = _prior(undo_pos_weight, base_rate, train_rate)
        card, about = sc.load(_store(store), coordinator, round_, pdo, base_score, base_odds, prior)
        if output is not None:
            sc.write(card, output, about)
    title = (
        f"scorecard of the global model of round {about['round']}: {card.base_score:g} points at good:bad odds "
        f"{card.base_odds:g}:1, +{card.pdo:g} points double them"
    )
    table = Table(
        title=escape(title), caption="a higher score is a lower risk; numeric: points = per unit x (x - mean)"
    )
    for col in ("feature", "attribute", "points"):
        table.add_column(col, justify="right" if col == "points" else "left")
    for row in sc.rows(card):
        if row["kind"] == "band":
            lo, hi = row["points_at_low"], row["points_at_high"]
            points = " to ".join("..." if v is None else f"{v:+.2f}" for v in (lo, hi))
        else:
            points = f"{row['points']:+.4f}" if row["kind"] == "per_unit" else f"{row['points']:+.2f}"
        table.add_row(escape(row["feature"]), escape(f"{row['kind']}: {row['attribute']}"), points)
    out.print(table)
    if about["prior_correction"]:
        err.print(f"[yellow]note:[/] prior-corrected: {escape(about['prior_correction'])}", soft_wrap=True)
    if output is not None:
        out.print(f"-> {escape(str(output))}", soft_wrap=True)


@app.command("export")
def export_model(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path = CoordOpt,
    output: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx, model_card.json, model_card.md."),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="Labelled holdout table: its evaluation goes into the model card."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the three files in a folder that is not empty."),
    round_: int | None = typer.Option(None, "--round", help="Round to export (default: latest)."),
    undo_pos_weight: bool = RecalOpts["undo_pos_weight"],
    base_rate: float | None = RecalOpts["base_rate"],
    train_rate: float | None = RecalOpts["train_rate"],
):
    """Verify the global model and write it as ONNX (preprocessing inside) with a model card in JSON and
    Markdown: data schema, preprocessing, training and privacy settings, lineage by round (docs/risk.md)."""
    from fedcli.export.writer import export

    with failures():
        prior = _prior(undo_pos_weight, base_rate, train_rate)
        res = export(_store(store), coordinator, output, force, data, round_, prior)
    what = f"global model of round {res.round} (tensors {res.tensors_sha256[:16]}...)"
    if res.evaluated_rows is not None:
        what += f", evaluated on {res.evaluated_rows:,} rows of {escape(data.name if data else '')}"
    out.print(f"[green]exported[/] {what} -> {escape(str(output))}: {', '.join(res.files)}", soft_wrap=True)


@app.command("recover-ledger")
def recover_ledger(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key."),
    coordinator: Path = CoordOpt,
    ledger: Path | None = LedgerOpt,
):
    """Bank: re-enter into the privacy ledger every DP release the store shows signed by this key (after a lost ledger)."""
    from fedcli.bank.releases import recover_ledger as run

    with failures():
        led, added = run(_store(store), key, coordinator, ledger)
    for e in added:
        out.print(f"recorded round {e['round']}: {e['mode']}-level, epsilon after {e['epsilon_after']:.4g}")
    out.print(f"{len(added)} release(s) re-entered into {escape(str(led.path))}", soft_wrap=True)


store_app = typer.Typer(help="A whole store: move a federation to another one.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("copy")
def store_copy(
    source: str = typer.Argument(..., help="The store the federation is on (folder or s3://bucket/prefix)."),
    destination: str = typer.Argument(..., help="An empty store to move it to."),
    coordinator: Path | None = PinOpt,
):
    """Copy a federation to another store, every object read back and compared; banks then continue on the new one."""
    from fedcli.protocol.rounds import latest_round, load_spec
    from fedcli.store.copy import copy_store

    with failures():
        pinned = _pinned(coordinator)
        src, dst = _store(source), _store(destination)
        spec, _ = load_spec(src, pinned)  # refuse to spread a store that does not verify
        res = copy_store(src, dst)
        load_spec(dst, pinned)
        latest = latest_round(dst)
    _unpinned_note(pinned)
    out.print(
        f"[green]copied[/] federation {escape(spec.federation_id)} to {escape(str(dst))}: {len(res.copied)} objects "
        f"written, {len(res.unchanged)} already there, {len(res.skipped)} lock records left behind; newest global: "
        f"round {latest}. Point every bank's and the coordinator's --store at the new store.",
        soft_wrap=True,
    )


@app.command()
def holdout(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key."),
    data: Path = typer.Option(..., "--data", "-d", help="This bank's table (the same one it trains on)."),
    coordinator: Path = CoordOpt,
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Publish the signed binned scores."),
    max_epsilon: float | None = typer.Option(
        None, "--max-epsilon", min=0.0, help="Under DP: this bank's own privacy budget, if stricter than the spec's."
    ),
):
    """Bank: score the latest global model on this bank's holdout rows ([evaluation] holdout) and publish the
    signed score histogram (train does this for the global it starts from; run this after the last round)."""
    from fedcli.bank.holdout import evaluate_latest

    with failures():
        result, message = evaluate_latest(
            _store(store), key, data, coordinator, publish_it=publish, console=err, max_epsilon=max_epsilon
        )
    out.print(escape(result.line()), soft_wrap=True)
    out.print(escape(message), soft_wrap=True)


stats_app = typer.Typer(
    help="Federated feature statistics: the round before round 1 that fills the spec's means, stds and levels.",
    no_args_is_help=True,
)
app.add_typer(stats_app, name="stats")


@stats_app.command("submit")
def stats_submit(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key."),
    data: Path = typer.Option(..., "--data", "-d", help="Training table: CSV, Parquet file or folder, s3://..."),
    coordinator: Path = CoordOpt,
    ledger: Path | None = LedgerOpt,
    max_epsilon: float | None = typer.Option(
        None, "--max-epsilon", min=0.0, help="This bank's own privacy budget, if stricter than the spec's."
    ),
):
    """Bank: upload signed counts, sums and sums of squares of this table's features (never a row).

    With [privacy] they carry Gaussian noise charged to the ledger; with [secagg] they are masked.
    Re-running is a no-op. Exit codes: 1 the table is refused, 4 a check of the store failed, 6 budget.
    """
    from fedcli.bank.statistics import submit

    with failures():
        res = submit(_store(store), key, data, coordinator, ledger, max_epsilon)
    _notes(res.notes)
    out.print(f"{escape(res.member)}: {escape(res.message)}", soft_wrap=True)
    if res.privacy:
        out.print(f"privacy: record-level epsilon spent {res.privacy['epsilon_after']:.3g}", soft_wrap=True)


@stats_app.command("aggregate")
def stats_aggregate(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="Coordinator private key."),
):
    """Coordinator: verify the contributions, publish the signed statistics and round 0's global model.

    Exit codes: 0 published, 3 waiting for quorum (every member with [secagg]), 4 verification failure.
    """
    from fedcli.coordinator.statistics import aggregate

    with failures():
        res = aggregate(_store(store), key)
    _stats_table(res)


@stats_app.command("show")
def stats_show(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path | None = PinOpt,
):
    """Anyone: whether the statistics round is open (and who contributed) or its verified result."""
    from fedcli.protocol import statistics
    from fedcli.protocol.rounds import load_spec

    with failures():
        pinned = _pinned(coordinator)
        s = _store(store)
        spec, sha = load_spec(s, pinned)
        found = statistics.load_statistics(s, spec, sha) if statistics.federated(spec) else None
        names = statistics.contributors(s, sha) if statistics.federated(spec) else []
    _unpinned_note(pinned)
    if not statistics.federated(spec):
        out.print(f"federation {escape(spec.federation_id)} declares its feature statistics in the spec")
        return
    if found is None:
        shown = ", ".join(escape(n) for n in names) or "none yet"
        out.print(
            f"statistics round open ({statistics.encoding(spec)}): {len(names)} of {len(spec.members)} members "
            f"submitted ({shown}); quorum {spec.min_clients}",
            soft_wrap=True,
        )
        return
    from fedcli.coordinator.statistics import StatsResult

    doc, doc_sha = found
    _stats_table(StatsResult(True, f"statistics document sha256 {doc_sha}", document=doc))


def _stats_table(res) -> None:
    for m, why in res.rejected.items():
        err.print(
            f"[red]rejected[/] {escape(m)} ({why['reason']}): {escape(why['message'])}", highlight=False, soft_wrap=True
        )
    doc = res.document
    if doc is not None:
        table = Table(title=f"federated statistics of {doc.rows:,.0f} rows from {', '.join(doc.contributors)}")
        for col in ("feature", "statistics"):
            table.add_column(col)
        for n in doc.numeric:
            shown = f"mean {n.mean:.6g}, std {n.std:.6g} ({n.count:,.0f} values)"
            if n.deciles:
                shown += "; deciles " + ", ".join(f"{d:.4g}" for d in n.deciles)
            table.add_row(escape(n.name), shown)
        for c in doc.categorical:
            table.add_row(escape(c.name), escape(f"{len(c.levels)} levels: {', '.join(c.levels)}"))
        out.print(table)
    if res.waiting:
        out.print(f"[yellow]waiting:[/] {escape(res.message)}", soft_wrap=True)
        raise typer.Exit(ExitCode.WAITING)
    out.print(f"[green]{escape(res.message)}[/]" if res.published else escape(res.message), soft_wrap=True)


def _stats_submitted(store, key, data, coordinator, ledger, max_epsilon) -> bool:
    """train while the statistics round is open: contribute to it (a no-op once contributed)."""
    from fedcli.bank.statistics import pending_for

    with failures():
        if not pending_for(_store(store), coordinator):
            return False
    stats_submit(store, key, data, coordinator, ledger, max_epsilon)
    out.print("the statistics round is open: train again once the coordinator published round 0", soft_wrap=True)
    return True


def _stats_aggregated(store, key) -> bool:
    """aggregate while the statistics round is open: close it (publishes round 0), or wait (exit 3)."""
    from fedcli.coordinator.statistics import pending

    with failures():
        if not pending(_store(store)):
            return False
    stats_aggregate(store, key)
    return True


# --------------------------------------------------------------------------- the spec's versions (protocol/chain.py)


def _chain_line(spec, sha: str) -> None:
    """Which version of the spec is in force, and what is announced after it (spec show)."""
    chain = spec.chain
    if chain is None:
        return
    current = next(v for v in chain.versions if v.sha == sha)
    line = f"spec version {current.number} of {chain.latest.number}, in force from round {current.effective_round}"
    later = [v for v in chain.versions if v.number > current.number]
    if later:
        line += "; announced: " + ", ".join(f"version {v.number} from round {v.effective_round}" for v in later)
    if chain.pending is not None:
        line += f"; version {chain.pending.number} awaits countersignatures"
    out.print(line, soft_wrap=True)


@spec_app.command("amend")
def spec_amend(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    key: Path = typer.Option(..., "--key", "-k", help="The coordinator key of the version in force."),
    file: Path | None = typer.Option(None, "--file", "-f", help="The new spec (default: the current one)."),
    member: list[Path] = typer.Option([], "--member", help="A bank's .pub to enrol (or its new key: see rotate-key)."),
    remove: list[str] = typer.Option([], "--remove", help="A member to remove (its key is revoked)."),
    new_key: Path | None = typer.Option(None, "--new-key", help="Rotate the coordinator key: the new private key."),
    effective_round: int | None = typer.Option(
        None, "--effective-round", min=1, help="First round under the new version (default: the next one)."
    ),
):
    """Coordinator: publish the next version of the spec, signed by the current coordinator key.

    Members join or leave, keys rotate, settings change, from a round boundary on. Banks refuse a
    version that weakens their privacy policy until they accept it (train --accept-spec-version).
    """
    from fedcli.coordinator.amend import amend

    with failures():
        done = amend(_store(store), key, file, effective_round, member, remove, new_key)
    v = done.version
    for c in v.changes:
        out.print(f"  {c['change']}: {escape(c['member'])}", highlight=False)
    state = "awaits countersignatures (fedcli spec countersign)" if done.pending else "published"
    out.print(f"spec version {v.number} {state}; applies from round {v.effective_round} (sha256 {v.sha})")


@spec_app.command("countersign")
def spec_countersign(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key (a member of the version in force)."),
    version: int | None = typer.Option(None, "--version", min=2, help="The pending version (default: the one)."),
):
    """Bank: countersign a pending version's roster change (the spec's federation.roster_countersign)."""
    from fedcli.coordinator.amend import countersign

    with failures():
        v = countersign(_store(store), key, version)
    for c in v.changes:
        out.print(f"  {c['change']}: {escape(c['member'])}", highlight=False)
    out.print(f"countersigned spec version {v.number} (sha256 {v.sha})")


@spec_app.command("rotate-key")
def spec_rotate_key(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    key: Path = typer.Option(..., "--key", "-k", help="This bank's current private key (it signs the statement)."),
    new: Path = typer.Option(..., "--new", help="The new key's .pub (fedcli keygen, same name)."),
):
    """Bank: state, signed with the current key, that the new key replaces it (the coordinator's next amend enrols it)."""
    from fedcli.coordinator.amend import rotate_key

    with failures():
        where = rotate_key(_store(store), key, new)
    out.print(f"key rotation statement written to {escape(where)}: send the new .pub to the coordinator")


@app.command()
def audit(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    coordinator: Path = typer.Option(
        ..., "--coordinator", "-c", help="Pinned coordinator public key (coordinator.pub) of version 1 or later."
    ),
    out_dir: Path = typer.Option(Path("audit"), "--out", "-o", help="Folder for audit.json and audit.html."),
):
    """Auditor: verify the whole history offline (spec versions, rounds, signatures, hashes, chain links)
    and write audit.json and audit.html. Exit 4 on any break, with the first break on one line."""
    from fedcli import audit as auditing
    from fedcli.keys import load_public

    with failures():
        result = auditing.audit(_store(store), load_public(coordinator))
        paths = auditing.write(result, out_dir)
        if result.broken:
            from fedcli.errors import VerificationError

            raise VerificationError(f"audit: {result.broken} (report written to {paths[1]})")
    out.print(
        f"audit passed: {len(result.versions)} spec version(s), {len(result.rounds)} round(s), final model "
        f"{result.final_sha256}; wrote {escape(str(paths[0]))} and {escape(str(paths[1]))}",
        soft_wrap=True,
    )


if __name__ == "__main__":
    app()
