"""The numpy training kernel against torch: the same minibatch Adam, step for step and fit for fit.

fedcli.bank.kernel writes forward, backward and Adam out by hand; torch autograd and
torch.optim.Adam are the reference. Steps agree to float32 rounding (~1e-7); a whole fit on
the credit data reaches the holdout AUC of a torch loop trained on the same batches.
"""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TEMPLATE, make_fed
from torch import nn

from fedcli import models
from fedcli.bank.kernel import Kernel, Network, probabilities
from fedcli.bank.tables import prepare
from fedcli.bank.training import epoch_order, fit, fit_stream
from fedcli.errors import FedcliError
from fedcli.metrics import score
from fedcli.privacy.dp_sgd import train_dp_sgd
from fedcli.protocol.spec import ModelSpec, TrainingSpec

FAMILIES = [ModelSpec("logreg", (), seed=2), ModelSpec("mlp", (8, 5), seed=2)]


def torch_loop(ms, start, X, y, training, prox_mu=0.0, orders=None):
    """The reference: torch autograd + torch.optim.Adam on batches cut in `orders` (else in row order)."""
    model = models.load_arrays(models.build(ms, X.shape[1]), start).train()
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=training.lr)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(training.pos_weight))
    bs, losses = training.batch_size, []
    for epoch in range(training.epochs):
        order = orders[epoch] if orders is not None else np.arange(len(X))
        Xe, ye = torch.from_numpy(X[order]), torch.from_numpy(y[order])
        for s in range(0, len(X), bs):
            opt.zero_grad()
            loss = loss_fn(model(Xe[s : s + bs]).squeeze(1), ye[s : s + bs])
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
            (loss + 0.5 * prox_mu * prox).backward()
            opt.step()
            losses.append((loss.item(), len(Xe[s : s + bs])))
    return models.to_arrays(model), losses


def random_data(n=50, d=7, seed=0, positives=0.3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), (rng.random(n) < positives).astype(np.float32)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("ms", FAMILIES, ids=lambda m: m.kind)
@pytest.mark.parametrize("pos_weight,prox_mu", [(1.0, 0.0), (7.5, 0.0), (1.0, 0.3), (20.0, 0.5)])
@pytest.mark.parametrize("steps", [1, 4])
def test_steps_equal_torch_autograd_and_adam(ms, pos_weight, prox_mu, steps):
    X, y = random_data()
    start = models.initial(ms, X.shape[1])
    training = TrainingSpec(epochs=1, batch_size=16, lr=0.05, pos_weight=pos_weight)
    rows = min(len(X), steps * 16)  # 4 steps: 16 + 16 + 16 + a last batch of 2 rows
    ref, _ = torch_loop(ms, start, X[:rows], y[:rows], training, prox_mu)
    kernel = Kernel(Network(ms, start), training, prox_mu)
    (batches, _, _), *_ = kernel.train_chunk(X[:rows], y[:rows])
    got = kernel.net.arrays()
    assert batches == steps
    assert max_diff(got, ref) < 1e-6
    assert max_diff(start, ref) > 0.04  # the steps moved the weights: agreement is not trivial


@pytest.mark.parametrize("ms", FAMILIES, ids=lambda m: m.kind)
def test_losses_are_torch_losses_of_the_weights_each_batch_started_from(ms):
    X, y = random_data(n=70)
    start = models.initial(ms, X.shape[1])
    training = TrainingSpec(epochs=2, batch_size=16, lr=0.05, pos_weight=3.0)
    orders = [epoch_order(9, e, len(X)) for e in range(2)]
    _, ref_losses = torch_loop(ms, start, X, y, training, orders=orders)
    seen = []
    _, epoch_loss = fit(ms, training, start, X, y, seed=9, on_step=lambda *a: seen.append(a))
    last_epoch = ref_losses[-5:]  # 70 rows: 4 batches of 16 and one of 6
    assert epoch_loss == pytest.approx(sum(v * n for v, n in last_epoch) / len(X), rel=1e-5)
    assert seen[-1] == (10, 10, pytest.approx(ref_losses[-1][0], rel=1e-5))
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)


def credit_tables(credit_split):
    raw = __import__("tomllib").loads(TEMPLATE)["data"]
    from fedcli.protocol.spec import CategoricalFeature, DataSpec, NumericFeature

    spec = DataSpec(
        raw["target"],
        raw["positive"],
        tuple(NumericFeature(**f) for f in raw["numeric"]),
        tuple(CategoricalFeature(c["name"], tuple(c["levels"])) for c in raw["categorical"]),
    )
    train = pd.concat([pd.read_csv(credit_split / f"bank-{b}.csv") for b in "abcd"], ignore_index=True)
    return prepare(train, spec, "train"), prepare(pd.read_csv(credit_split / "test.csv"), spec, "test")


@pytest.mark.slow
@pytest.mark.parametrize(
    "ms", [ModelSpec("logreg", (), seed=1), ModelSpec("mlp", (32, 16), seed=1)], ids=["logreg", "mlp"]
)
def test_a_whole_fit_reaches_the_torch_loops_holdout_auc(credit_split, ms):
    train, test = credit_tables(credit_split)
    training = TrainingSpec(epochs=3, batch_size=32, lr=0.02)  # the demo's hyper-parameters
    start = models.initial(ms, train.X.shape[1])
    orders = [epoch_order(3, e, len(train.X)) for e in range(training.epochs)]
    ref, _ = torch_loop(ms, start, train.X, train.y, training, orders=orders)
    got, _ = fit(ms, training, start, train.X, train.y, seed=3)
    auc_ref = score(test.y, models.predict(ms, ref, test.X))["auc"]
    auc_got = score(test.y, models.predict(ms, got, test.X))["auc"]
    assert auc_ref > 0.75
    assert abs(auc_got - auc_ref) < 0.002, (auc_got, auc_ref)
    assert max_diff(got, ref) < 1e-4  # ~1,000 Adam steps apart only by float32 rounding (3e-6 measured)


def test_fit_is_fit_stream_over_one_shuffled_chunk_per_epoch():
    X, y = random_data(n=100_000, d=5, positives=0.05)
    ms, training = FAMILIES[0], TrainingSpec(epochs=2, batch_size=64, lr=0.01, pos_weight=19.0)
    start = models.initial(ms, 5)
    whole = fit(ms, training, start, X, y, seed=11)  # gathers 32,768 rows at a time

    def one_chunk(epoch):
        order = epoch_order(11, epoch, len(X))
        yield X[order], y[order]

    streamed = fit_stream(ms, training, start, one_chunk, len(X), seed=11)
    assert streamed[1] == whole[1]
    assert all(np.array_equal(streamed[0][k], whole[0][k]) for k in whole[0])
    other = fit(ms, training, start, X, y, seed=12)
    assert max_diff(other[0], whole[0]) > 0


def test_pos_weight_raises_the_rare_class_scores():
    X, y = random_data(n=4000, d=4, positives=0.05)
    ms = FAMILIES[0]
    start = models.initial(ms, 4)
    mean_p = {}
    for pw in (1.0, 19.0):
        weights, _ = fit(ms, TrainingSpec(epochs=3, batch_size=64, lr=0.05, pos_weight=pw), start, X, y, seed=1)
        mean_p[pw] = float(probabilities(ms, weights, X).mean())
    assert mean_p[1.0] < 0.1 < 0.3 < mean_p[19.0]  # unweighted: about the base rate; weighted: about balanced


@pytest.mark.parametrize("ms", FAMILIES, ids=lambda m: m.kind)
def test_numpy_probabilities_equal_torch_predict(ms):
    X, _ = random_data(n=300, d=7)
    weights = {k: v + 0.3 for k, v in models.initial(ms, 7).items()}
    assert np.allclose(probabilities(ms, weights, X, rows=128), models.predict(ms, weights, X), atol=1e-6)


def test_bad_chunks_and_start_weights_are_one_clear_error():
    ms, training = FAMILIES[0], TrainingSpec(batch_size=8)
    start = models.initial(ms, 7)
    X, y = random_data()
    with pytest.raises(FedcliError, match=r"does not fit the model: expected \[rows, 7\]"):
        fit_stream(ms, training, start, lambda e: [(X[:, :6], y)], len(X), seed=0)
    with pytest.raises(FedcliError, match="one label per row"):
        fit_stream(ms, training, start, lambda e: [(X, y[:-1])], len(X), seed=0)
    with pytest.raises(FedcliError, match="do not fit the spec's mlp model on 7 features"):
        fit(FAMILIES[1], training, start, X, y, seed=0)
    with pytest.raises(FedcliError, match="no 2-d '0.weight'"):
        fit(ms, training, {}, X, y, seed=0)


def test_plain_training_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from fedcli.bank.training import fit\n"
        "from fedcli.protocol.spec import ModelSpec, TrainingSpec\n"
        "ms = ModelSpec('mlp', (4,), 0)\n"
        "start = {'0.weight': np.zeros((4, 3), np.float32), '0.bias': np.zeros(4, np.float32),\n"
        "         '2.weight': np.ones((1, 4), np.float32), '2.bias': np.zeros(1, np.float32)}\n"
        "w, loss = fit(ms, TrainingSpec(), start, np.ones((10, 3), np.float32), np.ones(10, np.float32), 1)\n"
        "assert np.isfinite(loss) and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dp_sgd_uses_pos_weight():
    """Opacus trains on BCEWithLogitsLoss(pos_weight): the losses it reports are the weighted ones.

    (The scores barely move with pos_weight under DP-SGD: per-example clipping caps a weighted
    row's gradient like any other. docs/fraud.md says so.)
    """
    X, y = random_data(n=2000, d=4, positives=0.05)
    mean_loss = {}
    for pw in (1.0, 19.0):
        model = models.load_arrays(models.build(FAMILIES[0], 4), models.initial(FAMILIES[0], 4))
        losses = []
        train_dp_sgd(
            model,
            torch.from_numpy(X),
            torch.from_numpy(y),
            epochs=2,
            batch_size=100,
            lr=0.1,
            max_grad_norm=1.0,
            noise_multiplier=0.3,
            pos_weight=pw,
            on_step=lambda done, total, loss, seen=losses: seen.append(loss),
        )
        mean_loss[pw] = float(np.mean(losses))
    # unweighted: at most ln 2 (about 0.2 once fitted); weighted 19x: at least about 0.95 ln 2 + 0.05 * 19 ln 2
    assert mean_loss[1.0] < 0.7 and mean_loss[19.0] > 1.0, mean_loss


def test_pos_weight_in_the_spec(tmp_path, credit_split):
    text = TEMPLATE.replace("lr = 0.02\n", "lr = 0.02\npos_weight = 12.5\n", 1)
    assert text != TEMPLATE
    fed = make_fed(tmp_path / "ok", credit_split, text)
    shown = fed.cli("spec", "show", fed.loc).output
    assert re.search(r"training\.pos_weight\s*│\s*12\.5\s*│\s*spec", shown), shown
    fed.train("bank-a")
    for bad, message in [("0", "greater than 0"), ("1e7", "less than or equal to 1000000")]:
        (tmp_path / bad).mkdir()
        template = tmp_path / bad / "federation.toml"
        template.write_text(TEMPLATE.replace("lr = 0.02\n", f"lr = 0.02\npos_weight = {bad}\n", 1))
        res = fed.cli(
            "init",
            tmp_path / bad / "store",
            "--spec",
            template,
            "--key",
            fed.key("coordinator"),
            "--member",
            fed.pub("bank-a"),
            code=1,
        )
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "'training.pos_weight'" in lines[0] and message in lines[0], res.output


def test_an_absurd_model_overflows_the_loss_as_torch_does_and_quietly(recwarn):
    """float32 loss, like torch: weights of 3e36 give an infinite loss (the bank step refuses it), no numpy warning."""
    X, y = random_data(n=64, d=26)
    X = np.abs(X) + 1.0
    ms = FAMILIES[0]
    start = {k: np.full_like(v, 3e36) for k, v in models.initial(ms, 26).items()}
    training = TrainingSpec(epochs=1, batch_size=32, lr=0.02)
    _, loss = fit(ms, training, start, X, y, seed=0)
    model = models.load_arrays(models.build(ms, 26), start)
    torch_loss = nn.BCEWithLogitsLoss()(model(torch.from_numpy(X[:32])).squeeze(1), torch.from_numpy(y[:32]))
    assert not np.isfinite(loss) and not torch.isfinite(torch_loss)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
