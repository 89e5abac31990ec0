"""Record-level DP: training with DP-SGD (Opacus: per-example clipping, Gaussian noise, Poisson sampling).

Unit of privacy: one customer record, even against the coordinator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedcli.errors import FedcliError
from fedcli.privacy.accounting import ACCOUNTANT, Mechanism
from fedcli.randomness import secure_torch_generator

if TYPE_CHECKING:  # torch is heavy; import it only where tensors are touched
    import torch


def train_dp_sgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_grad_norm: float,
    noise_multiplier: float,
    pos_weight: float = 1.0,
    loss_fn: torch.nn.Module | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Mechanism:
    """Train ``model`` in place with DP-SGD (Opacus) and return the mechanism to charge.

    The optimizer is Adam, as in the non-private loop; Adam only post-processes the noised
    gradients, so the guarantee is DP-SGD's.
    Per-example gradients are clipped to ``max_grad_norm`` and Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` is added to their sum; batches are Poisson-sampled
    with rate batch_size/len(x), as the RDP analysis assumes. Sampling and noise come from
    generators seeded with fresh OS randomness, and the optimizer's ``secure_mode`` noise
    (sum of four Gaussians) is switched on against floating-point attacks.
    The default loss is BCEWithLogits for a binary target (model output of shape (n,) or (n, 1)),
    with ``pos_weight`` on the positive class as in the plain loop (a rare class counts more).
    ``on_step(done, total, loss)`` is called after each step (total is the expected count).
    """
    import torch
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    if len(x) == 0 or len(x) != len(y):
        raise FedcliError("DP-SGD needs a non-empty dataset with one label per row")
    if not noise_multiplier > 0 or not max_grad_norm > 0:
        raise FedcliError("DP-SGD needs a positive noise multiplier and max_grad_norm")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise FedcliError(f"model is not compatible with DP-SGD: {errors[0]}")
    loss_fn = loss_fn or torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, dtype=torch.float32))
    loader = DataLoader(
        TensorDataset(x, y), batch_size=min(batch_size, len(x)), shuffle=True, generator=secure_torch_generator()
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # as fedcli.train.fit: same lr meaning
    with warnings.catch_warnings():  # "Secure RNG turned off": we pass secret-seeded generators
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=secure_torch_generator(),
    )
    dp_optimizer.secure_mode = True  # the 4-sample noise; our generator is already secret-seeded
    dp_model.train()
    with warnings.catch_warnings():  # torch's full-backward-hook notice on input layers is noise here
        warnings.simplefilter("ignore", UserWarning)
        _dp_sgd_epochs(dp_model, dp_optimizer, dp_loader, epochs, loss_fn, on_step)
    dp_model._close()  # remove hooks and grad_sample attributes; ``model`` holds the trained weights
    hist = engine.accountant.history
    if len(hist) != 1:
        raise FedcliError(f"unexpected DP-SGD history {hist}")
    z, q, steps = hist[0]
    return Mechanism(
        mode="record", noise_multiplier=float(z), sample_rate=float(q), steps=int(steps), clip=max_grad_norm
    )


def _dp_sgd_epochs(dp_model, dp_optimizer, dp_loader, epochs, loss_fn, on_step) -> None:
    done, total = 0, epochs * len(dp_loader)
    for _ in range(epochs):
        for xb, yb in dp_loader:
            dp_optimizer.zero_grad(set_to_none=True)
            out = dp_model(xb)
            if out.dim() == 2 and out.shape[1] == 1 and yb.dim() == 1:
                out = out.squeeze(1)
            # An empty Poisson batch still takes a (pure-noise) step, as the accountant assumes.
            loss = loss_fn(out, yb.to(out.dtype)) if len(xb) else out.sum() * 0.0
            loss.backward()
            dp_optimizer.step()
            done += 1
            if on_step:
                on_step(done, total, float(loss))
