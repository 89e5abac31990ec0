"""The local training loop a bank runs on its own rows (BCE-with-logits, Adam).

Each epoch gathers the rows once in a seeded random order and batches are views into that
copy; Adam runs fused, on one intra-op thread (a tabular model's step is microseconds of
work: extra threads only add synchronisation, and stall badly on shared cores). Measured
against a textbook DataLoader loop in docs/benchmarks.md.
"""

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedcli import models
from fedcli.protocol.spec import ModelSpec, TrainingSpec


def one_thread(fn):
    """Run `fn` with one intra-op torch thread, restoring the caller's setting afterwards."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@one_thread
def fit(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: dict[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
    prox_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], float]:
    """Train from `start` and return the new weights and the last epoch's mean loss.

    on_step(done, total, loss) is called after each batch so the CLI can draw progress.
    prox_mu > 0 adds FedProx's (mu/2)||w - start||^2 (Li et al. 2020), which keeps a bank
    with skewed data from drifting far from the global model; the reported loss excludes it.
    """
    torch.manual_seed(seed)
    model = models.load_arrays(models.build(model_spec, X.shape[1]), start).train()
    anchor = [p.detach().clone() for p in model.parameters()] if prox_mu > 0 else []
    opt = torch.optim.Adam(model.parameters(), lr=training.lr, fused=True)
    loss_fn = nn.BCEWithLogitsLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    n, bs = len(Xt), training.batch_size
    batches = (n + bs - 1) // bs
    total, done, epoch_loss = training.epochs * batches, 0, float("nan")
    gen = torch.Generator().manual_seed(seed)
    for _ in range(training.epochs):
        order = torch.randperm(n, generator=gen)
        Xe, ye = Xt[order], yt[order]  # one gather per epoch; batches below are views
        running = 0.0
        for b in range(batches):
            xb, yb = Xe[b * bs : (b + 1) * bs], ye[b * bs : (b + 1) * bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb).squeeze(1), yb)
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                (loss + 0.5 * prox_mu * prox).backward()
            else:
                loss.backward()
            opt.step()
            value = loss.item()
            running += value * len(xb)
            done += 1
            if on_step:
                on_step(done, total, value)
        epoch_loss = running / n
    return models.to_arrays(model), epoch_loss


def fit_private(
    model_spec: ModelSpec,
    training: TrainingSpec,
    start: dict[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    clip: float,
    noise_multiplier: float,
    on_step: Callable[[int, int, float], None] | None = None,
):
    """Record-level DP version of `fit`: DP-SGD through Opacus (see fedcli.privacy.train_dp_sgd).

    Returns the new weights and the mechanism that was actually run, for the privacy ledger.
    """
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
        on_step=on_step,
    )
    return models.to_arrays(model), mech
