"""Strategies through the real CLI: robust rule + server optimiser + compression, async mode, spec errors."""

import json

import numpy as np
from helpers import BANKS, TEMPLATE, bank_dir, forge, make_fed
from safetensors.numpy import load_file

from fedcli import digest
from fedcli.aggregation import rules, server_opt
from fedcli.errors import ExitCode
from fedcli.norms import clip_factor, update_norm
from fedcli.protocol import compression


def read_json(path):
    return json.loads(path.read_text())


def test_trimmed_mean_fedadam_int8_over_two_rounds(tmp_path, credit_split):
    fed = make_fed(
        tmp_path,
        credit_split,
        TEMPLATE
        + """
[strategy]
rule = "trimmed_mean"
trim_ratio = 0.25
max_norm = 5.0
prox_mu = 0.01
[strategy.server]
optimizer = "fedadam"
lr = 0.05
[strategy.compression]
method = "int8"
""",
    )
    for b in BANKS:
        assert "int8" in fed.train(b).output
    assert "(rule trimmed_mean, server fedadam)" in fed.aggregate().output
    g0 = load_file(fed.store / "rounds/000000/global.safetensors")
    upd = load_file(fed.store / "rounds/000001/updates/bank-a.safetensors")
    assert {k for k in upd} == {f"{k}#{s}" for k in g0 for s in ("q8", "scale")}
    assert all(upd[f"{k}#q8"].dtype == np.int8 for k in g0)
    m = read_json(fed.store / "rounds/000001/updates/bank-a.json")
    assert m["compression"] == {"method": "int8"}
    # error feedback stays at the bank, next to its state file, and never reaches the store
    residual = load_file(bank_dir(fed, "bank-a") / "state.residual.safetensors")
    assert set(residual) == set(g0) and any(np.abs(v).max() > 0 for v in residual.values())
    assert not [p for p in fed.store.rglob("*") if "residual" in p.name]

    g1_manifest = read_json(fed.store / "rounds/000001/global.json")
    assert g1_manifest["rule"] == "trimmed_mean" and g1_manifest["server_optimizer"] == "fedadam"
    state_file = fed.store / "rounds/000001/server_state.safetensors"
    assert g1_manifest["server_state_sha256"] == digest.sha256(state_file.read_bytes())
    sizes = [c["bytes"] for c in g1_manifest["contributors"]]
    assert len(sizes) == 4 and all(
        s == (fed.store / "rounds/000001/updates/bank-a.safetensors").stat().st_size for s in sizes
    )

    # round 2, recomputed by hand from the files: decode, bound norms, trim, FedAdam with round 1's state
    for b in BANKS:
        fed.train(b)
    g1 = load_file(fed.store / "rounds/000001/global.safetensors")
    shapes = {k: v.shape for k, v in g1.items()}
    deltas = []
    for b in BANKS:
        dec = compression.decode(
            load_file(fed.store / f"rounds/000002/updates/{b}.safetensors"), {"method": "int8"}, shapes
        )
        factor = clip_factor(update_norm(dec), 5.0)  # norm bounding, as the aggregator scales
        deltas.append({k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in dec.items()})
    agg = rules.trimmed_mean(shapes, 4, rules.memory_reader(deltas), 0.25)
    state1 = server_opt.state_from_bytes(state_file.read_bytes(), "fedadam", 1)
    want, _ = server_opt.fedadam(g1, agg, state1, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)

    # a tampered optimiser state is refused before anything is published
    good = state_file.read_bytes()
    state_file.write_bytes(good[:-4] + b"\0\0\0\0")
    res = fed.aggregate(code=ExitCode.VERIFY)
    assert "server optimizer state of round 1" in res.output
    assert not (fed.store / "rounds/000002/global.json").exists()
    state_file.write_bytes(good)
    fed.aggregate()
    g2 = load_file(fed.store / "rounds/000002/global.safetensors")
    for k in g2:
        np.testing.assert_allclose(g2[k], want[k], rtol=0, atol=1e-6)

    res = fed.cli("status", fed.store)
    per_round = 4 * (fed.store / "rounds/000002/updates/bank-a.safetensors").stat().st_size
    assert f"{per_round:,} B" in res.output
    payload = compression.wire_bytes(load_file(fed.store / "rounds/000002/updates/bank-a.safetensors"))
    assert payload == sum(v.size + 4 for v in g0.values())  # one byte per weight plus a float32 scale per tensor


def test_async_folds_a_stale_update_with_a_discount(tmp_path, credit_split):
    fed = make_fed(
        tmp_path,
        credit_split,
        TEMPLATE
        + """
[strategy]
mode = "async"
[strategy.async]
buffer_size = 2
max_staleness = 2
discount = "polynomial"
exponent = 0.5
""",
    )
    for b in ("bank-a", "bank-b", "bank-c"):
        fed.train(b)  # all three trained on global 0
    res = fed.aggregate()
    assert "published global model of round 1 from 2 updates (rule fedavg, server fedavg, async)" in res.output
    g1m = read_json(fed.store / "rounds/000001/global.json")
    assert [c["member"] for c in g1m["contributors"]] == ["bank-a", "bank-b"] and g1m["mode"] == "async"

    fed.train("bank-d")  # trained on global 1
    fed.aggregate()
    g2m = read_json(fed.store / "rounds/000002/global.json")
    by = {c["member"]: c for c in g2m["contributors"]}
    assert set(by) == {"bank-c", "bank-d"}
    assert by["bank-c"]["update_round"] == 1 and "update_round" not in by["bank-d"]
    assert by["bank-c"]["aggregation"] == {"staleness": 1, "discount": round(2**-0.5, 6)}

    g1 = load_file(fed.store / "rounds/000001/global.safetensors")
    g2 = load_file(fed.store / "rounds/000002/global.safetensors")
    dc = load_file(fed.store / "rounds/000001/updates/bank-c.safetensors")
    dd = load_file(fed.store / "rounds/000002/updates/bank-d.safetensors")
    nc, nd = by["bank-c"]["num_examples"], by["bank-d"]["num_examples"]
    for k in g2:
        by_hand = g1[k].astype(np.float64) + (nc * 2**-0.5 * dc[k].astype(np.float64) + nd * dd[k]) / (nc + nd)
        np.testing.assert_allclose(g2[k], by_hand.astype(np.float32), rtol=0, atol=1e-7)

    res = fed.aggregate(code=ExitCode.WAITING)  # bank-c's update was used once and is not folded again
    assert "0 of 2 buffered" in res.output


def test_bad_strategy_is_a_one_line_init_error(tmp_path, credit_split):
    fed = make_fed(tmp_path / "ok", credit_split)
    bad = tmp_path / "bad.toml"
    bad.write_text(TEMPLATE + '\n[strategy]\nrule = "krum"\n')
    res = fed.cli(
        "init",
        tmp_path / "store2",
        "--spec",
        bad,
        "--key",
        fed.key("coordinator"),
        *[x for b in BANKS for x in ("--member", fed.pub(b))],
        code=1,
    )
    assert "[strategy] krum with krum_f=1 needs at least 5 updates per round" in res.output
    assert not (tmp_path / "store2" / "rounds").exists()


def test_topk_updates_checked_before_use(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE + '\n[strategy.compression]\nmethod = "topk"\nratio = 0.1\n')
    assert "topk" in fed.train("bank-a").output
    upd = load_file(fed.store / "rounds/000001/updates/bank-a.safetensors")
    g0 = load_file(fed.store / "rounds/000000/global.safetensors")
    assert all(upd[f"{k}#idx"].size == -(-v.size // 10) for k, v in g0.items())  # ceil(10%) per tensor
    bad = dict(upd)
    k = next(iter(g0))
    bad[f"{k}#idx"] = bad[f"{k}#idx"].copy()
    bad[f"{k}#idx"][-1] = g0[k].size  # one past the end
    forge(fed, "bank-b", tensors=lambda _: bad, compression={"method": "topk", "ratio": 0.1})
    forge(fed, "bank-c", compression={"method": "none"})
    res = fed.aggregate(code=ExitCode.WAITING)
    rejections = read_json(fed.store / "rounds/000001/rejections.json")["entries"]
    assert "out of range" in rejections["bank-b"]["message"] and rejections["bank-b"]["reason"] == "malformed"
    assert "is not the spec's" in rejections["bank-c"]["message"]
    assert "1 of 3 required" in res.output


def test_fedprox_refused_with_record_level_dp(tmp_path, credit_split):
    fed = make_fed(tmp_path / "ok", credit_split)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        TEMPLATE
        + '\n[privacy]\nmode = "record"\nnoise_multiplier = 1.0\nbudget_epsilon = 10.0\n\n[strategy]\nprox_mu = 0.1\n'
    )
    res = fed.cli(
        "init",
        tmp_path / "store2",
        "--spec",
        bad,
        "--key",
        fed.key("coordinator"),
        *[x for b in BANKS for x in ("--member", fed.pub(b))],
        code=1,
    )
    assert "prox_mu (FedProx) is not supported with record-level DP" in res.output


def test_update_level_dp_with_median_and_int8(tmp_path, credit_split):
    fed = make_fed(
        tmp_path,
        credit_split,
        TEMPLATE
        + """
[privacy]
mode = "update"
noise_multiplier = 0.5
budget_epsilon = 1000.0

[strategy]
rule = "median"
[strategy.compression]
method = "int8"
""",
    )
    for b in BANKS[:3]:
        fed.train(b)
    assert "(rule median, server fedavg)" in fed.aggregate().output
    g1m = read_json(fed.store / "rounds/000001/global.json")
    assert len(g1m["contributors"]) == 3 and all(
        "num_examples" not in read_json(fed.store / f"rounds/000001/updates/{b}.json") for b in BANKS[:3]
    )
    # the published delta is the coordinate-wise median of the three decoded (noised) updates
    g0 = load_file(fed.store / "rounds/000000/global.safetensors")
    g1 = load_file(fed.store / "rounds/000001/global.safetensors")
    shapes = {k: v.shape for k, v in g0.items()}
    dec = [
        compression.decode(load_file(fed.store / f"rounds/000001/updates/{b}.safetensors"), {"method": "int8"}, shapes)
        for b in BANKS[:3]
    ]
    med = rules.coordinate_median(shapes, 3, rules.memory_reader(dec))
    for k in g1:
        np.testing.assert_allclose(g1[k], g0[k] + med[k], rtol=0, atol=1e-6)
