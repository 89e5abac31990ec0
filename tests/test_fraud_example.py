"""The fraud example: the transaction simulator, its features, the bank split, and one round through the CLI."""

import importlib.util
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, ROOT, make_fed

DAY = 86_400


def _load_simulator():
    path = ROOT / "examples" / "fraud" / "simulate.py"
    spec = importlib.util.spec_from_file_location("fraud_simulate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


sim = _load_simulator()
SIZE = {"customers": 600, "terminals": 1200, "days": 75, "banks": 4}
TEST_DAYS = 20


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return sim.simulate(**SIZE, rng=np.random.default_rng(1))


@pytest.fixture(scope="module")
def parts(frame) -> dict[str, np.ndarray]:
    return sim.split(frame, SIZE["days"], SIZE["banks"], TEST_DAYS)


@pytest.fixture(scope="module")
def fraud_split(tmp_path_factory) -> tuple:
    """The CSV files exactly as a user gets them from the command line (smaller, for a quick round)."""
    out = tmp_path_factory.mktemp("fraud")
    sim.main(["--out", str(out), "--customers", "400", "--terminals", "800", "--days", "60", "--test-days", "15"])
    return out


def test_fraud_rate_in_band(frame, parts):
    rate = frame[sim.TARGET].mean()
    assert 0.002 <= rate <= 0.015, rate
    assert set(np.unique(frame[sim.TARGET])) == {0, 1}
    assert (frame[sim.TARGET] == (frame["scenario"] > 0)).all()
    for name, rows in parts.items():  # every file has both classes, so every bank can train
        assert 0 < frame[sim.TARGET].to_numpy()[rows].mean() < 0.05, name


def test_each_scenario_produces_frauds(frame):
    counts = frame["scenario"].value_counts()
    assert all(counts.get(k, 0) >= 10 for k in (1, 2, 3)), counts.to_dict()
    # 1: exactly the amounts above 220 (before scenarios 2 and 3 relabel some of them)
    genuine_or_s1 = frame[frame["scenario"].isin([0, 1])]
    assert ((genuine_or_s1["amount"] > sim.FRAUD_AMOUNT) == (genuine_or_s1["scenario"] == 1)).all()
    # 2: a terminal is compromised for whole days: every transaction there that day is a fraud
    s2 = frame.loc[frame["scenario"] == 2, ["terminal", "day"]].drop_duplicates()
    same_days = frame.merge(s2, on=["terminal", "day"])
    assert len(same_days) > len(s2) and same_days[sim.TARGET].all()
    # 3: about a third of a compromised card's transactions, at five times the amount
    s3 = frame[frame["scenario"] == 3]
    assert s3["cust_amount_ratio_30d"].median() > 2.0
    assert frame.loc[frame["scenario"] == 0, "cust_amount_ratio_30d"].median() < 1.1


def test_features_are_the_documented_30_and_finite(frame, fraud_split):
    assert len(sim.FEATURES) == 30 == len(set(sim.FEATURES))
    values = frame[list(sim.FEATURES)].to_numpy(dtype=np.float64)
    assert np.isfinite(values).all()
    assert (frame[["cust_nb_tx_1d", "cust_nb_tx_7d", "cust_nb_tx_30d"]] >= 1).all().all()
    assert frame[["term_risk_1d", "term_risk_7d", "term_risk_30d"]].stack().between(0, 1).all()
    assert frame["is_night"].sum() > 0 and frame["is_weekend"].between(0, 1).all()
    docs = (ROOT / "docs" / "fraud.md").read_text()
    for name in sim.FEATURES:
        assert f"`{name}`" in docs, f"{name} is not in the feature table of docs/fraud.md"
    for f in ("bank-a", "bank-b", "bank-c", "bank-d", "test"):
        table = pd.read_csv(fraud_split / f"{f}.csv")
        assert list(table.columns) == [*sim.FEATURES, sim.TARGET]
        assert not table.isna().any().any()
        assert set(table[sim.TARGET].unique()) == {0, 1}


def test_customer_windows_match_pandas_rolling(frame):
    """The cumulative-sum windows give what the Handbook's pandas code gives (time-based rolling, the
    transaction itself included)."""
    some = frame[frame["customer"].isin(frame["customer"].unique()[:25])].copy()
    some["when"] = pd.to_datetime(some["tx_time"], unit="s")
    for w in (1, 7, 30):
        rolled = (
            some.sort_values(["customer", "tx_time"], kind="stable")
            .set_index("when")
            .groupby("customer")["amount"]
            .rolling(f"{w}D")
            .agg(["count", "mean"])
        )
        mine = some.sort_values(["customer", "tx_time"], kind="stable")
        np.testing.assert_array_equal(rolled["count"].to_numpy(), mine[f"cust_nb_tx_{w}d"].to_numpy())
        np.testing.assert_allclose(rolled["mean"].to_numpy(), mine[f"cust_avg_amount_{w}d"].to_numpy(), atol=0.006)


def _terminal_features_by_hand(frame, row, window):
    """Transactions of the same bank at the same terminal in (t - 7 - w, t - 7] days, and their frauds."""
    t = row["tx_time"]
    hi, lo = t - sim.DELAY_DAYS * DAY, t - (sim.DELAY_DAYS + window) * DAY
    seen = frame[
        (frame["terminal"] == row["terminal"])
        & (frame["bank"] == row["bank"])
        & (frame["tx_time"] > lo)
        & (frame["tx_time"] <= hi)
    ]
    return len(seen), int(seen[sim.TARGET].sum())


def test_terminal_features_only_use_frauds_reported_by_then(frame):
    rng = np.random.default_rng(0)
    with_frauds = np.flatnonzero(frame["term_nb_fraud_30d"].to_numpy() > 0)
    rows = np.concatenate([rng.choice(with_frauds, 30, replace=False), rng.choice(len(frame), 30, replace=False)])
    for i in rows:
        row = frame.iloc[i]
        for w in (1, 7, 30):
            n, frauds = _terminal_features_by_hand(frame, row, w)
            assert row[f"term_nb_tx_{w}d"] == n and row[f"term_nb_fraud_{w}d"] == frauds, (i, w)
            assert row[f"term_risk_{w}d"] == pytest.approx(frauds / n if n else 0.0, abs=1e-6)


def test_labels_younger_than_the_delay_change_nothing(frame):
    """Recompute the features after flipping every label of the 7 days before one transaction at its
    terminal: its terminal features are unchanged; flipping a label just older than 7 days changes them."""
    tx = {c: frame[c].to_numpy() for c in ("tx_time", "customer", "terminal", "amount")}
    bank = frame["bank"].to_numpy()
    busy = frame[frame["term_nb_tx_1d"] > 0].iloc[len(frame) // 3]
    same = (frame["terminal"] == busy["terminal"]).to_numpy() & (bank == busy["bank"])
    t = frame["tx_time"].to_numpy()
    recent = same & (t > busy["tx_time"] - sim.DELAY_DAYS * DAY) & (t <= busy["tx_time"])
    older = same & (t <= busy["tx_time"] - sim.DELAY_DAYS * DAY) & (t > busy["tx_time"] - (sim.DELAY_DAYS + 1) * DAY)
    assert recent.sum() >= 1 and older.sum() >= 1
    i = int(np.flatnonzero((t == busy["tx_time"]) & same)[0])
    terminal_columns = [c for c in sim.FEATURES if c.startswith("term_")]

    def terminal_features(labels):
        feats = sim.features({**tx, "is_fraud": labels.astype(np.int8)}, bank, SIZE["terminals"])
        return np.array([feats[c][i] for c in terminal_columns], dtype=float)

    labels = frame[sim.TARGET].to_numpy()
    base = terminal_features(labels)
    np.testing.assert_array_equal(base, frame.iloc[i][terminal_columns].to_numpy(dtype=float))
    np.testing.assert_array_equal(terminal_features(np.where(recent, 1 - labels, labels)), base)
    assert not np.array_equal(terminal_features(np.where(older, 1 - labels, labels)), base)


def test_banks_differ_in_size_and_fraud_mix(frame, parts):
    rows = {r["file"].removesuffix(".csv"): r for r in sim.summary(frame, parts)}
    sizes = [rows[b]["rows"] for b in BANKS]
    assert len(set(sizes)) == 4 and sizes[0] > 1.5 * max(sizes[1:])  # bank-a is the large one

    def share(bank, k):
        return rows[bank][f"s{k}"] / rows[bank]["frauds"]

    assert max(BANKS, key=lambda b: share(b, 2)) == "bank-b"  # compromised terminals
    assert max(BANKS, key=lambda b: share(b, 3)) == "bank-c"  # compromised cards
    assert max(BANKS, key=lambda b: share(b, 1)) == "bank-d"  # large amounts
    assert share("bank-b", 2) > 0.6 and share("bank-c", 3) > 0.6
    # different customers: each bank's customers are its own
    owners = frame.groupby("customer")["bank"].nunique()
    assert (owners == 1).all()


def test_holdout_is_strictly_after_training(frame, parts):
    t = frame["tx_time"].to_numpy()
    last_train = max(t[parts[b]].max() for b in BANKS)
    first_test = t[parts["test"]].min()
    assert first_test - last_train > sim.DELAY_DAYS * DAY
    assert frame["day"].to_numpy()[parts["test"]].min() == SIZE["days"] - TEST_DAYS
    assert set(frame["bank"].to_numpy()[parts["test"]]) == {0, 1, 2, 3}
    every = np.concatenate(list(parts.values()))
    assert len(every) == len(np.unique(every))


def test_same_seed_same_data_other_seed_other_data(frame, tmp_path):
    again = sim.simulate(**SIZE, rng=np.random.default_rng(1))
    pd.testing.assert_frame_equal(frame, again)
    other = sim.simulate(**SIZE, rng=np.random.default_rng(2))
    assert len(other) != len(frame) or not other["amount"].equals(frame["amount"])
    args = ["--customers", "150", "--terminals", "300", "--days", "40", "--test-days", "10", "--banks", "3"]
    sim.main(["--out", str(tmp_path / "one"), *args])
    sim.main(["--out", str(tmp_path / "two"), *args])
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["bank-a.csv", "bank-b.csv", "bank-c.csv", "test.csv"]
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_bad_sizes_are_one_line_usage_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        sim.main(["--out", "unused", "--days", "20", "--test-days", "15"])
    assert stop.value.code == 2
    assert "no training day" in capsys.readouterr().err


def test_csv_writer_round_trips():
    rng = np.random.default_rng(3)
    columns = [
        np.round(rng.normal(0, 500, 5000), 2),  # money: float64, cents
        rng.normal(0, 3, 5000).astype(np.float32),
        rng.integers(-5, 10**6, 5000).astype(np.int32),
        (rng.uniform(size=5000) < 0.5).astype(np.int8),
        np.array([0.0, -0.0, 1.5, -0.25, 1e-9] * 1000, dtype=np.float32),
    ]
    text = sim.csv_rows(columns)
    back = np.loadtxt(text.decode().splitlines(), delimiter=",")
    for j, (col, tol) in enumerate(zip(columns, (0.005, 5e-7, 0, 0, 5e-7), strict=True)):
        np.testing.assert_allclose(back[:, j], col.astype(np.float64), rtol=0, atol=tol + 1e-12)
    assert b"-0," not in text and b".," not in text and b"\n-0\n" not in text
    with pytest.raises(ValueError, match="finite"):
        sim.csv_rows([np.array([1.0, np.nan])])


@pytest.mark.slow
def test_a_round_trains_on_simulated_banks(tmp_path, fraud_split):
    spec = (ROOT / "examples" / "fraud" / "federation.toml").read_text()
    fed = make_fed(tmp_path, fraud_split, spec_text=spec)
    for b in BANKS:
        res = fed.train(b)
        assert "submitted update for round 1" in res.output
    res = fed.aggregate()
    assert "published global model of round 1 from 4 updates" in res.output
    res = fed.cli("spec", "show", fed.store, "--coordinator", fed.pub("coordinator"))
    assert "logreg" in res.output and "30" in res.output
    res = fed.evaluate(fed.data / "test.csv")
    assert "round 1" in res.output and "auc" in res.output
    scores = tmp_path / "scores.csv"
    fed.predict(fed.data / "test.csv", scores)
    from sklearn.metrics import roc_auc_score

    truth = pd.read_csv(fraud_split / "test.csv")[sim.TARGET]
    assert roc_auc_score(truth, pd.read_csv(scores)["score"]) > 0.75  # one round already finds most frauds


def test_parquet_output_holds_the_same_rows_as_csv(tmp_path, fraud_split):
    """--format parquet writes typed columns with the same values the CSV spells out; train reads either."""
    import pyarrow.parquet as pq

    args = ["--customers", "400", "--terminals", "800", "--days", "60", "--test-days", "15"]
    sim.main(["--out", str(tmp_path / "pq"), "--format", "parquet", *args])
    names = sorted(p.name for p in (tmp_path / "pq").iterdir())
    assert names == sorted(p.name.replace(".csv", ".parquet") for p in fraud_split.iterdir())
    for name in ("bank-a", "test"):
        table = pq.read_table(tmp_path / "pq" / f"{name}.parquet").to_pandas()
        csv = pd.read_csv(fraud_split / f"{name}.csv")
        assert list(table.columns) == list(csv.columns) == [*sim.FEATURES, sim.TARGET]
        np.testing.assert_allclose(table.to_numpy(np.float64), csv.to_numpy(np.float64), rtol=0, atol=5e-6)
