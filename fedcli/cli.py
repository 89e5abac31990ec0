"""fedcli's command line: parse, call one function, print with rich.

Heavy modules (torch, pandas, the workflows) are imported inside commands so that
`fedcli --help` starts fast.
"""

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EXIT_WAITING, FedcliError

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


@contextlib.contextmanager
def failures():
    """Turn expected failures into one red line and their exit code; nothing else is swallowed."""
    try:
        yield
    except FedcliError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


def _store(location: str):
    from .store import open_store

    return open_store(location)


@app.command()
def keygen(
    name: str = typer.Argument(..., help="Member or coordinator name, e.g. bank-a."),
    out_dir: Path = typer.Option(Path("."), "--out", "-o", help="Folder for NAME.key and NAME.pub."),
    encrypt: bool = typer.Option(False, "--encrypt", help="Protect the private key with a passphrase (prompted, or from FEDCLI_PASSPHRASE)."),
):
    """Make an Ed25519 key pair: NAME.key (private, 0600) and NAME.pub (send this one)."""
    from . import keys

    with failures():
        passphrase = None
        if encrypt:
            passphrase = os.environ.get(keys.PASSPHRASE_ENV) or typer.prompt(
                "Passphrase", hide_input=True, confirmation_prompt=True
            )
        key_path, pub_path, ident = keys.generate(name, out_dir, passphrase)
    out.print(f"private key: {key_path} (keep it here; mode 0600{', encrypted' if encrypt else ''})")
    out.print(f"public key:  {pub_path}")
    out.print(f"fingerprint: [bold]{ident.fingerprint}[/] (compare it out of band)")


@app.command()
def schema(
    data: Path = typer.Argument(..., help="CSV or Parquet table with representative rows."),
    target: str = typer.Option(..., "--target", help="Label column."),
    positive: str = typer.Option(..., "--positive", help="Label value that counts as the positive class (e.g. bad)."),
):
    """Draft the spec's data section from a table: only means, stds and category names."""
    from . import data as D
    from . import spec as S

    with failures():
        section = D.infer_schema(D.read_table(data), target, positive)
    out.print(S.dumps({"data": section}).decode(), highlight=False, markup=False)


@app.command()
def init(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix to create the federation in."),
    spec: Path = typer.Option(..., "--spec", help="Spec template (TOML): model, data, training, federation."),
    key: Path = typer.Option(..., "--key", "-k", help="Coordinator private key."),
    member: list[Path] = typer.Option([], "--member", "-m", help="A member's .pub file; repeat per bank."),
    federation_id: Optional[str] = typer.Option(None, "--id", help="Federation id (default: from the template, else random)."),
):
    """Coordinator: sign the federation spec and publish round 0's global model."""
    from .coordinator import init_federation

    with failures():
        s = init_federation(_store(store), spec, key, member, federation_id)
    table = Table(title=f"federation {s.federation_id}")
    for col in ("role", "name", "fingerprint"):
        table.add_column(col)
    table.add_row("coordinator", s.coordinator.name, s.coordinator.fingerprint)
    for m in s.members:
        table.add_row("member", m.name, m.fingerprint)
    out.print(table)
    out.print(f"model {s.model.kind} on {s.data.n_features} features; quorum {s.min_clients} of {len(s.members)}. "
              "Round 0 published.")


@app.command()
def train(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="This bank's private key."),
    data: Path = typer.Option(..., "--data", "-d", help="This bank's CSV or Parquet training table."),
    coordinator: Path = CoordOpt,
    state: Optional[Path] = typer.Option(None, "--state", help="Bank state file (default: next to the key)."),
):
    """Bank: verify the latest global model, train locally and submit a signed update."""
    from .bank import train_round

    with failures():
        res = train_round(_store(store), key, data, coordinator, state, err)
    for note in res.data_notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if not res.submitted:
        out.print(res.message)
        return
    table = Table(title=f"{res.member}: update for round {res.round}")
    table.add_column("rows", justify="right")
    for k in res.metrics:
        table.add_column(k, justify="right")
    table.add_row(str(res.num_examples), *(f"{v:.4f}" for v in res.metrics.values()))
    out.print(table)
    out.print(res.message)


@app.command()
def aggregate(
    store: str = StoreOpt,
    key: Path = typer.Option(..., "--key", "-k", help="Coordinator private key."),
):
    """Coordinator: verify submitted updates, aggregate, publish the next global model.

    Exit codes: 0 published, 3 waiting for quorum, 4 verification failure, 5 store error, 1 other error.
    """
    from .coordinator import aggregate_round

    with failures():
        res = aggregate_round(_store(store), key, err)
    table = Table(title=f"round {res.round}")
    for col in ("member", "status", "rows / reason"):
        table.add_column(col)
    for a in res.accepted:
        table.add_row(a["member"], "[green]accepted[/]", str(a["num_examples"]))
    for m, reason in res.rejected.items():
        table.add_row(m, "[red]rejected[/]", reason)
    for m in res.pending:
        table.add_row(m, "[yellow]incomplete[/]", "tensors without manifest (upload in progress or crashed)")
    for m in res.missing:
        table.add_row(m, "[dim]missing[/]", "")
    out.print(table)
    for m, reason in res.rejected.items():
        err.print(f"[red]rejected[/] {m}: {reason}", highlight=False, soft_wrap=True)
    if res.published:
        out.print(f"[green]published global model of round {res.round}[/] from {len(res.accepted)} updates")
    else:
        out.print(f"[yellow]waiting:[/] {res.waiting_reason}")
        raise typer.Exit(EXIT_WAITING)


@app.command()
def status(store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix.")):
    """Rounds, who submitted, rejections and mean metrics."""
    from .rounds import history

    with failures():
        spec, rows = history(_store(store))
    table = Table(title=f"federation {spec.federation_id}: {len(spec.members)} members, quorum {spec.min_clients}")
    for col, just in (("round", "right"), ("global", "left"), ("updates in", "right"), ("rows", "right"),
                      ("mean auc before", "right"), ("mean loss", "right"), ("pending / rejected", "left")):
        table.add_column(col, justify=just)
    for row in rows:
        other = [f"{m} (submitted)" for m in row.submitted if m not in row.contributors and m not in row.rejected]
        other += [f"{m} (incomplete)" for m in row.pending]
        other += [f"[red]{m}: {why}[/]" for m, why in row.rejected.items()]
        table.add_row(
            str(row.round),
            "[green]published[/]" if row.published else "[yellow]open[/]",
            f"{len(row.contributors)}/{len(spec.members)}" if row.round else "(initial)",
            str(row.examples) if row.examples else "",
            f"{row.metrics['auc_before']:.4f}" if "auc_before" in row.metrics else "",
            f"{row.metrics['loss']:.4f}" if "loss" in row.metrics else "",
            "\n".join(other),
        )
    out.print(table)


@app.command()
def report(
    store: str = typer.Argument(..., help="Shared folder or s3://bucket/prefix."),
    output: Path = typer.Option(Path("fedcli-report.html"), "--out", "-o",
                                help="HTML page to write; the PNG goes next to it with the same name."),
):
    """Plot each bank's loss, AUC and rows per round and the privacy budget spent: a PNG and an HTML page."""
    from .report import write_report

    with failures():
        html_path, png_path, rep = write_report(_store(store), output)
    out.print(f"{len(rep.entries)} updates over {len(rep.rounds)} rounds -> {html_path} and {png_path}")


def _metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title)
    for k in metrics:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.4f}" for v in metrics.values()))
    return table


@app.command()
def evaluate(
    store: str = StoreOpt,
    coordinator: Path = CoordOpt,
    data: Path = typer.Option(..., "--data", "-d", help="Labelled CSV or Parquet table."),
    round_: Optional[int] = typer.Option(None, "--round", help="Round to evaluate (default: latest)."),
):
    """Score a verified global model on a labelled table: AUC, PR-AUC, KS."""
    from .inference import evaluate as run

    with failures():
        r, n, metrics = run(_store(store), coordinator, data, round_)
    out.print(_metrics_table(f"global model of round {r} on {data.name} ({n} rows)", metrics))


@app.command()
def predict(
    store: str = StoreOpt,
    coordinator: Path = CoordOpt,
    data: Path = typer.Option(..., "--data", "-d", help="CSV or Parquet table to score."),
    output: Path = typer.Option(..., "--out", "-o", help="CSV to write: the input plus a score column."),
    round_: Optional[int] = typer.Option(None, "--round", help="Round to use (default: latest)."),
):
    """Write the probability of the positive class for each row, from a verified global model."""
    from .inference import predict as run

    with failures():
        r, n = run(_store(store), coordinator, data, output, round_)
    out.print(f"scored {n} rows with the global model of round {r} -> {output}")


if __name__ == "__main__":
    app()
