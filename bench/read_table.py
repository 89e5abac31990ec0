"""Reading + preparing a bank's table: rows/s and peak memory, CSV vs Parquet, before (pandas) vs after (Arrow).

The table: --rows rows x 30 numeric features (values with 6 decimals, like the fraud example's
engineered features) and a 0/1 target with 0.2 % positives, written once as CSV and as Parquet
(row groups of 100,000 rows). Each run is a fresh process that imports fedcli from one tree and
times `open + prepare` of the whole table to the float32 matrix the bank trains on:

  before  fedcli at --baseline (git archive): tables.prepare(tables.read_table(path)), pandas
          reads the whole table (pd.read_csv / pd.read_parquet) then preprocesses it
  after   this tree: tables.prepare(sources.open_table(path)), Arrow record batches of
          65,536 rows, preprocessed chunk by chunk into the matrix

Peak RSS is the child's VmHWM; "after imports" is its RSS before reading, so the difference is
what reading costs. The float32 matrix itself is rows x 30 x 4 bytes (120 MB at 1M rows).

    python bench/read_table.py --rows 1000000 --runs 5 --baseline main
    python bench/read_table.py --rows 10000000 --runs 3 --skip-before
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import PYTHON, ROOT, export_ref, machine

FEATURES = 30


def write_tables(rows: int, where: Path) -> dict[str, Path]:
    """The bench table as CSV and Parquet (written once; reused when present)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    where.mkdir(parents=True, exist_ok=True)
    paths = {"csv": where / f"t{rows}.csv", "parquet": where / f"t{rows}.parquet"}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(0)
    columns = {f"f{i}": (rng.standard_normal(rows) * (i + 1) + i).round(6) for i in range(FEATURES)}
    columns["is_fraud"] = (rng.random(rows) < 0.002).astype(np.int64)
    table = pa.table(columns)
    pcsv.write_csv(table, paths["csv"], pcsv.WriteOptions(quoting_style="none"))
    pq.write_table(table, paths["parquet"], row_group_size=100_000)
    return paths


def child(code: str, path: str) -> None:
    """One timed read + prepare in this process; prints one JSON line."""
    sys.path.insert(0, code)
    from fedcli.bank import tables
    from fedcli.protocol.spec import DataSpec, NumericFeature

    spec = DataSpec(
        "is_fraud", "1", tuple(NumericFeature(f"f{i}", float(i), float(i + 1)) for i in range(FEATURES)), ()
    )
    try:
        from fedcli.bank import sources
    except ImportError:  # before: pandas reads the whole table
        sources = None
    base = rss_mb()
    t = time.perf_counter()
    if sources is None:
        prep = tables.prepare(tables.read_table(Path(path)), spec, "t")
    else:
        prep = tables.prepare(sources.open_table(path), spec, "t")
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "rows": len(prep.X), "peak_mb": peak_mb(), "base_mb": base}))


def rss_mb() -> float:
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(code: Path, path: Path) -> dict:
    res = subprocess.run(
        [PYTHON, __file__, "--child", str(code), str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(code)),
        cwd=ROOT,
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median), interleaved")
    ap.add_argument("--baseline", metavar="REF", default="main", help="the 'before' git ref")
    ap.add_argument("--skip-before", action="store_true", help="only this tree (pandas needs ~10x the memory)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedcli-bench-read"))
    ap.add_argument("--child", nargs=2, metavar=("CODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    paths = write_tables(args.rows, args.work)
    trees = {"before": export_ref(args.baseline, args.work), "after": ROOT}
    if args.skip_before:
        del trees["before"]
    import pyarrow

    before = f", before = {trees['before'].name}" if "before" in trees else ""
    print(machine() + f", pyarrow {pyarrow.__version__}{before}")
    print(
        f"{args.rows:,} rows x {FEATURES} features; CSV {paths['csv'].stat().st_size / 2**20:,.0f} MiB, "
        f"Parquet {paths['parquet'].stat().st_size / 2**20:,.0f} MiB; median of {args.runs} runs"
    )
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.runs):  # interleaved, so a busy moment on shared cores hits every row alike
        for fmt, path in paths.items():
            for name, code in trees.items():
                results.setdefault((fmt, name), []).append(run(code, path))
    print("| format | code | rows/s | seconds | peak RSS (MB) | RSS after imports (MB) |\n|---|---|---|---|---|---|")
    for (fmt, name), runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak_mb"] for r in runs)
        base = statistics.median(r["base_mb"] for r in runs)
        label = f"{name} ({args.baseline}, pandas)" if name == "before" else f"{name} (Arrow, streamed)"
        print(f"| {fmt} | {label} | {args.rows / seconds:,.0f} | {seconds:.2f} | {peak:,.0f} | {base:,.0f} |")


if __name__ == "__main__":
    main()
