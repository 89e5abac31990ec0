"""`fedcli export`: the verified global model as ONNX, equal to `fedcli predict` on a real table within
1e-6 (onnxruntime), plus a model card; hostile folders and a tampered store leave nothing written."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from helpers import BANKS, TEMPLATE, make_fed, use_s3

from fedcli import digest


def _train_round(fed):
    for b in BANKS:
        fed.train(b)
    fed.aggregate()


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, credit_split):
    fed = make_fed(tmp_path_factory.mktemp("export"), credit_split)
    _train_round(fed)
    _train_round(fed)
    return fed


def _export(fed, out, *extra, code=0):
    return fed.cli("export", fed.store, "--coordinator", fed.pub("coordinator"), "--out", out, *extra, code=code)


def _onnx_scores(path, card: dict, rows: pd.DataFrame) -> np.ndarray:
    """Score rows with onnxruntime, building the inputs from the card's contract alone (raw values, NaN
    for missing; one-hot by exact text match on the declared levels)."""
    feeds = {}
    for spec in card["onnx"]["inputs"]:
        if spec["name"] == "numeric":
            cols = [pd.to_numeric(rows[c], errors="coerce").to_numpy(np.float64) for c in spec["columns"]]
            feeds["numeric"] = np.column_stack(cols)
        else:
            cols = []
            for column in spec["columns"]:
                feature, level = column.split("=", 1)
                cols.append((rows[feature].astype(str).str.strip() == level).to_numpy(np.float32))
            feeds["categorical"] = np.column_stack(cols)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, logit = session.run(["score", "logit"], feeds)
    assert score.shape == logit.shape == (len(rows),)
    return score


@pytest.mark.slow
def test_onnx_scores_equal_fedcli_predict_and_the_card_says_what_it_is(two_rounds, tmp_path):
    fed = two_rounds
    res = _export(fed, tmp_path / "out", "--data", fed.data / "test.csv")
    assert "exported global model of round 2" in res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model_card.json", "model_card.md"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    card = json.loads((out / "model_card.json").read_text())
    fed.predict(fed.data / "test.csv", tmp_path / "scores.csv")
    expected = pd.read_csv(tmp_path / "scores.csv")["score"].to_numpy(np.float64)
    rows = pd.read_csv(fed.data / "test.csv")
    assert rows[["Income", "Assets", "Debt"]].isna().any().all()  # missing values go through the graph too
    assert np.max(np.abs(_onnx_scores(out / "model.onnx", card, rows) - expected)) < 1e-6
    # the card: bound to the signed global, its lineage the verified chain, the holdout's numbers
    manifest = json.loads((fed.store / "rounds/000002/global.json").read_text())
    assert card["round"] == 2 and card["tensors_sha256"] == manifest["tensors_sha256"]
    assert card["onnx"]["sha256"] == digest.sha256((out / "model.onnx").read_bytes())
    assert [r["round"] for r in card["lineage"]] == [0, 1, 2]
    assert card["lineage"][2]["prev_sha256"] == card["lineage"][1]["tensors_sha256"]
    assert {c["member"] for c in card["lineage"][1]["contributors"]} == set(BANKS)
    assert [f["name"] for f in card["data_schema"]["numeric"]][:2] == ["Seniority", "Time"]
    assert card["evaluation"]["rows"] == len(rows) and card["evaluation"]["credit"]["gini"] > 0.5
    assert card["settings_in_force"]["differential privacy"] == "no differential privacy"
    md = (out / "model_card.md").read_text()
    assert "## Lineage" in md and manifest["tensors_sha256"] in json.dumps(card) and "| Gini |" in md
    assert "Home=owner" in md and "## Evaluation on `test.csv`" in md
    # the graph names what it is in its own metadata
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props == {"federation_id": "credit-demo", "round": "2", "tensors_sha256": manifest["tensors_sha256"]}


@pytest.mark.slow
def test_an_older_round_exports_too(two_rounds, tmp_path):
    fed = two_rounds
    _export(fed, tmp_path / "r1", "--round", "1")
    card = json.loads((tmp_path / "r1" / "model_card.json").read_text())
    assert card["round"] == 1 and len(card["lineage"]) == 2 and card["evaluation"] is None
    assert any("no holdout evaluation" in c for c in card["caveats"])


@pytest.mark.slow
def test_a_folder_with_files_is_refused_unless_forced(two_rounds, tmp_path):
    fed = two_rounds
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _export(fed, out, code=1)
    assert "is not empty: pass --force" in res.output and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    _export(fed, out, "--force")
    assert (out / "model.onnx").exists() and (out / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in _export(fed, tmp_path / "afile", code=1).output
    assert "no folder" in _export(fed, tmp_path / "nope" / "out", code=1).output


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rounds/000002/global.safetensors", "rounds/000001/global.json"])
def test_a_tampered_store_exits_4_and_writes_nothing(two_rounds, tmp_path, victim):
    """The exported round's tensors, or an earlier round of its lineage: either way nothing is written."""
    fed = two_rounds
    path = fed.store / victim
    good = path.read_bytes()
    try:
        if victim.endswith(".json"):
            doc = json.loads(good)
            doc["contributors"][0]["num_examples"] += 1  # the signature no longer covers it
            path.write_text(json.dumps(doc))
        else:
            path.write_bytes(good[:-4] + bytes(4))
        res = _export(fed, tmp_path / "out", code=4)
    finally:
        path.write_bytes(good)
    assert not (tmp_path / "out").exists() and len(res.output.strip().splitlines()) == 1


def test_an_mlp_exports_and_matches_predict(tmp_path, credit_split):
    """Round 0 of an MLP federation (no training needed): Gemm, Relu, Gemm, Sigmoid."""
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace('kind = "logreg"', 'kind = "mlp"'))
    _export(fed, tmp_path / "out")
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["model"]["layer_widths"] == [26, 16, 1]
    fed.predict(fed.data / "bank-a.csv", tmp_path / "scores.csv")
    expected = pd.read_csv(tmp_path / "scores.csv")["score"].to_numpy(np.float64)
    rows = pd.read_csv(fed.data / "bank-a.csv")
    assert np.max(np.abs(_onnx_scores(tmp_path / "out" / "model.onnx", card, rows) - expected)) < 1e-6


def test_a_prior_correction_is_folded_into_the_graph_and_named_in_the_card(tmp_path, credit_split):
    """pos_weight 3, round 0: export --undo-pos-weight scores as predict --undo-pos-weight does."""
    fed = make_fed(tmp_path, credit_split, TEMPLATE.replace("lr = 0.02", "lr = 0.02\npos_weight = 3.0"))
    rows = pd.read_csv(fed.data / "bank-b.csv")
    _export(fed, tmp_path / "plain")
    card = json.loads((tmp_path / "plain" / "model_card.json").read_text())
    assert card["model"]["prior_correction"] is None and any("pos_weight 3" in c for c in card["caveats"])
    _export(fed, tmp_path / "out", "--undo-pos-weight")
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert "pos_weight 3 undone" in card["model"]["prior_correction"]
    assert "prior-corrected" in (tmp_path / "out" / "model_card.md").read_text()
    fed.predict(fed.data / "bank-b.csv", tmp_path / "scores.csv", "--undo-pos-weight")
    expected = pd.read_csv(tmp_path / "scores.csv")["score"].to_numpy(np.float64)
    assert np.max(np.abs(_onnx_scores(tmp_path / "out" / "model.onnx", card, rows) - expected)) < 1e-6
    plain = _onnx_scores(tmp_path / "plain" / "model.onnx", card, rows)
    assert np.max(np.abs(plain - expected)) > 1e-3  # the correction really changed the scores


def test_a_spec_with_numeric_features_only_has_one_input(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, TEMPLATE.split("[[data.categorical]]")[0])
    _export(fed, tmp_path / "out")
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert [i["name"] for i in card["onnx"]["inputs"]] == ["numeric"]
    fed.predict(fed.data / "bank-c.csv", tmp_path / "scores.csv")
    expected = pd.read_csv(tmp_path / "scores.csv")["score"].to_numpy(np.float64)
    rows = pd.read_csv(fed.data / "bank-c.csv")
    assert np.max(np.abs(_onnx_scores(tmp_path / "out" / "model.onnx", card, rows) - expected)) < 1e-6


@pytest.mark.slow
def test_export_and_scorecard_read_an_s3_store(moto_s3, tmp_path, credit_split, monkeypatch):
    """Round 0 on the loopback S3 server: the same verified files as from a folder."""
    fed = make_fed(tmp_path, credit_split, url=use_s3(moto_s3, monkeypatch))
    fed.cli("export", fed.loc, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / "out")
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["round"] == 0 and [r["round"] for r in card["lineage"]] == [0]
    fed.cli("scorecard", fed.loc, "--coordinator", fed.pub("coordinator"), "--out", tmp_path / "card.json")
    assert json.loads((tmp_path / "card.json").read_text())["tensors_sha256"] == card["tensors_sha256"]
