"""Errors as data: every exception class fedcli has reaches the user as one line and its exit code."""

import importlib
import pkgutil

import pytest
from typer.testing import CliRunner

import fedcli
from fedcli.cli import app
from fedcli.errors import REASONS, ExitCode, FedcliError


def _all_error_classes() -> list[type[FedcliError]]:
    for mod in pkgutil.walk_packages(fedcli.__path__, "fedcli."):
        importlib.import_module(mod.name)  # every module, so every subclass is registered
    seen, todo = [], [FedcliError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return sorted(set(seen), key=lambda c: c.__qualname__)


ERRORS = _all_error_classes()


def _run_failing(monkeypatch, tmp_path, exc: BaseException):
    def boom(*_a, **_k):
        raise exc

    monkeypatch.setattr("fedcli.coordinator.step.aggregate_round", boom)
    return CliRunner().invoke(app, ["aggregate", "--store", str(tmp_path), "--key", str(tmp_path / "c.key")])


def test_every_error_class_is_known():
    assert len(ERRORS) >= 10
    for cls in ERRORS:
        assert isinstance(cls.exit_code, ExitCode), cls
        assert cls.reason in REASONS, cls


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_error_class_through_cli(cls, monkeypatch, tmp_path):
    res = _run_failing(monkeypatch, tmp_path, cls("something [bold]went[/] wrong"))
    assert res.exit_code == int(cls.exit_code)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    label = "waiting:" if cls.exit_code == ExitCode.WAITING else "error:"
    assert lines[0].startswith(label) and "[bold]went[/] wrong" in lines[0]  # markup escaped, not rendered


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad\nsecond line"), RecursionError("deep"), KeyError("x"), MemoryError()],
    ids=lambda e: type(e).__name__,
)
def test_unexpected_exception_is_one_line(exc, monkeypatch, tmp_path):
    res = _run_failing(monkeypatch, tmp_path, exc)
    assert res.exit_code == ExitCode.ERROR
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    assert "out of memory" in lines[0] if isinstance(exc, MemoryError) else "internal error" in lines[0]


def test_explicit_exit_code_and_reason_override():
    e = FedcliError("x", exit_code=4, reason="oversize")
    assert e.exit_code is ExitCode.VERIFY and e.reason == "oversize"
