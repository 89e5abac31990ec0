"""How far federated statistics under DP and secure aggregation land from the pooled ones (docs/data.md).

Runs the statistics round through the real CLI on the demo's credit data (4 banks, 3,341 rows):
[privacy] record-level (noise multiplier 5, the default statistics_noise) and [secagg] on with its
default "full" noise, public ranges, candidate levels, 20 histogram bins for Age and Income. For
each run it prints, per numeric feature, |mean - pooled mean| / range width and std / pooled std,
and for the binned features the largest gap between a decile's level (10 %, ..., 90 %) and the
share of pooled values at or below it. The noise is fresh each run (secret randomness).

    python bench/statistics_precision.py --runs 5
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]

import numpy as np
import test_statistics as t
from helpers import BANKS, make_fed
from prepare_credit import split

SPEC = '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n\n[secagg]\nenabled = true\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    root = Path(tempfile.mkdtemp(prefix="fedcli-stats-"))
    split(root / "credit")
    df = t.pooled(root / "credit")
    worst_mean, ratios, worst_level = 0.0, {}, 0.0
    for run in range(runs):
        fed = make_fed(root / f"run{run}", root / "credit", t.federated_template(SPEC, True, True, bins=20))
        for b in BANKS:
            t.submit(fed, b)
        t.stats_aggregate(fed)
        for n in t.statistics(fed)["numeric"]:
            low, high = t.RANGES[n["name"]]
            values = df[n["name"]].dropna().to_numpy()
            off = abs(n["mean"] - values.mean()) / (high - low)
            ratio = n["std"] / values.std(ddof=1)
            line = f"run {run} {n['name']:<9} mean off {off:.4f} of range, std x{ratio:.2f}"
            if n.get("deciles"):
                below = np.array([(values <= d).mean() for d in n["deciles"]])
                level = float(np.abs(below - np.arange(1, 10) / 10).max())
                worst_level = max(worst_level, level)
                line += f", deciles off by up to {level:.3f} in level"
            worst_mean = max(worst_mean, off)
            ratios.setdefault(n["name"], []).append(ratio)
            print(line)
    print(f"over {runs} runs: means within {worst_mean:.4f} of the range; deciles within {worst_level:.3f} in level")
    for name, found in ratios.items():
        low, high = t.RANGES[name]
        spread = df[name].std() / (high - low)
        print(f"  {name:<9} std / range {spread:.3f}: std ratio {min(found):.2f} .. {max(found):.2f}")


if __name__ == "__main__":
    main()
