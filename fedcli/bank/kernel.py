"""The bank's minibatch training kernel: forward, backward and Adam written out in numpy.

Why: a tabular model's batch is microseconds of arithmetic, and torch spends far longer
dispatching autograd and the optimiser than computing (a textbook DataLoader loop trains about
100k rows/s). Here a batch is about 16 (logreg) to 28 (MLP, two hidden layers) vectorised
numpy calls on buffers allocated once, with torch's semantics kept: the batch mean of
BCE-with-logits (pos_weight as in `torch.nn.BCEWithLogitsLoss`), Adam with bias correction and
torch's defaults (betas 0.9/0.999, eps 1e-8), FedProx's proximal gradient. tests/test_kernel.py checks steps against torch
autograd and `torch.optim.Adam`. No torch import: training a plain round never pays for it.

Layout: a layer's weight and bias are one (out, in + 1) matrix [W | b], and every layer's input
carries a trailing column of ones, so one matmul gives a layer's output forwards and both its
weight and bias gradients backwards. All parameters live in one flat float32 vector (the layers
are views into it), so Adam is nine calls whatever the depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from fedcli import models
from fedcli.errors import FedcliError
from fedcli.protocol.spec import ModelSpec, TrainingSpec

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
BLOCK = 256  # batches trained between two loss summaries (and progress calls)
# numpy converts a Python scalar operand on every call; a 0-d array costs half as much per call
_ZERO, _ONE = np.zeros((), np.float32), np.ones((), np.float32)

Arrays = dict[str, np.ndarray]


class Network:
    """The model's parameters as one flat float32 vector, with a [W | b] view per layer."""

    def __init__(self, model_spec: ModelSpec, start: Arrays):
        first = start.get("0.weight")
        if first is None or np.ndim(first) != 2:
            raise FedcliError("the start weights have no 2-d '0.weight' (first layer)", reason="malformed")
        self.n_features = int(np.shape(first)[1])
        expected = models.shapes(model_spec, self.n_features)
        if {k: tuple(np.shape(v)) for k, v in start.items()} != expected:
            raise FedcliError(
                f"the start weights do not fit the spec's {model_spec.kind} model on {self.n_features} features",
                reason="malformed",
            )
        names = list(expected)
        self.names = list(zip(names[0::2], names[1::2], strict=True))  # (weight, bias) per layer, in order
        dims = [expected[w] for w, _ in self.names]  # (out, in)
        self.theta = np.empty(sum(o * (i + 1) for o, i in dims), np.float32)
        self.grads = np.zeros((2, len(self.theta)), np.float32)  # row 0: the gradient; row 1: Adam's scratch
        self.layers: list[np.ndarray] = []
        self.layer_grads: list[np.ndarray] = []
        offset = 0
        for (w, b), (out, fan_in) in zip(self.names, dims, strict=True):
            end = offset + out * (fan_in + 1)
            layer = self.theta[offset:end].reshape(out, fan_in + 1)
            layer[:, :fan_in], layer[:, fan_in] = start[w], start[b]
            self.layers.append(layer)
            self.layer_grads.append(self.grads[0, offset:end].reshape(out, fan_in + 1))
            offset = end

    def arrays(self) -> Arrays:
        """The weights under torch's state_dict names and shapes, as fresh float32 arrays."""
        out: Arrays = {}
        for (w, b), layer in zip(self.names, self.layers, strict=True):
            out[w], out[b] = np.ascontiguousarray(layer[:, :-1]), layer[:, -1].copy()
        return out


class Adam:
    """torch.optim.Adam (no weight decay, no amsgrad) on the flat parameter vector, plus FedProx.

    Both moments live in one (2, P) array and the gradient in row 0 of another whose row 1
    takes its square, so the two moment updates are three calls together. prox_mu > 0 adds the
    gradient of (mu/2)||theta - start||^2 before the update, as autograd would for that term.
    """

    def __init__(self, theta: np.ndarray, grads: np.ndarray, lr: float, prox_mu: float = 0.0):
        self.theta, self.grads, self.lr = theta, grads, lr
        self.g, self.g_squared = grads[0], grads[1]
        self.moments, self.tmp = np.zeros_like(grads), np.empty_like(theta)
        self.m, self.v = self.moments[0], self.moments[1]
        self.betas = np.array([[BETA1], [BETA2]], np.float32)
        self.one_minus_betas = np.array([[1 - BETA1], [1 - BETA2]], np.float32)
        self.anchor = theta.copy() if prox_mu > 0 else None
        self.mu = np.array(prox_mu, np.float32)
        self.scale, self.shift = np.zeros((), np.float32), np.zeros((), np.float32)  # per step, below
        self.t = 0

    def step(self) -> None:
        theta, grads, moments, tmp = self.theta, self.grads, self.moments, self.tmp
        if self.anchor is not None:
            np.subtract(theta, self.anchor, out=tmp)
            tmp *= self.mu
            self.g += tmp
        np.multiply(self.g, self.g, out=self.g_squared)
        grads *= self.one_minus_betas  # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        moments *= self.betas
        moments += grads
        # theta -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), with both divisions folded into one denominator
        self.t += 1
        step_size = self.lr / (1 - BETA1**self.t)
        self.scale[()] = 1 / (math.sqrt(1 - BETA2**self.t) * step_size)
        self.shift[()] = EPS / step_size
        np.sqrt(self.v, out=tmp)
        tmp *= self.scale
        tmp += self.shift
        np.divide(self.m, tmp, out=tmp)
        theta -= tmp


def bce_rows(z: np.ndarray, y: np.ndarray, pos_weight: float) -> np.ndarray:
    """Per-row BCE-with-logits, torch's stable form (1-y) z + (1 + (pw-1) y) softplus(-z), in float32 as torch.

    float32 like torch's loss, so an absurd model overflows the loss to inf here exactly where a
    torch loop's would, and the bank step refuses it as it always did.
    """
    softplus_neg = np.log1p(np.exp(-np.abs(z))) + np.maximum(-z, _ZERO)
    return (_ONE - y) * z + (y * np.float32(pos_weight - 1.0) + _ONE) * softplus_neg


def batch_means(losses: np.ndarray, batch_size: int) -> np.ndarray:
    """The float32 mean loss of each batch of `losses` (the last batch may be shorter)."""
    starts = np.arange(0, len(losses), batch_size)
    sizes = np.diff(np.append(starts, len(losses))).astype(np.float32)
    return np.add.reduceat(losses, starts) / sizes


def logit_grad_weights(y: np.ndarray, batch_size: int, pos_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(c, w) per row with d(batch mean loss)/dz = c + w * sigmoid(z), the batch's own size as divisor.

    From d/dz [(1-y) z + lw softplus(-z)] = (1 - y - lw) + lw sigmoid(z), lw = 1 + (pw - 1) y.
    """
    w = y * np.float32(pos_weight - 1.0) + np.float32(1.0)
    c = np.float32(1.0) - y - w
    tail = len(y) % batch_size
    cut = len(y) - tail
    c[:cut] /= np.float32(batch_size)
    w[:cut] /= np.float32(batch_size)
    if tail:
        c[cut:] /= np.float32(tail)
        w[cut:] /= np.float32(tail)
    return c, w


class Kernel:
    """Minibatch Adam over chunks of rows, batches cut within each chunk in the given order."""

    def __init__(self, net: Network, training: TrainingSpec, prox_mu: float = 0.0):
        self.net, self.bs, self.pos_weight = net, training.batch_size, training.pos_weight
        self.adam = Adam(net.theta, net.grads, training.lr, prox_mu)
        b = self.bs
        widths = [layer.shape[0] for layer in net.layers[:-1]]  # hidden widths
        self.pre = [np.empty((b, h), np.float32) for h in widths]  # pre-activations
        self.acts = [np.ones((b, h + 1), np.float32) for h in widths]  # ReLU outputs + a ones column
        self.deltas = [np.empty((b, h), np.float32) for h in widths]  # d loss / d pre-activation
        self.masks = [np.empty((b, h), np.bool_) for h in widths]
        self.dz = np.empty(b, np.float32)
        self.xa = np.ones((0, net.n_features + 1), np.float32)  # the chunk + a ones column, grown on demand

    def train_chunk(self, X: np.ndarray, y: np.ndarray, all_losses: bool = True) -> Iterator[tuple[int, float, float]]:
        """Train on one chunk; every BLOCK batches yield (batches, sum of row losses, last batch's mean loss).

        The losses are those of the weights each batch was trained from, as a torch loop reports them.
        all_losses=False skips the sum (yields 0.0): an epoch whose mean loss nobody reads is cheaper.
        """
        X, y = self._check(X, y)
        m, bs = len(X), self.bs
        if len(self.xa) < m:
            self.xa = np.ones((m, self.net.n_features + 1), np.float32)
        xa = self.xa[:m]
        xa[:, :-1] = X
        c, w = logit_grad_weights(y, bs, self.pos_weight)
        z = np.empty(m, np.float32)
        run = self._logreg if len(self.net.layers) == 1 else self._mlp
        for s in range(0, m, BLOCK * bs):
            e = min(m, s + BLOCK * bs)
            # exp(-z) may overflow to inf (the sigmoid is then exactly 0); an absurd model makes inf or NaN
            # weights and losses, which the bank step refuses: no numpy warning on the way
            with np.errstate(over="ignore", invalid="ignore"):
                run(xa, c, w, z, s, e)
                summary = self._losses(z, y, s, e, all_losses)
            yield summary

    def _losses(self, z: np.ndarray, y: np.ndarray, s: int, e: int, all_losses: bool) -> tuple[int, float, float]:
        """(batches, sum of row losses or 0.0, last batch's mean loss) of rows s:e, per-batch means in float32."""
        bs = self.bs
        if not all_losses:
            last = s + (e - s - 1) // bs * bs
            return -(-(e - s) // bs), 0.0, float(batch_means(bce_rows(z[last:e], y[last:e], self.pos_weight), bs)[0])
        means = batch_means(bce_rows(z[s:e], y[s:e], self.pos_weight), bs)
        sizes = np.minimum(bs, e - np.arange(s, e, bs))
        return len(means), float(means.astype(np.float64) @ sizes), float(means[-1])

    def _check(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.net.n_features or y.shape != (len(X),):
            raise FedcliError(
                f"a training chunk of shape {X.shape} with labels {y.shape} does not fit the model: "
                f"expected [rows, {self.net.n_features}] and one label per row",
                reason="bad-input",
            )
        return X, y

    def _logreg(self, xa: np.ndarray, c: np.ndarray, w: np.ndarray, z: np.ndarray, s: int, e: int) -> None:
        weights, grad, dzbuf, step, bs = (
            self.net.layers[0][0],
            self.net.layer_grads[0][0],
            self.dz,
            self.adam.step,
            self.bs,
        )
        dot = np.dot
        for i in range(s, e, bs):
            j = i + bs
            xb, zb = xa[i:j], z[i:j]
            dz = dzbuf if len(zb) == bs else dzbuf[: len(zb)]
            dot(xb, weights, out=zb)
            logit_grad(zb, c[i:j], w[i:j], dz)
            dot(dz, xb, out=grad)  # weights and bias (the ones column) at once
            step()

    def _mlp(self, xa: np.ndarray, c: np.ndarray, w: np.ndarray, z: np.ndarray, s: int, e: int) -> None:
        layers, bs = self.net.layers, self.bs
        hidden = list(zip(layers[:-1], self.pre, self.acts, self.masks, strict=True))
        out_w, out_g, out_row = layers[-1][0], self.net.layer_grads[-1][0], layers[-1][:, :-1]
        for i in range(s, e, bs):
            j = i + bs
            a, zb = xa[i:j], z[i:j]
            r = len(zb)
            inputs = [a]
            for layer, pre, act, mask in hidden:
                p = pre if r == bs else pre[:r]
                np.dot(a, layer.T, out=p)
                np.greater(p, _ZERO, out=mask[:r])
                a = act[:r]
                np.fmax(p, _ZERO, out=a[:, :-1])  # ReLU (pre-activations are finite: fmax is the faster max)
                inputs.append(a)
            np.dot(a, out_w, out=zb)
            dz = self.dz[:r]
            logit_grad(zb, c[i:j], w[i:j], dz)
            np.dot(dz, a, out=out_g)
            delta = self.deltas[-1][:r]
            np.dot(dz[:, None], out_row, out=delta)  # d loss / d (last hidden output): an outer product
            self._backward(inputs, delta, r)
            self.adam.step()

    def _backward(self, inputs: list[np.ndarray], delta: np.ndarray, r: int) -> None:
        """From d loss / d (last hidden ReLU output) down to every hidden layer's [W | b] gradient."""
        layers, grads = self.net.layers, self.net.layer_grads
        for k in range(len(layers) - 2, -1, -1):
            delta *= self.masks[k][:r]  # through the ReLU
            np.dot(delta.T, inputs[k], out=grads[k])
            if k:
                below = self.deltas[k - 1][:r]
                np.dot(delta, layers[k][:, :-1], out=below)
                delta = below


def logit_grad(z: np.ndarray, c: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = c + w * sigmoid(z) = c + w / (1 + exp(-z)): d(batch mean loss)/d logit (see logit_grad_weights)."""
    np.negative(z, out=out)
    np.exp(out, out=out)
    np.add(out, _ONE, out=out)
    np.divide(w, out, out=out)
    np.add(out, c, out=out)


def probabilities(model_spec: ModelSpec, weights: Arrays, X: np.ndarray, rows: int = 65_536) -> np.ndarray:
    """P(positive) per row, the forward pass of `models.build` in numpy (float32, `rows` at a time)."""
    net = Network(model_spec, weights)
    out = np.empty(len(X), np.float32)
    # Overflow is not hidden: an inf logit gives a probability of 0 or 1, inf - inf gives NaN, which
    # metrics.score refuses (the bank then says its scores are not finite).
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, len(X), rows):
            a = np.asarray(X[s : s + rows], dtype=np.float32)
            for layer in net.layers[:-1]:
                a = np.maximum(a @ layer[:, :-1].T + layer[:, -1], 0.0)
            logit = (a @ net.layers[-1][0, :-1] + net.layers[-1][0, -1]).astype(np.float64)
            out[s : s + rows] = 1.0 / (1.0 + np.exp(-logit))
    return out
