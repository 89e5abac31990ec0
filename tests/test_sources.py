"""A bank's table read through Apache Arrow: every format gives the same update, scores and refusals.

The same rows as CSV (comma, semicolon, tab), a Parquet file, a partitioned Parquet folder and
the same files on S3 (the loopback moto server) must train to the very same update, evaluate to
the same metrics and predict the same scores; every bad input is one line and exit 1, with
nothing written. Preprocessing streams in chunks, so it is also checked that the chunk size never
changes a feature, a note or a refusal.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import BANKS, make_fed, one_line, snapshot, state_file, use_s3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcli.bank import sources, tables
from fedcli.errors import ExitCode, FedcliError
from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

SPEC = DataSpec(
    target="Status",
    positive="bad",
    numeric=(NumericFeature("Income", 140.0, 80.0), NumericFeature("Debt", 500.0, 1500.0)),
    categorical=(CategoricalFeature("Home", ("owner", "rent", "parents")), CategoricalFeature("Code", ("1", "2.0"))),
)


def formats(df: pd.DataFrame, where) -> dict[str, object]:
    """The same rows, in the same order, as every kind of table fedcli reads locally."""
    where.mkdir(parents=True, exist_ok=True)
    out = {"comma": where / "t.csv", "semicolon": where / "t-semi.csv", "tabs": where / "t.tsv"}
    df.to_csv(out["comma"], index=False)
    df.to_csv(out["semicolon"], sep=";", index=False)
    df.to_csv(out["tabs"], sep="\t", index=False)
    out["parquet"] = where / "t.parquet"
    df.to_parquet(out["parquet"], index=False)
    folder = where / "parts"
    for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):  # hive partitions in row order
        (folder / f"part={i}").mkdir(parents=True)
        df.iloc[part].to_parquet(folder / f"part={i}" / "data.parquet", index=False)
    (folder / "_SUCCESS").write_text("")  # what Spark leaves: skipped, like hidden files
    out["folder"] = folder
    return out


def update_sha(fed, bank: str) -> str:
    return json.loads((fed.store / f"rounds/000001/updates/{bank}.json").read_text())["tensors_sha256"]


def forget(fed, bank: str) -> None:
    """Undo a bank's round-1 submission so the same bank can train again on another copy of its table."""
    for suffix in ("json", "safetensors"):
        (fed.store / f"rounds/000001/updates/{bank}.{suffix}").unlink()
    state_file(fed, bank).unlink()


def upload(srv, url: str, path) -> str:
    """Copy a file or folder under an s3:// URL; return the URL of the copy."""
    bucket, _, prefix = url[len("s3://") :].partition("/")
    client = srv.client()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        key = f"{prefix}/{path.name}" if f == path else f"{prefix}/{path.name}/{f.relative_to(path)}"
        client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
    return f"{url}/{path.name}"


@pytest.mark.slow
def test_every_format_trains_evaluates_and_predicts_the_same(tmp_path, credit_split, moto_s3, monkeypatch):
    fed = make_fed(tmp_path / "fed", credit_split, banks=BANKS[:3])
    a = pd.read_csv(credit_split / "bank-a.csv")
    local = formats(a, tmp_path)
    url = use_s3(moto_s3, monkeypatch)
    remote = {f"s3 {name}": upload(moto_s3, url, local[name]) for name in ("comma", "parquet", "folder")}
    fed.train("bank-a")
    expected = update_sha(fed, "bank-a")
    for name, path in {**local, **remote}.items():
        forget(fed, "bank-a")
        res = fed.train("bank-a", data=path)
        assert update_sha(fed, "bank-a") == expected, (name, res.output)
        assert json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())["num_examples"] == len(a)
    for b in BANKS[1:3]:
        fed.train(b)
    fed.aggregate()

    where = ("--store", fed.store, "--coordinator", fed.pub("coordinator"))
    test = pd.read_csv(credit_split / "test.csv")
    held = formats(test, tmp_path / "holdout")
    held["s3 folder"] = upload(moto_s3, url + "/holdout", held["folder"])
    by_home = tmp_path / "by-home"  # partitioned on a feature: its values come back from the folder names
    pq.write_to_dataset(pa.Table.from_pandas(test.dropna(subset=["Home"])), by_home, partition_cols=["Home"])
    metrics = {name: _metrics(fed, where, path) for name, path in held.items()}
    assert all(m == metrics["comma"] for m in metrics.values()) and any("auc" in row for row in metrics["comma"]), (
        metrics
    )
    home_only = tmp_path / "with-home.csv"
    test.dropna(subset=["Home"]).to_csv(home_only, index=False)
    assert _metrics(fed, where, by_home) == _metrics(fed, where, home_only)

    unlabelled = formats(test.drop(columns="Status"), tmp_path / "unlabelled")
    unlabelled["s3 parquet"] = upload(moto_s3, url + "/unlabelled", unlabelled["parquet"])
    scores = {}
    for name, path in unlabelled.items():
        out = tmp_path / f"scores-{name.replace(' ', '-')}.csv"
        fed.cli("predict", *where, "--data", path, "--out", out)
        written = pd.read_csv(out)
        columns = [c for c in written.columns if c not in ("part", "score")]  # "part": the folder's partitions
        assert columns == list(test.columns.drop("Status")) and len(written) == len(test)
        scores[name] = written["score"].to_numpy()
    assert all(np.array_equal(s, scores["comma"]) for s in scores.values())
    as_csv = pd.read_csv(tmp_path / "scores-comma.csv")
    assert as_csv.drop(columns="score").astype(str).equals(test.drop(columns="Status").astype(str))  # cells as read


def test_bad_inputs_are_refused_in_one_line(tmp_path, credit_split, moto_s3, monkeypatch):
    fed = make_fed(tmp_path / "fed", credit_split, banks=BANKS[:3])
    a = pd.read_csv(credit_split / "bank-a.csv")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty-folder").mkdir()
    mixed = bad / "mixed"
    mixed.mkdir()
    a.to_parquet(mixed / "a.parquet", index=False)
    a.assign(Income=a.Income.astype(str)).to_parquet(mixed / "b.parquet", index=False)
    with_csv = bad / "with-csv"
    with_csv.mkdir()
    a.to_parquet(with_csv / "a.parquet", index=False)
    a.to_csv(with_csv / "b.csv", index=False)
    only_csv = bad / "only-csv"
    only_csv.mkdir()
    a.to_csv(only_csv / "a.csv", index=False)
    looped = bad / "looped"
    looped.mkdir()
    a.to_parquet(looped / "a.parquet", index=False)
    (looped / "again").symlink_to(looped)  # the folder reaches a.parquet again, through a link
    a.to_parquet(bad / "good.parquet", index=False)
    whole = (bad / "good.parquet").read_bytes()
    (bad / "truncated.parquet").write_bytes(whole[: len(whole) // 2])
    (bad / "garbled.parquet").write_bytes(whole[:4] + bytes(200) + whole[204:])  # the footer is intact
    text = (credit_split / "bank-a.csv").read_text().splitlines()
    (bad / "ragged.csv").write_text("\n".join([*text[:5], text[5] + ",extra", *text[6:]]) + "\n")
    (bad / "latin1.csv").write_bytes((credit_split / "bank-a.csv").read_bytes() + "bad,1,fixed,é\n".encode("latin-1"))
    (bad / "long-header.csv").write_text("x" * (5 << 20) + "\n1\n")
    (bad / "wide.csv").write_text(",".join(f"c{i}" for i in range(sources.MAX_COLUMNS + 1)) + "\n")
    (bad / "quote.csv").write_text(text[0] + '\n"' + "x" * (5 << 20) + "\n")  # a quote never closed
    (bad / "long-row.csv").write_text("\n".join([text[0], text[1] + "x" * (9 << 20), *text[2:]]) + "\n")
    url = use_s3(moto_s3, monkeypatch)
    upload(moto_s3, url, credit_split / "bank-a.csv")
    cases = {
        tmp_path / "nope.csv": "data file",
        bad / "empty-folder": "the folder is empty (no Parquet files)",
        mixed: "its files have different columns: a.parquet has Income (double) but b.parquet has Income (",
        with_csv: "a table folder holds only Parquet files (*.parquet, *.pq), and this one also holds 'b.csv'",
        only_csv: "the folder has no Parquet files (*.parquet, *.pq), only e.g. 'a.csv'",
        looped: "a.parquet and again/a.parquet are the same file (a link inside the folder)",
        bad / "truncated.parquet": "it is not a readable Parquet file (no Parquet footer: the file is truncated",
        bad / "garbled.parquet": "it is not a readable Parquet table",
        bad / "ragged.csv": "data row 5 has 15 field(s) where the header has 14",
        bad / "latin1.csv": "it is not UTF-8 text (byte 0xe9 at offset",
        bad / "long-header.csv": "its first line is longer than 4 MiB",
        bad / "wide.csv": f"its header has {sources.MAX_COLUMNS + 1:,} columns (at most {sources.MAX_COLUMNS:,})",
        bad / "quote.csv": "data row 1 has 1 field(s) where the header has 14",
        bad / "long-row.csv": "a line (or a quoted cell) is longer than 4 MiB",
        f"{url}/no-such-table.csv": "no such object or prefix in the bucket",
        "s3://no-such-bucket-fedcli/t.csv": "bucket 'no-such-bucket-fedcli' does not exist",
    }
    before = snapshot(fed)
    for path, message in cases.items():
        line = one_line(fed.train("bank-a", code=ExitCode.ERROR, data=path))
        assert message in line, (path, line)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line = one_line(fed.train("bank-a", code=ExitCode.ERROR, data=f"{url}/bank-a.csv"))
    assert "no usable S3 credentials for s3://" in line and "missing: AWS_SECRET_ACCESS_KEY" in line
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # nothing at all (no profile, no instance role: see use_s3)
    line = one_line(fed.train("bank-a", code=ExitCode.ERROR, data=f"{url}/bank-a.csv"))
    assert "no S3 credentials for s3://" in line and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    assert snapshot(fed) == before and not state_file(fed, "bank-a").exists()


@pytest.mark.slow
def test_s3_tables_on_a_server_that_checks_credentials(seaweed_s3, monkeypatch, tmp_path):
    """SeaweedFS checks signatures (moto does not): a wrong secret is "access denied", in one line."""
    url = use_s3(seaweed_s3, monkeypatch)
    (tmp_path / "t.csv").write_text("a;b\n1;2\n3;4\n")
    table = sources.open_table(upload(seaweed_s3, url, tmp_path / "t.csv"))
    assert table.separator == ";" and [b.to_pydict() for b in table.batches()] == [{"a": ["1", "3"], "b": ["2", "4"]}]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(FedcliError) as refusal:
        sources.open_table(f"{url}/t.csv")
    assert "access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket policy" in str(refusal.value)


def test_a_refusal_many_chunks_down_leaves_no_output(tmp_path, credit_split):
    """A bad value past the first chunk: predict has already scored earlier chunks, yet writes nothing."""
    fed = make_fed(tmp_path / "fed", credit_split, banks=BANKS[:3])
    test = pd.read_csv(credit_split / "test.csv")
    big = pd.concat([test] * (sources.ROWS_PER_BATCH // len(test) + 2), ignore_index=True)
    row = len(big) - 3
    big.loc[row, "Debt"] = 1e39
    big.to_parquet(tmp_path / "big.parquet", index=False)
    where = ("--store", fed.store, "--coordinator", fed.pub("coordinator"))
    out = tmp_path / "scores.csv"
    res = fed.cli("predict", *where, "--data", tmp_path / "big.parquet", "--out", out, code=ExitCode.ERROR)
    assert (
        f"column Debt has 1 value(s) more than 1,000,000 standard deviations from the spec's mean (e.g. 1e+39 in data row {row + 1})"
        in one_line(res)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.parquet", "fed"]  # no output, no temporary file


def _metrics(fed, where, path) -> list[str]:
    """The rows of the tables `fedcli evaluate` prints (metrics and thresholds), spacing normalised."""
    res = fed.cli("evaluate", *where, "--data", path)
    rows = [" ".join(ln.split()) for ln in res.output.splitlines() if ln.startswith(("┃", "│"))]
    assert any("pr_auc" in r or "PR-AUC" in r for r in rows), res.output
    return rows


def _messy(n: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "Income": rng.normal(140, 80, n).round(2).astype(object),
            "Debt": rng.normal(500, 1500, n).round(1),
            "Home": rng.choice(["owner", "rent", "parents", "castle", None], n),
            "Code": rng.choice(["1", "2", "1.0", "3", None], n),
            "Status": rng.choice(["good", "bad", " BAD", None], n, p=[0.6, 0.2, 0.1, 0.1]),
            "Extra": "x",
        }
    )
    df.loc[rng.choice(n, 20), "Income"] = "unknown"
    df.loc[rng.choice(n, 15), "Debt"] = np.nan
    return df


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_chunking_never_changes_features_notes_or_refusals(tmp_path, kind):
    df = _messy()
    path = tmp_path / f"t.{kind}"
    df.to_csv(path, index=False) if kind == "csv" else df.astype({"Income": str}).to_parquet(path, index=False)
    whole = tables.prepare(tables.read_table(path), SPEC, "t")
    for rows in (1, 7, 64, 10_000):
        part = tables.prepare(sources.open_table(path), SPEC, "t", rows_per_batch=rows)
        assert np.array_equal(part.X, whole.X) and np.array_equal(part.y, whole.y), rows
        assert tables.notes(part, "t") == tables.notes(whole, "t"), rows
    notes = tables.notes(whole, "t")
    unknown = int(((df.Income == "unknown") & df.Status.notna()).sum())
    assert any(f"Income {unknown}" in n and "text counted as missing: Income (e.g. 'unknown')" in n for n in notes)
    assert any("Home" in n and "Code" in n for n in notes if "unknown category" in n)
    code = [n for n in tables.feature_names(SPEC)].index("Code=2.0")
    assert whole.X[:, code].sum() == (df.dropna(subset=["Status"]).Code == "2").sum()  # "2" is the level "2.0"

    df.loc[[400, 450], "Status"] = "good"
    df.loc[400, "Debt"] = 1e39
    df.loc[450, "Debt"] = -1e40
    only_good = df.assign(Status=df.Status.map({"good": "good", "bad": "fine", " BAD": "ok"}))
    for frame, message in (
        (
            df,
            "column Debt has 2 value(s) more than 1,000,000 standard deviations from the spec's mean (e.g. 1e+39 in data row 401)",
        ),
        (
            only_good,
            "no row of t has Status == 'bad' (compared as text, ignoring case and spaces); values seen: good, fine, ok",
        ),
    ):
        frame.to_csv(path, index=False) if kind == "csv" else frame.astype({"Income": str}).to_parquet(
            path, index=False
        )
        for rows in (3, 10_000):
            with pytest.raises(FedcliError) as refusal:
                tables.prepare(sources.open_table(path), SPEC, "t", rows_per_batch=rows)
            assert message in str(refusal.value), (rows, str(refusal.value))


def test_separators_names_and_batches(tmp_path):
    assert sources.detect_separator("a;b;c") == ";" and sources.detect_separator("a\tb") == "\t"
    assert sources.detect_separator("a|b|c,d") == "|" and sources.detect_separator("a,b;c") == ","
    assert sources.detect_separator('"x;y";"z"') == ";" and sources.detect_separator('"a;b;c",d') == ","
    assert sources.detect_separator("single") == ","
    (tmp_path / "p.txt").write_text("a|a|b\n1|2|3\n4|5|6\n")
    t = sources.open_table(tmp_path / "p.txt")
    assert (
        t.separator == "|" and t.columns == ["a", "a.1", "b"] and t.rows is None
    )  # repeated names numbered like pandas
    assert [b.to_pydict() for b in t.batches(["b", "a.1"], rows_per_batch=1)] == [
        {"b": ["3"], "a.1": ["2"]},
        {"b": ["6"], "a.1": ["5"]},
    ]
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "t.pq", row_group_size=3)
    t = sources.open_table(tmp_path / "t.pq")
    assert t.rows == 10 and [b.num_rows for b in t.batches(rows_per_batch=4)] == [4, 4, 2]
    (tmp_path / "utf16.csv").write_bytes("Name,Score\nÉlise,1\n".encode("utf-16"))
    assert tables.read_table(tmp_path / "utf16.csv").to_dict("list") == {"Name": ["Élise"], "Score": [1.0]}
    (tmp_path / "book.csv").write_bytes(b"PK\x03\x04" + bytes(50))
    with pytest.raises(FedcliError, match="is a spreadsheet or archive, not CSV text"):
        sources.open_table(tmp_path / "book.csv")
    shutil.copy(tmp_path / "t.pq", tmp_path / "parquet-named.csv")  # a Parquet file is known by its first bytes
    assert sources.open_table(tmp_path / "parquet-named.csv").rows == 10


# --------------------------------------------------------------------------- property-based: any file, any cells

_XCY = DataSpec(
    target="y",
    positive="1",
    numeric=(NumericFeature("x", 1.0, 2.0),),
    categorical=(CategoricalFeature("c", ("a", "1", "True")),),
)
_CELL = st.one_of(
    st.sampled_from(["", " ", "1", "0", "1.0", " 1", "true", "False", "NA", "nan", "a", "A", "1e400", "-3", "x y"]),
    st.text(alphabet="01.-e aTr", max_size=4),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".tsv", ".parquet"]), header=st.booleans())
def test_any_bytes_stream_to_a_table_or_one_clear_refusal(tmp_path, data, suffix, header):
    path = tmp_path / f"t{suffix}"
    path.write_bytes((b"x,c,y\n" if header else b"") + data)
    try:
        prep = tables.prepare(sources.open_table(path), _XCY, "t", rows_per_batch=3)
    except FedcliError as e:
        assert "\n" not in str(e) and e.exit_code == ExitCode.ERROR
        return
    assert np.isfinite(prep.X).all() and sorted(set(prep.labels().tolist())) == [0.0, 1.0]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_CELL, _CELL, _CELL), min_size=1, max_size=12), chunk=st.integers(1, 5))
def test_streamed_csv_prepares_like_the_whole_table(tmp_path, rows, chunk):
    """The same cells give the same features, labels, notes or refusal, whole (typed as pandas would) or streamed."""
    path = tmp_path / "t.csv"
    pd.DataFrame(rows, columns=["x", "c", "y"]).to_csv(path, index=False)
    outcomes = []
    for read in (lambda: tables.read_table(path), lambda: sources.open_table(path)):
        try:
            prep = tables.prepare(read(), _XCY, "t", rows_per_batch=chunk)
            outcomes.append((prep.X.tolist(), prep.labels().tolist(), tables.notes(prep, "t")))
        except FedcliError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]


def test_schema_drafts_the_same_section_from_every_format(tmp_path, credit_split, fed):
    a = pd.read_csv(credit_split / "bank-a.csv")
    drafts = {}
    for name, path in formats(a, tmp_path / "a").items():
        res = fed.cli("schema", path, "--target", "Status", "--positive", "bad")
        drafts[name] = [ln for ln in res.output.splitlines() if not ln.startswith("note:") and '"part"' not in ln]
    assert all(d == drafts["comma"] for d in drafts.values()) and any("Seniority" in ln for ln in drafts["comma"])
