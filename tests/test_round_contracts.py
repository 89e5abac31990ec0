"""Round documents under attack: what someone with write access to the shared folder plants.

Each case goes through the real CLI and checks three things: the command ends in one clear
line (never a traceback), the round still completes from the honest updates when it can, and
nothing planted is ever shown as the coordinator's word.
"""

import json
import struct

import numpy as np
import pytest
from helpers import BANKS, ROOT, TEMPLATE, forge, make_fed, one_line
from safetensors.numpy import load

from fedcli import keys
from fedcli.errors import ExitCode

DEEP = b"[" * 20_000 + b"]" * 20_000  # under the 64 KiB bound; json.loads would hit RecursionError


def entries(fed, r: int = 1) -> dict:
    return json.loads((fed.store / f"rounds/{r:06d}/rejections.json").read_text())["entries"]


def published_from_honest_three(fed, res) -> None:
    assert "published global model of round 1 from 3 updates" in res.output, res.output
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert sorted(c["member"] for c in g["contributors"]) == ["bank-a", "bank-b", "bank-c"]
    weights = load((fed.store / "rounds/000001/global.safetensors").read_bytes())
    assert all(np.isfinite(v).all() for v in weights.values())


PLANTED_MANIFESTS = {  # bytes planted as bank-d's update manifest -> reason code
    "deeply nested": (DEEP, "too-deep"),
    "oversized": (b"{" + b" " * (70 * 1024) + b"}", "oversize"),
    "1e400 (inf once parsed)": (b'{"num_examples": 1e400, "signature": "AAAA"}', "not-finite"),
    "not JSON": (b"\x80\x04\x95 a pickle", "malformed"),
    "NaN literal": (b'{"num_examples": NaN, "signature": "AAAA"}', "malformed"),
    "no signature": (b'{"kind": "update"}', "bad-signature"),
}


@pytest.mark.parametrize("case", sorted(PLANTED_MANIFESTS))
def test_planted_update_manifest_is_rejected_and_the_round_publishes(fed, case):
    data, code = PLANTED_MANIFESTS[case]
    for b in BANKS[:3]:
        fed.train(b)
    upd = fed.store / "rounds/000001/updates"
    (upd / "bank-d.safetensors").write_bytes(b"\0" * 64)
    (upd / "bank-d.json").write_bytes(data)
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    assert entries(fed)["bank-d"]["reason"] == code, entries(fed)
    assert f"rejected bank-d ({code})" in res.output


HOSTILE_COUNTS = {  # num_examples a genuine bank key signs -> words of the rejection
    "1e300": (1e300, "valid integer"),
    "1e308": (1e308, "valid integer"),
    "10**400": (10**400, "less than or equal to"),
    "over max_rows_per_member": (10**9, "max_rows_per_member"),
    "zero": (0, "greater than or equal to 1"),
    "a string": ("100", "valid integer"),
    "true": (True, "valid integer"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_COUNTS))
def test_signed_hostile_num_examples_cannot_set_the_mean(fed, case):
    """A genuine bank signs an absurd weight: rejected (malformed), the others still publish, the global is finite."""
    value, words = HOSTILE_COUNTS[case]
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", num_examples=value, tensors=lambda g: {k: np.full_like(v, 1e30) for k, v in g.items()})
    raw = (fed.store / "rounds/000001/updates/bank-d.json").read_bytes()
    if case == "10**400":
        assert b"1" + b"0" * 400 in raw  # the 401-digit number really is in the signed JSON text
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    e = entries(fed)["bank-d"]
    assert e["reason"] == "malformed" and "num_examples" in e["message"] and words in e["message"], e
    assert len(e["message"]) < 400  # 10**400 is not echoed digit by digit


def test_deep_safetensors_header_is_rejected(fed):
    header = b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", raw=struct.pack("<Q", len(header)) + header)
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    assert entries(fed)["bank-d"]["reason"] == "too-deep"


@pytest.mark.parametrize("garbage", [DEEP, b'{"kind": "global"}', b"\xff\xfe not json"])
def test_planted_global_json_stops_everyone_with_one_line(fed, garbage):
    """The latest global.json replaced: train, aggregate and status refuse with exit 4 and one line."""
    (fed.store / "rounds/000000/global.json").write_bytes(garbage)
    for res in (
        fed.train("bank-a", code=ExitCode.VERIFY),
        fed.aggregate(code=ExitCode.VERIFY),
        fed.cli("status", fed.store, code=ExitCode.VERIFY),
    ):
        assert "global model of round 0" in one_line(res)
    assert not (fed.store / "rounds/000001").exists()  # the bank wrote nothing


def test_global_json_off_contract_but_coordinator_signed_is_refused(fed):
    """Even the coordinator's own signature does not make an off-contract global acceptable."""
    path = fed.store / "rounds/000000/global.json"
    doc = json.loads(path.read_text())
    del doc["signature"]
    doc["contributors"] = [{"member": "bank-a", "num_examples": 10**400, "metrics": {}, "bytes": 1}]
    private, _ = keys.load_private(fed.key("coordinator"))
    path.write_bytes(keys.sign_manifest(private, doc))
    line = one_line(fed.train("bank-a", code=ExitCode.VERIFY))
    assert "contributors[0].num_examples" in line


def test_rejections_are_signed_and_a_forged_file_is_only_ever_unverified(fed, tmp_path):
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", signer="bank-b")
    fed.aggregate()
    doc = json.loads((fed.store / "rounds/000001/rejections.json").read_text())
    assert doc["kind"] == "rejections" and doc["round"] == 1 and doc["federation_id"] == "credit-demo"
    assert isinstance(doc["signature"], str) and doc["entries"]["bank-d"]["reason"] == "bad-signature"
    res = fed.cli("status", fed.store)
    assert "bad-signature" in res.output and "unverified" not in res.output

    path = fed.store / "rounds/000001/rejections.json"
    bank_key, _ = keys.load_private(fed.key("bank-a"))
    forged = {
        "kind": "rejections",
        "format": 1,
        "federation_id": "credit-demo",
        "round": 1,
        "entries": {"bank-c": {"reason": "bad-signature", "message": "FORGED bank-c cheated"}},
        "created_at": "2026-01-01T00:00:00+00:00",
    }
    plants = {
        "unsigned": json.dumps({"bank-c": "FORGED bank-c cheated [/x]"}).encode(),
        "signed by a bank": keys.sign_manifest(bank_key, forged),
        "deeply nested": DEEP,
        "sparse 2 GiB": None,
    }
    for name, data in plants.items():
        path.unlink()
        if data is None:
            with open(path, "wb") as f:
                f.truncate(2 << 30)
        else:
            path.write_bytes(data)
        res = fed.cli("status", fed.store)
        assert "unverified" in res.output and "FORGED" not in res.output, (name, res.output)
        assert "Traceback" not in res.output
        out = tmp_path / f"rep-{len(name)}.html"
        fed.cli("report", fed.store, "--out", out)
        page = out.read_text()
        assert "FORGED" not in page and "unverified" in page, name


def test_rejections_link_to_the_coordinator_key_never_shows_its_bytes(fed):
    """A link planted at rejections.json: status lists it as unverified and never prints the key."""
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", signer="bank-b")
    fed.aggregate()
    path = fed.store / "rounds/000001/rejections.json"
    path.unlink()
    path.symlink_to(fed.key("coordinator"))
    res = fed.cli("status", fed.store)
    assert "PRIVATE KEY" not in res.output
    assert "(unverified)" in res.output, res.output  # the row that stands for the unreadable rejections.json


def test_markup_read_from_the_store_is_printed_literally(fed):
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", federation_id="[/x]", nonce="[bold]")  # signed by bank-d, off contract
    upd = fed.store / "rounds/000001/updates"
    (upd / "[red]evil.safetensors").write_bytes(b"x")  # not a name fedcli writes: never listed
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    assert "[/x]" in res.output and "evil" not in res.output
    res = fed.cli("status", fed.store)
    assert "[/x]" in res.output and "evil" not in res.output


def test_status_pins_the_coordinator_when_asked(fed):
    res = fed.cli("status", fed.store)
    assert "not pinned" in res.output
    res = fed.cli("status", fed.store, "--coordinator", fed.pub("coordinator"))
    assert "not pinned" not in res.output and "credit-demo" in res.output
    res = fed.cli("status", fed.store, "--coordinator", fed.pub("bank-a"), code=ExitCode.VERIFY)
    assert "refusing to trust this store" in one_line(res)


def test_a_non_finite_global_is_never_signed(tmp_path, credit_split):
    """Finite updates whose aggregate overflows float32: the coordinator refuses instead of publishing."""
    fed = make_fed(tmp_path, credit_split, TEMPLATE + '\n[strategy.server]\noptimizer = "fedavg"\nlr = 2.0\n')
    for b in BANKS:
        forge(fed, b, tensors=lambda g: {k: np.full_like(v, 3e38) for k, v in g.items()})
    res = fed.aggregate(code=ExitCode.ERROR)
    assert "NaN or infinite" in one_line(res)
    assert not (fed.store / "rounds/000001/global.json").exists()
    assert not (fed.store / "rounds/000001/global.safetensors").exists()


@pytest.mark.parametrize("z, code", [(1e-300, "weak-privacy"), (1.7e308, "malformed")])
def test_absurd_dp_declaration_is_rejected_not_a_crash(tmp_path, credit_split, z, code):
    """The accountant divides by zero or overflows on absurd parameters: a rejection, not a traceback."""
    from fedcli.privacy import accounting

    fed = make_fed(
        tmp_path,
        credit_split,
        TEMPLATE + '\n[privacy]\nmode = "record"\nclip = 1.0\ntarget_epsilon = 3.0\ndelta = 1e-5\nrounds = 5\n',
    )
    honest = accounting.Mechanism("record", 2.0, 0.01, 100, 1.0).manifest() | {"delta": 1e-5}
    for b in BANKS[:3]:
        forge(fed, b, num_examples=None, metrics=None, dp=honest)
    forge(fed, "bank-d", num_examples=None, metrics=None, dp=honest | {"noise_multiplier": z, "steps": 10**9})
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    assert entries(fed)["bank-d"]["reason"] == code, entries(fed)


def test_protocol_doc_lists_every_reason_code():
    from fedcli.errors import REASONS

    doc = (ROOT / "docs" / "protocol.md").read_text()
    for code, meaning in REASONS.items():
        assert f"| `{code}` | {meaning} |" in doc, code


def test_planted_file_names_never_stop_the_round(fed):
    """Update files whose names are no member's (control characters, dots, capitals) are rejected, not fatal."""
    for b in BANKS[:3]:
        fed.train(b)
    upd = fed.store / "rounds/000001/updates"
    for name in ("evil\nline", "Mallory", "a.b", "x" * 250):
        (upd / f"{name}.json").write_bytes(b"{}")
    res = fed.aggregate()
    published_from_honest_three(fed, res)
    got = entries(fed)
    assert got["Mallory"]["reason"] == "not-member" and got["a.b"]["reason"] == "not-member"
    assert set(got) == {"Mallory", "a.b"}  # a newline or 250 characters is no store key: never even listed
    assert "Traceback" not in fed.cli("status", fed.store).output


def test_a_later_run_that_rejects_nothing_clears_the_signed_list(fed):
    """rejections.json is the coordinator's latest word: once the bad file is gone, it lists nothing."""
    for b in BANKS[:2]:
        fed.train(b)
    mkey = fed.store / "rounds/000001/updates/bank-c.json"
    mkey.parent.mkdir(parents=True, exist_ok=True)
    mkey.write_bytes(b"{}")  # planted: bank-c's slot holds garbage
    fed.aggregate(code=ExitCode.WAITING)
    assert entries(fed)["bank-c"]["reason"] == "bad-signature"  # no signature in it
    mkey.unlink()
    fed.train("bank-c")
    published_from_honest_three(fed, fed.aggregate())
    assert entries(fed) == {}
