"""The bank fails before it writes: messy tables, wrong labels, broken numbers, planted manifests.

Every refusal is driven through the CLI the way a bank operator with a messy table, or an
attacker with write access to the shared folder, would cause it; after each one the store has
no new file, the bank's privacy ledger was not charged and its state file was not written.
"""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from helpers import BANKS, TEMPLATE, bank_dir, forge, ledger_file, make_fed, one_line, snapshot, state_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from fedcli import digest, keys
from fedcli.bank.tables import parse_labels, prepare, read_table
from fedcli.errors import ExitCode, FedcliError
from fedcli.protocol import tensors
from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

DP = TEMPLATE + '\n[privacy]\nmode = "update"\nclip = 0.5\nnoise_multiplier = 1.0\nbudget_epsilon = 50\n'
NUMERIC_POSITIVE = TEMPLATE.replace('positive = "bad"', 'positive = "1"')


def refused(fed, data, bank="bank-a", code=ExitCode.ERROR) -> str:
    """Train with `data`, expect a refusal, and check nothing was written anywhere."""
    before = snapshot(fed)
    res = fed.train(bank, code=code, data=data)
    assert snapshot(fed) == before
    assert not ledger_file(fed, bank).exists()  # not charged
    assert not state_file(fed, bank).exists()
    return one_line(res)


def table(credit_split, bank="bank-a") -> pd.DataFrame:
    return pd.read_csv(credit_split / f"{bank}.csv")


def update_sha(fed, bank: str, r: int = 1) -> str:
    return json.loads((fed.store / f"rounds/{r:06d}/updates/{bank}.json").read_text())["tensors_sha256"]


@pytest.mark.slow
def test_labels_are_parsed_with_their_type(tmp_path, credit_split):
    """1.0/0.0, "1"/"0"/True and " BAD "/"Good" give the very same update as the text labels."""
    text = make_fed(tmp_path / "text", credit_split, banks=BANKS[:3])
    numeric = make_fed(tmp_path / "numeric", credit_split, NUMERIC_POSITIVE, banks=BANKS[:3])
    text.train("bank-a")
    a = table(credit_split)
    floats = a.assign(Status=(a.Status == "bad").astype(float))  # written as 1.0 / 0.0
    floats.to_csv(tmp_path / "floats.csv", index=False)
    assert "1.0" in (tmp_path / "floats.csv").read_text()
    numeric.train("bank-a", data=tmp_path / "floats.csv")
    assert update_sha(text, "bank-a") == update_sha(numeric, "bank-a")

    b = table(credit_split, "bank-b")
    shouted = b.assign(Status=b.Status.map({"bad": " BAD ", "good": "Good"}))
    shouted.to_csv(tmp_path / "shouted.csv", index=False)
    text.train("bank-b", data=tmp_path / "shouted.csv")
    mixed = b.assign(
        Status=[
            ("1" if s == "bad" else "0") if i % 2 else ("True" if s == "bad" else "false")
            for i, s in enumerate(b.Status)
        ]
    )
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    numeric.train("bank-b", data=tmp_path / "mixed.csv")
    assert update_sha(text, "bank-b") == update_sha(numeric, "bank-b")

    # text labels against a numeric positive: nothing matches, and the values seen are named
    line = refused(numeric, credit_split / "bank-c.csv", bank="bank-c")
    assert "no row of bank-c.csv has Status == '1' (compared as numbers)" in line
    assert "values seen: good, bad" in line


def test_label_rule_units():
    values = pd.Series([1, 1.0, "1", True, " 1 ", "true", 0, "0", False, "yes", None], dtype=object)
    assert parse_labels(values, "1").tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert parse_labels(pd.Series(["bad", " BAD", "Bad ", "good", "bad!"]), "bad").tolist() == [1, 1, 1, 0, 0]
    assert parse_labels(pd.Series([True, False]), "true").tolist() == [1, 0]


def test_tables_that_cannot_train_are_refused_before_anything_is_written(tmp_path, credit_split):
    fed = make_fed(tmp_path / "fed", credit_split, DP)
    a = table(credit_split)
    huge, infinite = a.copy(), a.copy()
    huge.loc[7, "Income"] = 1e39  # float32 would overflow to inf after standardisation
    infinite.loc[3, "Debt"] = np.inf
    cases = {
        "one-row": (a.head(1), "has 1 usable row: at least 2 are needed"),
        "all-bad": (
            a[a.Status == "bad"],
            "every row of all-bad.csv has Status == 'bad' (compared as text, ignoring "
            "case and spaces): both classes are needed",
        ),
        "all-good": (a[a.Status == "good"], "no row of all-good.csv has Status == 'bad'"),
        "no-match": (
            a.assign(Status=a.Status.map({"bad": "1", "good": "0"})),
            "no row of no-match.csv has Status == 'bad' (compared as text, ignoring case and spaces); "
            "values seen: 0, 1",
        ),
        "no-target": (a.assign(Status=None), "has no usable rows"),
        "huge": (
            huge,
            "column Income has 1 value(s) more than 1,000,000 standard deviations from the spec's mean "
            "(e.g. 1e+39 in data row 8)",
        ),
        "infinite": (infinite, "column Debt has 1 value(s) more than 1,000,000 standard deviations"),
    }
    for name, (df, message) in cases.items():
        path = tmp_path / f"{name}.csv"
        df.to_csv(path, index=False)
        line = refused(fed, path)
        assert message in line, (name, line)
    fed.train("bank-a")  # the clean table still trains, and this is the first charge
    assert len(json.loads(ledger_file(fed, "bank-a").read_text())["entries"]) == 1


def _replace_global(fed, value: float) -> None:
    """The coordinator (its real key) publishes a round-0 model with absurd but finite weights."""
    gdir = fed.store / "rounds/000000"
    weights = load_file(gdir / "global.safetensors")
    data = tensors.encode({k: np.full(v.shape, value, np.float32) for k, v in weights.items()})
    (gdir / "global.safetensors").write_bytes(data)
    manifest = json.loads((gdir / "global.json").read_text())
    manifest.pop("signature")
    manifest["tensors_sha256"] = digest.sha256(data)
    private, _ = keys.load_private(fed.key("coordinator"))
    (gdir / "global.json").write_bytes(keys.sign_manifest(private, manifest))


@pytest.mark.parametrize(
    "value, message",
    [
        (3e36, "training produced non-finite loss on bank-a.csv: nothing was submitted"),  # loss overflows
        (3e38, "the global model's scores on bank-a.csv are not finite"),  # the logits overflow: inf - inf = NaN
    ],
)
def test_non_finite_loss_or_metrics_never_reach_the_store(tmp_path, credit_split, value, message):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    _replace_global(fed, value)
    line = refused(fed, credit_split / "bank-a.csv", code=ExitCode.VERIFY)  # the global is at fault, not the table
    assert message in line and "The global model of round 0 has weights up to" in line


def test_planted_manifest_is_not_already_submitted(fed):
    before = snapshot(fed)
    upd = fed.store / "rounds/000001/updates"
    upd.mkdir(parents=True)
    (upd / "bank-a.json").write_text('{"kind": "update", "round": 1, "member": "bank-a", "signature": "AAAA"}')
    res = fed.train("bank-a", code=ExitCode.VERIFY)
    line = one_line(res)
    assert (
        "an update manifest for bank-a that this key did not sign sits at rounds/000001/updates/bank-a.json; "
        "ask the coordinator to remove it"
    ) in line
    (upd / "bank-a.json").write_bytes(b"\x00garbage" + b"[" * 5000)
    assert "this key did not sign" in one_line(fed.train("bank-a", code=ExitCode.VERIFY))
    (upd / "bank-a.json").unlink()
    forge(fed, "bank-a", signer="bank-b")  # another member's key signed it
    assert "this key did not sign" in one_line(fed.train("bank-a", code=ExitCode.VERIFY))
    assert not state_file(fed, "bank-a").exists()
    (upd / "bank-a.json").unlink()
    (upd / "bank-a.safetensors").unlink()
    assert snapshot(fed) == sorted(before + ["rounds/000001", "rounds/000001/updates"])
    fed.train("bank-a")  # with the planted file gone, the bank submits


def test_replayed_own_manifest_is_refused(fed):
    for b in BANKS[:3]:
        fed.train(b)
    fed.aggregate()
    old = fed.store / "rounds/000001/updates/bank-a.json"
    new = fed.store / "rounds/000002/updates/bank-a.json"
    new.parent.mkdir(parents=True)
    new.write_bytes(old.read_bytes())  # genuine signature, wrong round
    line = one_line(fed.train("bank-a", code=ExitCode.VERIFY))
    assert "signed by this key for another round or federation (a replayed copy)" in line


def test_separators_spreadsheets_and_encodings(tmp_path, credit_split, fed):
    a = table(credit_split)
    a.to_csv(tmp_path / "semicolon.csv", sep=";", index=False)
    res = fed.train("bank-a", data=tmp_path / "semicolon.csv")
    assert "semicolon.csv is separated by ';'" in res.output
    assert json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())["num_examples"] == len(a)
    b = table(credit_split, "bank-b")
    b.to_csv(tmp_path / "tabs.txt", sep="\t", index=False)
    assert "separated by tabs" in fed.train("bank-b", data=tmp_path / "tabs.txt").output

    (tmp_path / "book.xlsx").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "book.xlsx: Excel files are not read: export the sheet as CSV" in refused(
        fed, tmp_path / "book.xlsx", bank="bank-c"
    )
    (tmp_path / "renamed.csv").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "Excel files are not read" in refused(fed, tmp_path / "renamed.csv", bank="bank-c")
    (tmp_path / "rows.json").write_text("[]")
    assert "JSON tables are not read" in refused(fed, tmp_path / "rows.json", bank="bank-c")
    c = table(credit_split, "bank-c")
    c.to_csv(tmp_path / "latin1.csv", index=False)
    (tmp_path / "latin1.csv").write_bytes((tmp_path / "latin1.csv").read_bytes() + "bad,1,fixed,é\n".encode("latin-1"))
    assert "it is not UTF-8 text (byte 0xe9" in refused(fed, tmp_path / "latin1.csv", bank="bank-c")
    (tmp_path / "colons.csv").write_text("Status:Age:Income\nbad:30:100\n")
    line = refused(fed, tmp_path / "colons.csv", bank="bank-c")
    assert "lacks columns the federation spec needs: Seniority" in line and "the table has one column" in line


def test_notes_are_summarised_once_and_what_is_in_force_is_shown(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    a = table(credit_split).astype({"Income": object})
    a.loc[:4, "Income"] = "unknown"
    a.loc[:9, "Job"] = "astronaut"
    a.to_csv(tmp_path / "messy.csv", index=False)
    res = fed.train("bank-a", data=tmp_path / "messy.csv")
    notes = [ln for ln in res.output.splitlines() if ln.startswith("note:")]
    assert len(notes) == 2, res.output
    assert (
        "filled with the spec's mean: Income 120" in notes[0]
        and "text counted as missing: Income (e.g. 'unknown')" in notes[0]
    )
    assert notes[1].startswith("note: unknown category -> all-zero one-hot: Home 2 rows, Job ")
    assert "in force:" in res.output and "update-level" in res.output and "secure aggregation: off" in res.output


def test_corrupt_state_and_ledger_are_refused_with_their_path(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split, DP, banks=BANKS[:3])
    state = state_file(fed, "bank-a")
    state.parent.mkdir(parents=True)
    for text, why in (
        ("{not json", "not valid JSON"),
        ('{"last_round": 1, "typo": 2}', "unknown key 'typo'"),
        ('{"last_round": "1"}', "'last_round' input should be a valid integer"),
        ("[" * 3000, "nests 3000 levels deep"),
    ):
        state.write_text(text)
        line = one_line(fed.train("bank-a", code=1))
        assert str(state) in line and why in line and line.endswith("restore it from backup")
    state.unlink()
    fed.train("bank-a")
    saved = json.loads(state.read_text())
    assert saved["last_round"] == 0 and len(saved["last_sha256"]) == 64
    ledger = ledger_file(fed, "bank-b")
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"version": 1, "accountant": "rdp", "entries": [{"round": 1}]}))
    before = snapshot(fed)
    line = one_line(fed.train("bank-b", code=1))
    assert str(ledger) in line and "restore it from backup" in line and "'entries[0].federation' is required" in line
    assert snapshot(fed) == before
    assert "restore it from backup" in one_line(fed.cli("privacy", "--ledger", ledger, code=1))


def test_schema_warns_and_refuses_mixed_columns(tmp_path, credit_split, fed):
    res = fed.cli("schema", credit_split / "bank-a.csv", "--target", "Status", "--positive", "BAD")
    assert "warning" not in res.output and 'positive = "BAD"' in res.output
    res = fed.cli("schema", credit_split / "bank-a.csv", "--target", "Status", "--positive", "yes")
    warning = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert warning == [
        "warning: no row has Status == 'yes' (compared as text, ignoring case and spaces); "
        "values seen: good, bad. Check --positive."
    ]
    a = table(credit_split).astype({"Income": object})
    a.loc[:2, "Income"] = "12,5"  # a decimal comma
    a.to_csv(tmp_path / "mixed.csv", sep=";", index=False)
    table(credit_split).to_csv(tmp_path / "tabs.csv", sep="\t", index=False)
    res = fed.cli("schema", tmp_path / "tabs.csv", "--target", "Status", "--positive", "bad")
    assert "note: tabs.csv is separated by tabs" in res.output
    line = one_line(fed.cli("schema", tmp_path / "mixed.csv", "--target", "Status", "--positive", "bad", code=1))
    assert "column Income mixes numbers" in line and "and text (3 rows, e.g. '12,5')" in line
    res = fed.cli("schema", "--help")
    words = " ".join(res.output.replace("│", " ").split())
    assert 'is compared as a number: 1, 1.0, "1" and true all match' in words and "ignoring case" in words


def test_damaged_residual_is_refused_before_anything_is_written(tmp_path, credit_split):
    fed = make_fed(
        tmp_path, credit_split, TEMPLATE + '\n[strategy.compression]\nmethod = "topk"\nratio = 0.1\n', banks=BANKS[:3]
    )
    for b in BANKS[:3]:
        fed.train(b)
    residual = bank_dir(fed, "bank-a") / "state.residual.safetensors"
    assert residual.exists()
    fed.aggregate()
    good = residual.read_bytes()
    state = state_file(fed, "bank-a").read_bytes()
    for damage, why in (
        (good[:-3], "offsets do not match"),
        (b"\xff" * 64, "header length"),
        (
            tensors.encode({"0.weight": np.full((1, 26), np.nan, np.float32), "0.bias": np.zeros(1, np.float32)}),
            "NaN or infinite",
        ),
    ):
        residual.write_bytes(damage)
        before = snapshot(fed)
        line = one_line(fed.train("bank-a", code=1))
        assert str(residual) in line and why in line and line.endswith("delete it to start afresh"), line
        assert snapshot(fed) == before and state_file(fed, "bank-a").read_bytes() == state
    residual.unlink()
    fed.train("bank-a")


def test_evaluate_and_predict_read_tables_the_same_way(tmp_path, credit_split, fed):
    t = pd.read_csv(credit_split / "test.csv")
    t.assign(Status=t.Status.str.upper()).to_csv(tmp_path / "upper.csv", sep=";", index=False)
    where = ("--store", fed.store, "--coordinator", fed.pub("coordinator"))
    res = fed.cli("evaluate", *where, "--data", tmp_path / "upper.csv")
    assert "round 0" in res.output and "upper.csv is separated by ';'" in res.output
    t[t.Status == "good"].to_csv(tmp_path / "good.csv", index=False)
    line = one_line(fed.cli("evaluate", *where, "--data", tmp_path / "good.csv", code=1))
    assert "no row of good.csv has Status == 'bad'" in line
    t.drop(columns="Status").to_csv(tmp_path / "unlabelled.csv", sep="\t", index=False)
    fed.cli("predict", *where, "--data", tmp_path / "unlabelled.csv", "--out", tmp_path / "scores.csv")
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == len(t) and scores["score"].between(0, 1).all()
    (tmp_path / "sheet.xls").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(60))
    line = one_line(fed.cli("predict", *where, "--data", tmp_path / "sheet.xls", "--out", tmp_path / "x.csv", code=1))
    assert "sheet.xls: Excel files are not read" in line and not (tmp_path / "x.csv").exists()


# --------------------------------------------------------------------------- property-based: any table


_CELL = st.one_of(
    st.none(),
    st.floats(),
    st.integers(-(10**30), 10**30),
    st.booleans(),
    st.text(max_size=5),
    st.sampled_from(["bad", "good", " BAD", "1", "1.0", "0", "true", "a", "b"]),
)
_SPEC = DataSpec(
    target="y",
    positive="bad",
    numeric=(NumericFeature("x", 1.0, 2.0),),
    categorical=(CategoricalFeature("c", ("a", "b")),),
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_CELL, _CELL, _CELL), max_size=12), st.sampled_from(["bad", "1", "true"]))
def test_any_table_prepares_to_finite_inputs_or_one_clear_refusal(rows, positive):
    df = pd.DataFrame(rows, columns=["x", "c", "y"], dtype=object) if rows else pd.DataFrame(columns=["x", "c", "y"])
    try:
        prep = prepare(df, replace(_SPEC, positive=positive), "t.csv")
    except FedcliError as e:
        assert "\n" not in str(e) and e.exit_code == ExitCode.ERROR
        return
    assert prep.X.dtype == np.float32 and np.isfinite(prep.X).all() and len(prep.X) >= 2
    assert sorted(set(prep.y.tolist())) == [0.0, 1.0]


def test_label_cell_with_a_newline_is_refused_in_one_line():
    df = pd.DataFrame([(None, None, 0.0), (None, None, "0\n0")], columns=["x", "c", "y"], dtype=object)
    with pytest.raises(FedcliError, match="no row of t.csv has y == 'bad'") as refusal:
        prepare(df, _SPEC, "t.csv")
    assert "\n" not in str(refusal.value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_any_bytes_read_as_a_table_or_one_clear_refusal(tmp_path, data, suffix):
    path = tmp_path / f"t{suffix}"
    path.write_bytes(data)
    try:
        read_table(path)
    except FedcliError as e:
        assert "\n" not in str(e)


_JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_STATE_KEYS = st.sampled_from(
    ["federation_id", "last_round", "last_sha256", "round", "entries", "version", "accountant", "mode", "federation"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.one_of(
        st.binary(max_size=200), st.dictionaries(_STATE_KEYS, _JSON, max_size=4).map(lambda d: json.dumps(d).encode())
    )
)
def test_any_state_or_ledger_file_loads_or_is_refused_in_one_line(tmp_path, doc):
    from fedcli.bank.state import BankState
    from fedcli.privacy.ledger import Ledger

    path = tmp_path / "bank.state.json"
    path.write_bytes(doc)
    for read in (lambda: BankState.load(path), lambda: Ledger(path).entries()):
        try:
            read()
        except FedcliError as e:
            assert "\n" not in str(e) and str(path) in str(e) and str(e).endswith("restore it from backup")
