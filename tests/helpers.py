"""Helpers shared by the test files: a federation driven through the real CLI, S3 prefixes, forged updates.

Fixtures live in conftest.py; everything a test imports by name lives here (pytest discourages importing
conftest.py, and test files import no helpers from one another).
"""

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load
from typer.testing import CliRunner

from fedcli import digest, keys
from fedcli.cli import app
from fedcli.protocol.tensors import encode
from fedcli.store.retry import RetryPolicy
from fedcli.store.s3 import S3Store

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_PATH = ROOT / "examples" / "federation.toml"  # the demo federation, the base of most specs
TEMPLATE = TEMPLATE_PATH.read_text()
BANKS = ("bank-a", "bank-b", "bank-c", "bank-d")

# Tests must not wait seconds on purpose-made failures: tiny, still bounded back-off.
FAST_RETRY = RetryPolicy(attempts=3, base=0.01, cap=0.05)


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

    def train(self, bank: str, *extra, code: int | None = 0, data: Path | None = None, store=None):
        """`fedcli train` at one bank on its own table; `extra` options, another `store` (a mirror) if given."""
        return self.cli(
            "train",
            "--store",
            store or self.loc,
            "--key",
            self.key(bank),
            "--data",
            data or self.data / f"{bank}.csv",
            "--coordinator",
            self.pub("coordinator"),
            *extra,
            code=code,
        )

    def aggregate(self, code: int | None = 0):
        return self.cli("aggregate", "--store", self.loc, "--key", self.key("coordinator"), code=code)

    def evaluate(self, data: Path, *extra, code: int | None = 0):
        """`fedcli evaluate` of the latest global on `data`, pinned to the coordinator's key."""
        return self.cli(
            "evaluate", "--store", self.loc, "--coordinator", self.pub("coordinator"), "--data", data, *extra, code=code
        )

    def predict(self, data: Path, out: Path, *extra, code: int | None = 0):
        """`fedcli predict` of the latest global on `data` into `out`, pinned to the coordinator's key."""
        return self.cli(
            "predict",
            "--store",
            self.loc,
            "--coordinator",
            self.pub("coordinator"),
            "--data",
            data,
            "--out",
            out,
            *extra,
            code=code,
        )


def make_fed(root: Path, credit_split: Path, spec_text: str | None = None, banks=BANKS, url: str | None = None) -> Fed:
    root.mkdir(parents=True, exist_ok=True)
    fed = Fed(root, CliRunner(), url)
    (root / "data").symlink_to(credit_split)
    fed.cli("keygen", "coordinator", "--out", root / "coordinator")
    for b in banks:
        fed.cli("keygen", b, "--out", root / b)
    template = root / "federation.toml"
    template.write_text(spec_text or TEMPLATE)
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


def forge(fed, member, signer=None, tensors=None, raw=None, **overrides):
    """Write an update for round 1 as `member`, signed by `signer`'s key, with chosen flaws."""
    base = json.loads((fed.store / "rounds/000000/global.json").read_text())
    good = {k: np.zeros_like(v) for k, v in load((fed.store / "rounds/000000/global.safetensors").read_bytes()).items()}
    data = raw if raw is not None else encode(tensors(good) if tensors is not None else good)
    manifest = {
        "kind": "update",
        "format": 1,
        "federation_id": "credit-demo",
        "round": 1,
        "member": member,
        "base_sha256": base["tensors_sha256"],
        "tensors_sha256": digest.sha256(data),
        "num_examples": 100,
        "metrics": {},
        "created_at": "2026-01-01T00:00:00+00:00",
        "nonce": "00",
    } | overrides
    private, _ = keys.load_private(fed.key(signer or member))
    upd = fed.store / "rounds/000001/updates"
    upd.mkdir(parents=True, exist_ok=True)
    (upd / f"{member}.safetensors").write_bytes(data)
    (upd / f"{member}.json").write_bytes(keys.sign_manifest(private, manifest))


def one_line(res) -> str:
    """The single error line of a refused command (and proof there is exactly one, and no traceback)."""
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return lines[0]


def snapshot(fed) -> list[str]:
    """Every path in the folder store, to show a refused command wrote nothing."""
    return sorted(str(p.relative_to(fed.store)) for p in fed.store.rglob("*"))


def bank_dir(fed, bank: str, federation: str = "credit-demo") -> Path:
    """The folder a bank keeps its state, ledger and residual in for one federation (next to its key)."""
    return fed.root / bank / f"{bank}.fedcli" / federation


def state_file(fed, bank: str, federation: str = "credit-demo") -> Path:
    return bank_dir(fed, bank, federation) / "state.json"


def ledger_file(fed, bank: str, federation: str = "credit-demo") -> Path:
    return bank_dir(fed, bank, federation) / "ledger.json"
