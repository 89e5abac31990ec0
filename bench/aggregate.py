"""Aggregation throughput and peak memory: fedcli vs `sha256sum` vs Flower, same files, same run.

For each model size P (float32 parameters) it builds a real federation on a local folder
(signed spec, an MLP whose parameter count is about P, N enrolled banks with real keys) and
N signed updates, then measures in fresh processes (page cache warm for all three):

  sha256sum    `sha256sum` over the N update files: reading + hashing, the practical limit
  openssl      `openssl dgst -sha256` over the same files (uses SHA CPU extensions where
               coreutils may not: the faster of the two is the real floor)
  fedcli       coordinator.aggregate_round: verify N signatures, hashes, headers, shapes,
               finite values, FedAvg in float64, publish the signed global (the real path)
  flwr         flwr.server.strategy.aggregate.aggregate on the same arrays (loaded with
               safetensors first, load time reported apart); no verification at all

Peak RSS is each child's high-water mark (VmHWM); "base" is its RSS after imports, before
any work, so peak - base is what aggregation itself needed.

    python bench/aggregate.py --params 1e6,1e7 --banks 10,100 --runs 3
"""

import argparse
import io
import json
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path

from common import PYTHON, ROOT, export_ref, machine, median, rss_mb, run_child, wait4

N_FEATURES = 26  # the credit demo's feature count after one-hot (examples/federation.toml)


def hidden_for(p: int) -> int:
    """Width h of an MLP [h, h] on the demo features with about p parameters."""
    # p = F*h + h + h*h + h + h + 1  ->  h^2 + (F+3)h + 1 - p = 0
    b = N_FEATURES + 3
    return max(1, round((-b + (b * b - 4 * (1 - p)) ** 0.5) / 2))


def build(root: Path, p: int, members: int) -> dict:
    """A federation of `members` banks with an MLP of about p parameters, round 0 published."""
    import tomli_w

    from fedcli import keys, models
    from fedcli.coordinator.federation import init_federation
    from fedcli.store.folder import FolderStore

    info_path = root / "info.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    (root / "keys").mkdir(parents=True)
    raw = tomllib.loads((ROOT / "examples" / "federation.toml").read_text())
    h = hidden_for(p)
    raw["model"] = {"kind": "mlp", "hidden": [h, h], "seed": 1}
    raw["federation"].update(id="bench", min_clients=1, deadline_minutes=0)
    template = root / "federation.toml"
    template.write_text(tomli_w.dumps(raw))
    coord_key, _, _ = keys.generate("coordinator", root / "keys", None)
    pubs = [keys.generate(f"bank-{i:03d}", root / "keys", None)[1] for i in range(members)]
    spec = init_federation(FolderStore(root / "store"), template, coord_key, pubs, "bench")
    shapes = models.shapes(spec.model, spec.data.n_features)
    info = {
        "params": sum(int(__import__("math").prod(s)) for s in shapes.values()),
        "hidden": h,
        "members": members,
        "written": 0,
    }
    info_path.write_text(json.dumps(info))
    return info


def write_updates(root: Path, n: int) -> list[Path]:
    """Signed updates from banks 0..n-1 (adds the missing ones); returns their tensor files."""
    import numpy as np

    from fedcli import digest, keys, models
    from fedcli.protocol import rounds
    from fedcli.protocol.tensors import encode
    from fedcli.store.folder import FolderStore

    info = json.loads((root / "info.json").read_text())
    store = FolderStore(root / "store")
    spec, _ = rounds.load_spec(store, None)
    shapes = models.shapes(spec.model, spec.data.n_features)
    base = json.loads(store.get(rounds.global_keys(0)[1], max_bytes=1 << 20))["tensors_sha256"]
    block = np.random.default_rng(0).standard_normal(info["params"], dtype=np.float32) * np.float32(1e-3)
    for i in range(info["written"], n):
        member = f"bank-{i:03d}"
        flat, off, delta = block * np.float32(1 + i / 1000), 0, {}
        for k, s in shapes.items():
            size = int(np.prod(s))
            delta[k] = flat[off : off + size].reshape(s)
            off += size
        data = encode(delta)
        tkey, mkey = rounds.update_keys(1, member)
        path = root / "store" / tkey
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        private, _ = keys.load_private(root / "keys" / f"{member}.key")
        manifest = {
            "kind": "update",
            "format": rounds.FORMAT,
            "federation_id": spec.federation_id,
            "round": 1,
            "member": member,
            "base_sha256": base,
            "tensors_sha256": digest.sha256(data),
            "num_examples": 100 + 37 * i,
            "metrics": {},
            "created_at": rounds.now(),
            "nonce": f"{i:032x}",
        }
        store.put(mkey, keys.sign_manifest(private, manifest), create_only=True)
        info["written"] = i + 1
        (root / "info.json").write_text(json.dumps(info))
    return [root / "store" / rounds.update_keys(1, f"bank-{i:03d}")[0] for i in range(n)]


def visible_updates(root: Path, n: int) -> None:
    """Hide manifests of banks >= n (rename) so a round sees exactly n updates."""
    updates = root / "store" / "rounds" / "000001" / "updates"
    for f in sorted(updates.glob("*.json*")):
        i = int(f.name.split("-")[1][:3])
        target = updates / (f"bank-{i:03d}.json" if i < n else f"bank-{i:03d}.json.hidden")
        if f != target:
            f.rename(target)
        tensors = updates / f"bank-{i:03d}.safetensors"
        parked = updates / f"bank-{i:03d}.safetensors.hidden"
        if i < n and parked.exists():
            parked.rename(tensors)
        elif i >= n and tensors.exists():
            tensors.rename(parked)


def child_fedcli(root: Path) -> dict:
    """One full aggregate_round in this process; undo the publication afterwards."""
    from rich.console import Console

    from fedcli.coordinator.step import aggregate_round
    from fedcli.store.folder import FolderStore

    store = FolderStore(root / "store")
    for key in ("rounds/000001/global.json", "rounds/000001/global.safetensors", "rounds/000001/rejections.json"):
        store.delete(key)
    base, _ = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    res = aggregate_round(store, root / "keys" / "coordinator.key", Console(file=io.StringIO()))
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    _, peak = rss_mb()
    if not res.published or res.rejected:
        raise SystemExit(f"round not published cleanly: {res}")
    import fedcli

    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "base_mb": base,
        "peak_mb": peak,
        "accepted": len(res.accepted),
        "module": fedcli.__file__,
    }


def measure(root: Path, files: list[Path], runs: int, flower: bool, baseline: Path | None) -> dict:
    """Each run does every contender once, in turn, so load drift on a shared machine hits all alike."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    contenders = {
        "sha256sum": lambda: dict(zip(("seconds", "peak_mb", "cpu_s"), wait4(["sha256sum", *map(str, files)]))),
        "openssl": lambda: dict(
            zip(("seconds", "peak_mb", "cpu_s"), wait4(["openssl", "dgst", "-sha256", *map(str, files)]))
        ),
        "fedcli": lambda: run_child([PYTHON, __file__, "_fedcli", str(root)], env),
    }
    if baseline:
        contenders["before"] = lambda: run_child(
            [PYTHON, __file__, "_fedcli", str(root)], dict(env, PYTHONPATH=str(baseline))
        )
    if flower:
        import flwr_env

        argv = [
            str(flwr_env.python()),
            str(Path(__file__).with_name("flwr_child.py")),
            str(root / "store"),
            *map(str, files),
        ]
        contenders["flwr"] = lambda: {**(r := run_child(argv)), "seconds": r["aggregate_s"]}
    results = {name: [] for name in contenders}
    for _ in range(runs):
        for name, run in contenders.items():
            results[name].append(run())
    assert all(r["accepted"] == len(files) and r["module"].startswith(str(ROOT / "fedcli")) for r in results["fedcli"])
    assert all(r["module"].startswith(str(baseline)) for r in results.get("before", []))
    row = {"gb": sum(f.stat().st_size for f in files) / 1e9, "load_avg": os.getloadavg()[0]}
    for name, rs in results.items():
        row[f"{name}_s"] = median([r["seconds"] for r in rs])
        row[f"{name}_cpu_s"] = median([r["cpu_s"] for r in rs])
        row[f"{name}_peak_mb"] = max(r["peak_mb"] for r in rs)
        if "base_mb" in rs[0]:
            row[f"{name}_base_mb"] = median([r["base_mb"] for r in rs])
        if "load_s" in rs[0]:
            row[f"{name}_load_s"] = median([r["load_s"] for r in rs])
    return row


def fmt(row: dict) -> str:
    def rate(name):
        return f"{row[name + '_s']:.2f} s ({row['gb'] / row[name + '_s']:.2f} GB/s; CPU {row[name + '_cpu_s']:.2f} s)"

    def mem(name):
        return f"{row[name + '_peak_mb']:.0f} (+{row[name + '_peak_mb'] - row[name + '_base_mb']:.0f})"

    cells = [
        f"{row['params'] / 1e6:.1f}M",
        str(row["banks"]),
        f"{row['gb']:.2f}",
        rate("sha256sum"),
        rate("openssl"),
        rate("fedcli"),
        mem("fedcli"),
    ]
    if "before_s" in row:
        cells += [rate("before"), mem("before")]
    if "flwr_s" in row:
        cells += [rate("flwr"), f"{row['flwr_load_s']:.2f} s", mem("flwr")]
    else:
        cells += [row.get("flwr_note", "not run")] * 3
    return "| " + " | ".join(cells + [f"{row['load_avg']:.1f}"]) + " |"


def header(baseline: str | None) -> str:
    cols = [
        "P",
        "N",
        "GB of updates",
        "sha256sum",
        "openssl dgst -sha256",
        "fedcli aggregate (verify + FedAvg + publish)",
        "fedcli peak RSS MB (+ over base)",
    ]
    if baseline:
        cols += [f"fedcli at {baseline} (before)", f"at {baseline}: peak RSS MB (+ over base)"]
    cols += ["Flower aggregate()", "Flower load", "Flower peak RSS MB (+ over base)", "load avg"]
    return "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="1e6,1e7", help="model sizes P, comma-separated")
    ap.add_argument("--banks", default="10,100", help="numbers of updates N, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fedcli-bench-aggregate"))
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument(
        "--flower-max-gb",
        type=float,
        default=2.5,
        help="skip Flower above this many GB of updates: it holds all N in memory (twice)",
    )
    ap.add_argument("--json", type=Path, help="also append raw rows here")
    ap.add_argument("--baseline", metavar="REF", help="also time fedcli as of this git ref (e.g. main): before/after")
    args = ap.parse_args()
    sizes = [int(float(x)) for x in args.params.split(",")]
    banks = sorted(int(x) for x in args.banks.split(","))
    sys.path.insert(0, str(ROOT))
    print(machine())
    baseline = export_ref(args.baseline, args.workdir) if args.baseline else None
    print(header(args.baseline))
    for p in sizes:
        root = args.workdir / f"p{p}"
        info = build(root, p, max(banks))
        for n in banks:
            files = write_updates(root, n)
            visible_updates(root, n)
            too_big = sum(f.stat().st_size for f in files) / 1e9 > args.flower_max_gb
            row = measure(root, files, args.runs, not args.no_flower and not too_big, baseline)
            row.update(params=info["params"], banks=n)
            if too_big and not args.no_flower:
                row["flwr_note"] = f"skipped (> {args.flower_max_gb:g} GB in RAM)"
            print(fmt(row), flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_fedcli":
        print(json.dumps(child_fedcli(Path(sys.argv[2]))))
    else:
        main()
