"""Store backends (folder, S3 on real loopback servers), retries and the lease lock."""

import errno
import threading

import pytest
from helpers import FAST_RETRY, s3_store_on
from s3server import FaultyProxy, free_ports

from fedcli.errors import AlreadyExists, ExitCode, FedcliError, NotFound, StoreError
from fedcli.store import check_create_only, open_store
from fedcli.store.folder import FolderStore
from fedcli.store.folder import is_transient as folder_transient
from fedcli.store.lock import _KEEP, LeaseLock, LockHeld, LockLost
from fedcli.store.retry import RetryPolicy, with_retry
from fedcli.store.s3 import S3Store

# -- basic operations, every backend ---------------------------------------------------


def test_put_get_size_exists_roundtrip(store):
    data = bytes(range(256)) * 4096  # 1 MiB of every byte value
    store.put("rounds/000001/updates/bank-a.safetensors", data)
    assert store.get("rounds/000001/updates/bank-a.safetensors", max_bytes=1 << 30) == data
    assert store.size("rounds/000001/updates/bank-a.safetensors") == len(data)
    assert store.exists("rounds/000001/updates/bank-a.safetensors")
    assert not store.exists("rounds/000001/updates/bank-b.safetensors")


def test_plain_put_replaces(store):
    store.put("federation.toml", b"one")
    store.put("federation.toml", b"two")
    assert store.get("federation.toml", max_bytes=1 << 30) == b"two"


def test_create_only_refuses_overwrite(store):
    store.put("rounds/000000/global.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists) as info:
        store.put("rounds/000000/global.json", b"second", create_only=True)
    assert info.value.exit_code == 1 and "already exists" in str(info.value)
    assert store.get("rounds/000000/global.json", max_bytes=1 << 30) == b"first"


def race_create_only(store, key: str, writers: int = 8) -> tuple[list[int], list[int], list[Exception]]:
    """`writers` threads put `key` create-only at the same moment: who won, who was refused, what else failed."""
    barrier = threading.Barrier(writers)
    winners, losers, errors = [], [], []

    def write(i: int) -> None:
        body = f"writer {i} ".encode() * 5000
        barrier.wait()
        try:
            store.put(key, body, create_only=True)
            winners.append(i)
        except AlreadyExists:
            losers.append(i)
        except Exception as e:  # pragma: no cover - shown on failure
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return winners, losers, errors


@pytest.mark.parametrize(  # the SeaweedFS race takes 6-7 s; the folder and moto ones stay in the quick loop
    "any_store", ["folder", "moto", pytest.param("seaweedfs", marks=pytest.mark.slow)], indirect=True
)
def test_create_only_race_has_exactly_one_winner(any_store):
    """Eight writers race for the same key several times: each time one wins, intact."""
    for trial in range(3):
        key = f"rounds/{trial:06d}/global.json"
        winners, losers, errors = race_create_only(any_store, key)
        assert errors == []
        assert len(winners) == 1 and len(losers) == 7
        assert any_store.get(key, max_bytes=1 << 30) == f"writer {winners[0]} ".encode() * 5000


def test_missing_key_is_not_found(store):
    with pytest.raises(NotFound):
        store.get("rounds/000009/global.json", max_bytes=1 << 30)
    with pytest.raises(NotFound):
        store.size("rounds/000009/global.json")
    assert not store.exists("rounds/000009/global.json")
    store.delete("rounds/000009/global.json")  # deleting what is not there is fine


def test_delete(store):
    store.put("locks/x/1.json", b"{}")
    store.delete("locks/x/1.json")
    assert not store.exists("locks/x/1.json")
    assert store.list("locks") == []


def test_list_is_recursive_sorted_and_by_folder(store):
    keys = [
        "rounds/000001/updates/bank-b.json",
        "rounds/000001/updates/bank-a.json",
        "rounds/000001/global.json",
        "rounds/0000010/global.json",
        "federation.toml",
    ]
    for k in keys:
        store.put(k, b"x")
    assert store.list() == sorted(keys)
    # a prefix is a folder: rounds/000001 does not match rounds/0000010
    assert store.list("rounds/000001") == sorted(k for k in keys if k.startswith("rounds/000001/"))
    assert store.list("rounds/000001/updates/") == [
        "rounds/000001/updates/bank-a.json",
        "rounds/000001/updates/bank-b.json",
    ]
    assert store.list("rounds/000077") == []


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a//b", "a/./b", "a/../../b", "", ".hidden", "a b"])
def test_paths_that_could_escape_are_refused(store, bad, tmp_path):
    with pytest.raises(FedcliError, match="invalid store path"):
        store.put(bad, b"x")
    with pytest.raises(FedcliError, match="invalid store path"):
        store.get(bad, max_bytes=1 << 30)
    if bad:
        with pytest.raises(FedcliError, match="invalid store path"):
            store.list(bad)
    assert not (tmp_path / "escape").exists()


def test_s3_prefixes_are_isolated(moto_s3, monkeypatch):
    a, b = s3_store_on(moto_s3, monkeypatch), s3_store_on(moto_s3, monkeypatch)
    a.put("federation.toml", b"a")
    assert b.list() == []
    assert not b.exists("federation.toml")
    assert a.list() == ["federation.toml"]


def test_open_store_picks_backend(tmp_path, moto_s3, monkeypatch):
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    s3 = open_store(f"s3://{moto_s3.bucket}/fed/bank-x/")
    assert isinstance(s3, S3Store) and s3.prefix == "fed/bank-x" and str(s3) == f"s3://{moto_s3.bucket}/fed/bank-x"
    s3.put("a/b", b"1")
    assert moto_s3.client().get_object(Bucket=moto_s3.bucket, Key="fed/bank-x/a/b")["Body"].read() == b"1"
    assert isinstance(open_store(str(tmp_path)), FolderStore)


@pytest.mark.parametrize("url", ["s3://Bad_Bucket/x", "s3://b/x", "s3://bucket/../x", "s3://bucket/a//b"])
def test_bad_s3_urls_are_refused(url):
    with pytest.raises(FedcliError) as info:
        S3Store.from_url(url)
    assert info.value.exit_code == 1  # a typo in the command, not a store outage
    assert "invalid" in str(info.value)


def test_check_create_only_passes_on_real_backends(any_store):
    check_create_only(any_store)
    assert any_store.list() == []  # the probe cleans up after itself


class OverwritingStore(FolderStore):
    """A backend that ignores create_only, like an S3 server that ignores If-None-Match."""

    def put(self, key, data, *, create_only=False):
        super().put(key, data)


def test_check_create_only_catches_a_store_that_overwrites(tmp_path):
    with pytest.raises(StoreError, match="does not honour create-only writes"):
        check_create_only(OverwritingStore(tmp_path))
    assert list(tmp_path.rglob("create-only-*")) == []


# -- errors and retries ----------------------------------------------------------------


def test_with_retry_recovers_from_transient_errors():
    calls, sleeps = [], []

    def op():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EIO, "I/O error")
        return "done"

    policy = RetryPolicy(attempts=4, base=1.0, cap=3.0)
    assert with_retry(op, what="read x", transient=folder_transient, policy=policy, sleep=sleeps.append) == "done"
    assert len(calls) == 3
    assert len(sleeps) == 2 and 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # back-off grows


def test_with_retry_is_bounded_and_reports_clearly():
    sleeps = []

    def op():
        raise OSError(errno.ESTALE, "Stale file handle")

    policy = RetryPolicy(attempts=5, base=1.0, cap=2.0)
    with pytest.raises(StoreError) as info:
        with_retry(op, what="write rounds/x", transient=folder_transient, policy=policy, sleep=sleeps.append)
    assert info.value.exit_code == ExitCode.STORE
    assert "write rounds/x" in str(info.value) and "after 5 attempts" in str(info.value)
    assert len(sleeps) == 4 and max(sleeps) <= 2.0  # capped


def test_with_retry_does_not_retry_permanent_errors():
    calls = []

    def op():
        calls.append(1)
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):
        with_retry(op, what="x", transient=folder_transient, policy=FAST_RETRY, sleep=lambda s: None)
    assert len(calls) == 1


def test_folder_permanent_error_is_one_clear_store_error(tmp_path):
    (tmp_path / "rounds").write_bytes(b"a file where a folder should be")
    store = FolderStore(tmp_path, policy=FAST_RETRY)
    with pytest.raises(StoreError, match="cannot write rounds/000001/global.json") as info:
        store.put("rounds/000001/global.json", b"x")
    assert info.value.exit_code == ExitCode.STORE and "\n" not in str(info.value)
    with pytest.raises(StoreError, match="cannot read"):
        store.get("rounds/000001/global.json", max_bytes=1 << 30)


def test_s3_store_that_stays_down_fails_with_exit_5(monkeypatch):
    port = free_ports(1)[0]  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDX")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    store = S3Store.from_url("s3://fedcli-down/p", policy=FAST_RETRY)
    with pytest.raises(StoreError) as info:
        store.put("rounds/000001/global.json", b"x", create_only=True)
    msg = str(info.value)
    assert info.value.exit_code == ExitCode.STORE
    assert "after 3 attempts" in msg and f"127.0.0.1:{port}" in msg and "\n" not in msg


def _behind_proxy(srv, plan, monkeypatch) -> tuple[S3Store, FaultyProxy]:
    proxy = FaultyProxy(int(srv.endpoint.rsplit(":", 1)[1]), plan)
    for name, value in srv.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    import secrets

    return S3Store.from_url(f"s3://{srv.bucket}/t-{secrets.token_hex(6)}", policy=FAST_RETRY), proxy


def test_s3_retries_dropped_connections(moto_s3, monkeypatch, caplog):
    store, proxy = _behind_proxy(moto_s3, ["refuse", "refuse"], monkeypatch)
    try:
        with caplog.at_level("WARNING", logger="fedcli.store"):
            store.put("rounds/000001/global.json", b"payload")
        assert proxy.seen[:3] == ["refuse", "refuse", "pass"]
        assert store.get("rounds/000001/global.json", max_bytes=1 << 30) == b"payload"
        assert sum("retrying" in r.getMessage() for r in caplog.records) == 2
    finally:
        proxy.close()


def test_s3_create_only_whose_reply_was_lost_still_succeeds(moto_s3, monkeypatch):
    """The PUT landed but its answer was lost; the retry gets 412 and must see the bytes are ours."""
    store, proxy = _behind_proxy(moto_s3, ["lose_reply"], monkeypatch)
    try:
        store.put("rounds/000001/global.json", b"ours", create_only=True)
        assert proxy.seen[0] == "lose_reply" and len(proxy.seen) >= 2
        assert store.get("rounds/000001/global.json", max_bytes=1 << 30) == b"ours"
        with pytest.raises(AlreadyExists):  # someone else's bytes: still refused
            store.put("rounds/000001/global.json", b"theirs", create_only=True)
    finally:
        proxy.close()


def test_s3_wrong_credentials_fail_at_once(seaweed_s3, monkeypatch):
    """SeaweedFS checks signatures: a wrong secret is a clear, non-retried StoreError."""
    store = s3_store_on(seaweed_s3, monkeypatch)
    store.put("federation.toml", b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = S3Store.from_url(store.url, policy=RetryPolicy(attempts=3, base=30, cap=30))  # a retry would hang
    with pytest.raises(StoreError, match="access denied") as info:
        bad.get("federation.toml", max_bytes=1 << 30)
    assert info.value.exit_code == ExitCode.STORE and "SignatureDoesNotMatch" in str(info.value)


def test_s3_missing_bucket_is_clear(moto_s3, monkeypatch):
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    store = S3Store.from_url("s3://no-such-bucket-here/p", policy=FAST_RETRY)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.list()


# -- lease lock -----------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_lock_excludes_a_second_run_until_released(store):
    a = LeaseLock(store, "aggregate").acquire()
    with pytest.raises(LockHeld) as info:
        LeaseLock(store, "aggregate").acquire()
    assert info.value.exit_code == ExitCode.WAITING and "try again later" in str(info.value)
    LeaseLock(store, "other").acquire()  # locks are per name
    a.release()
    b = LeaseLock(store, "aggregate").acquire()
    b.check()


def test_lock_context_manager_releases_even_on_error(store):
    with pytest.raises(RuntimeError):
        with LeaseLock(store, "aggregate"):
            raise RuntimeError("boom")
    with LeaseLock(store, "aggregate") as lock:
        lock.check()


def test_crashed_run_lease_expires_and_is_taken_over(store):
    clock = Clock()
    crashed = LeaseLock(store, "aggregate", ttl=600, clock=clock).acquire()  # never released
    clock.t += 599
    with pytest.raises(LockHeld):
        LeaseLock(store, "aggregate", ttl=600, clock=clock).acquire()
    clock.t += 2
    heir = LeaseLock(store, "aggregate", ttl=600, clock=clock).acquire()
    heir.check()
    # the old holder, if it was only slow, learns it lost the lock and cannot disturb the heir
    with pytest.raises(LockLost):
        crashed.check()
    crashed.release()
    heir.check()
    with pytest.raises(LockHeld):
        LeaseLock(store, "aggregate", ttl=600, clock=clock).acquire()


def test_renew_extends_the_lease(store):
    clock = Clock()
    lock = LeaseLock(store, "aggregate", ttl=100, clock=clock).acquire()
    clock.t += 90
    lock.renew()
    clock.t += 90  # 180 s after acquiring: only the renewal keeps it
    with pytest.raises(LockHeld):
        LeaseLock(store, "aggregate", ttl=100, clock=clock).acquire()
    clock.t += 20
    with pytest.raises(LockLost):
        lock.check()


def test_stale_lock_takeover_race_has_one_winner(any_store):
    clock = Clock()
    LeaseLock(any_store, "aggregate", ttl=10, clock=clock).acquire()  # crashes
    clock.t += 11
    barrier = threading.Barrier(6)
    won, held, errors = [], [], []

    def take(i: int) -> None:
        lock = LeaseLock(any_store, "aggregate", ttl=10, clock=clock)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except LockHeld:
            held.append(i)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(won) == 1 and len(held) == 5
    won[0].check()


def test_late_racer_filling_a_cleaned_number_withdraws(store):
    for _ in range(4):  # several runs: old records get cleaned up
        with LeaseLock(store, "aggregate"):
            pass
    holder = LeaseLock(store, "aggregate").acquire()
    late = LeaseLock(store, "aggregate")
    assert late._claim(1) is False  # number 1 was cleaned up; the top is higher
    assert not store.exists(late._key(1))
    holder.check()
    with pytest.raises(LockLost):
        late.check()


def test_lock_records_stay_few(store):
    for _ in range(8):
        with LeaseLock(store, "aggregate") as lock:
            lock.renew()
    assert len(store.list("locks/aggregate")) <= _KEEP + 3


def test_torn_lock_record_counts_as_expired(store):
    store.put("locks/aggregate/000000000001.json", b'{"state": "held", "own')
    LeaseLock(store, "aggregate").acquire().check()


def test_lock_name_is_validated(store):
    with pytest.raises(FedcliError, match="invalid lock name"):
        LeaseLock(store, "../x")
