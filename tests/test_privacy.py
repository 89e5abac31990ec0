"""Tests for fedcli.privacy: clipping, noise, accounting against independent accountants, ledger, DP-SGD."""

import json
import math
import multiprocessing

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp
from scipy import optimize, stats

from fedcli import errors, randomness
from fedcli.errors import ExitCode, FedcliError
from fedcli.norms import update_norm
from fedcli.privacy import accounting, dp_sgd, policy
from fedcli.privacy.accounting import Mechanism
from fedcli.privacy.ledger import BudgetExceeded, Ledger
from fedcli.privacy.noise import add_gaussian_noise, clip_update, privatize_update


def _update(scale=10.0, seed=0):
    g = np.random.default_rng(seed)
    return {
        "w": (g.standard_normal((64, 32)) * scale).astype(np.float32),
        "b": (g.standard_normal(32) * scale).astype(np.float32),
        "h": g.standard_normal((3, 3, 3)) * scale,  # float64 is kept as float64
    }


# --------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("clip", [1e-3, 0.1, 1.0, 3.7, 100.0])
def test_clipping_bounds_the_whole_update_norm_exactly(clip):
    upd = _update()
    norm_before = update_norm(upd)
    clipped, reported = clip_update(upd, clip)
    assert reported == pytest.approx(norm_before)
    after = update_norm(clipped)
    assert after <= clip  # never above the sensitivity the accountant assumes, not even by rounding
    assert after == pytest.approx(clip, rel=1e-5)
    # direction is kept: one common scale factor for every tensor
    flat = np.concatenate([v.ravel() for v in upd.values()]).astype(np.float64)
    flat_c = np.concatenate([clipped[k].ravel() for k in upd]).astype(np.float64)
    cosine = flat @ flat_c / (np.linalg.norm(flat) * np.linalg.norm(flat_c))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    assert all(clipped[k].dtype == upd[k].dtype and clipped[k].shape == upd[k].shape for k in upd)


def test_small_update_is_left_unchanged_by_clipping():
    upd = _update(scale=1e-3)
    clipped, norm = clip_update(upd, 10.0)
    assert norm < 10.0
    assert all(np.array_equal(clipped[k], upd[k]) and clipped[k] is not upd[k] for k in upd)


def test_clipping_rejects_bad_input():
    with pytest.raises(FedcliError):
        clip_update(_update(), 0.0)
    with pytest.raises(FedcliError, match="NaN"):
        clip_update({"w": np.array([1.0, np.nan], dtype=np.float32)}, 1.0)
    with pytest.raises(FedcliError, match="not floating point"):
        clip_update({"steps": np.array([3])}, 1.0)


# --------------------------------------------------------------------------- noise


def test_gaussian_noise_has_the_std_asked_and_is_gaussian():
    """Seeded (tests only): the statistical checks give the same verdict on every run."""
    sigma = 2.0
    zero = {"a": np.zeros((300, 400), dtype=np.float32), "b": np.zeros(50_000)}
    noised = add_gaussian_noise(zero, sigma, rng=np.random.default_rng(5))
    assert noised["a"].dtype == np.float32 and noised["b"].dtype == np.float64
    noise = np.concatenate([noised["a"].astype(np.float64).ravel(), noised["b"].ravel()])
    n = noise.size
    # standard errors of the sample mean and sample std of n Gaussian draws
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(n)
    assert abs(noise.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    # shape of the distribution, not just its moments
    assert stats.kstest(noise[:20_000] / sigma, "norm").pvalue > 1e-4


def test_noise_std_is_z_times_clip():
    """The release path draws from the OS generator, so its bound is 10 standard errors: a correct std
    never fails it (odds ~1e-23), a std off by 3% always does."""
    z, clip = 0.8, 2.5
    zero = {"a": np.zeros((300, 400), dtype=np.float32), "b": np.zeros(50_000)}
    noised, dp = privatize_update(zero, clip, z)
    noise = np.concatenate([noised["a"].astype(np.float64).ravel(), noised["b"].ravel()])
    n, sigma = noise.size, z * clip
    assert abs(noise.mean()) < 10 * sigma / math.sqrt(n)
    assert abs(noise.std() - sigma) < 10 * sigma / math.sqrt(2 * n)
    assert dp == {
        "mode": "update",
        "mechanism": "gaussian",
        "accountant": "rdp",
        "clip": clip,
        "noise_multiplier": z,
        "sample_rate": 1.0,
        "steps": 1,
    }


def test_noise_is_fresh_for_every_release():
    zero = {"a": np.zeros(1000, dtype=np.float32)}
    a, _ = privatize_update(zero, 1.0, 1.0)
    b, _ = privatize_update(zero, 1.0, 1.0)
    assert not np.array_equal(a["a"], b["a"])
    # two secure generators do not share a stream
    assert randomness.secure_numpy_rng().integers(0, 2**63) != randomness.secure_numpy_rng().integers(0, 2**63)


def test_privatize_clips_then_noises():
    upd = _update(scale=100.0)
    noised, dp = privatize_update(upd, 1.0, 0.01)
    assert "norm" not in json.dumps(dp)  # the raw norm is data-dependent: never published
    # with tiny noise the released norm is close to the clip, far from the raw norm (~1e4)
    assert update_norm(noised) == pytest.approx(1.0, abs=0.6)


def test_privatize_requires_noise():
    with pytest.raises(FedcliError):
        privatize_update(_update(), 1.0, 0.0)


# --------------------------------------------------------------------------- accounting


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism (Balle & Wang 2018, Thm 8), sensitivity 1."""

    def delta_of(eps):
        return stats.norm.cdf(-eps * sigma + 1 / (2 * sigma)) - math.exp(eps) * stats.norm.cdf(
            -eps * sigma - 1 / (2 * sigma)
        )

    return optimize.brentq(lambda e: delta_of(e) - delta, 1e-9, 500)


def _dp_accounting_eps(z, q, steps, delta, kind):
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    event = dp_accounting.SelfComposedDpEvent(event, steps)
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant(value_discretization_interval=1e-4)
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize(
    "z,rounds,delta",
    [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (5.0, 50, 1e-6), (0.8, 3, 1e-3)],
)
def test_update_level_epsilon_matches_independent_accountants(z, rounds, delta):
    ours = accounting.epsilon_update_level(z, rounds, delta)
    # Google's RDP accountant: same analysis, independent code (different order grid)
    assert ours == pytest.approx(_dp_accounting_eps(z, 1.0, rounds, delta, "rdp"), rel=0.03)
    # k rounds of Gaussian(z) = one Gaussian of z/sqrt(k): the exact value from the closed form
    exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), delta)
    assert _dp_accounting_eps(z, 1.0, rounds, delta, "pld") == pytest.approx(exact, rel=0.02)
    # RDP is a sound upper bound, and not a loose one
    assert exact <= ours <= 1.6 * exact


@pytest.mark.parametrize(
    "z,q,steps,delta",
    [(1.1, 256 / 60_000, 60 * 235, 1e-5), (1.0, 0.01, 300, 1e-5), (0.7, 0.05, 200, 1e-5), (3.0, 0.1, 1000, 1e-6)],
)
def test_dp_sgd_epsilon_matches_independent_accountants(z, q, steps, delta):
    ours = accounting.epsilon_dp_sgd(z, q, steps, delta)
    assert ours == pytest.approx(_dp_accounting_eps(z, q, steps, delta, "rdp"), rel=0.03)
    tight = _dp_accounting_eps(z, q, steps, delta, "pld")
    assert tight <= ours * 1.01
    assert ours <= 2.0 * tight


def test_epsilon_composes_a_mixed_history():
    a = Mechanism("record", 1.0, 0.01, 300, 1.0)
    b = Mechanism("record", 2.0, 0.02, 100, 1.0)
    both = accounting.epsilon([a, b], 1e-5)
    assert both > max(accounting.epsilon([a], 1e-5), accounting.epsilon([b], 1e-5))
    assert both < accounting.epsilon([a], 1e-5) + accounting.epsilon([b], 1e-5)  # RDP beats naive summing
    acc = rdp.RdpAccountant()
    for m in (a, b):
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
                m.steps,
            )
        )
    assert both == pytest.approx(acc.get_epsilon(1e-5), rel=0.03)
    assert accounting.epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("target,rounds,q,steps", [(3.0, 10, 1.0, 1), (1.0, 5, 1.0, 1), (3.0, 5, 0.02, 150)])
def test_noise_multiplier_for_reaches_the_target(target, rounds, q, steps):
    z = accounting.noise_multiplier_for(target, 1e-5, rounds, sample_rate=q, steps_per_round=steps)
    eps = accounting.epsilon([Mechanism("update", z, q, rounds * steps, 1.0)], 1e-5)
    assert eps <= target
    assert eps >= target - 0.05  # not wastefully noisy
    # and the independent accountant agrees the target is met (up to order-grid slack)
    assert _dp_accounting_eps(z, q, rounds * steps, 1e-5, "rdp") <= target * 1.03


def test_mechanism_validation():
    with pytest.raises(FedcliError):
        Mechanism("laplace", 1.0, 1.0, 1, 1.0)
    with pytest.raises(FedcliError):
        Mechanism("update", 0.0, 1.0, 1, 1.0)
    with pytest.raises(FedcliError):
        Mechanism("record", 1.0, 1.5, 1, 1.0)
    with pytest.raises(FedcliError):
        Mechanism.from_dict({"mode": "update"})
    m = Mechanism("record", 1.2, 0.01, 10, 0.5)
    assert Mechanism.from_dict(m.manifest()) == m


# --------------------------------------------------------------------------- ledger


def test_ledger_charges_composes_and_refuses_over_budget(tmp_path):
    led = Ledger(tmp_path / "bank" / "ledger.json")
    m = Mechanism("update", 2.0, 1.0, 1, 1.0)
    budget, delta = accounting.epsilon_update_level(2.0, 3, 1e-5) + 1e-9, 1e-5
    eps = [
        led.charge(m, round=r, federation="fed", budget_epsilon=budget, delta=delta)["epsilon_after"] for r in (1, 2, 3)
    ]
    assert eps == sorted(eps) and eps[0] < eps[2]
    assert eps[2] == pytest.approx(accounting.epsilon_update_level(2.0, 3, delta))
    with pytest.raises(BudgetExceeded, match="budget exceeded") as info:
        led.charge(m, round=4, federation="fed", budget_epsilon=budget, delta=delta)
    assert info.value.exit_code == ExitCode.BUDGET == 6
    assert len(led.entries()) == 3  # the refused release is not recorded
    # the ledger is plain JSON with what a reviewer needs per round
    data = json.loads(led.path.read_text())
    e = data["entries"][1]
    assert (e["round"], e["federation"], e["mode"], e["noise_multiplier"], e["delta"]) == (
        2,
        "fed",
        "update",
        2.0,
        delta,
    )
    assert e["epsilon_after"] == pytest.approx(eps[1])
    assert not list(led.path.parent.glob("*.tmp"))


def test_ledger_composes_across_federations_but_keeps_modes_apart(tmp_path):
    led = Ledger(tmp_path / "ledger.json")
    u = Mechanism("update", 1.5, 1.0, 1, 1.0)
    r = Mechanism("record", 1.0, 0.01, 300, 1.0)
    led.charge(u, round=1, federation="a", budget_epsilon=100, delta=1e-5)
    led.charge(u, round=1, federation="b", budget_epsilon=100, delta=1e-5)
    led.charge(r, round=1, federation="a", budget_epsilon=100, delta=1e-5)
    assert led.spent("update", 1e-5) == pytest.approx(accounting.epsilon_update_level(1.5, 2, 1e-5))
    assert led.spent("record", 1e-5) == pytest.approx(accounting.epsilon_dp_sgd(1.0, 0.01, 300, 1e-5))
    # check() alone does not write
    led.check(u, 100, 1e-5)
    assert len(led.entries()) == 3


def test_first_release_alone_can_exceed_budget(tmp_path):
    led = Ledger(tmp_path / "ledger.json")
    with pytest.raises(BudgetExceeded):
        led.check(Mechanism("update", 0.3, 1.0, 1, 1.0), 1.0, 1e-5)
    assert not led.path.exists()


def test_corrupt_ledger_is_an_error_not_an_empty_history(tmp_path):
    p = tmp_path / "ledger.json"
    p.write_text("{not json")
    with pytest.raises(FedcliError, match="unreadable"):
        Ledger(p).spent("update", 1e-5)
    p.write_text(json.dumps({"entries": [{"mode": "update", "noise_multiplier": "x"}]}))
    with pytest.raises(FedcliError):
        Ledger(p).spent("update", 1e-5)


def _charge_many(path, n):
    led = Ledger(path)
    for r in range(n):
        led.charge(Mechanism("update", 5.0, 1.0, 1, 1.0), round=r, federation="f", budget_epsilon=1e9, delta=1e-5)


def test_concurrent_charges_lose_no_entry(tmp_path):
    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_charge_many, args=(path, 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(Ledger(path).entries()) == 45


# --------------------------------------------------------------------------- DP-SGD (Opacus)


def _separable(n=400, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    return x, y


def test_dp_sgd_trains_and_reports_its_mechanism():
    x, y = _separable()
    model = torch.nn.Sequential(torch.nn.Linear(6, 1))
    before = [p.detach().clone() for p in model.parameters()]
    mech = dp_sgd.train_dp_sgd(model, x, y, epochs=3, batch_size=40, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
    assert mech.mode == "record"
    assert mech.sample_rate == pytest.approx(40 / 400)
    assert mech.steps == 3 * 10  # every Poisson step is accounted, empty batches included
    assert (mech.sample_rate, mech.steps) == accounting.dp_sgd_schedule(400, 40, 3)
    assert (mech.noise_multiplier, mech.clip) == (1.0, 1.0)
    # the caller's model carries the trained weights and no Opacus leftovers
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with torch.no_grad():
        acc = float(((model(x).squeeze(1) > 0).float() == y).float().mean())
    assert acc > 0.8
    eps = accounting.epsilon([mech], 1e-5)
    assert eps == pytest.approx(accounting.epsilon_dp_sgd(1.0, 0.1, 30, 1e-5))


def test_dp_sgd_noise_and_sampling_ignore_the_global_seed():
    """A caller's torch.manual_seed must not make the DP noise or the Poisson batches predictable."""
    x, y = _separable(n=100)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1)
        dp_sgd.train_dp_sgd(model, x, y, epochs=1, batch_size=20, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(runs[0], runs[1])


def test_dp_sgd_rejects_incompatible_models():
    x, y = _separable(n=50)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    with pytest.raises(FedcliError, match="not compatible"):
        dp_sgd.train_dp_sgd(model, x, y, epochs=1, batch_size=10, lr=0.1, max_grad_norm=1.0, noise_multiplier=1.0)


# --------------------------------------------------------------------------- federation policy


def test_parse_privacy_defaults_and_errors():
    assert not policy.parse_privacy(None).enabled
    ps = policy.parse_privacy({"mode": "update", "clip": 0.5, "target_epsilon": 3, "rounds": 5})
    assert (ps.mode, ps.clip, ps.budget_epsilon, ps.delta) == ("update", 0.5, 3.0, 1e-5)
    assert accounting.epsilon_update_level(ps.noise_for(), 5, 1e-5) <= 3.0
    fixed = policy.parse_privacy({"mode": "update", "noise_multiplier": 1.1, "budget_epsilon": 8})
    assert fixed.noise_for() == 1.1
    for bad, msg in [
        ({"mode": "laplace"}, "mode"),
        ({"mode": "update"}, "exactly one"),
        ({"mode": "update", "noise_multiplier": 1.0, "target_epsilon": 2.0}, "exactly one"),
        ({"mode": "update", "noise_multiplier": 1.0}, "budget_epsilon"),
        ({"mode": "update", "target_epsilon": -1}, "target_epsilon"),
        ({"mode": "record", "target_epsilon": 1, "rounds": 0}, "rounds"),
        ({"mode": "record", "target_epsilon": 1, "delta": 1.5}, "delta"),
        ({"mode": "update", "target_epsilon": 1, "epsilon": 1}, "unknown"),
        ({"mode": "update", "clip": True, "target_epsilon": 1}, "clip"),
    ]:
        with pytest.raises(FedcliError, match=msg):
            policy.parse_privacy(bad)


def test_coordinator_rejects_weaker_dp_than_required():
    fixed = policy.parse_privacy({"mode": "update", "noise_multiplier": 1.0, "budget_epsilon": 10})
    ok = Mechanism("update", 1.2, 1.0, 1, 0.5).manifest()
    assert policy.check_declared(ok, fixed, "u").noise_multiplier == 1.2
    for dp, msg in [
        (None, "declares no differential privacy"),
        (Mechanism("update", 0.9, 1.0, 1, 0.5).manifest(), "below the required"),
        (Mechanism("record", 5.0, 0.01, 100, 1.0).manifest(), "requires update-level"),
        (Mechanism("update", 1.0, 0.01, 1, 0.5).manifest(), "subsampling"),
        ({"mode": "update", "noise_multiplier": "lots"}, "malformed"),
        ("strong", "not an object"),
    ]:
        with pytest.raises(errors.VerificationError, match=msg):
            policy.check_declared(dp, fixed, "u")

    target = policy.parse_privacy({"mode": "record", "target_epsilon": 3.0, "rounds": 4, "delta": 1e-5})
    q, steps = accounting.dp_sgd_schedule(5000, 64, 2)
    z = target.noise_for(q, steps)
    assert policy.check_declared(Mechanism("record", z, q, steps, 1.0).manifest(), target, "u") is not None
    with pytest.raises(errors.VerificationError, match="over 4 rounds"):
        policy.check_declared(Mechanism("record", z * 0.8, q, steps, 1.0).manifest(), target, "u")
    with pytest.raises(errors.VerificationError, match="over 4 rounds"):  # more steps than planned
        policy.check_declared(Mechanism("record", z, q, steps * 3, 1.0).manifest(), target, "u")
    # a federation without DP accepts updates with or without a declaration
    assert policy.check_declared(None, policy.PrivacySpec(), "u") is None
