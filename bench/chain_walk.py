"""What the spec chain costs every command: `rounds.load_spec` (walk and verify every version) on a folder store.

For each chain length K it builds a federation (the demo spec, 4 banks, real keys), publishes K
amended versions (each changes `[training] epochs`), then times `load_spec` with the pinned key in
this process, median of --runs runs after one warm-up, and the same with 20 banks and
`roster_countersign = 3` (every version adds a bank, countersigned by 3 members).

    python bench/chain_walk.py --versions 0,10,50 --runs 7
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcli import keys  # noqa: E402
from fedcli.coordinator import amend  # noqa: E402
from fedcli.coordinator.federation import init_federation  # noqa: E402
from fedcli.protocol import rounds  # noqa: E402
from fedcli.store import open_store  # noqa: E402

TEMPLATE = (ROOT / "examples" / "federation.toml").read_text()


def build(root: Path, versions: int, banks: int, countersign: int) -> tuple[Path, Path]:
    coord_key, coord_pub, _ = keys.generate("coordinator", root / "coordinator")
    pubs = [keys.generate(f"bank-{i:02d}", root / f"bank-{i:02d}")[:2] for i in range(banks)]
    text = (
        TEMPLATE if not countersign else TEMPLATE.replace("deadline_minutes = 0", f"roster_countersign = {countersign}")
    )
    (root / "spec.toml").write_text(text)
    store = open_store(str(root / "store"))
    init_federation(store, root / "spec.toml", coord_key, [p for _, p in pubs])
    for k in range(versions):
        if countersign:
            _, pub, _ = keys.generate(f"new-{k:03d}", root / f"new-{k:03d}")
            amend.amend(store, coord_key, None, add=[pub])
            for key, _ in pubs[:countersign]:
                amend.countersign(store, key, None)
        else:
            (root / "v.toml").write_text(TEMPLATE.replace("epochs = 3", f"epochs = {3 + (k % 2) + 1}"))
            amend.amend(store, coord_key, root / "v.toml")
    return root / "store", coord_pub


def timed(store_path: Path, pub: Path, runs: int) -> float:
    store, pinned = open_store(str(store_path)), keys.load_public(pub)
    rounds.load_spec(store, pinned)  # warm-up (imports, page cache)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        rounds.load_spec(store, pinned)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", default="0,10,50")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    print("versions  banks  countersign  load_spec median (ms)")
    for banks, countersign in ((4, 0), (20, 3)):
        for k in (int(v) for v in args.versions.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                store, pub = build(Path(tmp), k, banks, countersign)
                ms = timed(store, pub, args.runs) * 1000
            print(f"{k:8d}  {banks:5d}  {countersign:11d}  {ms:10.1f}")


if __name__ == "__main__":
    main()
