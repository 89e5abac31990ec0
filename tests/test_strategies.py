"""Aggregation rules, server optimisers, staleness and compression against hand-computed values."""

import math

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedcli.aggregation import aggregators, rules, server_opt, strategy
from fedcli.errors import FedcliError, VerificationError
from fedcli.norms import clip_factor, update_norm
from fedcli.privacy.noise import clip_update
from fedcli.protocol import compression


def shapes_of(update):
    return {k: np.shape(v) for k, v in update.items()}


def f32(x):
    return np.array(x, dtype=np.float32)


# ----- weighted mean -----


def test_weighted_mean_hand_values():
    acc = rules.WeightedMean()
    acc.add({"w": f32([1, 2])}, weight=1)
    acc.add({"w": f32([3, 6])}, weight=3)
    np.testing.assert_allclose(acc.result()["w"], [2.5, 5.0])
    assert acc.result()["w"].dtype == np.float64  # no rounding before the server step
    assert acc.total_weight == 4 and acc.count == 2


def test_weighted_mean_scale_shrinks_without_renormalising():
    acc = rules.WeightedMean()
    acc.add({"w": f32([1, 2])}, weight=1)
    acc.add({"w": f32([3, 6])}, weight=3, scale=0.5)
    np.testing.assert_allclose(acc.result()["w"], [(1 + 4.5) / 4, (2 + 9) / 4])


def test_weighted_mean_refuses_bad_input():
    acc = rules.WeightedMean()
    with pytest.raises(FedcliError, match="no updates"):
        acc.result()
    with pytest.raises(FedcliError, match="positive"):
        acc.add({"w": f32([1])}, weight=0)
    acc.add({"w": f32([1, 2])})
    with pytest.raises(FedcliError, match="shape"):
        acc.add({"w": f32([1, 2, 3])})
    with pytest.raises(FedcliError, match="names"):
        acc.add({"v": f32([1, 2])})


# ----- norm bounding -----


def test_norm_bound_hand_values():
    d = {"a": f32([3, 0]), "b": f32([4])}
    assert update_norm(d) == 5.0
    assert clip_factor(update_norm(d), 2.5) == 0.5
    assert clip_factor(update_norm(d), 10) == 1.0
    out, norm = clip_update(d, 2.5)  # the DP clip uses the same rule, then holds the bound exactly
    assert norm == 5.0
    np.testing.assert_allclose(out["a"], [1.5, 0])
    np.testing.assert_allclose(out["b"], [2.0])
    assert clip_factor(float("nan"), 1.0) == 0.0


def test_streamed_norm_matches_in_memory():
    rng = np.random.default_rng(0)
    u = {"w": rng.normal(size=(7, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32), "s": f32(2.0)}
    got = rules.streamed_norm(shapes_of(u), rules.memory_reader([u]), 0, chunk_elems=4)
    assert got == pytest.approx(update_norm(u), rel=1e-12)


# ----- median / trimmed mean -----

UPDATES = [
    {"w": f32([[1, 5], [9, 0]]), "s": f32(1)},
    {"w": f32([[2, 7], [3, 3]]), "s": f32(2)},
    {"w": f32([[10, -1], [4, 1]]), "s": f32(10)},
]


@pytest.mark.parametrize("chunk", [1, 2, 1 << 16])
def test_coordinate_median_hand_values(chunk):
    out = rules.coordinate_median(shapes_of(UPDATES[0]), 3, rules.memory_reader(UPDATES), chunk_elems=chunk)
    np.testing.assert_array_equal(out["w"], [[2, 5], [4, 1]])
    assert out["s"].shape == () and out["s"] == 2


def test_coordinate_median_even_count_averages_middle_pair():
    ups = UPDATES + [{"w": f32([[0, 0], [0, 0]]), "s": f32(3)}]
    out = rules.coordinate_median(shapes_of(ups[0]), 4, rules.memory_reader(ups))
    # column values sorted: (0,1,2,10) -> 1.5, (-1,0,5,7) -> 2.5, (0,3,4,9) -> 3.5, (0,0,1,3) -> 0.5
    np.testing.assert_array_equal(out["w"], [[1.5, 2.5], [3.5, 0.5]])
    assert out["s"] == 2.5


def test_trimmed_mean_hand_values():
    ups = [{"x": f32([v, -v])} for v in (1, 2, 3, 4, 100)]
    read = rules.memory_reader(ups)
    np.testing.assert_allclose(rules.trimmed_mean({"x": (2,)}, 5, read, 0.2, chunk_elems=1)["x"], [3, -3])
    np.testing.assert_allclose(rules.trimmed_mean({"x": (2,)}, 5, read, 0.4)["x"], [3, -3])
    np.testing.assert_allclose(
        rules.trimmed_mean({"x": (2,)}, 5, read, 0.1)["x"], [22, -22]
    )  # floor(0.5)=0: plain mean
    assert rules.trim_count(10, 0.25) == 2
    with pytest.raises(FedcliError, match="trim_ratio"):
        rules.trimmed_mean({"x": (2,)}, 5, read, 0.5)


def test_safetensors_reader_matches_memory(tmp_path):
    paths = []
    for i, u in enumerate(UPDATES):
        p = tmp_path / f"u{i}.safetensors"
        save_file(dict(u), str(p))
        paths.append(p)
    with rules.safetensors_reader(paths) as read:
        got = rules.coordinate_median(shapes_of(UPDATES[0]), 3, read, chunk_elems=2)
        dist = rules.pairwise_sq_distances(shapes_of(UPDATES[0]), 3, read, chunk_elems=1)
    want = rules.coordinate_median(shapes_of(UPDATES[0]), 3, rules.memory_reader(UPDATES))
    np.testing.assert_array_equal(got["w"], want["w"])
    np.testing.assert_array_equal(got["s"], want["s"])
    np.testing.assert_allclose(
        dist, rules.pairwise_sq_distances(shapes_of(UPDATES[0]), 3, rules.memory_reader(UPDATES))
    )


# ----- Krum -----

KRUM_UPDATES = [{"a": f32([v]), "b": f32([[0.0]])} for v in (0, 1, 2, 3, 100)]


def test_pairwise_distances_hand_values():
    ups = [{"a": f32([0, 0]), "b": f32(0)}, {"a": f32([3, 0]), "b": f32(0)}, {"a": f32([0, 0]), "b": f32(4)}]
    d = rules.pairwise_sq_distances(shapes_of(ups[0]), 3, rules.memory_reader(ups), chunk_elems=1)
    np.testing.assert_allclose(d, [[0, 9, 16], [9, 0, 25], [16, 25, 0]])


def test_krum_scores_and_selection_hand_values():
    d = rules.pairwise_sq_distances(shapes_of(KRUM_UPDATES[0]), 5, rules.memory_reader(KRUM_UPDATES))
    # f=1: each score sums the n-f-2 = 2 smallest distances to the others
    np.testing.assert_allclose(rules.krum_scores(d, 1), [1 + 4, 1 + 1, 1 + 1, 1 + 4, 97**2 + 98**2])
    assert rules.krum_select(d, 1) == [1]
    assert rules.krum_select(d, 1, m=3) == [0, 1, 2]
    with pytest.raises(FedcliError, match="at least 7"):
        rules.krum_select(d, 2)
    with pytest.raises(FedcliError, match="m must be"):
        rules.krum_select(d, 1, m=6)


# ----- a poisoned update moves robust aggregates a bounded amount -----


def _honest_and_poison(n=6, size=50, seed=1):
    rng = np.random.default_rng(seed)
    honest = [{"w": rng.normal(0, 0.1, size).astype(np.float32)} for _ in range(n)]
    poison = {"w": np.full(size, 1e6, dtype=np.float32)}
    return honest, poison


def test_fedavg_is_not_robust():
    honest, poison = _honest_and_poison()
    acc = rules.WeightedMean()
    for u in honest + [poison]:
        acc.add(u)
    assert np.max(np.abs(acc.result()["w"])) > 1e5


def test_poisoned_update_bounded_by_median_and_trimmed_mean():
    honest, poison = _honest_and_poison()
    ups = honest + [poison]
    lo = np.min([u["w"] for u in honest], axis=0)
    hi = np.max([u["w"] for u in honest], axis=0)
    for out in (
        rules.coordinate_median({"w": (50,)}, 7, rules.memory_reader(ups), chunk_elems=8),
        rules.trimmed_mean({"w": (50,)}, 7, rules.memory_reader(ups), 0.15, chunk_elems=8),
    ):
        assert np.all(out["w"] >= lo) and np.all(out["w"] <= hi)


def test_poisoned_update_bounded_by_norm_bounding():
    honest, poison = _honest_and_poison()
    c = 0.5

    def bounded_mean(ups):
        acc = rules.WeightedMean()
        for u in ups:
            acc.add(u, scale=clip_factor(update_norm(u), c))
        return acc.result()["w"]

    clean = bounded_mean(honest + [{"w": np.zeros(50, np.float32)}])
    poisoned = bounded_mean(honest + [poison])
    shift = np.linalg.norm(poisoned.astype(np.float64) - clean)
    assert shift <= c / 7 + 1e-6
    assert shift > 0.5 * c / 7  # the poison is clipped, not dropped


def test_poisoned_update_never_chosen_by_krum():
    honest, poison = _honest_and_poison()
    ups = honest + [poison]
    d = rules.pairwise_sq_distances({"w": (50,)}, 7, rules.memory_reader(ups), chunk_elems=8)
    chosen = rules.krum_select(d, f=1, m=4)
    assert 6 not in chosen and len(chosen) == 4


# ----- staleness -----


def test_staleness_discount_hand_values():
    assert rules.staleness_discount(0) == 1.0
    assert rules.staleness_discount(3, "polynomial", a=0.5) == 0.5
    assert rules.staleness_discount(1, "polynomial", a=1.0) == 0.5
    assert rules.staleness_discount(4, "hinge", a=10, b=4) == 1.0
    assert rules.staleness_discount(5, "hinge", a=10, b=4) == pytest.approx(1 / 11)
    assert rules.staleness_discount(50, "constant") == 1.0
    with pytest.raises(FedcliError, match="unknown staleness"):
        rules.staleness_discount(1, "exp")
    with pytest.raises(FedcliError, match=">= 0"):
        rules.staleness_discount(-1)


def test_async_fold_discounts_stale_updates():
    acc = rules.WeightedMean()
    acc.add({"w": f32([2.0])}, weight=1, scale=rules.staleness_discount(0))
    acc.add({"w": f32([4.0])}, weight=1, scale=rules.staleness_discount(3, a=0.5))
    assert acc.result()["w"][0] == pytest.approx((2 + 0.5 * 4) / 2)


# ----- server optimisers -----


def test_fedavg_server_step():
    new, state = server_opt.server_step("fedavg", {"w": f32([1, 2])}, {"w": f32([0.5, -1])}, None)
    np.testing.assert_allclose(new["w"], [1.5, 1.0])
    assert state == {} and new["w"].dtype == np.float32
    new, _ = server_opt.server_step("fedavg", {"w": f32([1, 2])}, {"w": f32([0.5, -1])}, None, {"lr": 2})
    np.testing.assert_allclose(new["w"], [2.0, 0.0])


def test_fedavgm_momentum_accumulates():
    g, s = {"w": f32([0])}, {}
    g, s = server_opt.server_step("fedavgm", g, {"w": f32([1])}, s, {"momentum": 0.9})
    assert g["w"][0] == pytest.approx(1.0) and s["m/w"][0] == pytest.approx(1.0)
    g, s = server_opt.server_step("fedavgm", g, {"w": f32([1])}, s, {"momentum": 0.9})
    assert s["m/w"][0] == pytest.approx(1.9) and g["w"][0] == pytest.approx(2.9)


def test_fedadam_and_fedyogi_hand_values():
    p = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    ga, sa = server_opt.server_step("fedadam", {"w": f32([0])}, {"w": f32([2])}, {}, p)
    gy, sy = server_opt.server_step("fedyogi", {"w": f32([0])}, {"w": f32([2])}, {}, p)
    # m = 0.1*2 = 0.2; Adam v = 0.99*1e-6 + 0.01*4; Yogi v = 1e-6 + 0.01*4 (sign(v0 - 4) = -1)
    assert sa["m/w"][0] == pytest.approx(0.2) and sa["v/w"][0] == pytest.approx(0.04000099)
    assert sy["v/w"][0] == pytest.approx(0.040001)
    assert ga["w"][0] == pytest.approx(0.0995012624, rel=1e-6)
    assert gy["w"][0] == pytest.approx(0.0995012500, rel=1e-6)
    # a zero delta next: Adam decays v by beta2, Yogi keeps it (d^2 = 0); both decay m by beta1
    _, sa2 = server_opt.server_step("fedadam", ga, {"w": f32([0])}, sa, p)
    _, sy2 = server_opt.server_step("fedyogi", gy, {"w": f32([0])}, sy, p)
    assert sa2["v/w"][0] == pytest.approx(0.99 * 0.04000099, rel=1e-6)
    assert sy2["v/w"][0] == pytest.approx(0.040001, rel=1e-6)
    assert sa2["m/w"][0] == pytest.approx(0.18, rel=1e-6)


def test_server_step_leaves_integer_tensors_to_the_delta():
    new, state = server_opt.server_step(
        "fedadam", {"w": f32([0]), "n": np.array([5], np.int64)}, {"w": f32([1]), "n": f32([2])}, {}
    )
    assert new["n"].dtype == np.int64 and new["n"][0] == 7
    assert set(state) == {"m/w", "v/w"}


def test_server_opt_params_checked():
    with pytest.raises(FedcliError, match="unknown server optimizer"):
        server_opt.check_params("sgd")
    with pytest.raises(FedcliError, match="no parameter 'momentum'"):
        server_opt.check_params("fedadam", {"momentum": 0.9})
    with pytest.raises(FedcliError, match=r"beta2 must be in \[0, 1\)"):
        server_opt.check_params("fedyogi", {"beta2": 1.0})
    with pytest.raises(FedcliError, match="lr must be > 0"):
        server_opt.check_params("fedavg", {"lr": 0})
    assert server_opt.check_params("fedadam", {"lr": 1})["lr"] == 1.0


def test_server_opt_state_roundtrip_and_mismatch():
    _, state = server_opt.server_step("fedyogi", {"w": f32([[0, 1]])}, {"w": f32([[2, 3]])}, {})
    data = server_opt.state_to_bytes("fedyogi", state, round_no=3)
    back = server_opt.state_from_bytes(data, "fedyogi", 3)
    assert set(back) == {"m/w", "v/w"}
    np.testing.assert_array_equal(back["v/w"], state["v/w"])
    with pytest.raises(FedcliError, match="for 'fedyogi'"):
        server_opt.state_from_bytes(data, "fedadam", 3)
    with pytest.raises(VerificationError, match="round 3"):
        server_opt.state_from_bytes(data, "fedyogi", 4)
    with pytest.raises(VerificationError, match="not valid safetensors"):
        server_opt.state_from_bytes(b"\x80\x04garbage", "fedyogi")
    with pytest.raises(FedcliError, match="does not match the model"):
        server_opt.server_step("fedyogi", {"w": f32([0, 1, 2])}, {"w": f32([0, 0, 0])}, back)


# ----- compression -----


def test_int8_hand_values():
    d = {"w": f32([0.5, -1.27, 0.0, 1.0])}
    t, meta, res = compression.encode(d, "int8")
    assert meta == {"method": "int8"}
    np.testing.assert_array_equal(t["w#q8"], [50, -127, 0, 100])
    assert t["w#scale"][0] == pytest.approx(0.01)
    np.testing.assert_allclose(compression.decode(t, meta, {"w": (4,)})["w"], d["w"], atol=1e-6)
    assert np.max(np.abs(res["w"])) < 1e-6


def test_int8_error_bound_and_size():
    rng = np.random.default_rng(3)
    d = {"w": rng.normal(size=(100, 10)).astype(np.float32), "z": np.zeros(3, np.float32)}
    t, meta, res = compression.encode(d, "int8")
    dec = compression.decode(t, meta, shapes_of(d))
    scale = float(t["w#scale"][0])
    assert np.max(np.abs(dec["w"] - d["w"])) <= scale / 2 + 1e-6
    np.testing.assert_array_equal(dec["z"], 0)
    np.testing.assert_allclose(res["w"], d["w"] - dec["w"], atol=1e-6)
    assert compression.wire_bytes(t) == 1000 + 3 + 2 * 4  # one byte per value plus one float32 scale per tensor


def test_topk_hand_values_and_error_feedback():
    d = {"w": f32([0.1, -3, 2, 0.5])}
    t, meta, res = compression.encode(d, "topk", ratio=0.5)
    assert meta == {"method": "topk", "ratio": 0.5}
    np.testing.assert_array_equal(t["w#idx"], [1, 2])
    np.testing.assert_array_equal(t["w#val"], [-3, 2])
    np.testing.assert_allclose(res["w"], [0.1, 0, 0, 0.5])
    # next round with nothing new: the residual is what gets sent
    t2, _, res2 = compression.encode({"w": f32([0, 0, 0, 0])}, "topk", ratio=0.5, residual=res)
    np.testing.assert_array_equal(t2["w#idx"], [0, 3])
    np.testing.assert_allclose(t2["w#val"], [0.1, 0.5])
    np.testing.assert_array_equal(res2["w"], 0)


def test_topk_error_bound():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 25)).astype(np.float32)
    t, meta, res = compression.encode({"w": x}, "topk", ratio=0.1)
    dec = compression.decode(t, meta, {"w": x.shape})["w"]
    kept = dec != 0
    assert kept.sum() == 100
    assert np.max(np.abs(x[~kept])) <= np.min(np.abs(x[kept]))
    # dropping the d-k smallest of d coordinates loses at most (1 - k/d) of the squared norm
    assert np.sum(res["w"].astype(np.float64) ** 2) <= (1 - 0.1) * np.sum(x.astype(np.float64) ** 2) + 1e-9
    assert compression.wire_bytes(t) == 100 * (4 + 4)


@pytest.mark.parametrize("method,ratio", [("int8", None), ("topk", 0.05)])
def test_error_feedback_loses_nothing_over_rounds(method, ratio):
    rng = np.random.default_rng(5)
    residual, sent, total = None, np.zeros(200), np.zeros(200)
    for _ in range(10):
        d = rng.normal(size=200).astype(np.float32)
        t, meta, residual = compression.encode({"w": d}, method, ratio=ratio, residual=residual)
        sent += compression.decode(t, meta, {"w": (200,)})["w"]
        total += d
    # everything produced was either sent or is still in the bank's residual
    np.testing.assert_allclose(sent + residual["w"], total, atol=1e-4)


def test_decode_refuses_malformed_updates():
    d = {"w": f32([0.1, -3, 2, 0.5])}
    t, meta, _ = compression.encode(d, "topk", ratio=0.5)
    shapes = {"w": (4,)}
    with pytest.raises(VerificationError, match="out of range"):
        compression.decode({**t, "w#idx": np.array([1, 4], np.int32)}, meta, shapes)
    with pytest.raises(VerificationError, match="strictly increasing"):
        compression.decode({**t, "w#idx": np.array([2, 2], np.int32)}, meta, shapes)
    with pytest.raises(VerificationError, match="malformed"):
        compression.decode({**t, "w#idx": np.array([0, 1, 2], np.int32), "w#val": f32([1, 2, 3])}, meta, shapes)
    with pytest.raises(VerificationError, match="unexpected"):
        compression.decode({**t, "extra": f32([1])}, meta, shapes)
    t8, meta8, _ = compression.encode(d, "int8")
    with pytest.raises(VerificationError, match="invalid scale"):
        compression.decode({**t8, "w#scale": f32([np.nan])}, meta8, shapes)
    with pytest.raises(VerificationError, match="malformed"):
        compression.decode({**t8, "w#q8": t8["w#q8"].astype(np.int16)}, meta8, shapes)
    with pytest.raises(VerificationError, match="non-finite"):
        compression.decode({"w": f32([1, np.inf, 0, 0])}, {"method": "none"}, shapes)


def test_compression_settings_checked():
    with pytest.raises(FedcliError, match="ratio"):
        compression.check("topk")
    with pytest.raises(FedcliError, match="unknown compression"):
        compression.check("zip")
    assert compression.check("none") == {"method": "none"}
    t, meta, res = compression.encode({"w": f32([1, 2])}, "none")
    np.testing.assert_array_equal(t["w"], [1, 2])
    np.testing.assert_array_equal(res["w"], 0)
    assert math.isclose(compression.wire_bytes(t), 8)


# ----- [strategy] spec section and the coordinator's aggregators -----


def test_strategy_defaults_are_plain_sync_fedavg():
    s = strategy.parse(None, n_members=3, min_clients=2)
    assert (s.mode, s.rule, s.server, s.compression, s.max_norm, s.prox_mu) == (
        "sync",
        "fedavg",
        "fedavg",
        "none",
        0,
        0,
    )
    assert s.compression_meta == {"method": "none"}


def test_strategy_full_table_parses():
    s = strategy.parse(
        {
            "mode": "async",
            "rule": "trimmed_mean",
            "trim_ratio": 0.2,
            "max_norm": 3,
            "prox_mu": 0.01,
            "server": {"optimizer": "fedadam", "lr": 0.05},
            "compression": {"method": "topk", "ratio": 0.1},
            "async": {"buffer_size": 3, "max_staleness": 2, "discount": "hinge", "exponent": 10, "hinge_after": 1},
        },
        n_members=5,
        min_clients=2,
    )
    assert s.mode == "async" and s.server_params == {"lr": 0.05} and s.max_norm == 3.0
    assert s.compression_meta == {"method": "topk", "ratio": 0.1}
    assert s.discount_for(1) == 1.0 and s.discount_for(2) == pytest.approx(1 / 11)


@pytest.mark.parametrize(
    "table,msg",
    [
        ({"rule": "mean"}, "'rule' input should be 'fedavg', 'median', 'trimmed_mean' or 'krum'"),
        ({"mode": "later"}, "'mode' input should be 'sync' or 'async'"),
        ({"max_norm": -1}, "'max_norm' input should be greater than or equal to 0"),
        ({"prox_mu": "a lot"}, "'prox_mu' input should be a valid number"),
        ({"rule": "krum", "krum_f": 1}, r"needs at least 5 updates per round; raise min_clients \(now 2\)"),
        ({"server": {"optimizer": "fedadam", "momentum": 0.9}}, "no parameter 'momentum'"),
        (
            {"compression": {"method": "topk", "ratio": 2}},
            "'compression.ratio' input should be less than or equal to 1",
        ),
        ({"async": {"buffer_size": 9}}, "buffer_size must be between 1 and"),
        ({"async": {"discount": "exp"}}, "'async.discount' input should be 'polynomial', 'hinge' or 'constant'"),
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"server": {"optimiser": "fedadam"}}, "unknown key 'server.optimiser'; did you mean 'optimizer'"),
    ],
)
def test_strategy_errors_name_the_setting(table, msg):
    with pytest.raises(FedcliError, match=msg) as e:
        strategy.parse(table, n_members=5, min_clients=2)
    assert str(e.value).startswith("federation spec: [strategy]") and "\n" not in str(e.value)


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "krum"])
def test_combiner_resists_one_poisoned_bank_only_with_robust_rules(rule):
    honest, poison = _honest_and_poison(n=6, size=30)
    s = strategy.parse({"rule": rule, "trim_ratio": 0.2, "krum_f": 1, "krum_m": 3}, n_members=7, min_clients=7)
    rule_class = {"fedavg": aggregators.FedAvg, "median": aggregators.Median}
    rule_class |= {"trimmed_mean": aggregators.TrimmedMean, "krum": aggregators.Krum}
    comb = rule_class[rule](s, {"w": (30,)}, chunk_elems=7)
    for i, u in enumerate(honest):
        comb.add(f"bank-{i}", None, u, weight=100)
    comb.add("evil", None, poison, weight=100)
    delta, _, info = comb.result((True, ""))
    assert info["rule"] == rule
    worst = np.max(np.abs(delta["w"]))
    if rule == "fedavg":
        assert worst > 1e5
    else:
        assert worst < 1.0
    if rule == "krum":
        assert len(info["krum_selected"]) == 3 and "evil" not in info["krum_selected"]
    assert getattr(comb, "_tmp", None) is None  # temporary spill files are gone


def test_combiner_norm_bound_and_staleness_scale_updates():
    s = strategy.parse({"max_norm": 1.0, "mode": "async", "async": {"buffer_size": 2}}, n_members=2, min_clients=1)
    comb = aggregators.FedAvg(s, {"w": (2,)})
    note_a = comb.add("a", None, {"w": f32([3, 4])}, weight=1)  # norm 5 -> clipped by 0.2 -> [0.6, 0.8]
    note_b = comb.add("b", None, {"w": f32([0, 0.5])}, weight=1, staleness=3)  # discount (1+3)^-0.5 = 0.5
    delta, _, info = comb.result((True, ""))
    np.testing.assert_allclose(delta["w"], [(0.6 + 0) / 2, (0.8 + 0.25) / 2], rtol=1e-6)
    assert note_a["clipped_by"] == 0.2 and note_b["discount"] == 0.5
    assert info == {"rule": "fedavg", "max_norm": 1.0}


@pytest.mark.parametrize("method,ratio", [("none", None), ("int8", None), ("topk", 0.3)])
def test_layout_matches_what_encode_produces(method, ratio):
    d = {"w": np.ones((4, 5), np.float32), "b": f32([1.0])}
    t, meta, _ = compression.encode(d, method, ratio=ratio)
    shapes, dtypes = compression.layout(meta, shapes_of(d))
    assert shapes == {k: v.shape for k, v in t.items()}
    assert dtypes == {k: str(v.dtype) for k, v in t.items()}
