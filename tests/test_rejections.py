"""Every way an update can be bad is rejected with a reason, and the good ones still count."""

import json
import struct

import numpy as np
import pytest
from helpers import BANKS, forge

from fedcli.protocol.rounds import read_rejections
from fedcli.store.folder import FolderStore


def header_bomb() -> bytes:
    return struct.pack("<Q", 1 << 40) + b"{}"


CASES = {  # flaw -> (reason code, words of the message)
    "signed by another member": (dict(signer="bank-b"), "bad-signature", "signature does not verify"),
    "wrong round": (dict(round=2), "wrong-round", "round is 2"),
    "other federation": (dict(federation_id="other"), "wrong-round", "federation_id"),
    "stale base": (dict(base_sha256="0" * 64), "stale-base", "different global model"),
    "bad num_examples": (dict(num_examples=0), "malformed", "num_examples"),
    "hash mismatch": (dict(tensors_sha256="f" * 64), "bad-hash", "do not match the sha256"),
    "wrong shape": (dict(tensors=lambda g: g | {"0.weight": np.zeros((1, 5), np.float32)}), "malformed", "shape"),
    "extra tensor": (dict(tensors=lambda g: g | {"evil": np.zeros(1, np.float32)}), "malformed", "unexpected ['evil']"),
    "missing tensor": (dict(tensors=lambda g: {"0.bias": g["0.bias"]}), "malformed", "missing ['0.weight']"),
    "wrong dtype": (dict(tensors=lambda g: {k: v.astype(np.float64) for k, v in g.items()}), "malformed", "dtype"),
    "nan values": (dict(tensors=lambda g: g | {"0.bias": np.full(1, np.nan, np.float32)}), "not-finite", "NaN"),
    "infinite values": (
        dict(tensors=lambda g: g | {"0.bias": np.full(1, np.inf, np.float32)}),
        "not-finite",
        "infinite",
    ),
    "header bomb": (dict(raw=header_bomb()), "malformed", "header length"),
    "not safetensors": (dict(raw=b"\x80\x04\x95pickle payload" + b"\0" * 64), "malformed", "header length"),
    "unknown manifest key": (dict(num_exemples=5), "malformed", "did you mean 'num_examples'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_update_is_rejected_and_good_ones_published(fed, case):
    kwargs, code, words = CASES[case]
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "bank-d", **kwargs)
    res = fed.aggregate()
    assert "published global model of round 1 from 3 updates" in res.output
    rejected = read_rejections(FolderStore(fed.store), 1)
    assert list(rejected) == ["bank-d"] and words in rejected["bank-d"], rejected
    entry = json.loads((fed.store / "rounds/000001/rejections.json").read_text())["entries"]["bank-d"]
    assert entry["reason"] == code, entry
    assert f"rejected bank-d ({code}): " in res.output
    # nothing lost: the rejected files are still there for forensics
    assert (fed.store / "rounds/000001/updates/bank-d.json").exists()


def test_unenrolled_and_tampered_manifest_and_partial_upload(fed):
    for b in BANKS[:3]:
        fed.train(b)
    forge(fed, "mallory", signer="bank-d")  # a name not in the spec
    fed.train("bank-d")
    m = fed.store / "rounds/000001/updates/bank-d.json"
    doc = json.loads(m.read_text())
    doc["num_examples"] = 10**9  # a bank inflating its weight after signing
    m.write_text(json.dumps(doc))
    (fed.store / "rounds/000001/updates/bank-e.safetensors").write_bytes(b"partial")  # crashed upload
    res = fed.aggregate()
    rejected = read_rejections(FolderStore(fed.store), 1)
    assert "not an enrolled member" in rejected["mallory"]
    assert "signature does not verify" in rejected["bank-d"]
    assert "bank-e" in res.output and "incomplete" in res.output
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert sorted(c["member"] for c in g["contributors"]) == ["bank-a", "bank-b", "bank-c"]


def test_replayed_update_from_previous_round_is_rejected(fed):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    for b in BANKS[:3]:
        fed.train(b)
    src, dst = fed.store / "rounds/000001/updates", fed.store / "rounds/000002/updates"
    for ext in ("safetensors", "json"):
        (dst / f"bank-d.{ext}").write_bytes((src / f"bank-d.{ext}").read_bytes())
    fed.aggregate()
    assert "round is 1, expected 2" in read_rejections(FolderStore(fed.store), 2)["bank-d"]


def test_only_bad_updates_means_waiting_not_publishing(fed):
    fed.train("bank-a")
    forge(fed, "bank-b", signer="bank-c")
    forge(fed, "bank-c", round=7)
    res = fed.aggregate(code=3)
    assert "1 of 3 required" in res.output
    assert not (fed.store / "rounds/000001/global.json").exists()
