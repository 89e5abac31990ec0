"""The whole round loop through s3:// on real servers, and what users see when S3 misbehaves."""

import json

import pytest
from helpers import BANKS, FAST_RETRY, make_fed, use_s3
from s3server import FaultyProxy

from fedcli.errors import ExitCode
from fedcli.protocol import rounds
from fedcli.store import open_store


@pytest.mark.slow
@pytest.mark.parametrize("server", ["moto_s3", "seaweed_s3"])
def test_full_round_loop_on_s3(server, request, tmp_path, credit_split, monkeypatch):
    """init, train x4, aggregate, status, evaluate, all through s3:// on a real server."""
    srv = request.getfixturevalue(server)
    fed = make_fed(tmp_path, credit_split, url=use_s3(srv, monkeypatch))
    for r in (1, 2):
        for b in BANKS[:3]:  # the quorum: keeps the test short
            assert f"submitted update for round {r}" in fed.train(b).output
        assert f"published global model of round {r}" in fed.aggregate().output
    prefix = fed.url.split("/", 3)[3]
    listed = srv.client().list_objects_v2(Bucket=srv.bucket, Prefix=prefix + "/")["Contents"]
    keys = {o["Key"][len(prefix) + 1 :] for o in listed}
    assert {"federation.toml", "rounds/000002/global.json", "rounds/000002/updates/bank-c.safetensors"} <= keys
    store = open_store(fed.url)
    g1, g2 = (json.loads(store.get(rounds.global_keys(r)[1], max_bytes=1 << 30)) for r in (1, 2))
    assert g2["prev_sha256"] == g1["tensors_sha256"]
    res = fed.cli("status", fed.loc)
    assert "published" in res.output and "3/4" in res.output
    res = fed.cli(
        "evaluate", "--store", fed.loc, "--coordinator", fed.pub("coordinator"), "--data", fed.data / "test.csv"
    )
    assert "round 2" in res.output
    # the aggregate lock was released, not left behind
    top = sorted(k for k in store.list("locks/aggregate"))[-1]
    assert json.loads(store.get(top, max_bytes=1 << 30))["state"] == "free"


def test_store_down_is_exit_5_and_nothing_is_lost(moto_s3, tmp_path, credit_split, monkeypatch):
    """The S3 endpoint goes away: one clear line, exit 5; when it is back, the same command succeeds."""
    url = use_s3(moto_s3, monkeypatch)
    fed = make_fed(tmp_path, credit_split, url=url)
    proxy = FaultyProxy(int(moto_s3.endpoint.rsplit(":", 1)[1]), ["refuse"] * 1000)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setattr("fedcli.store.retry.DEFAULT_POLICY", FAST_RETRY)
        res = fed.train("bank-a", code=ExitCode.STORE)
        line = res.output.strip()
        assert line.startswith("error:") and "after 3 attempts" in line and proxy.endpoint.split("//")[1] in line
        assert "Traceback" not in res.output
    finally:
        proxy.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    assert "submitted update for round 1" in fed.train("bank-a").output


def test_tampered_global_on_s3_is_refused(moto_s3, tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, url=use_s3(moto_s3, monkeypatch))
    store = open_store(fed.url)
    tkey, _ = rounds.global_keys(0)
    data = bytearray(store.get(tkey, max_bytes=1 << 30))
    data[-1] ^= 1
    store.put(tkey, bytes(data))
    res = fed.train("bank-a", code=ExitCode.VERIFY)
    assert "do not match the sha256" in res.output


def test_check_store_command(seaweed_s3, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedcli.cli import app

    url = use_s3(seaweed_s3, monkeypatch)
    res = CliRunner().invoke(app, ["check-store", url])
    assert res.exit_code == 0 and "honours create-only writes" in res.output
    res = CliRunner().invoke(app, ["check-store", str(tmp_path / "shared")])
    assert res.exit_code == 0
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    res = CliRunner().invoke(app, ["check-store", url])
    assert res.exit_code == ExitCode.STORE and "access denied" in res.output
