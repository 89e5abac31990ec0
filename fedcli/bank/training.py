"""The local training loop a bank runs on its own rows (BCE-with-logits with pos_weight, Adam).

Plain training runs on the numpy kernel (fedcli.bank.kernel): the same minibatch Adam as a
torch loop, an order of magnitude faster on a tabular model, and without importing torch. `fit_stream`
takes the rows epoch by epoch as chunks (a reader streaming a table bigger than memory);
`fit` is that over an in-memory table, shuffled by a seeded permutation per epoch and handed
over in chunks of whole batches, so training memory beyond the table is one chunk.
Record-level DP (`fit_private`) stays on torch and Opacus. Speed: docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from fedcli.bank.kernel import Kernel, Network
from fedcli.protocol.spec import ModelSpec, TrainingSpec

CHUNK_ROWS = 32_768  # rows gathered at a time by `fit` (rounded down to whole batches)

Arrays = dict[str, np.ndarray]
Chunks = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]
OnStep = Callable[[int, int, float], None]


def fit_stream(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: Arrays,
    epochs_of_chunks: Chunks,
    n_rows: int,
    seed: int,
    on_step: OnStep | None = None,
    prox_mu: float = 0.0,
) -> tuple[Arrays, float]:
    """Train from `start` on the rows `epochs_of_chunks(epoch)` yields; return the weights and the last epoch's mean loss.

    Each chunk is (X float32 [m, d], y float32 [m]), in training order; batches are cut within a
    chunk, so chunks should hold whole batches except the epoch's last. `n_rows` (rows per epoch)
    only sizes the progress total. on_step(done, total, loss) reports batches done and the last
    batch's loss, every few hundred batches and at the end of each chunk. prox_mu > 0 adds
    FedProx's (mu/2)||w - start||^2 (Li et al. 2020), which keeps a bank with skewed data from
    drifting far from the global model; the reported loss excludes it. `seed` is unused: nothing
    in training is random once the stream has fixed the row order (no dropout, no init).
    """
    kernel = Kernel(Network(model_spec, start), training, prox_mu)
    total = training.epochs * -(-n_rows // training.batch_size)
    done, epoch_loss = 0, float("nan")
    for epoch in range(training.epochs):
        loss_sum, rows = 0.0, 0
        for X, y in epochs_of_chunks(epoch):
            for batches, block_loss, last_loss in kernel.train_chunk(X, y, all_losses=epoch == training.epochs - 1):
                done += batches
                loss_sum += block_loss
                if on_step:
                    on_step(done, max(total, done), last_loss)
            rows += len(X)
        epoch_loss = loss_sum / rows if rows else float("nan")
    return kernel.net.arrays(), epoch_loss


def fit(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: Arrays,
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    on_step: OnStep | None = None,
    prox_mu: float = 0.0,
) -> tuple[Arrays, float]:
    """`fit_stream` over an in-memory table: every epoch a fresh seeded permutation of the rows."""
    chunks = shuffled_chunks(X, y, seed, training.batch_size)
    return fit_stream(model_spec, training, start, chunks, len(X), seed, on_step, prox_mu)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The row order of one epoch: depends on (seed, epoch) only, so a rerun trains on the same batches."""
    return np.random.default_rng([seed % 2**64, epoch]).permutation(n)


def shuffled_chunks(X: np.ndarray, y: np.ndarray, seed: int, batch_size: int) -> Chunks:
    """Each epoch's rows in `epoch_order`, gathered CHUNK_ROWS (whole batches) at a time."""
    step = max(1, CHUNK_ROWS // batch_size) * batch_size

    def epoch(e: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = epoch_order(seed, e, len(X))
        for s in range(0, len(X), step):
            rows = order[s : s + step]
            yield np.take(X, rows, axis=0), np.take(y, rows)  # take: about 4x faster than X[rows] here

    return epoch


def fit_private(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: Arrays,
    X: np.ndarray,
    y: np.ndarray,
    clip: float,
    noise_multiplier: float,
    on_step: OnStep | None = None,
):
    """Record-level DP version of `fit`: DP-SGD through Opacus (see fedcli.privacy.train_dp_sgd).

    Returns the new weights and the mechanism that was actually run, for the privacy ledger.
    """
    import torch

    from fedcli import models
    from fedcli.privacy.dp_sgd import train_dp_sgd

    model = models.load_arrays(models.build(model_spec, X.shape[1]), start).train()
    mech = train_dp_sgd(
        model,
        torch.from_numpy(X),
        torch.from_numpy(y),
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        max_grad_norm=clip,
        noise_multiplier=noise_multiplier,
        pos_weight=training.pos_weight,
        on_step=on_step,
    )
    return models.to_arrays(model), mech
