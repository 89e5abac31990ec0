"""Secure aggregation through the CLI: masked files, dropout recovery, late updates refused.

The reference is a plain federation with the same data, ids and seeds: training is
deterministic, so its (unmasked) update files are exactly what the masked banks trained.
"""

import json
import os
import shutil
import stat

import numpy as np
import pytest
from helpers import TEMPLATE, make_fed, use_s3
from safetensors.numpy import load_file

from fedcli import keys
from fedcli.errors import ExitCode, InputError
from fedcli.secagg import masking
from fedcli.store import open_store

BANKS5 = ("bank-a", "bank-b", "bank-c", "bank-d", "bank-e")
# one epoch keeps the suite fast; the plain reference uses the same spec
SPEC = TEMPLATE.replace("epochs = 3", "epochs = 1")
SECAGG_SPEC = SPEC + "\n[secagg]\nenabled = true\nclip = 4.0\n"
# data per bank: bank-e reuses bank-a's rows (the demo split has four banks)
DATA = {b: f"{b if b != 'bank-e' else 'bank-a'}.csv" for b in BANKS5}


def train(fed, bank, code=0):
    return fed.train(bank, code=code, data=fed.data / DATA[bank])


def text(res) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def plain_deltas(tmp_path_factory, credit_split):
    """Round-1 deltas of the same banks without secure aggregation."""
    fed = make_fed(tmp_path_factory.mktemp("plain"), credit_split, SPEC, banks=BANKS5)
    for b in BANKS5:
        train(fed, b)
    return {b: load_file(fed.store / f"rounds/000001/updates/{b}.safetensors") for b in BANKS5}


def expected_global(fed, plain, members):
    base = load_file(fed.store / "rounds/000000/global.safetensors")
    return {
        k: base[k].astype(np.float64) + sum(plain[b][k].astype(np.float64) for b in members) / len(members)
        for k in base
    }


def assert_close(fed, r, expected):
    new = load_file(fed.store / f"rounds/{r:06d}/global.safetensors")
    scale = json.loads((fed.store / f"rounds/{r:06d}/global.json").read_text())["secagg"]["scale"]
    for k, v in expected.items():
        # the mean's quantization error is below 1/scale (each bank's stochastic rounding moves it < 1/scale);
        # 8 bits of headroom (masking.HEADROOM_BITS) make scale 2**18 here, so ~4e-6
        np.testing.assert_allclose(new[k], v.astype(np.float32), rtol=0, atol=1 / scale + 1e-7)


def test_keygen_enrols_an_x25519_key(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC.replace("min_clients = 3", "min_clients = 2"), banks=BANKS5[:3])
    mask_path = keys.x25519_path_for(fed.key("bank-a"))
    assert stat.S_IMODE(os.stat(mask_path).st_mode) == 0o600
    ident = keys.load_public(fed.pub("bank-a"))
    spec = (fed.store / "federation.toml").read_text()
    assert ident.x25519 and ident.x25519 in spec
    # a member enrolled without an X25519 key cannot join a secure federation
    old = tmp_path / "old.pub"
    old.write_text(
        "\n".join(line for line in fed.pub("bank-b").read_text().splitlines() if not line.startswith("x25519"))
    )
    res = fed.cli(
        "init",
        tmp_path / "store2",
        "--spec",
        fed.root / "federation.toml",
        "--key",
        fed.key("coordinator"),
        "--member",
        fed.pub("bank-a"),
        "--member",
        old,
        code=1,
    )
    assert "enrolled no x25519 key" in text(res)
    # spec checks: a noise mode that does not exist, a bad clip, a quorum of one ("sum" of one update)
    plain = (fed.root / "federation.toml").read_text().split("\n[secagg]")[0]
    bad = tmp_path / "bad.toml"
    for template, message in (
        (plain + '\n[secagg]\nenabled = true\nnoise = "half"\n', "'secagg.noise' input should be 'full' or 'shared'"),
        (plain + "\n[secagg]\nenabled = true\nclip = -1.0\n", "'secagg.clip' input should be greater than 0"),
        (plain + '\n[secagg]\nenabled = true\nnoise = "shared"\n', 'it needs [privacy] mode = "update"'),
        # robust rules, norm bounding, compression and async need individual updates
        (plain + '\n[strategy]\nrule = "median"\n\n[secagg]\nenabled = true\n', 'needs [strategy] mode = "sync"'),
        (plain + '\n[strategy.compression]\nmethod = "int8"\n\n[secagg]\nenabled = true\n', "no compression"),
        (plain.replace("min_clients = 2", "min_clients = 1") + "\n[secagg]\nenabled = true\n", "min_clients >= 2"),
        # t-of-n: at least 3, and a roster that can never muster t survivors is refused
        (plain + "\n[secagg]\nenabled = true\n", "threshold is 3 but only 2 members are enrolled"),
        (plain + "\n[secagg]\nenabled = true\nthreshold = 2\n", "threshold must be at least 3"),
    ):
        bad.write_text(template)
        res = fed.cli(
            "init",
            tmp_path / "store3",
            "--spec",
            bad,
            "--key",
            fed.key("coordinator"),
            "--member",
            fed.pub("bank-a"),
            "--member",
            fed.pub("bank-b"),
            code=1,
        )
        assert message in text(res), text(res)


def test_encrypted_mask_key_needs_the_passphrase(tmp_path, monkeypatch):
    monkeypatch.delenv(keys.PASSPHRASE_ENV, raising=False)
    key_path, _, ident = keys.generate("bank-z", tmp_path, passphrase="s3cret")
    assert b"ENCRYPTED" in keys.x25519_path_for(key_path).read_bytes()
    with pytest.raises(InputError, match="passphrase-protected"):
        keys.load_mask_key(key_path)
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "s3cret")

    assert keys.x25519_to_text(keys.load_mask_key(key_path)) == ident.x25519


def test_all_members_in_masks_cancel(tmp_path, credit_split, plain_deltas):
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5)
    for b in BANKS5:
        train(fed, b)
    upd = load_file(fed.store / "rounds/000001/updates/bank-a.safetensors")
    assert all(v.dtype == np.uint32 for v in upd.values())
    manifest = json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())
    # unmasked, every word would decode inside [-clip, clip]; masked words spread over the whole
    # 32-bit range (only clip*scale/2**31, here 1/8, of it is inside)
    words = np.concatenate([v.reshape(-1) for v in upd.values()]).view(np.int32).astype(np.float64)
    inside = np.abs(words) <= 4.0 * manifest["secagg"]["scale"]
    assert inside.mean() < 0.5
    assert sorted(manifest["secagg"]["commitments"]) == [b for b in BANKS5 if b != "bank-a"]
    assert sorted(manifest["secagg"]["shares"]) == list(BANKS5) and manifest["secagg"]["threshold"] == 3

    # double masking: even with everyone in, the self masks stay until t survivors reveal their shares
    res = fed.aggregate(code=ExitCode.WAITING)
    assert "declared the survivor set of round 1" in text(res)
    for b in BANKS5[:3]:
        assert "published recovery shares for round 1" in text(train(fed, b))
    res = fed.aggregate()
    assert "published global model of round 1" in res.output
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert g["rule"] == "secagg-mean" and g["secagg"]["dropped"] == []
    assert_close(fed, 1, expected_global(fed, plain_deltas, BANKS5))
    # the next round works on top of the unmasked global
    train(fed, "bank-a")


def test_dropout_recovery_and_late_update_refused(tmp_path, credit_split, plain_deltas):
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5)
    survivors = BANKS5[:4]
    for b in survivors:
        train(fed, b)
    # bank-e trains too, but its upload only lands after the deadline (kept aside for now)
    aside = tmp_path / "aside"
    shutil.copytree(fed.store, aside)
    fed.cli(
        "train",
        "--store",
        aside,
        "--key",
        fed.key("bank-e"),
        "--data",
        fed.data / DATA["bank-e"],
        "--coordinator",
        fed.pub("coordinator"),
        "--state",
        tmp_path / "e-aside.json",
    )

    res = fed.aggregate(code=ExitCode.WAITING)  # quorum (3) reached, deadline 0: declare bank-e dropped
    assert "(bank-e dropped)" in text(res)
    drops = json.loads((fed.store / "rounds/000001/secagg/drops.json").read_text())
    assert drops["dropped"] == ["bank-e"] and sorted(drops["survivors"]) == list(survivors)

    # bank-e is refused from now on: its update would never be accepted
    res = train(fed, "bank-e", code=1)
    assert "declared dropped from round 1" in text(res)
    assert not (fed.store / "rounds/000001/updates/bank-e.json").exists()

    assert "published recovery shares for round 1" in text(train(fed, "bank-a"))
    assert "already published" in text(train(fed, "bank-a"))
    res = fed.aggregate(code=ExitCode.WAITING)  # 1 of t = 3
    assert "recovery shares of round 1 still missing from bank-b, bank-c, bank-d" in text(res)

    # bank-e's update lands anyway: the coordinator never accepts it
    for ext in ("safetensors", "json"):
        shutil.copy(aside / f"rounds/000001/updates/bank-e.{ext}", fed.store / f"rounds/000001/updates/bank-e.{ext}")
    # bank-d submitted, survived the declaration, then vanished for good: any t = 3 survivors finish the
    # round, rebuilding bank-d's pairwise seed with bank-e from their shares (pairshares.py)
    for b in ("bank-b", "bank-c"):
        assert "published recovery shares for round 1" in text(train(fed, b))
    assert not (fed.store / "rounds/000001/secagg/recovery/bank-d.json").exists()
    res = fed.aggregate()
    assert "late update is never accepted" in text(res)
    assert "published global model of round 1" in res.output
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert g["secagg"]["dropped"] == ["bank-e"]
    assert sorted(c["member"] for c in g["contributors"]) == list(survivors)
    assert_close(fed, 1, expected_global(fed, plain_deltas, survivors))
    # the read-side commands work on a masked federation
    assert "4/5" in fed.cli("status", fed.store).output
    assert "updates over 1 rounds" in text(fed.cli("report", fed.store, "--out", tmp_path / "r.html"))
    assert (tmp_path / "r.png").stat().st_size > 0


def test_late_update_mid_recovery_does_not_block_the_round(tmp_path, credit_split):
    """A dropped bank's update lands while survivors are still revealing: it keeps its self mask
    (nobody reveals a share of a dropped member's seed), so survivors go on revealing and the
    round completes unattended without it."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:4])
    for b in BANKS5[:3]:
        train(fed, b)
    aside = tmp_path / "aside"
    shutil.copytree(fed.store, aside)
    fed.cli(
        "train",
        "--store",
        aside,
        "--key",
        fed.key("bank-d"),
        "--data",
        fed.data / DATA["bank-d"],
        "--coordinator",
        fed.pub("coordinator"),
        "--state",
        tmp_path / "d-aside.json",
    )
    assert "(bank-d dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    assert "published recovery shares" in text(train(fed, "bank-a"))
    for ext in ("safetensors", "json"):
        shutil.copy(aside / f"rounds/000001/updates/bank-d.{ext}", fed.store / f"rounds/000001/updates/bank-d.{ext}")
    for b in BANKS5[1:3]:
        assert "published recovery shares" in text(train(fed, b))
    res = fed.aggregate()
    assert "late update is never accepted" in text(res)
    assert "published global model of round 1" in res.output
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert g["secagg"]["dropped"] == ["bank-d"] and len(g["contributors"]) == 3


def test_no_drop_declaration_before_quorum(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:3])
    for b in BANKS5[:2]:
        train(fed, b)
    fed.aggregate(code=ExitCode.WAITING)  # min_clients 3 > 2 in: just waiting, no declaration
    assert not (fed.store / "rounds/000001/secagg/drops.json").exists()


def test_recovery_share_must_match_commitment(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:4])
    for b in BANKS5[:3]:
        train(fed, b)
    assert "(bank-d dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    for b in BANKS5[:3]:
        train(fed, b)
    # bank-b's share is replaced by a validly signed one with a wrong seed
    path = fed.store / "rounds/000001/secagg/recovery/bank-b.json"
    doc = json.loads(path.read_text())
    doc.pop("signature")
    doc["seeds"]["bank-d"] = keys.b64(bytes(32))
    private, _ = keys.load_private(fed.key("bank-b"))
    path.write_bytes(keys.sign_manifest(private, doc))
    res = fed.aggregate(code=ExitCode.VERIFY)
    assert "does not match bank-b's signed commitment" in text(res)
    assert not (fed.store / "rounds/000001/global.json").exists()


def test_deleted_declaration_is_detected(tmp_path, credit_split):
    """A store attacker deletes drops.json after the survivors revealed their seeds: the dropped
    bank must still refuse to publish (its update could be unmasked), and aggregate must stop."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:4])
    for b in BANKS5[:3]:
        train(fed, b)
    fed.aggregate(code=ExitCode.WAITING)
    train(fed, "bank-a")  # reveals its seed with bank-d
    (fed.store / "rounds/000001/secagg/drops.json").unlink()
    res = train(fed, "bank-d", code=ExitCode.VERIFY)
    assert "no drop declaration" in text(res)
    assert not (fed.store / "rounds/000001/updates/bank-d.json").exists()
    assert "no drop declaration" in text(fed.aggregate(code=ExitCode.VERIFY))


def test_update_dp_shared_noise_sums_to_the_required_noise(tmp_path, credit_split):
    """[privacy] mode update + [secagg] noise shared: each bank adds z/sqrt(t) of the noise,
    so the sum of the 5 updates carries z*clip*sqrt(5/t) per coordinate (t = max(threshold, min_clients) = 3)."""
    z, clip, t, n = 1.0, 0.5, 3, len(BANKS5)
    spec = (
        SPEC.replace('kind = "logreg"', 'kind = "mlp"').replace("hidden = [16]", "hidden = [256]")
        + f'\n[privacy]\nmode = "update"\nclip = {clip}\nnoise_multiplier = {z}\nbudget_epsilon = 1000.0\n'
        + '\n[secagg]\nenabled = true\nclip = 4.0\nnoise = "shared"\n'
    )
    fed = make_fed(tmp_path, credit_split, spec, banks=BANKS5)
    for b in BANKS5:
        train(fed, b)
    m = json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())
    assert m["dp"]["noise_multiplier"] == z  # what the ledger and the coordinator account
    assert abs(m["secagg"]["member_noise_multiplier"] - z / np.sqrt(t)) < 1e-12  # what the bank added
    fed.aggregate(code=ExitCode.WAITING)
    for b in BANKS5[:3]:
        train(fed, b)
    fed.aggregate()
    base = load_file(fed.store / "rounds/000000/global.safetensors")
    new = load_file(fed.store / "rounds/000001/global.safetensors")
    step = np.concatenate([(new[k].astype(np.float64) - base[k]).reshape(-1) for k in base])
    # the clipped deltas (L2 norm <= 0.5 over ~7k coordinates) are negligible next to the noise
    shared = z * clip * np.sqrt(n / t) / n
    full = z * clip * np.sqrt(n) / n
    assert step.size > 5000
    assert abs(step.std() / shared - 1) < 0.1, (step.std(), shared, full)


def test_dropout_round_across_an_air_gap(tmp_path, credit_split):
    """Banks on their own mirror stores: the drop declaration and the recovery shares travel in
    signed bundles like everything else."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:4])
    mirrors = {b: tmp_path / f"mirror-{b}" for b in BANKS5[:3]}  # bank-d never shows up

    def carry(who, src, dst, pinned):
        out = tmp_path / f"{who}.bundle"
        fed.cli("bundle", "export", "--store", src, "--key", fed.key(who), "--out", out)
        extra = ["--coordinator", fed.pub("coordinator")] if pinned else []
        return fed.cli("bundle", "import", out, "--store", dst, *extra)

    def bank_step(b):
        carry("coordinator", fed.store, mirrors[b], True)
        res = fed.cli(
            "train",
            "--store",
            mirrors[b],
            "--key",
            fed.key(b),
            "--data",
            fed.data / DATA[b],
            "--coordinator",
            fed.pub("coordinator"),
        )
        carry(b, mirrors[b], fed.store, False)
        return res

    for b in mirrors:
        bank_step(b)
    assert "(bank-d dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    for b in mirrors:
        assert "published recovery shares" in text(bank_step(b))
    assert "published global model of round 1" in fed.aggregate().output


@pytest.mark.slow
def test_dropout_round_on_s3(moto_s3, tmp_path, credit_split, monkeypatch):
    """The same exchange through s3:// on a loopback S3 server (create-only declaration included)."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5[:4], url=use_s3(moto_s3, monkeypatch))
    for b in BANKS5[:3]:
        train(fed, b)
    assert "(bank-d dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    assert "declared dropped from round 1" in text(train(fed, "bank-d", code=1))
    for b in BANKS5[:3]:
        assert "published recovery shares" in text(train(fed, b))
    assert "published global model of round 1" in fed.aggregate().output
    g = json.loads(open_store(fed.url).get("rounds/000001/global.json", max_bytes=1 << 30))
    assert g["secagg"]["dropped"] == ["bank-d"]


def test_threshold_holds_the_declaration_until_t_updates_are_in(tmp_path, credit_split):
    """min_clients 3 is reached, but [secagg] threshold = 4: no survivor set smaller than 4 is ever declared."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC + "threshold = 4\n", banks=BANKS5)
    for b in BANKS5[:3]:
        train(fed, b)
    res = fed.aggregate(code=ExitCode.WAITING)
    assert "3 masked updates are in; secure aggregation unmasks no fewer than 4" in text(res)
    assert not (fed.store / "rounds/000001/secagg/drops.json").exists()
    train(fed, "bank-d")
    assert "(bank-e dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    manifest = json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())
    assert manifest["secagg"]["threshold"] == 4
    for b in BANKS5[:3]:
        train(fed, b)
    res = fed.aggregate(code=ExitCode.WAITING)  # t = 4 recoveries are needed, dropouts or not
    assert "still missing from bank-d" in text(res)
    train(fed, "bank-d")
    assert "published global model of round 1" in fed.aggregate().output


def test_hidden_bank_and_vanished_survivor_the_round_publishes_and_the_hidden_update_stays_masked(
    tmp_path, credit_split, plain_deltas
):
    """The coordinator hides bank-e's files and declares it dropped; bank-d submitted, survived the
    declaration, then never came back. Any t = 3 survivors finish the round (exact mean of a-d), and
    everything the coordinator was given (every pairwise seed with bank-e, rebuilt from the shares)
    still leaves bank-e's update under its self mask: nobody revealed a share of bank-e's self seed."""
    from fedcli.secagg import exchange, pairshares

    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5)
    for b in BANKS5:
        train(fed, b)
    r1, hidden = fed.store / "rounds/000001", tmp_path / "hidden"
    hidden.mkdir()
    for ext in ("json", "safetensors"):
        shutil.move(r1 / f"updates/bank-e.{ext}", hidden / f"bank-e.{ext}")
    assert "(bank-e dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    for ext in ("json", "safetensors"):
        shutil.copy(hidden / f"bank-e.{ext}", r1 / f"updates/bank-e.{ext}")
    for b in ("bank-a", "bank-b", "bank-c"):
        assert "published recovery shares for round 1" in text(train(fed, b))
    assert "published global model of round 1" in fed.aggregate().output
    assert_close(fed, 1, expected_global(fed, plain_deltas, BANKS5[:4]))

    # the coordinator's best view of bank-e: its words minus every pairwise mask with bank-e it can rebuild
    docs = [json.loads(p.read_text()) for p in sorted((r1 / "secagg/recovery").glob("*.json"))]
    assert all("bank-e" not in d["self_shares"] for d in docs)
    members = sorted(BANKS5)
    upd = load_file(r1 / "updates/bank-e.safetensors")
    words = np.concatenate([upd[k].reshape(-1) for k in sorted(upd)]).astype(np.uint32)
    for peer in BANKS5[:4]:
        points = [
            (
                pairshares.x_of(d["member"], members),
                pairshares.decode_element(keys.unb64(d["pair_shares"][peer]["bank-e"])),
            )
            for d in docs
        ]
        commitment = json.loads((r1 / f"updates/{peer}.json").read_text())["secagg"]["commitments"]["bank-e"]
        seed = exchange.rebuild_pair_seed((peer, "bank-e"), points, 3, commitment)  # bank-d's too, without bank-d
        mask = masking.expand_mask(seed, words.size)
        words = words + mask if peer < "bank-e" else words - mask  # bank-e subtracted masks with lower ids
    scale = json.loads((r1 / "global.json").read_text())["secagg"]["scale"]
    inside = np.abs(words.view(np.int32).astype(np.float64)) <= 4.0 * scale
    assert inside.mean() < 0.2, inside.mean()  # uniform words: the self mask is still on


def test_an_update_without_its_pairwise_shares_is_refused(tmp_path, credit_split):
    """A store attacker deletes a bank's pair-shares file: the coordinator refuses that update (any t
    survivors could not remove its masks if it dropped later) and the round goes on with the others."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5)
    for b in BANKS5:
        train(fed, b)
    (fed.store / "rounds/000001/pairshares/bank-b.bin").unlink()
    res = fed.aggregate(code=ExitCode.WAITING)
    assert "pair-shares file of bank-b is missing" in text(res)
    assert "(bank-b dropped)" in text(res)


def test_a_pair_shares_file_deleted_after_the_declaration_does_not_stall_the_round(
    tmp_path, credit_split, plain_deltas
):
    """After the declaration a store attacker deletes bank-a's pair-shares file: the survivors reveal
    without shares of bank-a's seeds (withholding never unmasks anyone) and bank-a's own seed with the
    dropped bank-e closes the gap; the round publishes the exact mean."""
    fed = make_fed(tmp_path, credit_split, SECAGG_SPEC, banks=BANKS5)
    for b in BANKS5[:4]:
        train(fed, b)
    assert "(bank-e dropped)" in text(fed.aggregate(code=ExitCode.WAITING))
    (fed.store / "rounds/000001/pairshares/bank-a.bin").unlink()
    for b in ("bank-a", "bank-b", "bank-c"):
        res = text(train(fed, b))
        assert "published recovery shares" in res and "no shares of the pairwise seeds of bank-a" in res, res
    assert "published global model of round 1" in fed.aggregate().output
    assert_close(fed, 1, expected_global(fed, plain_deltas, BANKS5[:4]))
