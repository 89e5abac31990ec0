"""The exchange never loses or corrupts a round: S3 backends, overlapping cron runs, crashed writers."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import BANKS, ROOT, make_fed, use_s3
from rich.console import Console

from fedcli.errors import ExitCode
from fedcli.protocol import rounds
from fedcli.store import open_store


@pytest.fixture(params=["folder", pytest.param("moto", marks=pytest.mark.slow)])  # rounds on moto: 2-3 s a test
def any_fed(request, tmp_path, credit_split, monkeypatch):
    """A fresh federation on a folder or on a real (moto) S3 server."""
    url = None if request.param == "folder" else use_s3(request.getfixturevalue("moto_s3"), monkeypatch)
    return make_fed(tmp_path, credit_split, url=url)


@pytest.fixture
def s3_fed(tmp_path, credit_split, monkeypatch, moto_s3):
    return make_fed(tmp_path, credit_split, url=use_s3(moto_s3, monkeypatch))


def _published(fed) -> list[int]:
    return rounds.global_rounds(open_store(fed.loc))


def test_overlapping_aggregate_runs_publish_exactly_one_round(any_fed):
    """Three runs start together (overlapping cron): one publishes round 1, the others publish nothing."""
    from fedcli.coordinator.step import aggregate_round
    from fedcli.errors import FedcliError

    for b in BANKS[:3]:
        any_fed.train(b)
    barrier = threading.Barrier(3)
    outcomes = []

    def run() -> None:
        store = open_store(any_fed.loc)  # each run opens its own store, as separate processes do
        barrier.wait()
        try:
            res = aggregate_round(store, any_fed.key("coordinator"), Console(file=io.StringIO()))
            outcomes.append("published" if res.published else "waiting")
        except FedcliError as e:
            outcomes.append(f"exit {e.exit_code}: {e}")

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert outcomes.count("published") == 1, outcomes
    # the others either found the lock held (exit 3) or, arriving later, found round 1 done
    assert all(
        o == "waiting" or o.startswith(f"exit {ExitCode.WAITING}: another run holds")
        for o in outcomes
        if o != "published"
    )
    assert _published(any_fed) == [0, 1]
    # the published round is intact: every bank can verify it and train on it
    assert "submitted update for round 2" in any_fed.train("bank-a").output


def test_crashed_aggregate_leaves_no_round_and_a_rerun_completes(any_fed):
    """Coordinator died after uploading half the global tensors, holding the lock."""
    for b in BANKS[:3]:
        any_fed.train(b)
    store = open_store(any_fed.loc)
    tkey, mkey = rounds.global_keys(1)
    store.put(tkey, b'\x10\x00\x00\x00\x00\x00\x00\x00{"0.weight":')  # torn upload, no manifest
    dead = {"state": "held", "owner": "dead", "host": "cron-host", "pid": 4242, "at": 0, "expires": time.time() + 3600}
    store.put("locks/aggregate/000000000001.json", json.dumps(dead).encode())
    assert _published(any_fed) == [0]  # tensors without a manifest are not a round
    res = any_fed.train("bank-a")  # banks still see round 0 as the latest: nothing to do
    assert "already submitted" in res.output
    res = any_fed.aggregate(code=ExitCode.WAITING)  # the dead run's lease has not expired yet
    assert "cron-host" in res.output and "pid 4242" in res.output
    assert not store.exists(mkey)
    dead["expires"] = time.time() - 1  # ... now it has
    store.put("locks/aggregate/000000000002.json", json.dumps(dead).encode())
    assert "published global model of round 1" in any_fed.aggregate().output
    assert "submitted update for round 2" in any_fed.train("bank-b").output  # the new global verifies


def test_bank_crash_before_manifest_is_ignored_and_rerun_completes(s3_fed):
    """Tensors without a manifest (upload in progress or crashed) never count; the bank's rerun fixes it."""
    for b in BANKS[:2]:
        s3_fed.train(b)
    store = open_store(s3_fed.loc)
    tkey, mkey = rounds.update_keys(1, "bank-c")
    store.put(tkey, b"\x80\x04 half an upload")
    res = s3_fed.aggregate(code=ExitCode.WAITING)
    assert "incomplete" in res.output and "2 of 3 required" in res.output
    assert "submitted update for round 1" in s3_fed.train("bank-c").output
    res = s3_fed.aggregate()
    assert "published global model of round 1 from 3 updates" in res.output
    contributors = json.loads(store.get(rounds.global_keys(1)[1], max_bytes=1 << 30))["contributors"]
    assert "bank-c" in [c["member"] for c in contributors]


@pytest.mark.parametrize("any_fed, damage", [("folder", "truncated"), ("moto", "missing")], indirect=["any_fed"])
def test_committed_update_with_damaged_tensors_is_quarantined(any_fed, damage):
    """A manifest whose tensors are truncated or gone is rejected with its reason; the round completes."""
    for b in BANKS:
        any_fed.train(b)
    store = open_store(any_fed.loc)
    tkey, mkey = rounds.update_keys(1, "bank-d")
    if damage == "truncated":
        store.put(tkey, store.get(tkey, max_bytes=1 << 30)[:100])
    else:
        store.delete(tkey)
    res = any_fed.aggregate()
    assert "published global model of round 1 from 3 updates" in res.output
    reason = rounds.read_rejections(store, 1)["bank-d"]
    assert ("do not match the sha256" if damage == "truncated" else "tensor file is missing") in reason
    assert store.exists(mkey)  # kept for forensics, never deleted


@pytest.mark.slow
def test_killed_bank_run_leaves_a_consistent_store(s3_fed):
    """SIGKILL a real `fedcli train` as soon as its upload starts; whatever state that leaves, a rerun completes."""
    for b in BANKS[:2]:
        s3_fed.train(b)
    store = open_store(s3_fed.loc)
    tkey, mkey = rounds.update_keys(1, "bank-c")
    cmd = [
        sys.executable,
        "-m",
        "fedcli.cli",
        "train",
        "--store",
        s3_fed.loc,
        "--key",
        str(s3_fed.key("bank-c")),
        "--data",
        str(s3_fed.data / "bank-c.csv"),
        "--coordinator",
        str(s3_fed.pub("coordinator")),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while proc.poll() is None and not store.exists(tkey) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not store.exists(mkey) or store.exists(tkey)  # a manifest never appears before its tensors
    if store.exists(mkey):
        assert "already submitted" in s3_fed.train("bank-c").output
    else:
        assert "submitted update for round 1" in s3_fed.train("bank-c").output
    res = s3_fed.aggregate()
    assert "published global model of round 1 from 3 updates" in res.output
    assert rounds.read_rejections(store, 1) == {}
