"""Issue 10 QA: cases found by trying the merged code as an attacker and as a new user.

Each test drives the real CLI and asserts one clear line, the exit code, and that nothing
reached the store.
"""

import hashlib
import json
import struct

import numpy as np
from helpers import TEMPLATE, make_fed

from fedcli import keys
from fedcli.errors import ExitCode
from fedcli.protocol import rounds


def _resign_huge_update(fed, member: str, r: int = 1) -> None:
    """A member's genuinely signed update whose values are huge but finite (float32 max)."""
    tkey, mkey = rounds.update_keys(r, member)
    tpath, mpath = fed.store / tkey, fed.store / mkey
    raw = tpath.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    body = np.frombuffer(raw[8 + n :], dtype="<f4").copy()
    body[:] = np.finfo(np.float32).max
    data = raw[: 8 + n] + body.tobytes()
    tpath.write_bytes(data)
    manifest = json.loads(mpath.read_bytes())
    manifest.pop("signature")
    manifest["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    manifest["num_examples"] = 100_000_000  # the spec's max_rows_per_member: the whole weight
    private, _ = keys.load_private(fed.key(member))
    mpath.write_bytes(keys.sign_manifest(private, manifest))


def test_a_global_poisoned_by_one_member_is_blamed_not_the_banks_table(tmp_path, credit_split):
    """A member's huge-but-finite update makes a finite global that no bank can train on.

    The bank must say the global model is at fault (exit 4) rather than "check the table",
    and submit nothing.
    """
    fed = make_fed(tmp_path, credit_split)
    for bank in ("bank-a", "bank-b", "bank-d"):
        fed.train(bank)
    _resign_huge_update(fed, "bank-d")
    fed.aggregate()  # finite, so the coordinator may publish it; every weight is now absurd
    res = fed.train("bank-c", code=ExitCode.VERIFY)
    line = res.output.strip().splitlines()[-1]
    assert "global model of round 1 has weights up to" in line and "check the table" not in line, line
    assert not (fed.store / rounds.update_keys(2, "bank-c")[1]).exists()


def test_predict_into_a_missing_folder_names_the_reason(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    out = tmp_path / "no-such-folder" / "scores.csv"
    res = fed.cli(
        "predict",
        "--store",
        fed.store,
        "--coordinator",
        fed.pub("coordinator"),
        "--data",
        fed.data / "test.csv",
        "--out",
        out,
        code=ExitCode.ERROR,
    )
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: cannot write") and "non-existent directory" in line and "None" not in line, line
    assert not out.parent.exists()


def test_an_empty_table_is_named_empty(tmp_path, credit_split):
    """A zero-byte export (a failed copy) is one plain line, not pandas' wording; nothing is written."""
    fed = make_fed(tmp_path, credit_split)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    res = fed.train("bank-a", code=ExitCode.ERROR, data=empty)
    assert res.output.strip().splitlines()[-1] == f"error: cannot read {empty}: it is empty (not even a header line)"
    assert not (fed.store / "rounds" / "000001").exists()


def test_planted_recovery_shares_are_not_taken_for_the_banks_own(tmp_path, credit_split):
    """[secagg] after a dropout: a file planted as bank-b's recovery shares must not make bank-b
    report "already published" (exit 0) and wait forever; it is refused out loud, and bank-b
    publishes once the file is gone."""
    spec = TEMPLATE.replace("epochs = 3", "epochs = 1")
    fed = make_fed(tmp_path, credit_split, spec + "\n[secagg]\nenabled = true\n")
    for bank in ("bank-a", "bank-b", "bank-c"):
        fed.train(bank)
    fed.aggregate(code=ExitCode.WAITING)  # bank-d declared dropped; survivors must reveal their seeds
    planted = fed.store / "rounds" / "000001" / "secagg" / "recovery" / "bank-b.json"
    planted.parent.mkdir(parents=True, exist_ok=True)
    for content in (b"[" * 5000 + b"]" * 5000, b"{}"):
        planted.write_bytes(content)
        res = fed.train("bank-b", code=ExitCode.VERIFY)
        line = res.output.strip().splitlines()[-1]
        assert "recovery shares for bank-b that this key did not sign" in line and "already" not in line, line
    fed.train("bank-a")  # a genuine share of another bank is not bank-b's either
    planted.write_bytes((planted.parent / "bank-a.json").read_bytes())
    fed.train("bank-b", code=ExitCode.VERIFY)
    planted.unlink()
    assert "published recovery shares" in fed.train("bank-b").output
    assert "already published" in fed.train("bank-b").output


def test_a_spec_template_saved_with_a_byte_order_mark_is_read(tmp_path, credit_split):
    """Notepad's "UTF-8 with BOM" is still the same TOML (tables with a BOM are read too)."""
    fed = make_fed(tmp_path, credit_split)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + TEMPLATE.encode())
    fed.cli(
        "init",
        tmp_path / "store2",
        "--spec",
        bom,
        "--key",
        fed.key("coordinator"),
        *[x for b in ("bank-a", "bank-b", "bank-c") for x in ("--member", fed.pub(b))],
    )
    assert not (tmp_path / "store2" / "federation.toml").read_bytes().startswith(b"\xef\xbb\xbf")


def test_init_blames_the_option_not_the_template_for_a_bad_name(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    odd = tmp_path / "Coord Key.key"
    odd.write_bytes(fed.key("coordinator").read_bytes())
    odd.chmod(0o600)
    members = [x for b in ("bank-a", "bank-b", "bank-c") for x in ("--member", fed.pub(b))]
    template = tmp_path / "federation.toml"
    for args, expected in (
        (["--key", odd], "error: invalid coordinator name (from the key file name Coord Key.key) 'Coord Key'"),
        (["--key", fed.key("coordinator"), "--id", "[red]x"], "error: invalid --id '[red]x'"),
    ):
        res = fed.cli("init", tmp_path / "store2", "--spec", template, *args, *members, code=ExitCode.ERROR)
        assert res.output.strip().startswith(expected) and "template" not in res.output, res.output
    assert not (tmp_path / "store2").exists()


def test_status_counts_only_updates_a_member_signed(tmp_path, credit_split):
    """Files planted in an open round (garbage under a member's name, a non-member's name) are not
    shown as submitted: status lists them as unsigned."""
    fed = make_fed(tmp_path, credit_split)
    for bank in ("bank-a", "bank-b"):
        fed.train(bank)
    upd = fed.store / "rounds" / "000001" / "updates"
    (upd / "bank-d.json").write_text('{"kind": "update", "member": "bank-d", "signature": "AAAA"}')
    (upd / "evil.json").write_text("{}")
    res = fed.cli("status", fed.store, "--coordinator", fed.pub("coordinator"))
    other = " ".join(
        c for c in (line.split("│")[-2].strip() for line in res.output.splitlines() if line.startswith("│")) if c
    )  # the last column, wrapped cells joined
    assert "2 submitted, 2 unsigned" in other, res.output
    assert res.output.count("unsigned: no member signed") == 2


def test_a_file_given_as_the_store_is_named_as_such(tmp_path):
    from typer.testing import CliRunner

    from fedcli.cli import app

    f = tmp_path / "notes.txt"
    f.write_text("hello")
    res = CliRunner().invoke(app, ["status", str(f)])
    assert res.exit_code == 1 and "is a file, not a store folder" in res.output
