"""Spec templates: model choices, quorum and deadline rules, clear errors for bad templates."""

import json

import pytest
from helpers import BANKS, TEMPLATE, make_fed


def test_mlp_federation_runs_a_round(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace('kind = "logreg"', 'kind = "mlp"'))
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    g = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert len(g["contributors"]) == 3
    res = fed.cli(
        "evaluate", "--store", fed.store, "--coordinator", fed.pub("coordinator"), "--data", fed.data / "test.csv"
    )
    assert "round 1" in res.output


def test_deadline_waits_for_stragglers_until_all_are_in(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("deadline_minutes = 0", "deadline_minutes = 60"))
    for b in BANKS[:3]:
        fed.train(b)
    res = fed.aggregate(code=3)
    assert "deadline" in res.output
    fed.train(BANKS[3])
    fed.aggregate(code=0)


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("min_clients = 3", "min_clients = 9", "min_clients must be between 1 and"),
        ('kind = "logreg"', 'kind = "forest"', "'model.kind' input should be 'logreg' or 'mlp'"),
        ("epochs = 3", "epochs = 0", "'training.epochs' input should be greater than or equal to 1"),
        ("lr = 0.02", 'lr = "fast"', "'training.lr' input should be a valid number"),
        ('target = "Status"', 'target = "Age"', "also declared as a feature"),
        ("std = 8.547769", "std = 0", "'data.numeric[0].std' input should be greater than 0"),
        ("[model]", "[model", "not valid TOML"),
    ],
)
def test_bad_template_is_a_clear_error_and_nothing_is_written(tmp_path, credit_split, old, new, message):
    assert old in TEMPLATE
    with pytest.raises(AssertionError) as exc:
        make_fed(tmp_path, credit_split, TEMPLATE.replace(old, new, 1))
    assert message in str(exc.value)
    assert not (tmp_path / "store" / "federation.toml").exists()
