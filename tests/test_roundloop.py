"""The whole round loop through the CLI on a shared folder."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from helpers import BANKS, ROOT, make_fed
from safetensors.numpy import load_file

from fedcli import keys
from fedcli.cli import app
from fedcli.errors import ExitCode, InputError


def test_full_rounds_status_evaluate_predict(fed, tmp_path):
    for r in (1, 2):
        for b in BANKS:
            res = fed.train(b)
            assert f"submitted update for round {r}" in res.output
        res = fed.aggregate()
        assert f"published global model of round {r}" in res.output
        manifest = json.loads((fed.store / f"rounds/{r:06d}/global.json").read_text())
        assert sorted(c["member"] for c in manifest["contributors"]) == sorted(BANKS)
    g1 = json.loads((fed.store / "rounds/000001/global.json").read_text())
    g2 = json.loads((fed.store / "rounds/000002/global.json").read_text())
    assert g2["prev_sha256"] == g1["tensors_sha256"]

    res = fed.cli("status", fed.store)
    assert "published" in res.output and "4/4" in res.output

    res = fed.evaluate(fed.data / "test.csv")
    assert "round 2" in res.output and "auc" in res.output
    out = tmp_path / "scores.csv"
    fed.predict(fed.data / "test.csv", out)
    import pandas as pd

    scores = pd.read_csv(out)["score"]
    assert len(scores) > 1000 and scores.between(0, 1).all() and scores.std() > 0.05


def test_train_twice_is_a_noop(fed):
    fed.train("bank-a")
    before = (fed.store / "rounds/000001/updates/bank-a.json").read_bytes()
    res = fed.train("bank-a")
    assert "already submitted" in res.output
    assert (fed.store / "rounds/000001/updates/bank-a.json").read_bytes() == before


def test_waiting_for_quorum_exit_code(fed):
    fed.train("bank-a")
    res = fed.aggregate(code=ExitCode.WAITING)
    assert "1 of 3 required" in res.output
    assert not (fed.store / "rounds/000001/global.json").exists()
    fed.train("bank-b")
    fed.train("bank-c")
    fed.aggregate(code=0)


def test_fedavg_published_global_is_weighted_mean(fed):
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    base = load_file(fed.store / "rounds/000000/global.safetensors")
    new = load_file(fed.store / "rounds/000001/global.safetensors")
    deltas, weights = [], []
    for b in BANKS[:3]:
        deltas.append(load_file(fed.store / f"rounds/000001/updates/{b}.safetensors"))
        weights.append(json.loads((fed.store / f"rounds/000001/updates/{b}.json").read_text())["num_examples"])
    for name in base:
        by_hand = base[name].astype(np.float64) + sum(
            w * d[name].astype(np.float64) for w, d in zip(weights, deltas, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(new[name], by_hand.astype(np.float32), rtol=0, atol=1e-7)


def test_init_is_reproducible_and_refuses_twice(tmp_path, credit_split):
    a = make_fed(tmp_path / "a", credit_split)
    b = make_fed(tmp_path / "b", credit_split)
    ga = (a.store / "rounds/000000/global.safetensors").read_bytes()
    assert ga == (b.store / "rounds/000000/global.safetensors").read_bytes()
    res = a.cli(
        "init",
        a.store,
        "--spec",
        a.root / "federation.toml",
        "--key",
        a.key("coordinator"),
        "--member",
        a.pub("bank-a"),
        code=1,
    )
    assert "already holds a federation" in res.output


def test_keygen_permissions_passphrase_and_fingerprint(fed, tmp_path, monkeypatch):
    mode = stat.S_IMODE(os.stat(fed.key("bank-a")).st_mode)
    assert mode == 0o600
    monkeypatch.delenv("FEDCLI_PASSPHRASE", raising=False)
    # no passphrase in env and none typed: keygen stops and writes no key
    res = fed.cli("keygen", "bank-x", "--out", tmp_path / "x", "--encrypt", code=1)
    assert "Aborted" in res.output and not (tmp_path / "x" / "bank-x.key").exists()
    # no passphrase in env: prompted; CliRunner feeds it
    res = fed.runner.invoke(
        app,
        ["keygen", "bank-y", "--out", str(tmp_path / "y"), "--encrypt"],
        input="s3cret\ns3cret\n",
    )
    assert res.exit_code == 0 and "encrypted" in res.output

    fp = keys.load_public(tmp_path / "y" / "bank-y.pub").fingerprint
    assert fp in res.output and len(fp.replace(" ", "")) == 16
    with pytest.raises(InputError, match="bank-y.key is passphrase-protected: set FEDCLI_PASSPHRASE"):
        keys.load_private(tmp_path / "y" / "bank-y.key")
    monkeypatch.setenv("FEDCLI_PASSPHRASE", "s3cret")
    keys.load_private(tmp_path / "y" / "bank-y.key")
    res = fed.cli("keygen", "bank-a", "--out", fed.root / "bank-a", code=1)
    assert "refusing to overwrite" in res.output
    res = fed.cli("keygen", "../evil", code=1)
    assert "invalid key name" in res.output


def test_help_does_not_import_torch():
    code = "import sys; from fedcli.cli import app; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False False"


def test_bank_refuses_wrong_pinned_coordinator_and_tampered_global(fed):
    fed.cli("keygen", "impostor", "--out", fed.root / "impostor")
    res = fed.cli(
        "train",
        "--store",
        fed.store,
        "--key",
        fed.key("bank-a"),
        "--data",
        fed.data / "bank-a.csv",
        "--coordinator",
        fed.pub("impostor"),
        code=ExitCode.VERIFY,
    )
    assert "refusing to trust" in res.output
    g = fed.store / "rounds/000000/global.safetensors"
    data = bytearray(g.read_bytes())
    data[-1] ^= 1
    g.write_bytes(bytes(data))
    res = fed.train("bank-a", code=ExitCode.VERIFY)
    assert "do not match the sha256" in res.output
    assert not (fed.store / "rounds/000001/updates/bank-a.json").exists()


def test_bank_detects_rollback(fed):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    fed.train("bank-a")  # bank-a has now seen round 1
    # an attacker with write access removes round 1 (rolls the store back)
    for p in sorted((fed.store / "rounds/000001").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (fed.store / "rounds/000001").rmdir()
    res = fed.train("bank-a", code=ExitCode.VERIFY)
    assert "rollback" in res.output


def test_unenrolled_key_and_bad_data_are_clear_errors(fed, tmp_path):
    fed.cli("keygen", "stranger", "--out", tmp_path / "s")
    res = fed.cli(
        "train",
        "--store",
        fed.store,
        "--key",
        tmp_path / "s" / "stranger.key",
        "--data",
        fed.data / "bank-a.csv",
        "--coordinator",
        fed.pub("coordinator"),
        code=1,
    )
    assert "not enrolled" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("Status,Age\nbad,30\n")
    res = fed.train("bank-a", data=bad, code=1)
    assert "lacks columns" in res.output and "Seniority" in res.output
    res = fed.train("bank-a", data=tmp_path / "nope.csv", code=1)
    assert "does not exist" in res.output
    res = fed.cli("status", tmp_path / "empty", code=1)
    assert "no federation" in res.output
