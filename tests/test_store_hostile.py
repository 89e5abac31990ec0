"""The shared folder as an attacker with write access would leave it: links, FIFOs, folders
where files belong, planted lock records. Every case ends in a refusal (one line, exit 4) or
the hostile file being ignored, never a traceback, a hang, a read of what a link points to,
or a write outside the store."""

import json
import os
import threading
import time

import pytest
from helpers import BANKS, FAST_RETRY, make_fed, s3_store_on
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcli.errors import ExitCode, FedcliError, NotRegular, Oversize
from fedcli.names import check_key
from fedcli.store.folder import FolderStore
from fedcli.store.lock import LeaseLock, LockHeld

LOCK = "locks/aggregate"


def refused(res, code=ExitCode.VERIFY, *words):
    """One clear line with the exit code: no traceback, and each of `words` in the message."""
    assert res.exit_code == code, f"exit {res.exit_code} != {code}\n{res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith(("error:", "waiting:"))]
    assert len(lines) == 1, res.output
    for word in words:
        assert word in " ".join(res.output.split()), res.output
    return res


def clean(res):
    """Exit 0 or 4, and never a traceback either way."""
    assert res.exit_code in (0, ExitCode.VERIFY), f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res


def within(seconds, fn, fifo):
    """Run fn in a thread; if it blocks on the planted FIFO, unblock it and fail instead of hanging."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees end of file
        thread.join(10)
        pytest.fail("blocked on a planted FIFO")
    if "error" in box:
        raise box["error"]
    return box["value"]


def bounded(fed, *args, fifo):
    return within(60, lambda: fed.cli(*args, code=None), fifo)


@pytest.fixture
def hfed(tmp_path, credit_split):
    return make_fed(tmp_path / "fed", credit_split)


# -- the store itself -----------------------------------------------------------------


def test_folder_store_refuses_links_everywhere(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "coordinator.key"
    secret.write_bytes(b"PRIVATE KEY BYTES")
    store = FolderStore(tmp_path / "store", policy=FAST_RETRY)
    store.put("rounds/000000/global.json", b"{}")
    (tmp_path / "store/rounds/000000/rejections.json").symlink_to(secret)
    (tmp_path / "store/rounds/000001").symlink_to(outside, target_is_directory=True)

    key = "rounds/000000/rejections.json"
    calls = [
        lambda: store.get(key, max_bytes=1 << 20),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: list(store.read_into(key, memoryview(bytearray(64)))),
        lambda: store.put(key, b"x"),
        lambda: store.put(key, b"x", create_only=True),
    ]
    for call in calls:
        with pytest.raises(NotRegular) as info:
            call()
        assert info.value.exit_code == ExitCode.VERIFY and info.value.reason == "not-regular"
        assert str(info.value) == (
            f"{key} in {store.url} is a symbolic link; a store path must be a regular file: refusing to follow it"
        )
    for call in [
        lambda: store.put("rounds/000001/updates/bank-a.json", b"x"),
        lambda: store.get("rounds/000001/coordinator.key", max_bytes=1 << 20),
        lambda: store.exists("rounds/000001/coordinator.key"),
        lambda: store.list("rounds/000001/updates"),
    ]:
        with pytest.raises(NotRegular, match="rounds/000001 in .* is a symbolic link; a store folder must be a real"):
            call()
    # listing reports the links (so readers refuse them) but never descends into the linked folder
    assert store.list() == ["rounds/000000/global.json", key, "rounds/000001"]
    store.delete(key)  # removes the link itself, not what it points to
    assert not os.path.lexists(tmp_path / "store" / key) and secret.read_bytes() == b"PRIVATE KEY BYTES"
    assert sorted(p.name for p in outside.iterdir()) == ["coordinator.key"]


def test_folder_store_refuses_fifos_and_folders_without_blocking(tmp_path):
    store = FolderStore(tmp_path / "store", policy=FAST_RETRY)
    store.put("rounds/000000/global.json", b"{}")
    os.mkfifo(tmp_path / "store/rounds/000000/rejections.json")
    (tmp_path / "store/rounds/000000/global.safetensors").mkdir()
    fifo = tmp_path / "store/rounds/000000/rejections.json"
    for key, kind in [("rounds/000000/rejections.json", "a FIFO"), ("rounds/000000/global.safetensors", "a folder")]:
        for call in [
            lambda k=key: store.get(k, max_bytes=1 << 20),
            lambda k=key: store.size(k),
            lambda k=key: store.exists(k),
            lambda k=key: list(store.read_into(k, memoryview(bytearray(64)))),
        ]:
            with pytest.raises(NotRegular, match=f"is {kind}.*a store path must be a regular file: refusing to read"):
                within(5, call, fifo)


def test_store_root_may_be_a_link(tmp_path):
    """The root is resolved once when opened (documented); only paths inside are walked link-free."""
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real", target_is_directory=True)
    store = FolderStore(tmp_path / "via")
    store.put("federation.toml", b"x")
    assert store.url == str(tmp_path / "real") and (tmp_path / "real/federation.toml").read_bytes() == b"x"


def test_s3_oversize_object_is_refused_before_its_body_is_read(moto_s3, monkeypatch):
    store = s3_store_on(moto_s3, monkeypatch)
    store.put("rounds/000000/rejections.json", b"x" * (4 << 20))
    with pytest.raises(Oversize) as info:
        store.get("rounds/000000/rejections.json", max_bytes=64 * 1024)
    # the size in the message is the one the server announced, before any of the body was read
    assert "is 4,194,304 bytes, more than the 65,536 allowed; not read" in str(info.value)
    assert info.value.exit_code == ExitCode.VERIFY and info.value.reason == "oversize"


@pytest.mark.parametrize("key", ["rounds/x\n", "rounds/../x", "rounds/.hidden", "rounds/a b", "x" * 2000])
def test_check_key_gates_odd_names(tmp_path, key):
    store = FolderStore(tmp_path / "store")
    with pytest.raises(FedcliError, match="invalid store path"):
        store.put(key, b"x")
    assert not (tmp_path / "store").exists() or store.list() == []


# -- through the CLI --------------------------------------------------------------------


def test_link_to_coordinator_key_at_rejections_is_never_read(hfed, tmp_path):
    secret = hfed.key("coordinator").read_bytes()
    (hfed.store / "rounds/000000/rejections.json").symlink_to(hfed.key("coordinator"))
    res = clean(hfed.cli("status", hfed.store, code=None))  # refused, or shown as not readable
    assert secret.decode() not in res.output
    if res.exit_code:
        refused(res, ExitCode.VERIFY, "rejections.json", "symbolic link", "refusing to follow")
    out = tmp_path / "global.bundle"
    res = clean(
        hfed.cli("bundle", "export", "--store", hfed.store, "--key", hfed.key("coordinator"), "--out", out, code=None)
    )
    if res.exit_code:
        refused(res, ExitCode.VERIFY, "rejections.json", "symbolic link")
    else:
        assert secret not in out.read_bytes()
    for b in BANKS[:3]:
        hfed.train(b)
    res = clean(hfed.aggregate(code=None))
    assert secret.decode() not in res.output
    assert secret not in b"".join(p.read_bytes() for p in hfed.store.rglob("*") if p.is_file() and not p.is_symlink())


def test_link_at_a_bank_update_to_its_customer_table_is_never_read(hfed):
    for b in BANKS[:4]:
        hfed.train(b)
    tensors = hfed.store / "rounds/000001/updates/bank-a.safetensors"
    tensors.unlink()
    tensors.symlink_to(hfed.data / "bank-a.csv")
    res = clean(hfed.aggregate(code=None))
    if res.exit_code == 0:  # the other three make quorum; bank-a's update is rejected with the reason
        manifest = json.loads((hfed.store / "rounds/000001/global.json").read_text())
        assert "bank-a" not in [c["member"] for c in manifest["contributors"]]
        rejections = (hfed.store / "rounds/000001/rejections.json").read_text()
        assert "bank-a" in rejections and "symbolic link" in rejections
    else:
        refused(res, ExitCode.VERIFY, "bank-a.safetensors", "symbolic link")
    row = (hfed.data / "bank-a.csv").read_text().splitlines()[1]  # a customer's record
    assert row not in res.output
    assert not any(row in p.read_text("latin-1") for p in hfed.store.rglob("*.json") if not p.is_symlink())


def test_bank_bundle_export_never_packs_what_its_update_links_to(hfed, tmp_path):
    hfed.train("bank-a")
    tensors = hfed.store / "rounds/000001/updates/bank-a.safetensors"
    tensors.unlink()
    tensors.symlink_to(hfed.data / "bank-a.csv")
    out = tmp_path / "a.bundle"
    res = refused(
        hfed.cli("bundle", "export", "--store", hfed.store, "--key", hfed.key("bank-a"), "--out", out, code=None),
        ExitCode.VERIFY,
        "bank-a.safetensors",
        "symbolic link",
    )
    row = (hfed.data / "bank-a.csv").read_text().splitlines()[1]
    assert row not in res.output
    assert not out.exists() or row.encode() not in out.read_bytes()


@pytest.mark.parametrize("linked", ["rounds/000001", "rounds/000001/updates"])
def test_linked_round_folder_makes_train_and_aggregate_refuse_without_writing_outside(hfed, tmp_path, linked):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = hfed.store / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    refused(hfed.train("bank-a", code=None), ExitCode.VERIFY, linked, "symbolic link")
    refused(hfed.aggregate(code=None), ExitCode.VERIFY, linked, "symbolic link")
    assert list(outside.iterdir()) == []


def test_linked_lock_folder_makes_aggregate_refuse_without_writing_outside(hfed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (hfed.store / "locks").mkdir()
    (hfed.store / LOCK).symlink_to(outside, target_is_directory=True)
    for b in BANKS[:3]:
        hfed.train(b)
    refused(hfed.aggregate(code=None), ExitCode.VERIFY, LOCK, "symbolic link")
    assert list(outside.iterdir()) == []


def test_fifo_planted_where_a_file_belongs_is_refused_without_hanging(hfed):
    fifo = hfed.store / "rounds/000000/rejections.json"
    os.mkfifo(fifo)
    res = clean(bounded(hfed, "status", hfed.store, fifo=fifo))  # refused, or shown as not readable
    if res.exit_code:
        refused(res, ExitCode.VERIFY, "rejections.json", "FIFO")
    for b in BANKS[:4]:
        hfed.train(b)
    tensors = hfed.store / "rounds/000001/updates/bank-b.safetensors"
    tensors.unlink()
    os.mkfifo(tensors)
    res = clean(bounded(hfed, "aggregate", "--store", hfed.store, "--key", hfed.key("coordinator"), fifo=tensors))
    if res.exit_code == 0:
        assert "bank-b" in (hfed.store / "rounds/000001/rejections.json").read_text()
    else:
        refused(res, ExitCode.VERIFY, "FIFO")


def test_folder_planted_as_a_bank_manifest_is_not_already_submitted(hfed):
    (hfed.store / "rounds/000001/updates/bank-a.json").mkdir(parents=True)
    res = refused(hfed.train("bank-a", code=None), ExitCode.VERIFY, "bank-a.json", "is a folder")
    assert "already submitted" not in res.output


# -- planted lock records -----------------------------------------------------------------


def _plant(fed, gen: int, data: bytes) -> os.PathLike:
    path = fed.store / LOCK / f"{gen:012d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _record(**over) -> bytes:
    now = time.time()
    rec = {"state": "held", "owner": "ab" * 16, "host": "mallory", "pid": 4242, "at": now, "expires": now + 600}
    return json.dumps({**rec, **over}).encode()


def test_nested_and_sparse_lock_records_count_as_expired(hfed, caplog):
    _plant(hfed, 1, b"[" * 2000 + b"]" * 2000)
    sparse = _plant(hfed, 2, b"")
    os.truncate(sparse, 2 << 30)  # 2 GiB, no disk used
    for b in BANKS[:3]:
        hfed.train(b)
    with caplog.at_level("WARNING", logger="fedcli.store"):
        res = hfed.aggregate(code=None)
    assert res.exit_code == 0, res.output
    assert "published global model of round 1" in res.output
    warned = [r.getMessage() for r in caplog.records if "ignoring the aggregate lock record" in r.getMessage()]
    assert any("2,147,483,648 bytes" in w for w in warned), warned
    assert all("\n" not in w for w in warned)


def test_lease_planted_far_in_the_future_is_taken_over(hfed, caplog):
    _plant(hfed, 1, _record(expires=253402300799.0))  # 9999-12-31
    for b in BANKS[:3]:
        hfed.train(b)
    with caplog.at_level("WARNING", logger="fedcli.store"):
        res = hfed.aggregate(code=None)
    assert res.exit_code == 0 and "published global model of round 1" in res.output, res.output
    assert any("ignoring the aggregate lock record" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "bad",
    [
        {"expires": time.time() + 86400},  # a day ahead: more than 10 default lease times
        {"state": "HELD"},
        {"owner": "[/x]"},
        {"pid": 10**30},
        {"host": "a" * 300},
        {"extra": 1},
        {"expires": "soon"},
    ],
)
def test_malformed_lock_records_never_hold_the_lock(tmp_path, bad):
    store = FolderStore(tmp_path / "store", policy=FAST_RETRY)
    store.put(f"{LOCK}/000000000001.json", _record(**bad))
    LeaseLock(store, "aggregate").acquire().check()


def test_a_live_lease_still_holds(hfed):
    """The contract does not weaken the lock: a well-formed live lease makes aggregate wait."""
    _plant(hfed, 1, _record())
    res = refused(hfed.aggregate(code=None), ExitCode.WAITING, "another run holds the aggregate lock", "mallory")
    assert "try again later" in res.output
    with pytest.raises(LockHeld):
        LeaseLock(FolderStore(hfed.store), "aggregate").acquire()


def test_lock_generation_overflow_is_a_clear_refusal(hfed):
    _plant(hfed, 10**12 - 1, _record(state="free"))
    refused(hfed.aggregate(code=None), ExitCode.VERIFY, "12 digits", "remove locks/aggregate/")


@pytest.mark.parametrize("kind", ["a symbolic link", "a FIFO", "a folder"])
def test_linked_fifo_or_folder_lock_record_counts_as_expired(tmp_path, caplog, kind):
    store = FolderStore(tmp_path / "store", policy=FAST_RETRY)
    store.put(f"{LOCK}/000000000001.json", _record(expires=time.time() - 1))
    top = tmp_path / "store" / LOCK / "000000000002.json"
    if kind == "a symbolic link":  # to a live lease elsewhere: must not be believed
        (tmp_path / "elsewhere.json").write_bytes(_record())
        top.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "a FIFO":
        os.mkfifo(top)
    else:
        top.mkdir()
    with caplog.at_level("WARNING", logger="fedcli.store"):
        lock = within(10, LeaseLock(store, "aggregate").acquire, top)
    lock.check()
    assert lock.gen == 3 and any(f"is {kind}" in r.getMessage() for r in caplog.records)


def test_planted_folders_on_lock_numbers_are_skipped_then_refused_clearly(tmp_path):
    store = FolderStore(tmp_path / "store", policy=FAST_RETRY)
    lock = LeaseLock(store, "aggregate").acquire()  # record 1
    (tmp_path / "store" / LOCK / "000000000002.json").mkdir()  # blocks the release record
    lock.release()  # a warning, not a crash: the lease runs out by itself
    for gen in range(3, 12):
        (tmp_path / "store" / LOCK / f"{gen:012d}.json").mkdir()
    with pytest.raises(FedcliError, match="records in a row that are not files: when no run is active, remove") as info:
        LeaseLock(store, "aggregate", clock=lambda: time.time() + 3600).acquire()
    assert info.value.exit_code == ExitCode.VERIFY


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(alphabet=st.sampled_from("ab0./-_\n\\ ~:"), max_size=24))
def test_any_key_check_key_accepts_stays_inside_the_store(tmp_path, key):
    try:
        check_key(key)
    except FedcliError:
        return
    store = tmp_path / "store"
    assert (store / key).resolve().is_relative_to(store.resolve())
    assert not key.startswith("/") and ".." not in key.split("/") and "\n" not in key
