"""Each bank alone: a model trained only on this bank's own training rows, kept at the bank, and scored
on its holdout beside the federated global ([evaluation] baseline = true).

It is what the bank would have without the federation, at equal compute: it starts from the shared
round-0 weights and trains `[training] epochs` per round on the same training rows as the bank's
federated updates (never its holdout), so "after r rounds" compares like with like. It never leaves the
bank; only its holdout histogram is published, next to the federated one. The model is kept next to
the state file (`<key>.<federation>.baseline-rNNNNNN.safetensors`, atomic writes, the latest round
only); a bank that skipped rounds catches up with the epochs it missed.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcli import digest
from fedcli.errors import FedcliError
from fedcli.files import read_bounded, write_atomic
from fedcli.protocol import rounds, tensors

if TYPE_CHECKING:
    from fedcli.bank.rows import LocalRows
    from fedcli.bank.step import BankRound

Arrays = dict[str, np.ndarray]


def _files(job: BankRound) -> list[tuple[int, Path]]:
    """(round, path) of this bank's saved baselines in this federation, latest first."""
    stem = f"{job.state.path.stem}.{job.spec.federation_id}.baseline-r"
    found = []
    for path in job.state.path.parent.glob(f"{stem}*.safetensors"):
        m = re.fullmatch(re.escape(stem) + r"(\d{6})\.safetensors", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def _path(job: BankRound, r: int) -> Path:
    return job.state.path.with_name(f"{job.state.path.stem}.{job.spec.federation_id}.baseline-r{r:06d}.safetensors")


def _load(job: BankRound, path: Path) -> Arrays:
    what = f"bank-alone baseline {path}"
    try:
        data = read_bounded(path, tensors.max_file_size(job.shapes), "bank-alone baseline")
        if data is None:
            raise FedcliError(f"{what} vanished")
        return dict(tensors.decode(data, job.shapes, what))
    except FedcliError as e:
        raise FedcliError(f"{e}; delete it to retrain the baseline from round 0") from None


def model_at(job: BankRound, r: int, rows: LocalRows) -> Arrays:
    """The bank-alone model after r rounds of local epochs on the bank's training rows, trained on from the latest
    one kept (held in memory or streamed, as the round's own training: bank.rows)."""
    from fedcli.bank.training import fit_stream

    kept = [(k, p) for k, p in _files(job) if k <= r]
    if kept:
        done, weights = kept[0][0], _load(job, kept[0][1])
    else:
        done, weights = 0, rounds.load_global(job.store, job.spec, job.spec_sha, 0, job.shapes).tensors
    if done < r:
        seed = int(digest.sha256(f"{job.spec.federation_id}/{job.me.name}/alone/{r}".encode())[:16], 16)
        training = replace(job.spec.training, epochs=job.spec.training.epochs * (r - done))
        epochs = rows.epochs(seed, training.batch_size)
        weights, _ = fit_stream(job.spec.model, training, weights, epochs, len(rows), seed)
        write_atomic(_path(job, r), tensors.encode(weights), ".baseline-")
        for k, old in _files(job):
            if k < r:
                old.unlink(missing_ok=True)
    return weights
