"""A table bigger than the shuffle buffer is trained on without being held: re-read per epoch, buffer by buffer."""

import json

import numpy as np
import pytest
from helpers import make_fed

from fedcli.bank import rows, sources, training
from fedcli.bank.kernel import probabilities
from fedcli.errors import InputError
from fedcli.protocol import rounds
from fedcli.store import open_store


def _spec(fed):
    spec, _ = rounds.load_spec(open_store(str(fed.store)), None)
    return spec


def _read(fed, path, spec):
    zeros = {k: np.zeros(s, np.float32) for k, s in _shapes(spec).items()}
    local, scores, held = rows.read(sources.open_table(path), spec.data, lambda X: probabilities(spec.model, zeros, X))
    assert held is None  # no holdout selector given
    return local, scores


def _shapes(spec):
    from fedcli import models

    return models.shapes(spec.model, spec.data.n_features)


@pytest.fixture
def small_buffer(monkeypatch):
    monkeypatch.setattr(rows, "SHUFFLE_ROWS", 300)


def test_a_table_that_fits_is_held_and_shuffled_whole(tmp_path, credit_split):
    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    local, scores = _read(fed, fed.data / "bank-a.csv", spec)
    assert not local.streamed and len(scores) == len(local) == len(local.X)
    held = list(local.epochs(7, 32)(0))
    whole = list(training.shuffled_chunks(local.X, local.y, 7, 32)(0))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(held, whole, strict=True))


def test_a_bigger_table_is_streamed_in_whole_batch_buffers(tmp_path, credit_split, small_buffer):
    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    local, scores = _read(fed, fed.data / "bank-a.csv", spec)
    assert local.streamed and local.X is None and len(scores) == len(local) > 3 * rows.SHUFFLE_ROWS
    matrix = local.matrix()
    for e in range(2):
        chunks = list(local.epochs(7, 32)(e))
        seen = np.concatenate([X for X, _ in chunks])
        # every row exactly once per epoch: the same multiset of rows as the table
        assert np.array_equal(np.sort(seen, axis=0), np.sort(matrix, axis=0))
        assert all(len(X) % 32 == 0 for X, _ in chunks[:-1])
        assert not np.array_equal(seen, matrix)  # shuffled within buffers
    first, second = (np.concatenate([X for X, _ in local.epochs(7, 32)(e)]) for e in (0, 1))
    assert not np.array_equal(first, second)  # each epoch its own order
    np.testing.assert_array_equal(local.scores(lambda X: X[:, 0]), matrix[:, 0])


def test_a_table_changed_during_training_is_refused(tmp_path, credit_split, small_buffer):
    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    path = tmp_path / "bank-a.csv"
    path.write_text((fed.data / "bank-a.csv").read_text())
    local, _ = _read(fed, path, spec)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-40]) + "\n")  # rows went missing under the bank
    with pytest.raises(InputError, match="changed while the bank was training"):
        list(local.epochs(7, 32)(0))


def test_train_streams_a_big_table_through_the_cli(tmp_path, credit_split, small_buffer):
    fed = make_fed(tmp_path, credit_split)
    for bank in ("bank-a", "bank-b"):
        fed.train(bank)
    manifest = json.loads((fed.store / "rounds/000001/updates/bank-a.json").read_text())
    body = manifest.get("manifest", manifest)
    assert body["num_examples"] > 3 * rows.SHUFFLE_ROWS
    assert body["metrics"]["auc_after"] > body["metrics"]["auc_before"]


def test_parquet_row_groups_are_visited_in_a_new_order_each_epoch(tmp_path, credit_split, small_buffer):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    path = tmp_path / "bank-a.parquet"
    pq.write_table(pacsv.read_csv(fed.data / "bank-a.csv"), path, row_group_size=100)
    local, _ = _read(fed, path, spec)
    assert local.streamed and len(local.table.parts()) > 10
    matrix = local.matrix()
    firsts = []
    for e in range(3):
        seen = np.concatenate([X for X, _ in local.epochs(7, 32)(e)])
        assert np.array_equal(np.sort(seen, axis=0), np.sort(matrix, axis=0))
        # which row group the epoch's first buffer drew from: the buffer holds 300 of ~1,350 rows
        first_buffer = {tuple(r) for r in seen[: rows.SHUFFLE_ROWS // 32 * 32]}
        firsts.append({i // 100 for i, r in enumerate(matrix) if tuple(r) in first_buffer})
    assert len({frozenset(f) for f in firsts}) > 1  # the parts' order changes with the epoch


def test_a_parquet_table_changed_during_training_is_refused(tmp_path, credit_split, small_buffer):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    path = tmp_path / "bank-a.parquet"
    table = pacsv.read_csv(fed.data / "bank-a.csv")
    pq.write_table(table, path, row_group_size=100)
    local, _ = _read(fed, path, spec)
    pq.write_table(table.slice(0, len(table) - 7), path, row_group_size=100)
    with pytest.raises(InputError, match="changed while the bank was training"):
        list(local.epochs(7, 32)(0))


def test_a_streamed_table_keeps_its_holdout_rows_out_of_every_epoch(tmp_path, credit_split, small_buffer):
    from fedcli.bank.holdout import holdout_rows

    fed = make_fed(tmp_path, credit_split)
    spec = _spec(fed)
    zeros = {k: np.zeros(s, np.float32) for k, s in _shapes(spec).items()}
    table = sources.open_table(fed.data / "bank-a.csv")
    local, scores, held = rows.read(
        table, spec.data, lambda X: probabilities(spec.model, zeros, X), lambda X: holdout_rows("f", X, 0.15)
    )
    everything, _, _ = rows.read(table, spec.data, lambda X: X[:, 0])
    all_rows = everything.matrix()
    out = holdout_rows("f", all_rows, 0.15)
    assert local.streamed and len(held.y) == int(out.sum()) and len(local) == int((~out).sum()) == len(scores)
    assert np.array_equal(np.sort(held.X, axis=0), np.sort(all_rows[out], axis=0))
    for e in range(2):
        seen = np.concatenate([X for X, _ in local.epochs(3, 32)(e)])
        assert np.array_equal(np.sort(seen, axis=0), np.sort(all_rows[~out], axis=0))


def test_a_no_op_train_reads_no_table_and_imports_no_table_reader(tmp_path, credit_split):
    """cron re-runs train every few minutes: a bank that already submitted must answer without pyarrow, pandas, torch."""
    import subprocess
    import sys

    from helpers import ROOT

    fed = make_fed(tmp_path, credit_split)
    fed.train("bank-a")
    args = ["train", "--store", str(fed.store), "--key", str(fed.key("bank-a")), "--data", str(fed.data / "bank-a.csv")]
    args += ["--coordinator", str(fed.pub("coordinator"))]
    code = (
        "import sys\nfrom fedcli.cli import app\nsys.argv = ['fedcli', *sys.argv[1:]]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print(sorted(m for m in ('torch', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "nothing to do" in out.stderr + out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
