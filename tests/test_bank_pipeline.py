"""The bank step's plan: what the signed spec turns on is read once, and the stages follow it."""

import math

import pandas as pd
import pytest
from helpers import ROOT, make_fed

from fedcli import keys
from fedcli.bank.plan import BankPlan
from fedcli.bank.tables import prepare
from fedcli.errors import InputError
from fedcli.protocol import rounds
from fedcli.protocol.spec import DataSpec, NumericFeature
from fedcli.store import open_store

SPEC = (ROOT / "examples" / "federation.toml").read_text().replace("epochs = 3", "epochs = 1")
UPDATE_DP = '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.2\nbudget_epsilon = 50.0\n'
RECORD_DP = '\n[privacy]\nmode = "record"\nnoise_multiplier = 1.0\nbudget_epsilon = 10.0\n'
SHARED = '\n[secagg]\nenabled = true\nclip = 4.0\nnoise = "shared"\n'


def plan_for(tmp_path, credit_split, extra: str, max_epsilon: float | None = None) -> BankPlan:
    fed = make_fed(tmp_path, credit_split, SPEC + extra)
    spec, _ = rounds.load_spec(open_store(fed.loc), keys.load_public(fed.pub("coordinator")))
    return BankPlan.decide(spec, fed.key("bank-a"), tmp_path / "bank-a.ledger.json", max_epsilon)


def test_plain_spec_turns_nothing_on(tmp_path, credit_split):
    plan = plan_for(tmp_path, credit_split, "")
    assert (plan.privacy, plan.update_noise, plan.mask_key) == (None, None, None)
    assert plan.compression == {"method": "none"} and not plan.compressed


def test_update_dp_with_shared_noise_plans_this_banks_share(tmp_path, credit_split):
    plan = plan_for(tmp_path, credit_split, UPDATE_DP + SHARED, max_epsilon=20.0)
    assert plan.mask_key is not None and plan.privacy is not None
    assert plan.privacy.budget_epsilon == 20.0  # --max-epsilon lowers the spec's budget, never raises it
    assert plan.update_noise is not None and plan.update_noise.clip == 0.5
    min_survivors = 3  # the template's min_clients
    assert plan.update_noise.multiplier == pytest.approx(1.2 / math.sqrt(min_survivors))


def test_record_dp_noises_gradients_not_the_update(tmp_path, credit_split):
    plan = plan_for(tmp_path, credit_split, RECORD_DP + '\n[strategy.compression]\nmethod = "int8"\n', 99.0)
    assert plan.privacy is not None and plan.privacy.budget_epsilon == 10.0
    assert plan.update_noise is None and plan.mask_key is None
    assert plan.compressed and plan.compression["method"] == "int8"


def test_labels_of_a_table_prepared_for_predict_are_refused_not_none():
    spec = DataSpec(target="y", positive="1", numeric=(NumericFeature("x", 0.0, 1.0),), categorical=())
    prep = prepare(pd.DataFrame({"x": [1.0, 2.0]}), spec, "t.csv", need_target=False)
    with pytest.raises(InputError, match="no target column"):
        prep.labels()
