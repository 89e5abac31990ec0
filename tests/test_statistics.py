"""Federated feature statistics: a statistics round before round 1 fills the spec's means, stds and levels.

Driven through the CLI: init publishes no round 0, banks submit signed counts and sums (`fedcli stats submit`
or `fedcli train`), the coordinator publishes the signed statistics and round 0 (`fedcli stats aggregate` or
`fedcli aggregate`), every global names the statistics document, and hostile contributions are refused.
"""

import json
import re
import tomllib

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, TEMPLATE, forge, make_fed, one_line, snapshot

from fedcli import keys
from fedcli.digest import sha256

NUMERIC = ["Seniority", "Time", "Age", "Expenses", "Income", "Assets", "Debt", "Amount", "Price"]
CATEGORICAL = ["Home", "Marital", "Records", "Job"]
RANGES = {
    "Seniority": [0, 50],
    "Time": [0, 80],
    "Age": [18, 80],
    "Expenses": [0, 200],
    "Income": [0, 1000],
    "Assets": [0, 300000],
    "Debt": [0, 30000],
    "Amount": [0, 5000],
    "Price": [0, 12000],
}
LEVELS = {
    "Home": ["ignore", "other", "owner", "parents", "priv", "rent"],
    "Marital": ["divorced", "married", "separated", "single", "widow"],
    "Records": ["no", "yes"],
    "Job": ["fixed", "freelance", "others", "partime"],
}


def federated_template(extra: str = "", ranges: bool = False, levels: bool = False, data_extra: str = "") -> str:
    """The demo's template with its [data] section replaced by column names and types only."""
    head = TEMPLATE.split("[data]")[0]
    numeric = ",\n".join(f'    {{ name = "{n}"' + (f", range = {RANGES[n]}" if ranges else "") + " }" for n in NUMERIC)
    text = head + f'[data]\ntarget = "Status"\npositive = "bad"\nstatistics = "federated"\n{data_extra}'
    text += f"numeric = [\n{numeric},\n]\n"
    for c in CATEGORICAL:
        text += f'\n[[data.categorical]]\nname = "{c}"\n' + (f"levels = {json.dumps(LEVELS[c])}\n" if levels else "")
    return text + extra


def submit(fed, bank, code=0, data=None):
    return fed.cli(
        "stats",
        "submit",
        "--store",
        fed.loc,
        "--key",
        fed.key(bank),
        "--data",
        data or fed.data / f"{bank}.csv",
        "--coordinator",
        fed.pub("coordinator"),
        code=code,
    )


def stats_aggregate(fed, code=0):
    return fed.cli("stats", "aggregate", "--store", fed.loc, "--key", fed.key("coordinator"), code=code)


def statistics(fed) -> dict:
    return json.loads((fed.store / "statistics/statistics.json").read_text())


def contribution_path(fed, bank):
    (folder,) = [p for p in (fed.store / "statistics").iterdir() if p.is_dir()]
    return folder / f"{bank}.json"


def pooled(credit_split) -> pd.DataFrame:
    return pd.concat([pd.read_csv(credit_split / f"{b}.csv") for b in BANKS], ignore_index=True)


@pytest.fixture
def ffed(tmp_path, credit_split):
    return make_fed(tmp_path / "fed", credit_split, federated_template())


def test_statistics_round_fills_the_data_section_with_pooled_moments(ffed, credit_split):
    fed = ffed
    assert not (fed.store / "rounds").exists()  # init waits for the statistics round
    for b in BANKS:
        assert "submitted statistics of" in submit(fed, b).output
    assert "nothing to do" in submit(fed, "bank-a").output  # re-running is a no-op
    res = stats_aggregate(fed)
    assert "published the statistics of 4 contributions" in res.output
    doc = statistics(fed)
    assert doc["encoding"] == "plain" and doc["contributors"] == list(BANKS)
    df = pooled(credit_split)
    for n in doc["numeric"]:
        assert n["mean"] == pytest.approx(df[n["name"]].mean(), rel=1e-9)
        assert n["std"] == pytest.approx(df[n["name"]].std(), rel=1e-6)
    home = next(c for c in doc["categorical"] if c["name"] == "Home")
    counts = df["Home"].astype(str).value_counts()
    assert home["levels"] == sorted(lvl for lvl, n in counts.items() if n >= 10)
    # round 0 names the statistics document, and banks train with it
    manifest = json.loads((fed.store / "rounds/000000/global.json").read_text())
    assert manifest["statistics_sha256"] == sha256((fed.store / "statistics/statistics.json").read_bytes())
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    r1 = json.loads((fed.store / "rounds/000001/global.json").read_text())
    assert r1["statistics_sha256"] == manifest["statistics_sha256"]
    shown = fed.cli("spec", "show", fed.loc, "--coordinator", fed.pub("coordinator")).output
    assert "feature statistics" in shown and "federated: statistics document" in shown
    age = next(n for n in doc["numeric"] if n["name"] == "Age")
    assert f"mean {age['mean']:g}" in shown


def test_train_and_aggregate_run_the_statistics_round_themselves(ffed):
    fed = ffed
    for b in BANKS:
        assert "the statistics round is open" in fed.train(b).output
    assert "published the statistics" in fed.aggregate().output
    assert "nothing to do" in stats_aggregate(fed).output
    for b in BANKS:
        assert "submitted update for round 1" in fed.train(b).output
    assert "published global model of round 1" in fed.aggregate().output


def test_quorum_and_pending_state(ffed):
    fed = ffed
    submit(fed, "bank-a")
    assert "quorum is 3" in stats_aggregate(fed, code=3).output
    line = one_line(fed.evaluate(fed.data / "bank-a.csv", code=1))
    assert "no global model yet" in line
    submit(fed, "bank-b")
    submit(fed, "bank-c")
    assert "published the statistics of 3 contributions" in stats_aggregate(fed).output
    assert "nothing to do" in submit(fed, "bank-d").output  # late: the statistics are published


def test_schema_proposes_types_only(fed, credit_split):
    res = fed.cli("schema", credit_split / "bank-a.csv", "--target", "Status", "--positive", "bad")
    section = tomllib.loads(res.output)["data"]
    assert section["statistics"] == "federated"
    assert {"name": "Age"} in section["numeric"] and "mean" not in res.output and "std" not in res.output
    assert {"name": "Home"} in section["categorical"]
    with_levels = tomllib.loads(
        fed.cli("schema", credit_split / "bank-a.csv", "--target", "Status", "--positive", "bad", "--levels").output
    )["data"]
    assert "owner" in next(c for c in with_levels["categorical"] if c["name"] == "Home")["levels"]
    declared = fed.cli("schema", credit_split / "bank-a.csv", "--target", "Status", "--positive", "bad", "--declared")
    assert "mean" in declared.output and "statistics" not in declared.output


def test_template_mixing_declared_and_federated_statistics_is_refused(tmp_path, credit_split):
    text = federated_template().replace('{ name = "Age" }', '{ name = "Age", mean = 40.0, std = 10.0 }')
    with pytest.raises(AssertionError, match="computes them: remove them"):
        make_fed(tmp_path / "f", credit_split, text)
