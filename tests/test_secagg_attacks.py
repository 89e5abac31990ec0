"""Issue 12 through the CLI: secure aggregation against a lying coordinator, a cheating bank and a store attacker.

Case 1: bank-c's update is cut short (padded manifest, crash before the manifest); case 2: the
coordinator hides bank-c's files and declares it dropped, then asks for the other secret with a
second survivor set; case 3: a bank leaves out its masks; case 4: the coordinator shrinks the
survivor set or shows one bank another global model. In none of them may a single bank's update
be unmasked or a garbage global be published; dropout rounds still complete unattended.
"""

import json
import shutil

import numpy as np
import pytest
from helpers import BANKS, TEMPLATE, make_fed
from safetensors.numpy import load_file

from fedcli import keys, models
from fedcli.coordinator.federation import publish_global
from fedcli.errors import ExitCode
from fedcli.keys import MAX_MANIFEST_BYTES
from fedcli.protocol import rounds
from fedcli.secagg import masking
from fedcli.store import open_store

# 4 banks, min_clients 3, threshold max(3, 4 // 2 + 1) = 3; one epoch keeps it fast
SPEC = TEMPLATE.replace("epochs = 3", "epochs = 1") + "\n[secagg]\nenabled = true\nclip = 4.0\n"
R1 = "rounds/000001"


def text(res) -> str:
    return " ".join(res.output.split())


def coordinator_sign(fed, path, doc) -> None:
    """What a malicious coordinator can do: sign any document with its own key and put it anywhere."""
    private, _ = keys.load_private(fed.key("coordinator"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(keys.sign_manifest(private, doc))


def train_aside(fed, tmp_path, bank, store=None):
    """`bank` trains on a copy of the store (its upload never reaches the real one); returns that copy."""
    aside = store or tmp_path / f"aside-{bank}"
    if store is None:
        shutil.copytree(fed.store, aside)
    fed.cli(
        "train",
        "--store",
        aside,
        "--key",
        fed.key(bank),
        "--data",
        fed.data / f"{bank}.csv",
        "--coordinator",
        fed.pub("coordinator"),
        "--state",
        tmp_path / f"{bank}-aside-state.json",
    )
    return aside


def best_unmasking(fed, victim: str) -> np.ndarray:
    """The coordinator's best view of victim's update: its masked words minus every pairwise mask any
    survivor revealed for it, as int32 words. Unmasked, every word lies within ±clip·scale."""
    upd = load_file(fed.store / f"{R1}/updates/{victim}.safetensors")
    words = np.concatenate([upd[k].reshape(-1) for k in sorted(upd)]).astype(np.uint32)
    seen = 0
    for path in sorted((fed.store / f"{R1}/secagg/recovery").glob("*.json")):
        doc = json.loads(path.read_text())
        if victim in doc["seeds"]:
            seed = keys.unb64(doc["seeds"][victim])
            mask = masking.expand_mask(seed, words.size)
            # the victim added the mask when its id sorts first, subtracted it otherwise
            words = words - mask if victim < doc["member"] else words + mask
            seen += 1
    assert seen == len(BANKS) - 1, "every survivor revealed its pairwise seed with the dropped bank"
    return words.view(np.int32)


def assert_still_masked(fed, victim: str) -> None:
    spec_scale = json.loads((fed.store / f"{R1}/global.json").read_text())["secagg"]["scale"]
    words = best_unmasking(fed, victim).astype(np.float64)
    inside = np.abs(words) <= 4.0 * spec_scale
    # a pairwise-only mask would leave every word inside (the case 1: error ~1e-8);
    # under the self mask the words are uniform: inside with probability ~2**-8
    assert inside.mean() < 0.2, inside.mean()


def survivors_reveal_and_publish(fed, survivors=("bank-a", "bank-b", "bank-d")):
    for b in survivors:
        assert "published recovery shares for round 1" in text(fed.train(b))
    assert "published global model of round 1" in fed.aggregate().output


@pytest.mark.parametrize("cut", ["padded-manifest", "crash-before-manifest"])
def test_case1_a_cut_short_update_stays_masked(tmp_path, credit_split, cut):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in ("bank-a", "bank-b", "bank-d"):
        fed.train(b)
    if cut == "padded-manifest":  # an outsider with write access pads bank-c's manifest past the limit
        fed.train("bank-c")
        manifest = fed.store / f"{R1}/updates/bank-c.json"
        manifest.write_bytes(manifest.read_bytes() + b" " * MAX_MANIFEST_BYTES)
    else:  # bank-c crashes after uploading its tensors, before its manifest
        aside = train_aside(fed, tmp_path, "bank-c")
        shutil.copy(aside / f"{R1}/updates/bank-c.safetensors", fed.store / f"{R1}/updates/bank-c.safetensors")
    res = fed.aggregate(code=ExitCode.WAITING)  # the unmodified coordinator declares bank-c dropped
    assert "(bank-c dropped)" in text(res)
    survivors_reveal_and_publish(fed)
    assert_still_masked(fed, "bank-c")


def test_case2_hidden_bank_stays_masked_and_a_second_set_is_refused(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in BANKS:
        fed.train(b)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for ext in ("json", "safetensors"):  # the coordinator hides bank-c's files ...
        shutil.move(fed.store / f"{R1}/updates/bank-c.{ext}", hidden / f"bank-c.{ext}")
    assert "(bank-c dropped)" in text(fed.aggregate(code=ExitCode.WAITING))  # ... and declares it dropped
    for ext in ("json", "safetensors"):
        shutil.copy(hidden / f"bank-c.{ext}", fed.store / f"{R1}/updates/bank-c.{ext}")
    for b in ("bank-a", "bank-b", "bank-d"):
        fed.train(b)  # pairwise seeds with bank-c revealed
    recoveries = {p.name: p.read_bytes() for p in (fed.store / f"{R1}/secagg/recovery").glob("*.json")}

    # then it asks for the other secret: a new set naming bank-c a survivor would reveal shares of its self mask
    first = (fed.store / f"{R1}/secagg/drops.json").read_bytes()
    drops = json.loads(first)
    shutil.rmtree(fed.store / f"{R1}/secagg")
    drops.pop("signature")
    c_manifest = json.loads((fed.store / f"{R1}/updates/bank-c.json").read_text())
    drops["survivors"]["bank-c"] = c_manifest["tensors_sha256"]
    drops["dropped"] = []
    coordinator_sign(fed, fed.store / f"{R1}/secagg/drops.json", drops)
    for b in ("bank-a", "bank-b", "bank-d"):
        res = fed.train(b, code=ExitCode.VERIFY)
        assert "different survivor set" in text(res), text(res)
    assert not (fed.store / f"{R1}/secagg/recovery").exists()

    # with the first set back, the round completes and bank-c's update is still masked
    shutil.rmtree(fed.store / f"{R1}/secagg")
    (fed.store / f"{R1}/secagg/recovery").mkdir(parents=True)
    (fed.store / f"{R1}/secagg/drops.json").write_bytes(first)
    for name, data in recoveries.items():
        (fed.store / f"{R1}/secagg/recovery/{name}").write_bytes(data)
    assert "published global model of round 1" in fed.aggregate().output
    assert_still_masked(fed, "bank-c")


def test_case3_a_bank_that_leaves_out_a_mask_publishes_nothing(tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in ("bank-a", "bank-b", "bank-d"):
        fed.train(b)
    with monkeypatch.context() as m:  # bank-c runs a modified fedcli: no self mask, shares dealt anyway
        m.setattr(masking, "add_self_mask", lambda acc, seed: None)
        fed.train("bank-c")
    assert "declared the survivor set" in text(fed.aggregate(code=ExitCode.WAITING))
    for b in BANKS:
        fed.train(b)
    res = fed.aggregate(code=ExitCode.VERIFY)
    assert "outside ±4·clip" in text(res) and "nothing is published" in text(res), text(res)
    assert not (fed.store / f"{R1}/global.json").exists()


def test_case3_a_bank_that_leaves_out_its_pairwise_masks_publishes_nothing(tmp_path, credit_split, monkeypatch):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in ("bank-a", "bank-b", "bank-c"):
        fed.train(b)
    with monkeypatch.context() as m:
        m.setattr(masking, "apply_masks", lambda q, me, seeds: np.array(q, dtype=np.uint32).reshape(-1))
        fed.train("bank-d")
    fed.aggregate(code=ExitCode.WAITING)
    for b in BANKS[:3]:
        fed.train(b)
    res = fed.aggregate(code=ExitCode.VERIFY)
    assert "a mask is missing or wrong" in text(res)
    assert not (fed.store / f"{R1}/global.json").exists()


def forged_set(fed, survivors, base_sha=None):
    """A drop declaration signed by the coordinator's key, naming whatever survivors it likes."""
    manifests = {b: json.loads((fed.store / f"{R1}/updates/{b}.json").read_text()) for b in survivors}
    doc = {
        "kind": "secagg-drops",
        "format": 1,
        "federation_id": manifests[survivors[0]]["federation_id"],
        "round": 1,
        "survivors": {b: m["tensors_sha256"] for b, m in manifests.items()},
        "dropped": sorted(set(BANKS) - set(survivors)),
        "base_sha256": base_sha or manifests[survivors[0]]["base_sha256"],
        "threshold": 3,
        "created_at": rounds.now(),
    }
    coordinator_sign(fed, fed.store / f"{R1}/secagg/drops.json", doc)


def test_case4_a_survivor_set_below_the_threshold_reveals_nothing(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in BANKS:
        fed.train(b)
    forged_set(fed, ["bank-a", "bank-b"])  # shrink the set until one honest bank would be left
    for b in ("bank-a", "bank-b"):
        res = fed.train(b, code=ExitCode.VERIFY)
        assert "only 2 survivor(s)" in text(res) and "needs at least 3" in text(res), text(res)
    assert not (fed.store / f"{R1}/secagg/recovery").exists()


def test_case4_a_bank_shown_another_global_reveals_nothing(tmp_path, credit_split):
    """Pasquini et al.: bank-a gets a crafted global. Its shares and seeds are bound to that base, so no
    survivor set can cover both bases: every survivor refuses, and the sum would be noise anyway."""
    fed = make_fed(tmp_path, credit_split, SPEC)
    evil = tmp_path / "evil"
    shutil.copytree(fed.store, evil)
    for f in ("global.json", "global.safetensors"):
        (evil / "rounds/000000" / f).unlink()
    store = open_store(str(evil))
    spec, spec_sha = rounds.load_spec(store, None)
    private, _ = keys.load_private(fed.key("coordinator"))
    weights = {k: np.full(s, 0.5, dtype=np.float32) for k, s in models.shapes(spec.model, spec.data.n_features).items()}
    publish_global(store, private, spec, spec_sha, 0, weights, prev_sha=None, contributors=[])
    train_aside(fed, tmp_path, "bank-a", store=evil)
    for b in BANKS[1:]:
        fed.train(b)
    for ext in ("json", "safetensors"):
        shutil.copy(evil / f"{R1}/updates/bank-a.{ext}", fed.store / f"{R1}/updates/bank-a.{ext}")
    forged_set(
        fed, list(BANKS), base_sha=json.loads((fed.store / f"{R1}/updates/bank-b.json").read_text())["base_sha256"]
    )
    res = fed.train("bank-a", code=ExitCode.VERIFY)  # its own update names another base
    assert "another base global" in text(res), text(res)
    res = fed.train("bank-b", code=ExitCode.VERIFY)  # bank-a's manifest names another base
    assert "another base global than bank-a trained on" in text(res), text(res)
    assert not (fed.store / f"{R1}/secagg/recovery").exists()


def test_dropout_rounds_complete_unattended(tmp_path, credit_split):
    """Cron: every tick each reachable bank runs `train` and the coordinator `aggregate`; bank-d is
    offline for round 1 and back for round 2. Both rounds publish with nobody stepping in."""
    fed = make_fed(tmp_path, credit_split, SPEC)
    codes = []
    for tick in range(6):
        for b in BANKS:
            if b != "bank-d" or rounds.latest_round(open_store(str(fed.store))) >= 1:
                fed.train(b)
        codes.append(fed.aggregate(code=None).exit_code)
        if rounds.latest_round(open_store(str(fed.store))) == 2:
            break
    assert codes == [ExitCode.WAITING, 0, ExitCode.WAITING, 0], codes
    g1 = json.loads((fed.store / f"{R1}/global.json").read_text())
    g2 = json.loads((fed.store / "rounds/000002/global.json").read_text())
    assert g1["secagg"]["dropped"] == ["bank-d"] and g2["secagg"]["dropped"] == []


def test_a_survivor_revealing_a_wrong_share_delays_the_round_but_never_corrupts_it(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, SPEC)
    for b in BANKS:
        fed.train(b)
    fed.aggregate(code=ExitCode.WAITING)
    for b in BANKS[:3]:
        fed.train(b)
    # bank-b lies about its share of bank-c's self-mask seed (validly signed by bank-b)
    path = fed.store / f"{R1}/secagg/recovery/bank-b.json"
    doc = json.loads(path.read_text())
    doc.pop("signature")
    share = keys.unb64(doc["self_shares"]["bank-c"])
    doc["self_shares"]["bank-c"] = keys.b64(share[:2] + bytes(16))
    private, _ = keys.load_private(fed.key("bank-b"))
    path.write_bytes(keys.sign_manifest(private, doc))
    res = fed.aggregate(code=ExitCode.WAITING)  # t = 3 shares are in, but they do not rebuild bank-c's seed
    assert "does not rebuild yet; waiting for bank-d" in text(res), text(res)
    fed.train("bank-d")
    assert "published global model of round 1" in fed.aggregate().output  # the 3 honest shares rebuild it
