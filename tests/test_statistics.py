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
from helpers import BANKS, TEMPLATE, make_fed, one_line, snapshot, use_s3

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


def federated_template(
    extra: str = "", ranges: bool = False, levels: bool = False, data_extra: str = "", bins: int = 0
) -> str:
    """The demo's template with its [data] section replaced by column names and types only
    (with public ranges, candidate levels, and `bins` histogram bins for Age and Income, when asked)."""
    head = TEMPLATE.split("[data]")[0]

    def numeric_entry(n: str) -> str:
        binned = bins and n in ("Age", "Income")
        return (
            f'    {{ name = "{n}"'
            + (f", range = {RANGES[n]}" if ranges or binned else "")
            + (f", bins = {bins}" if binned else "")
            + " }"
        )

    numeric = ",\n".join(numeric_entry(n) for n in NUMERIC)
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
    show = ("stats", "show", fed.loc, "--coordinator", fed.pub("coordinator"))
    assert "statistics round open (plain): 0 of 4 members submitted (none yet); quorum 3" in fed.cli(*show).output
    shown = fed.cli("spec", "show", fed.loc, "--coordinator", fed.pub("coordinator")).output
    assert "pending (federated statistics)" in shown and "logreg on 9 numeric and 4 categorical columns" in shown
    submit(fed, "bank-a")
    assert "1 of 4 members submitted (bank-a)" in fed.cli(*show).output
    status = fed.cli("status", fed.loc, "--coordinator", fed.pub("coordinator")).output
    assert "no round yet: the statistics round is open" in status
    assert "quorum is 3" in stats_aggregate(fed, code=3).output
    line = one_line(fed.evaluate(fed.data / "bank-a.csv", code=1))
    assert "no global model yet" in line
    submit(fed, "bank-b")
    submit(fed, "bank-c")
    assert "published the statistics of 3 contributions" in stats_aggregate(fed).output
    assert "nothing to do" in submit(fed, "bank-d").output  # late: the statistics are published
    res = fed.cli(*show)
    assert "federated statistics of" in res.output and "from bank-a, bank-b, bank-c" in res.output
    assert "statistics document sha256" in res.output


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


# --------------------------------------------------------------------------- hostile contributions


def test_forged_oversized_replayed_and_planted_contributions_are_refused(ffed, tmp_path, credit_split):
    fed = ffed
    submit(fed, "bank-a")
    good = contribution_path(fed, "bank-a").read_bytes()
    folder = contribution_path(fed, "bank-a").parent
    # bank-b's contribution signed by bank-c's key
    doc = json.loads(good)
    del doc["signature"]
    private, _ = keys.load_private(fed.key("bank-c"))
    (folder / "bank-b.json").write_bytes(keys.sign_manifest(private, doc | {"member": "bank-b"}))
    # bank-c's: larger than any contribution may be
    (folder / "bank-c.json").write_bytes(b" " * (70 * 1024))
    # bank-d's: a genuine contribution of bank-d to another federation, replayed here
    template = tmp_path / "other.toml"
    template.write_text(federated_template(data_extra="min_level_count = 5\n"))
    members = [x for b in BANKS for x in ("--member", fed.pub(b))]
    fed.cli("init", tmp_path / "other", "--spec", template, "--key", fed.key("coordinator"), *members)
    fed.cli(
        "stats",
        "submit",
        "--store",
        tmp_path / "other",
        "--key",
        fed.key("bank-d"),
        "--data",
        fed.data / "bank-d.csv",
        "--coordinator",
        fed.pub("coordinator"),
    )
    (replayed,) = (tmp_path / "other/statistics").glob("*/bank-d.json")
    (folder / "bank-d.json").write_bytes(replayed.read_bytes())
    # a planted file for someone who is not a member
    (folder / "mallory.json").write_bytes(good)
    res = stats_aggregate(fed, code=3)
    rejected = {ln.split()[1]: ln for ln in res.output.splitlines() if ln.startswith("rejected")}
    assert set(rejected) == {"bank-b", "bank-c", "bank-d", "mallory"}, res.output
    assert "(bad-signature)" in rejected["bank-b"]
    assert "(oversize)" in rejected["bank-c"]
    assert "(wrong-round)" in rejected["bank-d"] and "another spec" in rejected["bank-d"]
    assert "(not-member)" in rejected["mallory"]
    assert "1 valid contribution(s), quorum is 3" in res.output
    assert not (fed.store / "statistics/statistics.json").exists()


def resign(fed, bank, change) -> None:
    """Rewrite bank's contribution with change(doc) applied, signed by bank's own key (a malicious bank)."""
    path = contribution_path(fed, bank)
    doc = json.loads(path.read_text())
    del doc["signature"]
    change(doc)
    path.write_bytes(keys.sign_manifest(keys.load_private(fed.key(bank))[0], doc))


def test_a_malicious_bank_cannot_claim_impossible_sums(ffed):
    fed = ffed
    for b in BANKS:
        submit(fed, b)
    resign(fed, "bank-c", lambda d: d["numeric"]["Age"].update(count=d["rows"] + 1))
    resign(fed, "bank-d", lambda d: d["numeric"]["Assets"].update(sum_squares=1.0))  # to blow up the pooled std
    res = stats_aggregate(fed, code=3)
    assert "rejected bank-c (malformed): statistics contribution from bank-c: column Age counts more" in res.output
    assert "rejected bank-d (malformed)" in res.output and "Assets's sums cannot come from numbers" in res.output


def test_a_bank_without_a_declared_column_is_refused_before_any_write(ffed, tmp_path):
    fed = ffed
    pd.read_csv(fed.data / "bank-b.csv").drop(columns=["Age"]).to_csv(tmp_path / "no-age.csv", index=False)
    before = snapshot(fed)
    line = one_line(submit(fed, "bank-b", code=1, data=tmp_path / "no-age.csv"))
    assert line == "error: no-age.csv lacks columns the federation spec needs: Age"
    assert snapshot(fed) == before


def test_a_level_seen_at_one_bank_is_kept_only_with_enough_rows(ffed, tmp_path):
    fed = ffed
    a = pd.read_csv(fed.data / "bank-a.csv")
    a.loc[:11, "Home"] = "castle"  # 12 rows, at bank-a only
    a.loc[12:14, "Marital"] = "eloped"  # 3 rows, at bank-a only
    a.to_csv(tmp_path / "a.csv", index=False)
    submit(fed, "bank-a", data=tmp_path / "a.csv")
    for b in BANKS[1:]:
        submit(fed, b)
    stats_aggregate(fed)
    levels = {c["name"]: c["levels"] for c in statistics(fed)["categorical"]}
    assert "castle" in levels["Home"] and "eloped" not in levels["Marital"]
    res = fed.train("bank-a", data=tmp_path / "a.csv")
    assert "Marital 3 rows" in res.output  # the dropped level trains as an unknown category, said once


def test_a_tampered_or_removed_statistics_document_stops_every_bank(ffed):
    fed = ffed
    for b in BANKS:
        submit(fed, b)
    stats_aggregate(fed)
    path = fed.store / "statistics/statistics.json"
    genuine = path.read_bytes()
    doc = json.loads(genuine)
    doc["numeric"][0]["mean"] += 1
    path.write_text(json.dumps(doc))
    assert "signature does not verify" in one_line(fed.train("bank-a", code=4))
    path.unlink()
    line = one_line(fed.train("bank-a", code=4))
    assert "statistics document does not" in line
    path.write_bytes(genuine)
    fed.train("bank-a")


def test_federated_statistics_with_privacy_need_ranges_and_levels(tmp_path, credit_split):
    privacy = '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n'
    with pytest.raises(AssertionError, match="need a range for every numeric feature"):
        make_fed(tmp_path / "f", credit_split, federated_template(privacy))


# --------------------------------------------------------------------------- privacy


def close_to_pooled(doc: dict, df: pd.DataFrame, within: float) -> None:
    """Means within a share of each feature's public range, variances within that share of its square
    (noise and fixed point blur both; a wide range blurs more)."""
    for n in doc["numeric"]:
        low, high = RANGES[n["name"]]
        assert abs(n["mean"] - df[n["name"]].mean()) < within * (high - low), n
        assert abs(n["std"] ** 2 - df[n["name"]].var()) < within * (high - low) ** 2, n


def test_with_dp_each_bank_adds_noise_and_charges_its_ledger(tmp_path, credit_split):
    privacy = '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n'
    fed = make_fed(tmp_path / "f", credit_split, federated_template(privacy, ranges=True, levels=True))
    before = snapshot(fed)
    strict = fed.cli(
        "stats", "submit", "--store", fed.loc, "--key", fed.key("bank-a"), "--data", fed.data / "bank-a.csv",
        "--coordinator", fed.pub("coordinator"), "--max-epsilon", "0.5", code=6,
    )  # fmt: skip
    assert "privacy budget exceeded" in one_line(strict) and snapshot(fed) == before
    for b in BANKS:
        assert "with DP noise" in submit(fed, b).output
    contribution = json.loads(contribution_path(fed, "bank-a").read_text())
    assert contribution["dp"]["noise_multiplier"] == 5.0 and "numeric" not in contribution
    assert any(v != round(v) for v in contribution["values"])  # noised counts are not whole numbers
    ledger = fed.cli("privacy", "--key", fed.key("bank-a")).output
    assert re.search(r"record-level: epsilon [0-9.]+ spent of budget 3", ledger)
    stats_aggregate(fed)
    doc = statistics(fed)
    assert doc["encoding"] == "noised"
    close_to_pooled(doc, pooled(credit_split), 0.05)
    home = next(c for c in doc["categorical"] if c["name"] == "Home")["levels"]
    assert {"owner", "rent", "parents"} <= set(home) <= set(LEVELS["Home"])


def test_a_contribution_with_less_noise_than_the_spec_is_refused(tmp_path, credit_split):
    privacy = '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n'
    fed = make_fed(tmp_path / "f", credit_split, federated_template(privacy, ranges=True, levels=True))
    for b in BANKS:
        submit(fed, b)
    resign(fed, "bank-d", lambda d: d["dp"].update(noise_multiplier=0.1))
    res = stats_aggregate(fed)
    assert "rejected bank-d (weak-privacy)" in res.output and "of 3 contributions" in res.output


def test_with_secure_aggregation_the_coordinator_only_reads_the_sum(tmp_path, credit_split):
    secagg = "\n[secagg]\nenabled = true\n"
    fed = make_fed(tmp_path / "f", credit_split, federated_template(secagg, ranges=True, levels=True))
    for b in BANKS[:3]:
        assert "masked for secure aggregation" in submit(fed, b).output
    assert "needs every member's" in stats_aggregate(fed, code=3).output
    submit(fed, "bank-d")
    contribution = json.loads(contribution_path(fed, "bank-a").read_text())
    assert "masked" in contribution and "numeric" not in contribution and "values" not in contribution
    stats_aggregate(fed)
    doc = statistics(fed)
    assert doc["encoding"] == "masked" and doc["rows"] == pytest.approx(3341, abs=0.01)  # two words per value
    close_to_pooled(doc, pooled(credit_split), 0.002)
    home = next(c for c in doc["categorical"] if c["name"] == "Home")["levels"]
    assert home == LEVELS["Home"]
    fed.train("bank-a")


@pytest.mark.slow
def test_the_statistics_round_on_s3(tmp_path, credit_split, moto_s3, monkeypatch):
    fed = make_fed(tmp_path / "s3", credit_split, federated_template(), url=use_s3(moto_s3, monkeypatch))
    for b in BANKS:
        fed.train(b)
    assert "published the statistics of 4 contributions" in fed.aggregate().output
    fed.train("bank-a")
    shown = fed.cli("stats", "show", fed.loc, "--coordinator", fed.pub("coordinator")).output
    assert "Marital" in shown and "federated statistics of 3,341 rows" in shown


def check_deciles(doc: dict, df: pd.DataFrame, bins: int, levels_off: float = 0.0) -> None:
    """Exact counts: deciles within one bin width of the pooled ones. Noised counts: each decile cuts the
    pooled values within levels_off of its level (a sparse tail's values spread too far to compare)."""
    for n in doc["numeric"]:
        if n["name"] not in ("Age", "Income"):
            assert n.get("deciles") is None
            continue
        low, high = RANGES[n["name"]]
        values = df[n["name"]].dropna().to_numpy()
        found = np.asarray(n["deciles"])
        if levels_off:
            below = np.array([(values <= d).mean() for d in found])
            assert np.all(np.abs(below - np.arange(1, 10) / 10) <= levels_off), (n["name"], below)
        else:
            pooled_deciles = np.quantile(values, np.arange(1, 10) / 10)
            assert np.all(np.abs(found - pooled_deciles) <= (high - low) / bins), n


def test_histograms_give_deciles_for_binning(tmp_path, credit_split):
    fed = make_fed(tmp_path / "f", credit_split, federated_template(bins=50))
    for b in BANKS[:3]:
        submit(fed, b)
    contribution = json.loads(contribution_path(fed, "bank-a").read_text())
    assert len(contribution["numeric"]["Age"]["histogram"]) == 50 and "histogram" not in contribution["numeric"]["Time"]
    submit(fed, "bank-d")
    resign(fed, "bank-d", lambda d: d["numeric"]["Age"].update(histogram=[1] * 49))
    res = stats_aggregate(fed)
    assert "rejected bank-d (malformed)" in res.output and "histogram does not have the spec's 50 bins" in res.output
    assert "deciles" in res.output
    three = pd.concat([pd.read_csv(credit_split / f"{b}.csv") for b in BANKS[:3]], ignore_index=True)
    check_deciles(statistics(fed), three, 50)
    assert "deciles" in fed.cli("stats", "show", fed.loc, "--coordinator", fed.pub("coordinator")).output


def test_histograms_under_dp_and_secure_aggregation(tmp_path, credit_split):
    both = '\n[privacy]\nmode = "record"\ntarget_epsilon = 3.0\nrounds = 5\n\n[secagg]\nenabled = true\n'
    fed = make_fed(tmp_path / "f", credit_split, federated_template(both, ranges=True, levels=True, bins=20))
    for b in BANKS:
        assert "with DP noise" not in submit(fed, b).output  # masked (and noised): the sum is all anyone reads
    stats_aggregate(fed)
    doc = statistics(fed)
    assert doc["encoding"] == "masked"
    close_to_pooled(doc, pooled(credit_split), 0.05)
    check_deciles(doc, pooled(credit_split), 20, levels_off=0.2)
