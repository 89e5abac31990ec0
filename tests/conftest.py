"""A small federation on a temporary folder, driven through the real CLI."""

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from fedcli.cli import app  # noqa: E402

BANKS = ("bank-a", "bank-b", "bank-c", "bank-d")


@dataclass
class Fed:
    root: Path
    runner: CliRunner

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def key(self, name: str) -> Path:
        return self.root / name / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.root / name / f"{name}.pub"

    def cli(self, *args, code: int | None = 0):
        res = self.runner.invoke(app, [str(a) for a in args])
        if code is not None:
            assert res.exit_code == code, f"exit {res.exit_code} != {code}\n{res.output}\n{res.exception!r}"
        return res

    def train(self, bank: str, code: int | None = 0, data: Path | None = None):
        return self.cli("train", "--store", self.store, "--key", self.key(bank), "--data",
                        data or self.data / f"{bank}.csv", "--coordinator", self.pub("coordinator"), code=code)

    def aggregate(self, code: int | None = 0):
        return self.cli("aggregate", "--store", self.store, "--key", self.key("coordinator"), code=code)


@pytest.fixture(scope="session")
def credit_split(tmp_path_factory) -> Path:
    from prepare_credit import split

    out = tmp_path_factory.mktemp("credit")
    split(out)
    return out


def make_fed(root: Path, credit_split: Path, spec_text: str | None = None, banks=BANKS) -> Fed:
    root.mkdir(parents=True, exist_ok=True)
    fed = Fed(root, CliRunner())
    (root / "data").symlink_to(credit_split)
    fed.cli("keygen", "coordinator", "--out", root / "coordinator")
    for b in banks:
        fed.cli("keygen", b, "--out", root / b)
    template = root / "federation.toml"
    template.write_text(spec_text or (ROOT / "examples" / "federation.toml").read_text())
    fed.cli("init", fed.store, "--spec", template, "--key", fed.key("coordinator"),
            *[x for b in banks for x in ("--member", fed.pub(b))])
    return fed


@pytest.fixture
def fed(tmp_path, credit_split) -> Fed:
    return make_fed(tmp_path, credit_split)
