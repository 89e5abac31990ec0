"""The one aggregator interface: every rule of the registry waits, combines and cleans up the same way."""

import typing
from pathlib import Path

import numpy as np
import pytest
from helpers import BANKS, ROOT, make_fed

from fedcli import keys, models
from fedcli.aggregation import aggregators, strategy
from fedcli.contract import validate
from fedcli.errors import FedcliError
from fedcli.protocol import rounds
from fedcli.protocol.documents import UpdateManifest
from fedcli.secagg.exchange import SecureSum
from fedcli.store.folder import FolderStore

SHAPES = {"w": (3, 2), "b": (2,)}
RULES = {
    "fedavg": aggregators.FedAvg,
    "median": aggregators.Median,
    "trimmed_mean": aggregators.TrimmedMean,
    "krum": aggregators.Krum,
}


def update(value: float) -> dict:
    return {"w": np.full((3, 2), value, np.float32), "b": np.full(2, value, np.float32)}


def five_banks(rule: str):
    """A [strategy] that every rule accepts with five updates (krum with f=1 needs 2f+3 = 5)."""
    return strategy.parse({"rule": rule, "krum_f": 1, "trim_ratio": 0.2}, n_members=5, min_clients=5)


def test_registry_covers_every_rule_of_the_contract_and_secagg():
    contract = typing.get_args(strategy.StrategyTable.model_fields["rule"].annotation)
    assert set(aggregators.REGISTRY) == set(contract) | {"secagg"}
    assert set(RULES) == set(contract)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_a_waiting_round_returns_the_reason_and_combines_later(rule):
    agg = RULES[rule](five_banks(rule), SHAPES)
    try:
        for bank in "abcd":
            assert agg.add(f"bank-{bank}", None, update(1.0), weight=10) == {}  # nothing done to them
        assert agg.result((False, "4 of 5 required updates are in")) == (None, "4 of 5 required updates are in", {})
        agg.add("bank-e", None, update(1.0), weight=10)
        delta, reason, info = agg.result((True, ""))
    finally:
        agg.close()
    assert reason == "" and info["rule"] == rule
    np.testing.assert_allclose(delta["w"], 1.0)  # identical updates: every rule returns them
    np.testing.assert_allclose(delta["b"], 1.0)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_robust_rules_remove_their_spill_files_when_closed_without_a_result(rule):
    agg = RULES[rule](five_banks(rule), SHAPES)
    agg.add("bank-a", None, update(2.0))
    spill = Path(agg._tmp.name)
    assert len(list(spill.iterdir())) == 1
    agg.close()
    agg.close()  # twice is fine
    assert not spill.exists()
    with pytest.raises(FedcliError, match="already taken"):
        agg.add("bank-b", None, update(2.0))


def test_an_empty_ready_round_is_an_error_not_a_zero_model():
    with pytest.raises(FedcliError, match="no updates to aggregate"):
        aggregators.FedAvg(five_banks("fedavg"), SHAPES).result((True, ""))


def test_fedavg_with_equal_weights_is_named_a_plain_mean():
    agg = aggregators.FedAvg(five_banks("fedavg"), SHAPES, equal_weights=True)
    agg.add("bank-a", None, update(1.0), weight=1.0)
    agg.add("bank-b", None, update(3.0), weight=1.0)
    delta, _, info = agg.result((True, ""))
    assert info == {"rule": "mean"}
    np.testing.assert_allclose(delta["w"], 2.0)


def test_secagg_spec_selects_the_masked_sum_which_refuses_an_unmasked_update(tmp_path, credit_split):
    template = (ROOT / "examples" / "federation.toml").read_text() + "\n[secagg]\nenabled = true\nclip = 4.0\n"
    fed = make_fed(tmp_path, credit_split, template)
    fed.train(BANKS[0])
    store = FolderStore(fed.store)
    spec, _ = rounds.load_spec(store, None)
    assert aggregators.select(spec) == "secagg"
    private = object()  # never used: nothing is declared while the round waits
    shapes = models.shapes(spec.model, spec.data.n_features)
    agg = aggregators.build(aggregators.RoundContext(spec, shapes, 1, store, private, False))
    assert isinstance(agg, SecureSum)
    signed = (fed.store / "rounds/000001/updates/bank-a.json").read_bytes()
    manifest = validate(UpdateManifest, keys.verify_manifest(signed, spec.member("bank-a"), "update"), "update")
    agg.check("bank-a", manifest)  # a proper masked update
    with pytest.raises(FedcliError, match="not masked"):
        agg.check("bank-a", manifest.model_copy(update={"secagg": None}))
    assert agg.result((False, "1 of 3 required updates are in")) == (None, "1 of 3 required updates are in", {})
