"""Holdout AUC of the federated credit model against the privacy budget (not a test).

Runs the real round loop (keys, signed spec, `train_round`, `aggregate_round` on a folder
store) on the credit demo data for each privacy setting, several times because the DP noise
is fresh every run, and prints a markdown table for docs/benchmarks.md. Local-only models
(each bank alone, no DP, same epochs in total) are the baseline federation has to beat.

    python bench/dp_auc.py [--rounds 5] [--repeats 3]
"""

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from compare_local import compare
from prepare_credit import BANKS, split
from rich.console import Console

from fedcli import keys
from fedcli.bank.state import ledger_for_key
from fedcli.bank.step import train_round
from fedcli.coordinator.federation import init_federation
from fedcli.coordinator.step import aggregate_round
from fedcli.privacy import ledger
from fedcli.store import open_store

TRAINING = "[training]\nepochs = 3\nbatch_size = 128\nlr = 0.05\n"
DELTA = 1e-5
# (mode, target epsilon over all rounds, clip); None = no DP
SETTINGS = (
    [("none", None, None)]
    + [("record", e, 1.0) for e in (0.5, 1, 2, 3, 8)]
    + [("update", e, 0.5) for e in (3, 10, 30, 100)]
)


def run(work: Path, data: Path, mode: str, eps: float | None, clip: float | None, rounds: int) -> dict:
    quiet = Console(file=io.StringIO())
    template = (ROOT / "examples" / "federation.toml").read_text()
    template = template.replace("[training]\nepochs = 3\nbatch_size = 32\nlr = 0.02\n", TRAINING)
    if mode != "none":
        template += (
            f'\n[privacy]\nmode = "{mode}"\nclip = {clip}\ntarget_epsilon = {eps}\ndelta = {DELTA}\nrounds = {rounds}\n'
        )
    (work / "federation.toml").write_text(template)
    ckey, cpub, _ = keys.generate("coordinator", work / "coordinator")
    bank_keys = {b: keys.generate(b, work / b)[:2] for b in BANKS}
    store = open_store(str(work / "store"))
    init_federation(store, work / "federation.toml", ckey, [p for _, p in bank_keys.values()])
    for _ in range(rounds):
        for b, (k, _) in bank_keys.items():
            train_round(store, k, data / f"{b}.csv", cpub, console=quiet)
        assert aggregate_round(store, ckey, console=quiet).published
    res = compare(str(work / "store"), str(cpub), data)
    spent, noise = [], []
    if mode != "none":
        for k, _ in bank_keys.values():
            led = ledger.Ledger(ledger_for_key(k))
            spent.append(led.spent(mode, DELTA))
            noise.append(led.entries()[-1]["noise_multiplier"])
    local = [v["auc"] for name, v in res.items() if name != "federated"]
    return {
        "auc": res["federated"]["auc"],
        "pr_auc": res["federated"]["pr_auc"],
        "local_auc": statistics.mean(local),
        "spent": max(spent, default=0.0),
        "noise": (min(noise), max(noise)) if noise else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        split(data)
        rows = []
        for i, (mode, eps, clip) in enumerate(SETTINGS):
            t0, runs = time.perf_counter(), []
            for r in range(1 if mode == "none" else args.repeats):  # no DP: deterministic, one run
                work = Path(tmp) / f"s{i}r{r}"
                work.mkdir()
                runs.append(run(work, data, mode, eps, clip, args.rounds))
            aucs = [x["auc"] for x in runs]
            sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
            z = runs[0]["noise"]
            noise = "" if z is None else (f"{z[0]:.2f}" if z[0] == z[1] else f"{z[0]:.2f}–{z[1]:.2f}")
            spent = "" if eps is None else f"{max(x['spent'] for x in runs):.2f}"
            pr_auc = statistics.mean(x["pr_auc"] for x in runs)
            rows.append(
                f"| {mode} | {'∞' if eps is None else eps} | {'' if clip is None else clip} | {noise} | {spent} | "
                f"{statistics.mean(aucs):.4f} ± {sd:.4f} | {pr_auc:.4f} | {runs[0]['local_auc']:.4f} | {len(runs)} |"
            )
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    training = ", ".join(TRAINING.strip().splitlines()[1:])
    print(f"Credit demo, 4 banks, {args.rounds} rounds, training {training}, delta={DELTA:g}.\n")
    print(
        "| DP mode | target ε | clip | noise multiplier | ε spent (max bank) | federated AUC | PR-AUC | local-only AUC (mean of banks) | runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
