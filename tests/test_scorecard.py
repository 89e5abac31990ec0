"""`fedcli scorecard`: a logistic global model as points per attribute; summing a row's points gives
back the model's score (offset - factor x logit) to 1e-9, on the demo's real rows."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, TEMPLATE, make_fed
from safetensors.numpy import load


@pytest.fixture(scope="module")
def logreg_fed(tmp_path_factory, credit_split):
    fed = make_fed(tmp_path_factory.mktemp("scorecard"), credit_split)
    for b in BANKS:
        fed.train(b)
    fed.aggregate()
    return fed


def _card(fed, tmp_path, *extra, name="card.json", code=0):
    return fed.cli(
        "scorecard", fed.store, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / name, *extra, code=code
    )


def _logits(fed, rows: pd.DataFrame, card: dict) -> np.ndarray:
    """The model's log-odds of 'bad' in float64 from the published weights and the spec's preprocessing."""
    tensors = load((fed.store / "rounds/000001/global.safetensors").read_bytes())
    w, b = tensors["0.weight"].astype(np.float64).ravel(), float(tensors["0.bias"][0])
    columns = []
    for f in card["numeric"]:
        z = (pd.to_numeric(rows[f["feature"]], errors="coerce").to_numpy(np.float64) - f["mean"]) / f["std"]
        columns.append(np.nan_to_num(z, nan=0.0))
    for c in card["categorical"]:
        for level in c["levels"]:
            columns.append((rows[c["feature"]].astype(str).str.strip() == level).to_numpy(np.float64))
    return np.column_stack(columns) @ w + b


def _points(rows: pd.DataFrame, card: dict) -> np.ndarray:
    """A row's score the way a credit analyst would add it up from the scorecard file."""
    total = np.full(len(rows), card["base_points"])
    for f in card["numeric"]:
        x = pd.to_numeric(rows[f["feature"]], errors="coerce").to_numpy(np.float64)
        total += np.nan_to_num(f["per_unit"] * (x - f["mean"]), nan=0.0)
    for c in card["categorical"]:
        total += rows[c["feature"]].astype(str).str.strip().map(c["levels"]).fillna(c["other_points"]).to_numpy()
    return total


@pytest.mark.slow
def test_summing_the_points_reproduces_the_models_score(logreg_fed, tmp_path):
    fed = logreg_fed
    res = _card(fed, tmp_path, "--pdo", "20", "--base-score", "600", "--base-odds", "50")
    card = json.loads((tmp_path / "card.json").read_text())
    factor, offset = 20 / math.log(2), 600 - 20 / math.log(2) * math.log(50)
    assert card["factor"] == pytest.approx(factor, rel=1e-15) and card["offset"] == pytest.approx(offset, rel=1e-15)
    rows = pd.read_csv(fed.data / "test.csv")
    assert rows[["Income", "Assets"]].isna().any().all()  # real rows, missing values included
    logits = _logits(fed, rows, card)
    assert np.max(np.abs(_points(rows, card) - (offset - factor * logits))) < 1e-9
    # and against fedcli predict's probability (float32): the same score to float32 precision
    fed.predict(fed.data / "test.csv", tmp_path / "scores.csv")
    p = pd.read_csv(tmp_path / "scores.csv")["score"].to_numpy(np.float64)
    assert np.max(np.abs(_points(rows, card) - (offset - factor * np.log(p / (1 - p))))) < 1e-3
    # a higher score is a lower risk: 20 more points, twice the good:bad odds
    assert card["odds"].startswith("good:bad") and "scorecard of the global model of round 1" in res.output


@pytest.mark.slow
def test_the_csv_holds_the_same_points_and_bands_are_linear(logreg_fed, tmp_path):
    fed = logreg_fed
    _card(fed, tmp_path)
    _card(fed, tmp_path, name="card.csv")
    card = json.loads((tmp_path / "card.json").read_text())
    table = pd.read_csv(tmp_path / "card.csv", keep_default_na=False)
    base = table[table.kind == "base"]
    assert float(base.points.iloc[0]) == card["base_points"]
    for f in card["numeric"]:
        per_unit = table[(table.feature == f["feature"]) & (table.kind == "per_unit")].points.astype(float)
        assert per_unit.tolist() == [f["per_unit"]]
        for band in f["bands"]:
            for end in ("low", "high"):
                if band[end] is not None:
                    assert band[f"points_at_{end}"] == pytest.approx(f["per_unit"] * (band[end] - f["mean"]))
    for c in card["categorical"]:
        levels = table[(table.feature == c["feature"]) & (table.kind == "level")]
        assert dict(zip(levels.attribute, levels.points.astype(float), strict=True)) == c["levels"]


@pytest.mark.slow
def test_scorecard_refusals_are_one_line(logreg_fed, tmp_path):
    fed = logreg_fed
    res = _card(fed, tmp_path, "--pdo", "0", code=1)
    assert "--pdo must be a positive number" in res.output and not (tmp_path / "card.json").exists()
    res = _card(fed, tmp_path, name="card.txt", code=1)
    assert "name a .csv or a .json file" in res.output
    # a tampered global: signature check fails, exit 4, nothing written
    path = fed.store / "rounds/000001/global.safetensors"
    good = path.read_bytes()
    try:
        path.write_bytes(good[:-4] + bytes(4))
        res = _card(fed, tmp_path, code=4)
        assert not (tmp_path / "card.json").exists() and len(res.output.strip().splitlines()) == 1
    finally:
        path.write_bytes(good)


def test_an_mlp_is_refused_with_one_line(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace('kind = "logreg"', 'kind = "mlp"'))
    res = fed.cli("scorecard", fed.store, "--coordinator", fed.pub("coordinator"), code=1)
    assert "the global model is an mlp: points per attribute exist only for a logistic model" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_undo_pos_weight_moves_only_the_base_points(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("lr = 0.02", "lr = 0.02\npos_weight = 3.0"))
    _card(fed, tmp_path, name="plain.json")
    res = _card(fed, tmp_path, "--undo-pos-weight", name="undone.json")
    plain, undone = (json.loads((tmp_path / n).read_text()) for n in ("plain.json", "undone.json"))
    # the odds divided by 3: every score up by factor x ln 3 (higher score, lower risk)
    assert undone["base_points"] - plain["base_points"] == pytest.approx(plain["factor"] * math.log(3), rel=1e-12)
    assert undone["numeric"] == plain["numeric"] and undone["categorical"] == plain["categorical"]
    assert "pos_weight 3 undone" in undone["prior_correction"] and "prior-corrected" in res.output


def test_hostile_level_names_stay_text_in_the_csv_and_the_markdown_card(tmp_path, credit_split):
    """A spec (signed by a coordinator who may be malicious) whose level names are a spreadsheet formula
    and HTML with a table pipe: the CSV quotes the formula, the Markdown card escapes the rest."""
    spec = TEMPLATE.replace('"ignore",', '"=HYPERLINK(\\"http://x\\")",').replace('"other",', '"<img src=x>|b",')
    fed = make_fed(tmp_path, credit_split, spec)
    _card(fed, tmp_path, name="card.csv")
    table = pd.read_csv(tmp_path / "card.csv", keep_default_na=False)
    levels = table[(table.feature == "Home") & (table.kind == "level")].attribute.tolist()
    assert levels[:2] == ['\'=HYPERLINK("http://x")', "<img src=x>|b"]
    fed.cli("export", fed.store, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / "out")
    md = (tmp_path / "out" / "model_card.md").read_text()
    assert "<img" not in md and "&lt;img src=x&gt;\\|b" in md
    home = next(line for line in md.splitlines() if line.startswith("| Home |"))
    assert home.count(" | ") == 1  # still two cells: the pipe in the level did not split the row


def test_points_that_overflow_are_refused_not_written(tmp_path, credit_split):
    """A declared std so small that weight / std is beyond float range: one line, no file with inf."""
    spec = TEMPLATE.replace("mean = 9.132939, std = 8.547769", "mean = 9.132939, std = 1e-320")
    fed = make_fed(tmp_path, credit_split, spec)
    res = _card(fed, tmp_path, code=1)
    assert "the scorecard's points overflow" in res.output and not (tmp_path / "card.json").exists()
