"""Keys through the CLI: permissions, passphrases, and public key files that are not what they claim."""

import os

import pytest
import tomli_w
from helpers import BANKS, make_fed, one_line, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcli import keys
from fedcli.cli import app
from fedcli.errors import ExitCode, FedcliError


@pytest.fixture
def small(tmp_path, credit_split):
    return make_fed(tmp_path, credit_split, banks=BANKS[:3])


def train_with(fed, key, coordinator=None, code=0, **kw):
    return fed.cli(
        "train",
        "--store",
        fed.store,
        "--key",
        key,
        "--data",
        fed.data / "bank-a.csv",
        "--coordinator",
        coordinator or fed.pub("coordinator"),
        code=code,
        **kw,
    )


def test_private_key_readable_by_others_is_refused(small):
    key = small.key("bank-a")
    os.chmod(key, 0o644)
    before = snapshot(small)
    line = one_line(train_with(small, key, code=ExitCode.ERROR))
    assert line == f"error: bank-a.key is readable by others (mode 0644): run chmod 600 {key}"
    os.chmod(key, 0o640)
    assert "(mode 0640)" in one_line(train_with(small, key, code=ExitCode.ERROR))
    assert snapshot(small) == before
    os.chmod(key.with_suffix(".x25519.key"), 0o604)  # the coordinator's key too: aggregate refuses alike
    os.chmod(small.key("coordinator"), 0o604)
    assert "coordinator.key is readable by others (mode 0604)" in one_line(small.aggregate(code=ExitCode.ERROR))
    os.chmod(key, 0o600)
    train_with(small, key)


def test_private_key_given_as_public_and_public_as_private(small):
    line = one_line(train_with(small, small.key("bank-a"), coordinator=small.key("coordinator"), code=1))
    assert line == "error: coordinator.key is a private key; pass the public key file coordinator.pub"
    line = one_line(train_with(small, small.pub("bank-a"), code=1))
    assert "bank-a.pub is not a private key file (PEM); pass the private key bank-a.key" in line


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t + 'extra = "x"\n', "unknown key 'extra'"),
        (lambda t: t.replace('name = "coordinator"', "name = 7"), "'name' input should be a valid string (got 7)"),
        (lambda t: t.replace('ed25519 = "', 'ed25519 = "AAAA'), "'ed25519' string should match pattern"),
        (lambda t: t.replace('name = "coordinator"', 'name = "../evil"'), "invalid name '../evil'"),
        (lambda t: "[" * 3000, "nests 3000 levels deep"),
        (lambda t: "\udcff", "is not UTF-8 text"),
    ],
)
def test_public_key_file_is_a_typed_document(small, tmp_path, edit, message):
    bad = tmp_path / "coordinator.pub"
    text = edit(small.pub("coordinator").read_text())
    bad.write_bytes(text.encode("utf-8", "surrogateescape"))
    line = one_line(train_with(small, small.key("bank-a"), coordinator=bad, code=1))
    assert f"public key file {bad}" in line and message in line


def test_encrypted_key_prompts_on_a_terminal_and_names_real_options(small, tmp_path, monkeypatch):
    monkeypatch.delenv(keys.PASSPHRASE_ENV, raising=False)
    res = small.runner.invoke(
        app, ["keygen", "bank-z", "--out", str(tmp_path / "z"), "--encrypt"], input="s3cret\ns3cret\n"
    )
    assert res.exit_code == 0 and "encrypted" in res.output
    key = tmp_path / "z" / "bank-z.key"
    # not a terminal (cron, a pipe): no prompt, and the hint names options that exist
    line = one_line(train_with(small, key, code=1))
    assert line == (
        f"error: {key} is passphrase-protected: set FEDCLI_PASSPHRASE or run from a terminal to be prompted"
    )
    # on a terminal: prompted once, hidden; the key then loads (bank-z is simply not enrolled)
    monkeypatch.setattr(keys, "_interactive", lambda: True)
    keys._prompted.clear()
    res = small.runner.invoke(
        app,
        [
            "train",
            "--store",
            str(small.store),
            "--key",
            str(key),
            "--data",
            str(small.data / "bank-a.csv"),
            "--coordinator",
            str(small.pub("coordinator")),
        ],
        input="s3cret\n",
    )
    assert res.exit_code == 1 and "Passphrase for bank-z.key" in res.output and "s3cret" not in res.output
    assert "is not enrolled in federation credit-demo" in one_line(res)
    keys._prompted.clear()
    res = small.runner.invoke(
        app,
        [
            "train",
            "--store",
            str(small.store),
            "--key",
            str(key),
            "--data",
            str(small.data / "bank-a.csv"),
            "--coordinator",
            str(small.pub("coordinator")),
        ],
        input="wrong\n",
    )
    assert one_line(res) == f"error: wrong passphrase for {key}"


def test_clear_key_with_passphrase_set_is_not_called_protected(small, tmp_path, monkeypatch):
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "s3cret")
    res = small.train("bank-a")
    assert "warning: FEDCLI_PASSPHRASE is set but bank-a.key is not encrypted" in res.output
    assert "submitted update for round 1" in res.output
    res = small.cli("keygen", "bank-q", "--out", tmp_path / "q")
    assert "FEDCLI_PASSPHRASE is set but --encrypt was not given: the keys are written unencrypted" in res.output
    assert b"ENCRYPTED" not in (tmp_path / "q" / "bank-q.key").read_bytes()
    assert "encrypted" not in res.output.split("warning")[-1].split("\n", 1)[1]  # never called protected


def test_pub_written_by_keygen_round_trips(small):
    ident = keys.load_public(small.pub("bank-a"))
    assert ident.name == "bank-a" and len(keys.unb64(ident.ed25519)) == 32 and ident.x25519
    assert ident.fingerprint in small.pub("bank-a").read_text()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["name", "ed25519", "x25519", "nmae", "extra"]),
            st.one_of(
                st.text(max_size=50),
                st.integers(),
                st.booleans(),
                st.just("Z6jviQpOIokT8iqckxIkie9YmUDiFnleYC/itHsdRLs="),
            ),
            max_size=4,
        ).map(lambda d: tomli_w.dumps(d).encode()),
    )
)
def test_any_public_key_file_loads_or_is_refused_in_one_line(tmp_path, data):
    path = tmp_path / "x.pub"
    path.write_bytes(data)
    try:
        ident = keys.load_public(path)
    except FedcliError as e:
        assert "\n" not in str(e) and e.exit_code == ExitCode.ERROR
    else:
        assert len(keys.unb64(ident.ed25519)) == 32
