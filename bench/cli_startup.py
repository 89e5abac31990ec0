"""CLI start-up: wall time of `fedcli --help` (median of many runs), with floors for context.

Each command runs in a fresh process, as cron or a shell runs it. Rows: the bare
interpreter, `import typer` + `rich` (what any typer CLI pays), `fedcli --help`, and
`import torch` (what every command would pay if the CLI imported it at module level), and a
no-op `fedcli train` (the bank already submitted this round: it must answer before importing torch).

    python bench/cli_startup.py --runs 15 [--baseline main]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, export_ref, machine


def wall(argv: list[str], env: dict, runs: int) -> tuple[float, float]:
    """Median and minimum wall seconds of `argv` over `runs` fresh processes (after one warm-up)."""
    # cwd outside the repository: `python -m` puts the working folder first on sys.path, which would
    # import this tree's fedcli instead of the baseline's
    subprocess.run(argv, env=env, capture_output=True, check=True, cwd="/")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True, cwd="/")
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def noop_train(env: dict, work: Path) -> list[str]:
    """A federation where bank-a already submitted round 1; returns the argv of its second `train`."""

    def cli(*args):
        subprocess.run(
            [PYTHON, "-m", "fedcli.cli", *map(str, args)], env=env, cwd=work, capture_output=True, check=True
        )

    subprocess.run(
        [PYTHON, str(ROOT / "examples" / "prepare_credit.py"), "data"],
        env=env,
        cwd=work,
        capture_output=True,
        check=True,
    )
    cli("keygen", "coordinator", "--out", "coordinator")
    for bank in ("bank-a", "bank-b", "bank-c", "bank-d"):  # the template's quorum needs a few members
        cli("keygen", bank, "--out", bank)
    cli(
        "init",
        "store",
        "--spec",
        ROOT / "examples" / "federation.toml",
        "--key",
        "coordinator/coordinator.key",
        *[f"--member={b}/{b}.pub" for b in ("bank-a", "bank-b", "bank-c", "bank-d")],
    )
    argv = [
        PYTHON,
        "-m",
        "fedcli.cli",
        "train",
        "--store",
        f"{work}/store",
        "--key",
        f"{work}/bank-a/bank-a.key",
        "--data",
        f"{work}/data/bank-a.csv",
        "--coordinator",
        f"{work}/coordinator/coordinator.pub",
    ]
    subprocess.run(argv, env=env, capture_output=True, check=True, cwd="/")
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline", metavar="REF", help="also time `fedcli --help` as of this git ref")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = [
        ("python -c pass", [PYTHON, "-c", "pass"], env),
        ("python -c 'import typer, rich'", [PYTHON, "-c", "import typer, rich.console, rich.table"], env),
        ("fedcli --help", [PYTHON, "-m", "fedcli.cli", "--help"], env),
        ("fedcli report --help", [PYTHON, "-m", "fedcli.cli", "report", "--help"], env),
    ]
    if args.baseline:
        old = dict(os.environ, PYTHONPATH=str(export_ref(args.baseline, Path("/tmp/fedcli-bench-cli"))))
        rows.append((f"fedcli --help at {args.baseline}", [PYTHON, "-m", "fedcli.cli", "--help"], old))
    rows.append(("python -c 'import torch' (for scale)", [PYTHON, "-c", "import torch"], env))
    work = Path(tempfile.mkdtemp(prefix="fedcli-bench-noop-"))
    rows.append(("fedcli train, already submitted (no-op)", noop_train(env, work), env))
    if args.baseline:
        old_work = Path(tempfile.mkdtemp(prefix="fedcli-bench-noop-old-"))
        rows.append((f"fedcli train no-op at {args.baseline}", noop_train(old, old_work), old))
    check = subprocess.run(
        [PYTHON, "-c", "import sys, fedcli.cli; print(sorted({'torch', 'matplotlib', 'pandas'} & set(sys.modules)))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    print(machine())
    print(f"heavy modules imported by `import fedcli.cli`: {check.stdout.strip()}")
    print("| command | median (s) | min (s) |\n|---|---|---|")
    for name, argv, e in rows:
        med, low = wall(argv, e, args.runs)
        print(f"| `{name}` | {med:.3f} | {low:.3f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
