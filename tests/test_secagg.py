"""Secure aggregation maths: masks cancel, a masked update looks random, dropouts recover."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedcli import keys
from fedcli.errors import FedcliError, VerificationError
from fedcli.secagg import masking

FED = "bank-consortium"
CLIP = 1.0


def _keys(n):
    """Fixed keys (never in production: masking.generate_key): the masks, and every statistic on them, repeat."""
    members = [f"bank-{i}" for i in range(n)]
    priv = {m: X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, m in enumerate(members)}
    roster = {m: k.public_key() for m, k in priv.items()}
    return members, priv, roster


def _updates(members, size, seed=7):
    rng = np.random.default_rng(seed)
    return {m: rng.normal(0, 0.3, size) for m in members}


def _rounding() -> np.random.Generator:
    """A seeded generator for the stochastic rounding, so its statistics give the same verdict every run."""
    return np.random.default_rng(11)


def _masked(members, priv, roster, updates, scale, round_=1):
    return {
        m: masking.mask_update(
            masking.quantize(updates[m], CLIP, scale, rng=_rounding()), FED, round_, m, priv[m], roster
        )
        for m in members
    }


def test_pair_seed_is_symmetric_and_bound_to_context():
    _, priv, roster = _keys(3)
    s_ab = masking.pair_seed(FED, 4, "bank-0", priv["bank-0"], "bank-1", roster["bank-1"])
    s_ba = masking.pair_seed(FED, 4, "bank-1", priv["bank-1"], "bank-0", roster["bank-0"])
    assert s_ab == s_ba and len(s_ab) == 32
    others = {
        masking.pair_seed(FED, 5, "bank-0", priv["bank-0"], "bank-1", roster["bank-1"]),
        masking.pair_seed("other-fed", 4, "bank-0", priv["bank-0"], "bank-1", roster["bank-1"]),
        masking.pair_seed(FED, 4, "bank-0", priv["bank-0"], "bank-2", roster["bank-2"]),
    }
    assert s_ab not in others and len(others) == 3


def test_masked_sum_equals_plain_sum_within_quantization_error():
    members, priv, roster = _keys(5)
    size = 10_000
    updates = _updates(members, size)
    scale = masking.fixed_point_scale(CLIP, len(members))
    masked = _masked(members, priv, roster, updates, scale)
    total = masking.dequantize(masking.sum_masked(masked.values()), scale)
    plain = sum(np.clip(u, -CLIP, CLIP) for u in updates.values())
    # each member's stochastic rounding is off by < 1 unit per coordinate
    assert np.max(np.abs(total - plain)) < len(members) / scale
    # and a single masked update is far from its plaintext
    # and a single masked update decodes to noise spread over the whole range (|x| <= CLIP)
    alone = masking.dequantize(masked["bank-0"], scale)
    assert np.mean(np.abs(alone - updates["bank-0"])) > CLIP


def test_clipping_and_sum_near_range_do_not_wrap():
    members, priv, roster = _keys(4)
    scale = masking.fixed_point_scale(CLIP, len(members))
    updates = {m: np.array([5.0, -5.0, CLIP, -CLIP, 0.0]) for m in members}
    masked = _masked(members, priv, roster, updates, scale)
    total = masking.dequantize(masking.sum_masked(masked.values()), scale)
    np.testing.assert_allclose(total, [4, -4, 4, -4, 0], atol=4 / scale)


def test_stochastic_rounding_is_unbiased():
    scale = 4.0  # coarse grid so rounding is visible: 0.1 * 4 = 0.4 units
    x = np.full(200_000, 0.1)
    q = masking.dequantize(masking.quantize(x, CLIP, scale, rng=_rounding()), scale)
    assert set(np.unique(q)) == {0.0, 0.25}
    # mean of Bernoulli(0.4)/4 over 200k draws: std of the mean ~ 2.7e-4
    assert abs(q.mean() - 0.1) < 0.002


def test_single_masked_update_is_indistinguishable_from_random():
    members, priv, roster = _keys(3)
    size = 1 << 18
    # a maximally structured update: a constant, quantized to one repeated word
    x = np.full(size, 0.5)
    scale = masking.fixed_point_scale(CLIP, len(members))
    q = masking.quantize(x, CLIP, scale, rng=_rounding())
    masked = masking.mask_update(q, FED, 2, "bank-1", priv["bank-1"], roster)

    def byte_chi2_p(words):
        counts = np.bincount(words.view(np.uint8), minlength=256)
        return stats.chisquare(counts).pvalue

    def ks_p(words):
        return stats.kstest(words.astype(np.float64) / 2**32, "uniform").pvalue

    # control: the unmasked update fails both tests outright
    assert byte_chi2_p(q) < 1e-12 and ks_p(q) < 1e-12
    # masked: the tests cannot reject uniformity (false alarm probability 1e-6 each)
    assert byte_chi2_p(masked) > 1e-6
    assert ks_p(masked) > 1e-6


def test_dropout_recovery_one_of_five_missing():
    members, priv, roster = _keys(5)
    size = 5_000
    updates = _updates(members, size, seed=3)
    scale = masking.fixed_point_scale(CLIP, len(members))
    masked = _masked(members, priv, roster, updates, scale, round_=9)
    dropped = ["bank-2"]
    survivors = [m for m in members if m not in dropped]
    masking.check_recovery(members, survivors, dropped)

    partial = masking.sum_masked(masked[m] for m in survivors)
    # without recovery the leftover masks make the sum garbage
    garbage = masking.dequantize(partial, scale)
    plain = sum(np.clip(updates[m], -CLIP, CLIP) for m in survivors)
    assert np.mean(np.abs(garbage - plain)) > CLIP

    revealed = {}
    for s in survivors:
        for d, seed in masking.recovery_seeds(FED, 9, s, priv[s], roster, dropped).items():
            revealed[(s, d)] = seed
    assert len(revealed) == 4
    total = masking.dequantize(masking.unmask_sum(partial, survivors, revealed), scale)
    assert np.max(np.abs(total - plain)) < len(survivors) / scale


def test_revealed_seeds_do_not_unmask_other_rounds():
    members, priv, roster = _keys(3)
    r9 = masking.recovery_seeds(FED, 9, "bank-0", priv["bank-0"], roster, ["bank-2"])
    r10 = masking.recovery_seeds(FED, 10, "bank-0", priv["bank-0"], roster, ["bank-2"])
    assert r9["bank-2"] != r10["bank-2"]
    # a commitment matches only its own seed
    assert masking.seed_commitment(r9["bank-2"]) != masking.seed_commitment(r10["bank-2"])


def test_recovery_refuses_bad_declarations():
    members, priv, roster = _keys(3)
    with pytest.raises(VerificationError):
        masking.check_recovery(members, ["bank-0", "bank-1"], ["bank-1", "bank-2"])
    with pytest.raises(VerificationError):
        masking.check_recovery(members, ["bank-0"], ["bank-2"])
    with pytest.raises(FedcliError, match="at least 2"):
        masking.check_recovery(members, ["bank-0"], ["bank-1", "bank-2"])
    with pytest.raises(FedcliError, match="declared dropped"):
        masking.recovery_seeds(FED, 1, "bank-2", priv["bank-2"], roster, ["bank-2"])
    seed = masking.pair_seed(FED, 1, "bank-0", priv["bank-0"], "bank-1", roster["bank-1"])
    # a seed between two survivors must never be accepted as a recovery share
    with pytest.raises(VerificationError):
        masking.unmask_sum(np.zeros(4, np.uint32), members[:2], {("bank-0", "bank-1"): seed})


def test_mask_refuses_wrong_key_and_tiny_roster():
    members, priv, roster = _keys(2)
    q = np.zeros(8, np.uint32)
    with pytest.raises(FedcliError, match="does not match"):
        masking.mask_update(q, FED, 1, "bank-0", priv["bank-1"], roster)
    with pytest.raises(FedcliError, match="at least 2"):
        masking.mask_update(q, FED, 1, "bank-0", priv["bank-0"], {"bank-0": roster["bank-0"]})


def test_key_serialisation_round_trip_and_errors():
    k = keys.generate_x25519()
    text = keys.x25519_to_text(k)
    assert keys.x25519_to_text(keys.x25519_from_text(text)) == text
    pem = keys.x25519_private_to_pem(k, b"pw")
    assert keys.x25519_to_text(keys.x25519_private_from_pem(pem, b"pw")) == text
    with pytest.raises(FedcliError):
        keys.x25519_from_text("not base64!")
    with pytest.raises(FedcliError, match="32 bytes"):
        keys.x25519_from_text("AAAA")
    # the all-zero point is low order: no shared secret may come from it
    zero = keys.x25519_from_text("A" * 43 + "=")
    with pytest.raises(FedcliError, match="low-order"):
        masking.pair_seed(FED, 1, "a", k, "b", zero)


def test_noise_split():
    assert masking.member_noise_multiplier(1.2, "full", 4) == 1.2
    share = masking.member_noise_multiplier(1.2, "shared", 4)
    # variances of 4 shares add up to the full variance
    assert abs(4 * share**2 - 1.2**2) < 1e-12
    with pytest.raises(FedcliError):
        masking.member_noise_multiplier(1.0, "half", 4)


def test_flatten_round_trip():
    t = {"w": np.arange(6.0).reshape(2, 3), "b": np.array([7.0])}
    flat, layout = masking.flatten(t)
    assert flat.tolist() == [7.0, 0, 1, 2, 3, 4, 5]
    back = masking.unflatten(flat, layout)
    assert np.array_equal(back["w"], t["w"]) and np.array_equal(back["b"], t["b"])


# --- double masking: self-mask seeds shared t-of-n, sealed per recipient ------------------------


def test_pair_seed_is_bound_to_the_base_global():
    _, priv, roster = _keys(2)
    a = masking.pair_seed(FED, 4, "bank-0", priv["bank-0"], "bank-1", roster["bank-1"], "aa" * 32)
    b = masking.pair_seed(FED, 4, "bank-1", priv["bank-1"], "bank-0", roster["bank-0"], "bb" * 32)
    assert a != b  # banks shown different globals derive unrelated masks


def test_self_mask_shares_rebuild_only_from_t_and_only_for_their_context():
    from fedcli.secagg import sharing

    members, priv, roster = _keys(5)
    seed, base = bytes(range(16)), "ab" * 32
    sealed = sharing.deal(seed, 3, FED, 2, "bank-0", priv["bank-0"], roster, base)
    assert sorted(sealed) == members and all(len(v) == sharing.SEALED_BYTES for v in sealed.values())
    opened = {
        m: sharing.open_sealed(sealed[m], priv[m], roster["bank-0"], sharing.share_context(FED, 2, "bank-0", m, base))
        for m in members
    }
    assert sharing.combine([opened[m] for m in members[2:]], 3) == seed
    assert sharing.combine([opened[m] for m in members[:3]], 3) == seed
    with pytest.raises(VerificationError, match="need 3 distinct shares"):
        sharing.combine([opened[m] for m in members[:2]], 3)
    # two shares interpolated as if t were 2 give something else: t-1 shares tell nothing
    assert sharing.combine([opened[m] for m in members[:2]], 2) != seed
    # a share moved to another round, base, dealer or recipient does not open
    for context in (
        sharing.share_context(FED, 3, "bank-0", "bank-1", base),
        sharing.share_context(FED, 2, "bank-0", "bank-1", "cd" * 32),
        sharing.share_context(FED, 2, "bank-2", "bank-1", base),
    ):
        with pytest.raises(VerificationError, match="does not decrypt"):
            sharing.open_sealed(sealed["bank-1"], priv["bank-1"], roster["bank-0"], context)
    # nobody else (the coordinator has no roster key) can open bank-1's share
    outsider = X25519PrivateKey.from_private_bytes(bytes([99]) * 32)
    with pytest.raises(VerificationError):
        sharing.open_sealed(
            sealed["bank-1"], outsider, roster["bank-0"], sharing.share_context(FED, 2, "bank-0", "bank-1", base)
        )


def test_rebuild_skips_a_wrong_share_and_blames_when_none_fits():
    from fedcli.secagg import exchange, sharing

    seed = bytes(range(16))
    shares = sharing.split(seed, 3, [f"bank-{i}" for i in range(5)])
    good = [shares[f"bank-{i}"] for i in range(5)]
    bad = good[0][:2] + bytes(16)
    commitment = masking.seed_commitment(seed)
    assert exchange.rebuild_self_seed("bank-9", [bad, *good[1:4]], 3, commitment) == seed
    with pytest.raises(VerificationError, match="do not rebuild its signed commitment"):
        exchange.rebuild_self_seed("bank-9", [bad, good[1], good[2]], 3, commitment)


def test_double_masked_sum_unmasks_with_self_seeds_and_any_missing_mask_is_refused():
    members, priv, roster = _keys(5)
    size = 2_000
    updates = _updates(members, size)
    scale = masking.fixed_point_scale(CLIP, len(members))
    masked, self_seeds = {}, {}
    for i, m in enumerate(members):
        q = masking.quantize(updates[m], CLIP, scale, rng=_rounding())
        masked[m] = masking.mask_update(q, FED, 1, m, priv[m], roster)
        self_seeds[m] = bytes([i]) * 16
        masking.add_self_mask(masked[m], self_seeds[m])
    total = masking.sum_masked(masked.values())
    with pytest.raises(VerificationError, match="outside ±5·clip"):
        masking.check_range(total, 5, CLIP, scale)  # self masks still on
    for m in members[:-1]:
        masking.remove_self_mask(total, self_seeds[m])
    with pytest.raises(VerificationError, match="a mask is missing or wrong"):
        masking.check_range(total, 5, CLIP, scale)  # one self mask left: caught
    masking.remove_self_mask(total, self_seeds[members[-1]])
    masking.check_range(total, 5, CLIP, scale)
    plain = sum(np.clip(updates[m], -CLIP, CLIP) for m in members)
    assert np.max(np.abs(masking.dequantize(total, scale) - plain)) <= 5 / scale


def test_headroom_never_wraps_and_leaves_8_bits():
    for n in (3, 20, 50, 1000):
        scale = masking.fixed_point_scale(4.0, n)
        bound = n * (4.0 * scale + 1)
        assert bound <= 2 ** (31 - masking.HEADROOM_BITS)
        assert n * (4.0 * 2 * scale + 1) > 2 ** (31 - masking.HEADROOM_BITS)  # the largest power of two that fits
    # a sum of n values all at +clip (rounded up) decodes exactly, no wrap
    n, scale = 50, masking.fixed_point_scale(4.0, 50)
    total = masking.sum_masked(masking.quantize(np.full(10, 4.0), 4.0, scale) for _ in range(n))
    masking.check_range(total, n, 4.0, scale)
    assert np.allclose(masking.dequantize(total, scale), n * 4.0)


def test_reveal_record_refuses_a_second_set_and_the_other_secret(tmp_path):
    from fedcli.secagg import reveals

    path = reveals.record_path_for(tmp_path / "bank-a.state.json")
    reveals.check_and_record(path, FED, 1, "11" * 32, ["bank-a", "bank-b", "bank-c"], ["bank-d"])
    reveals.check_and_record(path, FED, 1, "11" * 32, ["bank-a", "bank-b", "bank-c"], ["bank-d"])  # same: fine
    with pytest.raises(VerificationError, match="different survivor set"):
        reveals.check_and_record(path, FED, 1, "22" * 32, ["bank-a", "bank-b", "bank-c", "bank-d"], [])
    reveals.check_and_record(path, FED, 2, "22" * 32, ["bank-a", "bank-b", "bank-c", "bank-d"], [])  # next round
    path.write_text("[1, 2]")
    with pytest.raises(FedcliError, match="damaged"):
        reveals.check_and_record(path, FED, 3, "33" * 32, ["bank-a"], [])


def test_pairwise_seed_shares_rebuild_from_any_t_and_only_for_their_context():
    from fedcli.secagg import pairshares

    members, priv, roster = _keys(6)
    base = "ab" * 32
    seeds = masking.pair_seeds(FED, 2, "bank-0", priv["bank-0"], roster, base)
    data = pairshares.deal(seeds, 4, FED, 2, "bank-0", priv["bank-0"], roster, base)
    assert len(data) == pairshares.file_bytes(6)
    opened = {m: pairshares.open_box(data, FED, 2, "bank-0", m, priv[m], roster, base) for m in members}

    def points(holders, peer):
        return [(pairshares.x_of(m, members), pairshares.decode_element(opened[m][peer])) for m in holders]

    for holders in (members[:4], members[2:], ["bank-0", "bank-2", "bank-3", "bank-5"]):
        assert pairshares.combine(points(holders, "bank-4")) == seeds["bank-4"]
    # t - 1 shares interpolate to something else
    assert pairshares.combine(points(members[:3], "bank-4")) != seeds["bank-4"]
    # the box is bound to round, base global, dealer and recipient; nobody outside the roster opens one
    for args in ((FED, 3, "bank-0", "bank-1"), (FED, 2, "bank-2", "bank-1")):
        with pytest.raises(VerificationError, match="do not decrypt"):
            pairshares.open_box(data, *args, priv["bank-1"], roster, base)
    with pytest.raises(VerificationError, match="do not decrypt"):
        pairshares.open_box(data, FED, 2, "bank-0", "bank-1", priv["bank-1"], roster, "cd" * 32)
    with pytest.raises(VerificationError, match="wrong size"):
        pairshares.open_box(data + b"x", FED, 2, "bank-0", "bank-1", priv["bank-1"], roster, base)
    with pytest.raises(VerificationError, match="wrong length"):
        pairshares.decode_element(b"\xff" * (pairshares.ELEMENT_BYTES + 1))


def test_pair_seed_rebuild_skips_a_wrong_share_and_blames_when_none_fits():
    from fedcli.secagg import exchange, pairshares

    seed = bytes(range(32))
    ys = pairshares.split(seed, 3, 5)
    good = list(enumerate(ys, start=1))
    bad = (1, bytes([ys[0][0] ^ 1]) + ys[0][1:])
    commitment = masking.seed_commitment(seed)
    assert exchange.rebuild_pair_seed(("bank-1", "bank-4"), [bad, *good[1:4]], 3, commitment) == seed
    with pytest.raises(VerificationError, match="bank-1's pairwise seed with bank-4 do not rebuild"):
        exchange.rebuild_pair_seed(("bank-1", "bank-4"), [bad, good[1], good[2]], 3, commitment)


@pytest.mark.parametrize(("n", "t", "expected"), [(4, 3, 3), (5, 3, 3), (6, 3, 4), (20, 3, 18), (50, 26, 26)])
def test_pair_threshold_makes_two_disjoint_revealing_groups_impossible(n, t, expected):
    """A coordinator showing two survivor sets to two disjoint groups of banks needs t self-mask shares
    from one and t_pair pairwise shares from the other: t + t_pair > n rules it out."""
    from types import SimpleNamespace

    from fedcli.secagg import exchange

    spec = SimpleNamespace(secagg=SimpleNamespace(threshold=t), members=list(range(n)))
    got = exchange.pair_threshold(spec)
    assert got == expected and got >= t and got + t > n


def _fork_spec(members, roster, t):
    from types import SimpleNamespace

    def member(name):
        return SimpleNamespace(name=name, mask_key=lambda: roster[name])

    secagg = SimpleNamespace(clip=CLIP, noise="full", threshold=t, enabled=True)
    return SimpleNamespace(federation_id=FED, secagg=secagg, min_clients=t, members=[member(m) for m in members])


def test_two_survivor_sets_shown_to_two_disjoint_groups_never_unmask_a_bank():
    """6 banks, t = 3: the coordinator shows group A (banks 0-2) a set where bank-5 dropped and group B
    (banks 3-5) a set where it survived. B's self-mask shares rebuild bank-5's self seed; A's reveals give
    banks 0-2's seeds with bank-5, but only 3 shares of banks 3-4's: t' = 4 keeps those masks on. Had the
    pairwise seeds been shared 3-of-6, the same reveals would unmask bank-5's update."""
    from fedcli.secagg import exchange, pairshares, sharing

    members, priv, roster = _keys(6)
    spec, base, victim = _fork_spec(members, roster, 3), "ab" * 32, "bank-5"
    assert exchange.pair_threshold(spec) == 4
    x = np.random.default_rng(3).normal(0, 0.3, 64)
    dealt = {m: exchange.mask_delta(spec, 1, m, priv[m], {"w": x}, base) for m in members}
    group_a, group_b = members[:3], members[3:]

    # group B, shown "everyone survived", reveals its shares of bank-5's self seed: t = 3 rebuild it
    self_shares = [
        sharing.open_sealed(
            keys.unb64(dealt[victim][1]["shares"][m]),
            priv[m],
            roster[victim],
            sharing.share_context(FED, 1, victim, m, base),
        )
        for m in group_b
    ]
    self_seed = exchange.rebuild_self_seed(victim, self_shares, 3, dealt[victim][1]["self_commitment"])

    # group A, shown "bank-5 dropped", reveals its own seeds with bank-5 and its shares of the others'
    # (bank-3's and bank-4's masks with bank-5 stay unless their seeds rebuild)
    known = {m: masking.pair_seed(FED, 1, m, priv[m], victim, roster[victim], base) for m in group_a}

    def points(dealer, files):
        return [
            (
                pairshares.x_of(m, members),
                pairshares.decode_element(
                    pairshares.open_box(files[dealer], FED, 1, dealer, m, priv[m], roster, base)[victim]
                ),
            )
            for m in group_a
        ]

    files = {m: dealt[m][3] for m in members}
    for dealer in group_b[:2]:
        commitment = dealt[dealer][1]["commitments"][victim]
        with pytest.raises(VerificationError, match="do not rebuild its signed commitment"):
            exchange.rebuild_pair_seed((dealer, victim), points(dealer, files), 3, commitment)

    words = np.asarray(dealt[victim][0]["w"], dtype=np.uint32).reshape(-1).copy()
    masking.remove_self_mask(words, self_seed)
    for m, seed in known.items():
        words += masking.expand_mask(seed, words.size)  # bank-5 subtracted its masks with lower ids
    with pytest.raises(VerificationError, match="outside"):
        masking.check_range(words, 1, CLIP, exchange.scale(spec))

    # the counterfactual: pairwise seeds shared 3-of-6 would let group A's three shares rebuild them
    weak = {
        d: pairshares.deal(masking.pair_seeds(FED, 1, d, priv[d], roster, base), 3, FED, 1, d, priv[d], roster, base)
        for d in group_b[:2]
    }
    for dealer in group_b[:2]:
        seed = exchange.rebuild_pair_seed(
            (dealer, victim), points(dealer, weak), 3, dealt[dealer][1]["commitments"][victim]
        )
        words += masking.expand_mask(seed, words.size)
    masking.check_range(words, 1, CLIP, exchange.scale(spec))  # bank-5's update in the clear
    np.testing.assert_allclose(masking.dequantize(words, exchange.scale(spec)), np.clip(x, -CLIP, CLIP), atol=1e-4)


def test_a_recovery_file_too_large_for_the_bound_leaves_out_the_last_survivors_pairwise_shares():
    """100 banks, 51 survivors, 49 dropped: every pairwise share would not fit the 64 kB signed-document
    bound; the file keeps the shares of the first survivors (the same ones at every bank) and fits."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcli.secagg import exchange

    share = keys.b64(bytes(33))
    survivors, dropped = [f"bank-{i:03d}" for i in range(51)], [f"bank-{i:03d}" for i in range(51, 100)]
    doc = {"kind": "secagg-recovery", "pair_shares": {s: {d: share for d in dropped} for s in survivors}}
    signed = exchange._sign_within_bound(Ed25519PrivateKey.generate(), doc)
    assert len(signed) <= keys.MAX_MANIFEST_BYTES
    kept = sorted(doc["pair_shares"])
    assert 0 < len(kept) < len(survivors) and kept == survivors[: len(kept)]
