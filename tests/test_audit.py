"""`fedcli audit`: the whole history verifies offline, and tampering with any kind of file breaks it
(exit 4, the first break on one line, the report still written)."""

import json
import shutil

import pytest
from helpers import BANKS, TEMPLATE, forge, make_fed, one_line

pytestmark = pytest.mark.slow  # one federation of two rounds, built once for the module

DP = '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 50\n'


@pytest.fixture(scope="module")
def history(tmp_path_factory, credit_split):
    """Two rounds under DP: bank-d's forged update is rejected in round 1; bank-e joins (version 2) for round 2."""
    fed = make_fed(tmp_path_factory.mktemp("audit"), credit_split, TEMPLATE + DP)
    for b in ("bank-a", "bank-b", "bank-c"):
        fed.train(b)
    forge(fed, "bank-d", signer="bank-a")
    fed.aggregate()
    fed.cli("keygen", "bank-e", "--out", fed.root / "bank-e")
    fed.cli("spec", "amend", fed.loc, "--key", fed.key("coordinator"), "--member", fed.pub("bank-e"))
    for b in ("bank-a", "bank-b"):
        fed.train(b)
    fed.cli(
        "train",
        "--store",
        fed.loc,
        "--key",
        fed.key("bank-e"),
        "--data",
        fed.data / "bank-c.csv",
        "--coordinator",
        fed.pub("coordinator"),
    )
    fed.aggregate()
    return fed


def run_audit(fed, store, out, code=0):
    return fed.cli("audit", store, "--coordinator", fed.pub("coordinator"), "--out", out, code=code)


def test_the_whole_history_verifies_and_the_report_tells_it(history, tmp_path):
    res = run_audit(history, history.store, tmp_path)
    assert "audit passed: 2 spec version(s), 3 round(s)" in res.output
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["verified"] and doc["broken"] == ""
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    assert doc["versions"][1]["changes"][0]["change"] == "join" and doc["versions"][1]["effective_round"] == 2
    by_round = {r["round"]: r for r in doc["rounds"]}
    assert {c["member"] for c in by_round[1]["contributors"]} == {"bank-a", "bank-b", "bank-c"}
    assert {c["member"] for c in by_round[2]["contributors"]} == {"bank-a", "bank-b", "bank-e"}
    assert by_round[2]["spec_version"] == 2 and by_round[1]["spec_version"] == 1
    refused = {u["member"]: u for u in by_round[1]["updates"] if u["status"] == "rejected"}
    assert refused["bank-d"]["reason"] == "bad-signature"
    assert set(doc["epsilon"]) == {"bank-a", "bank-b", "bank-c", "bank-e"}
    assert doc["epsilon"]["bank-a"] > doc["epsilon"]["bank-c"] > 0  # two releases against one
    final = json.loads((history.store / "rounds/000002/global.json").read_text())["tensors_sha256"]
    assert doc["final_sha256"] == final and doc["lineage"][0] == f"round 2: {final}"
    page = (tmp_path / "audit.html").read_text()
    assert "<script" not in page and final in page and "bad-signature" in page


def _json_edit(path, key, value):
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


TAMPER = {
    "spec v1": (lambda s: (s / "federation.toml").write_text((s / "federation.toml").read_text() + "\n#"), "signature"),
    "spec v2 file": (lambda s: _flip(s / "specs/000002/federation.toml"), "does not match the sha256"),
    "spec v2 link": (lambda s: _json_edit(s / "specs/000002/link.json", "effective_round", 1), "signature"),
    "spec v2 removed": (lambda s: shutil.rmtree(s / "specs"), "global model of round 2"),
    "global manifest": (lambda s: _json_edit(s / "rounds/000001/global.json", "rule", "median"), "signature"),
    "global tensors": (lambda s: _flip(s / "rounds/000002/global.safetensors"), "does not match the sha256"),
    "global removed": (lambda s: (s / "rounds/000001/global.json").unlink(), "round 1's global model is missing"),
    "update manifest": (
        lambda s: _json_edit(s / "rounds/000001/updates/bank-a.json", "nonce", "ff"),
        "contribution of bank-a",
    ),
    "update tensors": (lambda s: _flip(s / "rounds/000002/updates/bank-e.safetensors"), "does not match the sha256"),
    "update removed": (lambda s: (s / "rounds/000001/updates/bank-b.json").unlink(), "manifest is missing"),
    "rejections": (lambda s: _json_edit(s / "rounds/000001/rejections.json", "entries", {}), "rejections of round 1"),
}


@pytest.mark.parametrize("kind", sorted(TAMPER))
def test_tampering_with_any_file_breaks_the_audit(history, tmp_path, kind):
    store = tmp_path / "store"
    shutil.copytree(history.store, store)
    change, expected = TAMPER[kind]
    change(store)
    res = run_audit(history, store, tmp_path / "out", code=4)
    line = one_line(res)
    assert line.startswith("error: audit: ") and expected in line, line
    doc = json.loads((tmp_path / "out/audit.json").read_text())
    assert not doc["verified"] and doc["broken"] in line


def test_a_store_from_another_coordinator_is_refused(history, tmp_path):
    res = history.cli("audit", history.store, "--coordinator", history.pub("bank-a"), "--out", tmp_path, code=4)
    assert "pinned coordinator key" in one_line(res)


def test_the_audit_passes_a_federation_with_federated_statistics(tmp_path, credit_split):
    """The data section the statistics round filled is the one every global was made with."""
    from test_statistics import federated_template, stats_aggregate, submit

    fed = make_fed(tmp_path, credit_split, federated_template(""))
    for b in BANKS:
        submit(fed, b)
    stats_aggregate(fed)
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    res = fed.cli("audit", fed.store, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / "audit")
    assert "audit passed" in res.output and "2 round(s)" in res.output
