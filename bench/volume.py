"""The whole bank step at a bank's volume: `fedcli train` on a 10M-row x 30-feature Parquet fraud table.

What is timed is one `fedcli train` process (read + preprocess the Parquet table through Arrow, score the
global, 5 epochs of minibatch Adam, score again, sign and export), with its wall time and peak RSS from
`/usr/bin/time -v`. The table is the fraud simulator's output (examples/fraud/simulate.py), all banks' rows
concatenated, written once as Parquet with 100,000-row row groups and cached in --work.

    python bench/volume.py --rows 10000000 --runs 3 --work /tmp/fedcli-volume [--baseline a986ca5]

--baseline REV also times fedcli at git revision REV (exported with `git archive`), run by run
interleaved with this tree, so both see the same load on the machine.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import PYTHON, ROOT, machine

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d")


def table(work: Path, rows: int) -> Path:
    """The cached Parquet table of `rows` simulated transactions (simulated and converted on first use)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out = work / f"fraud-{rows}.parquet"
    if out.exists():
        return out
    sim = work / "sim"
    if not (sim / "test.csv").exists():
        customers = int(rows / 339) + 1  # about 339 kept rows per card over 183 days
        subprocess.run(
            [
                PYTHON,
                str(ROOT / "examples/fraud/simulate.py"),
                "--out",
                str(sim),
                "--customers",
                str(customers),
                "--terminals",
                str(2 * customers),
            ],
            check=True,
        )
    writer, written = None, 0
    for name in [*BANKS, "test"]:
        header = (sim / f"{name}.csv").open().readline().strip().split(",")
        types = {col: pa.float32() for col in header if col != "is_fraud"} | {"is_fraud": pa.int8()}
        reader = pacsv.open_csv(sim / f"{name}.csv", convert_options=pacsv.ConvertOptions(column_types=types))
        for batch in reader:
            batch = batch.slice(0, min(len(batch), rows - written))
            writer = writer or pq.ParquetWriter(out.with_suffix(".tmp"), batch.schema)
            writer.write_batch(batch, row_group_size=100_000)
            written += len(batch)
            if written >= rows:
                break
        if written >= rows:
            break
    writer.close()
    out.with_suffix(".tmp").rename(out)
    print(f"{written:,} rows -> {out}", flush=True)
    return out


def federation(work: Path, env: dict) -> Path:
    """A fresh store with the fraud spec and four banks; returns its folder."""
    fed = work / "fed"
    subprocess.run(["rm", "-rf", str(fed)], check=True)
    fed.mkdir()

    def cli(*args):
        subprocess.run([PYTHON, "-m", "fedcli.cli", *map(str, args)], env=env, cwd=fed, check=True, capture_output=True)

    for who in ("coordinator", *BANKS):
        cli("keygen", who, "--out", who)
    members = [f"--member={b}/{b}.pub" for b in BANKS]
    cli(
        "init",
        "store",
        "--spec",
        ROOT / "examples/fraud/federation.toml",
        "--key",
        "coordinator/coordinator.key",
        *members,
    )
    return fed


def one_run(work: Path, data: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one bank's `fedcli train` on the table."""
    fed = federation(work, env)
    argv = [
        "/usr/bin/time",
        "-v",
        PYTHON,
        "-m",
        "fedcli.cli",
        "train",
        "--store",
        "store",
        "--key",
        "bank-a/bank-a.key",
        "--data",
        str(data),
        "--coordinator",
        "coordinator/coordinator.pub",
    ]
    res = subprocess.run(argv, env=env, cwd=fed, capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stdout + res.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return hours * 3600 + minutes * 60 + seconds, rss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedcli-volume"))
    ap.add_argument("--baseline", help="also time this git revision, interleaved run by run")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"this tree": ROOT}
    if args.baseline:
        trees[f"at {args.baseline}"] = exported(args.baseline, args.work)
    data = table(args.work, args.rows)
    load = os.getloadavg()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            runs[name].append(one_run(args.work, data, dict(os.environ, PYTHONPATH=str(tree))))
    print(machine())
    print(f"load average before the runs: {load}, after: {os.getloadavg()}")
    print("| fedcli | rows | runs | wall s (median) | wall s (each) | peak RSS MiB (median) |")
    print("|---|---|---|---|---|---|")
    for name, done in runs.items():
        walls, rss = [w for w, _ in done], [r for _, r in done]
        each = ", ".join(f"{w:.1f}" for w in walls)
        median = f"{statistics.median(walls):.1f} | {each} | {statistics.median(rss):,.0f}"
        print(f"| {name} | {args.rows:,} | {len(done)} | {median} |")


def exported(rev: str, work: Path) -> Path:
    """fedcli's source at git revision `rev`, exported once into work/."""
    out = work / f"tree-{rev}"
    if not out.exists():
        tmp = work / f"tree-{rev}.tmp"
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        tmp.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fedcli"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        tmp.rename(out)
    return out


if __name__ == "__main__":
    main()
