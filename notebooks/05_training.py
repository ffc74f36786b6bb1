# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Training
#
# Chapter 4 assembled the whole transformer, with a checked backward pass, but its weights are
# random, so its answers are guesses. This chapter teaches it. The project this book grew out
# of (a first NumPy transformer written from a task list; *the original project*) trained a
# model of the same size for 6.2 minutes and reached 93.5% or 99.2% test accuracy, depending
# on the seed, on a test set that mostly repeated its training inputs (chapter 1). Here the
# same size of model reaches **100% on every one of the 5,000 possible inputs** after training on
# 4,004 of them, in seconds.
#
# **In this chapter:** the cross-entropy loss and its gradient, computed so that it stays
# finite; SGD with momentum and Adam, each tested against a step worked out by hand; gradient
# clipping and a warm-up-cosine learning rate; the training loop, and why the same seed gives
# slightly different weights on another machine; the original project's training checklist
# as asserts; and the reference model, trained, proven right on all 5,000 inputs, and saved.
# Cells marked `export` become `transformer_lib.training`.

# %% tags=["export"]
import json
import math
import os
import platform
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import transformer_lib
from transformer_lib.data import (Batch, Example, all_examples, create_batch,
                                  split_dataset)
from transformer_lib.layers import Parameter
from transformer_lib.transformer import Transformer

# %%
import matplotlib.pyplot as plt

from transformer_lib.data import (all_examples, create_batch, generate_dataset,
                                  generate_example)
from transformer_lib.data import show_error  # chapter 1: assert an error and print it
from transformer_lib.layers import numerical_gradient, relative_error

# %% [markdown]
# ## The loss: cross-entropy
#
# For each puzzle the model outputs a row of $V = 20$ numbers $z_1, \dots, z_V$, the *logits*,
# one per token of the vocabulary. Softmax turns them into probabilities,
# $p_j = e^{z_j} / \sum_k e^{z_k}$, and training should make $p_y$ large, where $y$ is the id of
# the correct answer. The cross-entropy loss of one example is
#
# $$\ell = -\log p_y ,$$
#
# and the loss of a batch of $B$ examples is the mean of theirs. It is 0 when the model puts all
# its probability on the right answer and grows without bound as $p_y \to 0$; a model that
# knows nothing and spreads its bets evenly over the 20 tokens pays $\log 20 \approx 3.0$.
# (Minimising it is maximum likelihood: $\sum_b \log p_{y_b}$ is the log-probability the model
# gives to the training answers.)
#
# ### Computing it without overflow: log-sum-exp
#
# Written as above, the loss breaks on confident models. In float32, $e^{z}$ overflows to `inf`
# for $z > 88.7$, and when $p_y$ underflows to 0, $\log p_y = -\infty$. Take the logarithm
# first and subtract the row's largest logit $m = \max_k z_k$ (softmax does not change when the
# same number is subtracted from every logit):
#
# $$\log p_y = z_y - \log \sum_k e^{z_k} = (z_y - m) - \log \sum_k e^{z_k - m} .$$
#
# Now every exponent is $\le 0$, so nothing overflows; the sum contains the term $e^0 = 1$, so
# it lies between 1 and $V$ and its logarithm is finite. $\log p_y$ is a difference of finite
# numbers, finite even when $p_y$ itself is too small to represent.
#
# ### The gradient
#
# Writing the loss of one example as $\ell = -z_y + \log \sum_k e^{z_k}$ makes its derivative
# short. The first term gives $-1$ for $j = y$ and 0 otherwise; the second gives
# $e^{z_j} / \sum_k e^{z_k} = p_j$. So
#
# $$\frac{\partial \ell}{\partial z_j} = p_j - [j = y], \qquad
# \frac{\partial L}{\partial Z} = \frac{\operatorname{softmax}(Z) - \operatorname{one\_hot}(y)}{B}$$
#
# for the batch mean $L$: the gradient pushes down every wrong logit in proportion to the
# probability it got, and pushes up the right one by $1 - p_y$, the probability it is missing.
# Every entry lies in $[-1/B, 1/B]$, however extreme the logits. `forward` keeps the
# log-probabilities, which is all `backward` needs.

# %% tags=["export"]
def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax along the last axis, (..., V) -> (..., V), as
    ``(z - m) - log sum exp(z - m)`` with m the row maximum: finite for any finite z."""
    shifted = z - z.max(axis=-1, keepdims=True)               # (..., V), row max is 0
    log_sum = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))   # (..., 1), <= log V
    return shifted - log_sum


class CrossEntropyLoss:
    """Mean cross-entropy of a batch: mean over b of
    -log softmax(logits[b])[targets[b]].

    ``forward(logits, targets)`` takes logits (B, V) and integer targets (B,) and
    returns the loss as a float; ``backward()`` returns dL/dlogits, shape (B, V).
    """

    def __init__(self):
        self._cache = None

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> float:
        logits, targets = np.asarray(logits), np.asarray(targets)
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError("expected logits of shape (B, V) "
                             "and targets of shape (B,), "
                             f"got {logits.shape} and {targets.shape}")
        if len(targets) == 0:
            raise ValueError("the batch is empty: the mean loss of no examples "
                             "is undefined")
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError("targets must be integer class ids, "
                             f"got dtype {targets.dtype}")
        B, V = logits.shape
        outside = (targets < 0) | (targets >= V)
        if outside.any():
            i = int(np.argmax(outside))
            raise ValueError(f"target {targets[i]} of example {i} is outside "
                             f"the {V} classes 0..{V - 1}")
        log_probs = log_softmax(logits)                        # (B, V)
        self._cache = (log_probs, targets)
        return float(-log_probs[np.arange(B), targets].mean())

    __call__ = forward

    def backward(self) -> np.ndarray:
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward called before forward")
        log_probs, targets = self._cache
        grad = np.exp(log_probs)                                   # (B, V) softmax p
        grad[np.arange(len(targets)), targets] -= 1.0              # p - one_hot(y)
        return grad / len(targets)                                 # (B, V)


# %% [markdown]
# First the easy facts: equal logits cost $\log 20$, and on ordinary logits the stable formula
# agrees with the textbook one.

# %%
loss_fn = CrossEntropyLoss()
rng = np.random.default_rng(0)
targets = rng.integers(0, 20, size=4)                                   # (B,) = (4,)

uniform = loss_fn(np.zeros((4, 20)), targets)
print(f"equal logits: loss {uniform:.4f} = log 20 = {np.log(20):.4f}")
assert abs(uniform - np.log(20)) < 1e-12


def naive_cross_entropy(logits, targets):
    """The textbook formula: softmax, then -log of the target's probability."""
    p = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return float(-np.log(p[np.arange(len(targets)), targets]).mean())


logits = rng.normal(0, 3, size=(4, 20))                                 # (B, V)
print(f"ordinary logits: stable {loss_fn(logits, targets):.6f}, "
      f"textbook {naive_cross_entropy(logits, targets):.6f}")
assert abs(loss_fn(logits, targets) - naive_cross_entropy(logits, targets)) < 1e-12

# %% [markdown]
# Now logits of $\pm 10^4$, as a badly diverging model might produce. The first row is right and
# certain; the second is certain and wrong, so the probability of its target is $e^{-20000}$,
# which is exactly 0 in floating point. The stable loss is finite: $(0 + 20000)/2 = 10^4$. The
# textbook formula returns `nan`: $e^{10^4}$ overflows, and `inf / inf` is not a number.
# Then the gradient, against central differences on random float64 logits; each of its rows
# also sums to zero, since probabilities and a one-hot vector both sum to 1.

# %%
extreme = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]])               # (B, V) = (2, 3)
extreme_targets = np.array([0, 1])
stable = loss_fn(extreme, extreme_targets)
grad = loss_fn.backward()
p_target = np.exp(extreme[1, 1] - extreme[1].max())
with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    naive = naive_cross_entropy(extreme, extreme_targets)
print(f"probability of the second target: {p_target}")
print(f"stable loss {stable}, textbook loss {naive}")
print("gradient:", grad.round(3).tolist())
assert p_target == 0.0 and stable == 1e4 and np.isnan(naive)
assert np.isfinite(grad).all() and np.abs(grad).max() <= 1 / 2

logits = np.random.default_rng(1).normal(0, 2, size=(5, 20))     # (B, V), float64
targets = np.random.default_rng(2).integers(0, 20, size=5)              # (B,)
loss_fn(logits, targets)
analytic = loss_fn.backward()                                            # (B, V)
numeric = numerical_gradient(lambda: loss_fn(logits, targets), logits)
error = relative_error(analytic, numeric)
print("cross-entropy gradient: relative error < 1e-08; rows sum to 0 within 1e-15")
assert error < 1e-8
assert np.abs(analytic.sum(axis=1)).max() < 1e-15

# %% [markdown]
# Bad input is refused with a message that says what was wrong (the calls are hidden in the
# book; the messages are shown):

# %% tags=["hide-input"]
show_error(lambda: loss_fn(np.zeros((4, 20)), np.zeros(3, dtype=int)),
           ValueError, "expected logits of shape (B, V) and targets of shape (B,)")
show_error(lambda: loss_fn(np.zeros((2, 20)), np.array([3, 20])),
           ValueError, "target 20 of example 1 is outside the 20 classes 0..19")
show_error(lambda: loss_fn(np.zeros((2, 20)), np.array([3.0, 1.0])),
           ValueError, "targets must be integer class ids, got dtype float64")

# %% [markdown]
# ## Optimisers
#
# Backpropagation leaves a gradient in every parameter's `.grad`. An *optimiser* turns
# gradients into updates. The reference model (chapter 4's size: `d_model` 64, 4 heads, 2 layers,
# `d_ff` 256) has 33 parameter arrays holding 102,420 numbers:

# %%
model = Transformer(d_model=64, num_heads=4, num_layers=2, d_ff=256, seed=0)
sizes = [p.data.size for p in model.parameters()]
print(f"{len(sizes)} parameter arrays, {sum(sizes):,} numbers, "
      f"from {min(sizes)} to {max(sizes):,} per array")
assert (len(sizes), sum(sizes)) == (33, 102_420)

# %% [markdown]
# ### One flat buffer for all parameters
#
# Adam's update is about ten array operations: on 33 arrays, some 330 NumPy calls per step,
# mostly on arrays so small that the fixed cost of a call dominates. So the optimiser moves all
# parameters into **one flat array** (and all gradients into another) and makes every
# parameter's `.data` and `.grad` a *view* into it, sharing its memory. Layers read and write
# their own `W.data` and `W.grad` as before; the optimiser updates all 102,420 numbers with a
# handful of large operations (the appendix [Engineering notes](A1_engineering.ipynb), "One
# flat buffer for all parameters", checks the views and measures the saving). Every optimiser
# starts from the base class `Optimizer`, which flattens the parameters, keeps the learning
# rate `lr`, and clears all gradients with one `fill(0)`.

# %% tags=["export"]
def flatten_parameters(params: Sequence[Parameter]) -> tuple[np.ndarray, np.ndarray]:
    """Move all parameters' data and grads into one flat buffer each; they become views.

    Parameters
    ----------
    params : sequence of Parameter, all of the same dtype

    Returns
    -------
    data, grad : 1-D arrays of length sum(p.data.size)
        Each parameter's ``p.data`` and ``p.grad`` are now reshaped slices of these, so
        writing to the flat arrays changes the parameters and vice versa.
    """
    params = list(params)
    if not params:
        raise ValueError("no parameters to flatten (did you pass model.parameters()?)")
    dtypes = {p.data.dtype for p in params}
    if len(dtypes) > 1:
        raise ValueError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; "
                         "cast the model with model.to(dtype) first")
    dtype = params[0].data.dtype
    total = sum(p.data.size for p in params)
    data, grad = np.empty(total, dtype), np.empty(total, dtype)
    offset = 0
    for p in params:
        n, shape = p.data.size, p.data.shape
        data[offset:offset + n] = p.data.ravel()
        grad[offset:offset + n] = p.grad.ravel()
        p.data = data[offset:offset + n].reshape(shape)       # a view: no copy
        p.grad = grad[offset:offset + n].reshape(shape)
        offset += n
    return data, grad


# %% tags=["export"]
class Optimizer:
    """Base class: owns flat buffers of all parameters (``data``) and grads (``grad``).
    """

    def __init__(self, params: Sequence[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("the optimiser got no parameters "
                             "(did you pass model.parameters()?)")
        if not lr > 0:
            raise ValueError(f"the learning rate must be positive, got {lr}")
        self.data, self.grad = flatten_parameters(self.params)   # (N,), (N,)
        self.lr = lr

    def zero_grad(self) -> None:
        self.grad.fill(0)

    def step(self) -> None:
        raise NotImplementedError


# %% [markdown]
# ### SGD with momentum
#
# Plain gradient descent takes a step of size $\eta$ (the learning rate) downhill:
# $\theta \leftarrow \theta - \eta g$. Mini-batch gradients are noisy, though, and on a loss
# surface shaped like a long valley they point mostly across it. *Momentum* keeps a running
# sum of past gradients, the velocity $v$, and steps along it:
#
# $$v \leftarrow \mu v + g, \qquad \theta \leftarrow \theta - \eta v .$$
#
# Directions that gradients agree on build up speed (up to $1/(1-\mu)$ times, 10 times for
# $\mu = 0.9$), while the components that flip sign from step to step cancel out.

# %% tags=["export"]
class SGD(Optimizer):
    """Stochastic gradient descent with momentum: v = momentum v + grad; p -= lr v."""

    def __init__(self, params: Sequence[Parameter], lr: float = 0.1,
                 momentum: float = 0.0):
        super().__init__(params, lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.velocity = np.zeros_like(self.data)                 # (N,)

    def step(self) -> None:
        lr = float(self.lr)
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += self.grad
            self.data -= lr * self.velocity
        else:
            self.data -= lr * self.grad


# %% [markdown]
# Two steps worked out by hand, with $\eta = 0.1$, $\mu = 0.9$ and $\theta_0 = (1, -2)$:
#
# | step | gradient $g$ | velocity $v = 0.9\,v + g$ | parameters $\theta - 0.1\,v$ |
# |---|---|---|---|
# | 1 | $(0.5, 0.25)$ | $(0.5, 0.25)$ | $(0.95, -2.025)$ |
# | 2 | $(-1, 1)$ | $(0.45 - 1,\ 0.225 + 1) = (-0.55, 1.225)$ | $(1.005, -2.1475)$ |
#
# In step 2 the first gradient component reversed, and momentum damped the reversal: the
# parameter moved back by only $0.055$ rather than $0.1$.

# %%
theta = Parameter(np.array([1.0, -2.0]))
sgd = SGD([theta], lr=0.1, momentum=0.9)
for g, expected in [((0.5, 0.25), (0.95, -2.025)), ((-1.0, 1.0), (1.005, -2.1475))]:
    sgd.zero_grad()
    theta.grad += g
    sgd.step()
    print(f"gradient {g} -> parameters {theta.data.round(6).tolist()}")
    assert np.allclose(theta.data, expected, rtol=0, atol=1e-12)

# %% [markdown]
# ### Adam
#
# SGD uses one learning rate for all parameters, yet their gradients differ by orders of
# magnitude (compare an embedding row that appears in every puzzle with one for a token that
# appears once per batch). Adam (Kingma & Ba, 2015) gives every parameter its own step size.
# It keeps two running averages per parameter, of the gradient and of its square:
#
# $$m \leftarrow \beta_1 m + (1 - \beta_1) g, \qquad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 ,$$
#
# and steps by their ratio:
#
# $$\hat m = \frac{m}{1 - \beta_1^t}, \qquad \hat v = \frac{v}{1 - \beta_2^t}, \qquad
# \theta \leftarrow \theta - \eta \, \frac{\hat m}{\sqrt{\hat v} + \epsilon} .$$
#
# Because $m$ and $v$ start at zero, after $t$ steps they are too small by a factor
# $1 - \beta^t$; dividing by it is the *bias correction*. After the first step $\hat m = g$ and
# $\hat v = g^2$, so every parameter moves by $\eta\, g / (|g| + \epsilon) \approx \eta$ in the
# direction of $-g$, whatever the size of its gradient. That makes $\eta$ a step size in
# parameter units, and it is why Adam needs little tuning.
#
# *Weight decay* pulls parameters towards zero. Adding $\lambda \theta$ to the gradient would
# let Adam's division rescale it, so AdamW (Loshchilov & Hutter, 2019) *decouples* it: it
# shrinks the parameters directly, $\theta \leftarrow (1 - \eta\lambda)\,\theta$, before the
# Adam step. (The reference model trains without it; the README's recipe table tried it.)
#
# The code does this arithmetic in place (`out=`, augmented assignment), and every scalar in
# it is a Python `float`, never a NumPy `float64`, which under NumPy 2 would turn each float32
# operation into slower float64 arithmetic (the appendix, "Python floats, not NumPy scalars").

# %% tags=["export"]
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction; optional decoupled weight decay
    (AdamW, Loshchilov & Hutter 2019)."""

    def __init__(self, params: Sequence[Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0 or weight_decay < 0:
            raise ValueError("eps must be positive and weight_decay >= 0, "
                             f"got {eps} and {weight_decay}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.m = np.zeros_like(self.data)          # (N,) running mean of the gradient
        self.v = np.zeros_like(self.data)          # (N,) running mean of its square
        self._tmp = np.empty_like(self.data)       # (N,) scratch space
        self.t = 0                                 # number of steps taken

    def step(self) -> None:
        b1, b2 = self.betas
        lr = float(self.lr)           # every scalar a Python float: see the note above
        self.t += 1
        g, m, v, tmp = self.grad, self.m, self.v, self._tmp
        m *= b1                                     # m = b1 m + (1-b1) g
        np.multiply(g, 1 - b1, out=tmp)
        m += tmp
        v *= b2                                     # v = b2 v + (1-b2) g^2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        v += tmp
        if self.weight_decay:
            self.data *= 1 - lr * self.weight_decay                   # decoupled decay
        # p -= lr m_hat / (sqrt(v_hat) + eps),
        # m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
        np.sqrt(v, out=tmp)
        tmp *= 1 / math.sqrt(1 - b2 ** self.t)      # sqrt(v_hat)
        tmp += self.eps
        np.divide(m, tmp, out=tmp)
        tmp *= lr / (1 - b1 ** self.t)              # lr m_hat / (sqrt(v_hat) + eps)
        self.data -= tmp


# %% [markdown]
# The test recomputes two Adam steps, weight decay on, with plain Python floats straight from
# the formulas. Then the property that makes Adam easy to use: its first step moves each
# parameter by almost exactly $\eta$ against the sign of its gradient, be it $10^{-4}$ or 3.

# %%
def adam_by_hand(theta, grads, lr, b1, b2, eps, wd):
    """Adam on a list of floats, one formula at a time."""
    m, v = [0.0] * len(theta), [0.0] * len(theta)
    for t, g in enumerate(grads, start=1):
        for i in range(len(theta)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            theta[i] = theta[i] * (1 - lr * wd) - lr * m_hat / (math.sqrt(v_hat) + eps)
    return theta


grads = [(0.5, -3.0, 1e-4), (-1.0, 2.0, 2e-4)]
theta = Parameter(np.array([1.0, -2.0, 0.5]))
adam = Adam([theta], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
for g in grads:
    adam.zero_grad()
    theta.grad += g
    adam.step()
expected = adam_by_hand([1.0, -2.0, 0.5], grads, 0.01, 0.9, 0.999, 1e-8, 0.1)
print("Adam:   ", theta.data.tolist())
print("by hand:", expected)
assert np.allclose(theta.data, expected, rtol=0, atol=1e-15)

theta = Parameter(np.array([0.0, 0.0, 0.0]))
adam = Adam([theta], lr=0.01)
theta.grad += (0.5, -3.0, 1e-4)
adam.step()
print("first step:", theta.data.tolist())
assert np.allclose(theta.data, [-0.01, 0.01, -0.01], rtol=1e-3)

show_error(lambda: Adam([], lr=0.01), ValueError, "the optimiser got no parameters")
show_error(lambda: Adam([theta], lr=0.01, betas=(0.9, 1.0)), ValueError,
           "betas must be two numbers in [0, 1), got (0.9, 1.0)")

# %% [markdown]
# ## Gradient clipping
#
# Now and then a mini-batch produces an unusually large gradient, most often early in
# training, and one huge step can undo a lot of learning. *Global-norm clipping* caps the
# length of the whole gradient vector, all 102,420 numbers taken together:
#
# $$\|g\| = \sqrt{\textstyle\sum_i g_i^2}, \qquad g \leftarrow g \cdot \frac{c}{\|g\|}
# \quad \text{if } \|g\| > c .$$
#
# Unlike clipping each number separately, this keeps the gradient's *direction* and only
# shortens it. With the flat gradient buffer the norm is a single dot product.

# %% tags=["export"]
def clip_grad_norm(grad: np.ndarray, max_norm: float) -> float:
    """Scale the flat gradient (N,) in place so its L2 norm is at most max_norm.

    Returns the norm before clipping (worth logging: how often and how hard it acts).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = float(np.sqrt(grad @ grad))
    if norm > max_norm:
        grad *= max_norm / (norm + 1e-12)
    return norm


# %%
g = np.array([3.0, 4.0])                           # length 5
norm = clip_grad_norm(g, 1.0)
print(f"norm before {norm}, after {np.linalg.norm(g):.6f}, "
      f"gradient now {g.round(6).tolist()}")
assert norm == 5.0 and np.allclose(g, [0.6, 0.8])  # same direction, length 1

small = np.array([0.3, -0.4])
assert clip_grad_norm(small, 1.0) == 0.5                   # short enough: untouched
assert small.tolist() == [0.3, -0.4]

# %% [markdown]
# ## The learning-rate schedule
#
# A constant learning rate is a compromise: large steps are fast but rattle around the bottom
# of the loss, small ones settle but take long. The reference run changes it with the step
# number $s$:
#
# - **warm-up**: rise linearly from $\eta_{\max}/w$ to $\eta_{\max}$ over the first $w = 50$
#   steps. At the start the gradients are large and change quickly, and Adam's running averages
#   have seen only a few of them, yet Adam moves every parameter by about $\eta$ per step;
#   starting small avoids wrecking the random network. Post-norm transformers like ours are
#   known to need it (Xiong et al., 2020, *On Layer Normalization in the Transformer
#   Architecture*).
# - **cosine decay**: then fall along half a cosine from $\eta_{\max}$ towards 0, which it
#   would reach at step $S$, the number of steps,
#
# $$\eta(s) = \frac{\eta_{\max}}{2}\left(1 + \cos\left(\pi\, \frac{s - w}{S - w}\right)\right),$$
#
#   so training ends with small steps that settle into a minimum. The steps are numbered
#   $0, \dots, S - 1$, so the last one taken still has a small positive rate ($5.4 \times
#   10^{-9}$ in the reference run, below).

# %% tags=["export"]
def warmup_cosine(step: int, total_steps: int, warmup: int, peak_lr: float) -> float:
    """Learning rate at `step` (0-based): linear warm-up to peak_lr over `warmup` steps,
    then cosine decay to 0 at `total_steps`."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return float(peak_lr * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


# %% [markdown]
# The schedule of the reference run: 8 epochs of 126 mini-batches each (the training split has
# 4,004 inputs, in batches of 32), peak $\eta_{\max} = 2 \times 10^{-3}$; the plot (its code
# folded) follows the asserts.

# %%
total_steps, warmup, peak = 8 * 126, 50, 2e-3
lrs = np.array([warmup_cosine(s, total_steps, warmup, peak)
                for s in range(total_steps)])
print(f"step 0: {lrs[0]:.1e}   step {warmup - 1}: {lrs[warmup - 1]:.1e}   "
      f"last step: {lrs[-1]:.1e}")
assert lrs[0] == peak / warmup and lrs[warmup - 1] == lrs[warmup] == peak == lrs.max()
assert (np.diff(lrs[:warmup]) > 0).all() and (np.diff(lrs[warmup:]) < 0).all()
midpoint = warmup + (total_steps - warmup) // 2
assert abs(lrs[midpoint] - peak / 2) < 1e-3 * peak
assert 5.3e-9 < lrs[-1] < 5.5e-9                   # the last step, S - 1: not quite 0

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(lrs * 1e3, color="tab:blue")
ax.axvline(warmup, color="gray", linestyle=":", label=f"end of warm-up (step {warmup})")
for epoch in range(1, 8):
    ax.axvline(epoch * 126, color="lightgray", linewidth=0.5)
ax.set(xlabel="step (thin lines: epochs)", ylabel="learning rate (×10⁻³)",
       title="Warm-up and cosine decay of the learning rate")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The training loop
#
# ### Evaluation
#
# `evaluate` computes the mean loss and the accuracy (the fraction of puzzles whose largest
# logit is the right answer) on a list of examples or a `Batch`, in chunks of 2,048, in eval
# mode (no layer caches activations for a backward pass), then restores the mode it found.

# %% tags=["export"]
def _as_batch(data) -> Batch:
    return data if isinstance(data, Batch) else create_batch(list(data))


def evaluate(model: Transformer, data: Batch | Sequence[Example],
             batch_size: int = 2048) -> dict:
    """Mean loss and accuracy of the model on data (a Batch or a list of Examples).

    Runs in eval mode (no layer caches activations for a backward pass) and restores the
    model's previous mode. Returns ``{"loss": float, "accuracy": float}``.
    """
    data = _as_batch(data)
    loss_fn, total_loss, correct = CrossEntropyLoss(), 0.0, 0
    with model.evaluating():
        for i in range(0, len(data.ids), batch_size):
            chunk = slice(i, i + batch_size)
            logits = model(data.ids[chunk], data.mask[chunk])      # (b, V)
            t = data.targets[chunk]                                # (b,)
            total_loss += loss_fn(logits, t) * len(t)
            correct += int((logits.argmax(axis=-1) == t).sum())
    n = len(data.ids)
    return {"loss": total_loss / n, "accuracy": correct / n}


# %% [markdown]
# An untrained model is about as good as a guess, and evaluating it leaves no cache behind:

# %%
def cached_activations(model):
    """Names of the backward caches (attributes starting with '_') holding something."""
    return [f"{type(m).__name__}.{name}" for m in model.modules()
            for name, value in vars(m).items()
            if name.startswith("_") and value is not None]


untrained = Transformer(d_model=64, num_heads=4, num_layers=2, d_ff=256, seed=0)
result = evaluate(untrained, all_examples())
print(f"untrained model on all 5,000 inputs: loss {result['loss']:.3f}, "
      f"accuracy {result['accuracy']:.1%}")
assert result["accuracy"] < 0.2 and result["loss"] > 2.0
assert untrained.training and cached_activations(untrained) == []

# %% [markdown]
# ### One epoch
#
# An *epoch* is one pass over the training data. `train_one_epoch` shuffles it with the random
# generator it is given, cuts it into mini-batches, sets the learning rate from the schedule,
# and hands each mini-batch to `train_step`, which makes the moves every training loop makes:
#
# 1. clear the gradients;
# 2. forward: logits $(B, V)$ and the loss;
# 3. backward: the loss gradient $(B, V)$ back through the model, into every `.grad`;
# 4. clip the gradient's global norm;
# 5. let the optimiser update the parameters.
#
# `train_step` is the book's only training step: every training run goes through it, and
# `benchmarks/benchmark.py` times it. An optional `on_step(step, loss, grad_norm)` is called
# after every update.

# %% tags=["export"]
StepCallback = Callable[[int, float, float], None]      # on_step(step, loss, grad_norm)


def train_step(model: Transformer, loss_fn: CrossEntropyLoss, optimizer: Optimizer,
               ids: np.ndarray, mask: np.ndarray, targets: np.ndarray,
               clip: float | None = 1.0) -> tuple[float, float]:
    """One update on one mini-batch (ids, mask and targets of B examples); returns the
    loss and the gradient norm before clipping (clip: the max global norm, None: no
    clipping)."""
    optimizer.zero_grad()
    logits = model(ids, mask)                                           # (B, V)
    loss = loss_fn(logits, targets)
    model.backward(loss_fn.backward())                     # fills every .grad
    if clip:
        grad_norm = clip_grad_norm(optimizer.grad, clip)
    else:
        grad_norm = float(np.sqrt(optimizer.grad @ optimizer.grad))
    optimizer.step()
    return loss, grad_norm


def train_one_epoch(model: Transformer, loss_fn: CrossEntropyLoss, optimizer: Optimizer,
                    data: Batch, batch_size: int, rng: np.random.Generator,
                    lr_at: Callable[[int], float] | None = None, step: int = 0,
                    clip: float | None = 1.0,
                    on_step: StepCallback | None = None) -> list[float]:
    """One pass over data in mini-batches shuffled by rng; returns every step's loss.

    lr_at(step) sets the learning rate before each step (counted from `step`); clip is
    the max global gradient norm (None: no clipping); on_step(step, loss, grad_norm) is
    called after each update, with the gradient norm before clipping.
    """
    losses = []
    order = rng.permutation(len(data.ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]                           # (B,)
        if lr_at is not None:
            optimizer.lr = lr_at(step)
        loss, grad_norm = train_step(model, loss_fn, optimizer, data.ids[idx],
                                     data.mask[idx], data.targets[idx], clip)
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss, grad_norm)
        step += 1
    return losses


# %% [markdown]
# `train_steps` runs such epochs for a recipe (an optimiser, Adam unless given, the
# warm-up-cosine schedule, clipping) on any model and loss: the book's one training loop, used
# by `fit` below, chapter 7's experiments and chapter 8's decoder.

# %% tags=["export"]
def train_steps(model, loss_fn: CrossEntropyLoss, data: Batch, *, epochs: int,
                batch_size: int, lr: float, warmup: int, clip: float | None = 1.0,
                seed: int = 0, optimizer: Optimizer | None = None,
                on_step: StepCallback | None = None, on_epoch=None) -> list[float]:
    """``epochs`` of ``train_one_epoch`` with ``optimizer`` (default: Adam) and
    ``warmup_cosine`` (peak ``lr``); batches shuffled by
    ``np.random.default_rng(seed)``. Returns every step's loss. ``on_step`` is passed
    on to ``train_one_epoch``; ``on_epoch(epoch, losses)`` is called after each epoch
    with all losses so far, and stops the training when it returns True."""
    if optimizer is None:
        optimizer = Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-len(data.ids) // batch_size)        # ceiling division
    total = epochs * steps_per_epoch

    def schedule(step):
        return warmup_cosine(step, total, warmup, lr)

    model.train()
    losses = []
    for epoch in range(epochs):
        losses += train_one_epoch(model, loss_fn, optimizer, data, batch_size, rng,
                                  schedule, epoch * steps_per_epoch, clip, on_step)
        if on_epoch is not None and on_epoch(epoch + 1, losses):
            break
    return losses


# %% [markdown]
# ### `fit`: epochs, history, and the best model
#
# `fit` creates the optimiser (Adam by default), runs `train_steps`, and evaluates on the
# validation set after each epoch. It records a `History` (loss, learning rate and gradient
# norm of every step; training loss, validation loss and accuracy of every epoch) and keeps
# the parameters of the best epoch (highest validation accuracy, then lowest validation loss),
# restoring them at the end: cheap, since they live in one flat buffer (`opt.data.copy()`).
#
# The progress lines contain **no times**, and training is deterministic: the same seed prints
# the same lines *on the same machine*. On another machine the last digits differ. A matrix
# product adds its terms in an order its library (OpenBLAS, here) chooses for the processor,
# and floating-point addition is not associative, so two processors can round the same
# product differently in the last bit ([Engineering notes](A1_engineering.ipynb), "Why the
# same seed trains differently on another machine", shows it on a sum). Training feeds each
# step into the next and amplifies such differences until the printed losses differ; for the
# book's recipe and seed the final answers stay the same. So the tests do not compare training
# progress (nor times, kept in `History.seconds`), and the book asserts what holds everywhere.

# %% tags=["export"]
@dataclass
class History:
    """What fit recorded: per step, per epoch, the best epoch and the training time."""

    step_loss: list = field(default_factory=list)       # training loss of every step
    step_lr: list = field(default_factory=list)         # learning rate of every step
    step_grad_norm: list = field(default_factory=list)  # gradient norm, before clipping
    epoch: list = field(default_factory=list)           # 1, 2, ...
    # mean training loss of each epoch
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    # the epoch whose parameters were kept
    best_epoch: int = 0
    seconds: float = 0.0                                # wall-clock time of fit


OPTIMIZERS = ("adam", "sgd")


def fit(model: Transformer, train: Batch | Sequence[Example],
        val: Batch | Sequence[Example], *, epochs: int = 10, batch_size: int = 32,
        lr: float = 2e-3, warmup: int = 50, clip: float | None = 1.0,
        weight_decay: float = 0.0, seed: int = 0, optimizer: str = "adam",
        progress: bool = True, stop_at_accuracy: float | None = None,
        on_step: StepCallback | None = None) -> History:
    """Train on `train`, select on `val`; restore the best epoch's parameters at the
    end.

    train, val: lists of Examples or Batches. The learning rate warms up over `warmup`
    steps to `lr`, then decays along a cosine to 0 over `epochs` epochs. optimizer:
    "adam" (with `weight_decay`, decoupled) or "sgd" (momentum 0.9). progress prints one
    line per epoch (no times, so it is reproducible). stop_at_accuracy stops after the
    first epoch whose validation accuracy reaches it. on_step(step, loss, grad_norm) is
    called after every update.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1, "
                         f"got {epochs} and {batch_size}")
    train, val = _as_batch(train), _as_batch(val)
    if optimizer == "adam":
        opt = Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = SGD(model.parameters(), lr=lr, momentum=0.9)
    hist, best, best_key = History(), None, None

    def record(step, loss, grad_norm):                     # after every update
        hist.step_lr.append(opt.lr)
        hist.step_grad_norm.append(grad_norm)
        if on_step is not None:
            on_step(step, loss, grad_norm)

    def end_of_epoch(epoch, losses):                       # validate, keep the best
        nonlocal best, best_key
        ev = evaluate(model, val)
        hist.train_loss.append(float(np.mean(losses[len(hist.step_loss):])))
        hist.step_loss = list(losses)
        hist.epoch.append(epoch)
        hist.val_loss.append(ev["loss"])
        hist.val_accuracy.append(ev["accuracy"])
        key = (ev["accuracy"], -ev["loss"])
        if best_key is None or key > best_key:
            best_key, best, hist.best_epoch = key, opt.data.copy(), epoch
        if progress:
            print(f"epoch {epoch:2d}/{epochs}  train loss {hist.train_loss[-1]:<9.3g} "
                  f"val loss {ev['loss']:<9.3g} val accuracy {ev['accuracy']:.2%}",
                  flush=True)
        return stop_at_accuracy is not None and ev["accuracy"] >= stop_at_accuracy

    t0 = time.perf_counter()
    train_steps(model, CrossEntropyLoss(), train, epochs=epochs, batch_size=batch_size,
                lr=lr, warmup=warmup, clip=clip, seed=seed, optimizer=opt,
                on_step=record, on_epoch=end_of_epoch)
    opt.data[...] = best                                   # the best epoch's parameters
    hist.seconds = time.perf_counter() - t0
    if progress:
        print(f"kept epoch {hist.best_epoch} (validation accuracy "
              f"{hist.val_accuracy[hist.best_epoch - 1]:.2%})", flush=True)
    return hist


# %% [markdown]
# ## The whole model's gradient, through the loss
#
# Chapters 2 to 4 checked every layer and the whole model's backward pass. Training adds one
# link, the loss, so the check runs once more, end to end, on exactly what the optimiser sees:
# $\partial L / \partial \theta$ for every parameter of a small float64 model (`d_model` 8,
# 2 heads, 2 layers, `d_ff` 16), on three real puzzles of different lengths, so padding and
# masking are part of it.

# %%
small = Transformer(d_model=8, num_heads=2, num_layers=2, d_ff=16, seed=0)
small.to(np.float64)
rng = np.random.default_rng(5)
examples = [generate_example(rng, num_args=k) for k in (3, 2, 4)]   # lengths 7, 6, 8
check_batch = create_batch(examples)
print("batch:", [ex.text for ex in examples],
      "lengths", check_batch.mask.sum(axis=1).tolist())
assert sorted(check_batch.mask.sum(axis=1)) == [6, 7, 8]

loss_fn = CrossEntropyLoss()


def loss_of_small_model():
    return loss_fn(small(check_batch.ids, check_batch.mask), check_batch.targets)


small.train().zero_grad()
loss_of_small_model()
small.backward(loss_fn.backward())                  # the analytic dL/dθ, in every .grad
errors = {name: relative_error(p.grad, numerical_gradient(loss_of_small_model, p.data))
          for name, p in small.named_parameters()}
n_numbers = sum(p.data.size for p in small.parameters())
print(f"{len(errors)} parameter arrays, {n_numbers:,} numbers: "
      "every relative error < 1e-07")
assert max(errors.values()) < 1e-7

# %% [markdown]
# ## Before the long run: can it learn ten puzzles by heart?
#
# The original project's checklist asks four things of a training run: the loss decreases, the
# model can overfit 10 examples, the validation accuracy improves, and training does not
# diverge. The second is the classic first test of any training code: a model with 100,000
# parameters that cannot memorise ten answers has a bug (a sign error, a missing gradient, a
# learning rate of zero), and it takes well under a second to find out.

# %%
ten = generate_dataset(10, seed=1)
tiny_model = Transformer(d_model=64, num_heads=4, num_layers=2, d_ff=256, seed=0)
tiny_history = fit(tiny_model, ten, ten, epochs=20, batch_size=10, warmup=5,
                   progress=False)
first_perfect = tiny_history.val_accuracy.index(1.0) + 1
print("10 examples: 100% by epoch 10 of 20; final loss < 0.01, from above 3")
assert first_perfect <= 10 and evaluate(tiny_model, ten)["accuracy"] == 1.0
assert tiny_history.train_loss[-1] < 0.01 and tiny_history.train_loss[0] > 3

# %%
# NBVAL_IGNORE_OUTPUT
print(f"20 epochs on 10 examples took {tiny_history.seconds:.2f} s here")

# %% [markdown]
# ## Training the reference model
#
# Now the real thing: the reference model (`d_model` 64, 4 heads, 2 layers, `d_ff` 256, the
# answer read at `[EOS]`), trained with seed 0 for 8 epochs with Adam, batch 32, peak learning
# rate $2 \times 10^{-3}$, 50 warm-up steps, cosine decay and clipping at norm 1.
#
# The data is chapter 1's stratified split of all 5,000 inputs: 80/10/10 by *input*, within
# each (operation, answer) pair, so that even `Max` = 1 has six training examples. The model
# trains on the training split only; the validation split chooses which epoch to keep; the
# test split waits until the end. Neither shares a single input with training.
#
# The recipe was chosen by a benchmark (`benchmarks/recipes.py`, table in the README) that
# trains 20 seeds on this machine and on one imitated one and counts the runs right on all
# 5,000 inputs: 39 of the 40, the other missing one input (the book's first recipe, a random
# split of 10,000 random puzzles and peak rate $3 \times 10^{-3}$, managed 8 of 20 on each
# machine, not the same 8). That selects on all 5,000 inputs, the test split included:
# acceptable only because "right on every input" is the claim itself; on a real task, choose
# on the validation split.

# %% tags=["export"]
_PACKAGE = Path(transformer_lib.__file__).resolve().parent
_USER_CACHE = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
               / "transformer_lib")
ARTIFACTS = Path(os.environ.get(                          # where trained models go:
    "TRANSFORMER_LIB_ARTIFACTS",                          # as set, else
    _PACKAGE.parent / "artifacts" if (_PACKAGE.parent / "pyproject.toml").exists()
    else _USER_CACHE))                                    # the repository's or a cache
REFERENCE_PATH = ARTIFACTS / "reference_model.npz"        # the run of this chapter
SHIPPED_PATH = _PACKAGE / "reference_model.npz"           # the book's copy (in git)
REFERENCE_CONFIG = dict(vocab_size=20, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                        readout="eos")
REFERENCE_EPOCHS = 8


def default_splits(seed: int = 0) -> tuple[list[Example], list[Example], list[Example]]:
    """The book's data: all 5,000 inputs, split 80/10/10 within each (operation, answer)
    pair (chapter 1's stratified split): 4,004 / 502 / 494 inputs."""
    return split_dataset(all_examples(), seed=seed, stratify=True)


def train_reference_model(seed: int = 0, epochs: int = REFERENCE_EPOCHS,
                          progress: bool = True) -> tuple[Transformer, "History"]:
    """Train the reference model on the training split only; return (model, history)."""
    train, val, _ = default_splits()
    model = Transformer(**REFERENCE_CONFIG, seed=seed)
    history = fit(model, train, val, epochs=epochs, seed=seed, progress=progress)
    return model, history


# %%
train, val, test = default_splits()
print(f"train {len(train):,}   validation {len(val):,}   test {len(test):,}"
      "   (distinct inputs)")
seen = {ex.text for ex in train}
assert not seen & {ex.text for ex in val} and not seen & {ex.text for ex in test}
assert len(train) == 4004 and -(-len(train) // 32) == 126   # steps/epoch, as above

# %% [markdown]
# The progress lines of `fit` and the time it took depend on the machine (see "`fit`" above),
# so the tests compare neither; the cells after them assert what every machine gets.

# %%
# NBVAL_IGNORE_OUTPUT
model, history = train_reference_model(seed=0)

# %%
# NBVAL_IGNORE_OUTPUT
per_step = 1000 * history.seconds / len(history.step_loss)
print(f"training took {history.seconds:.1f} s here ({len(history.step_loss)} steps, "
      f"{per_step:.1f} ms each including evaluation);")
print(f"    the original project trained for 6.2 minutes ({6.2 * 60:.0f} s)")

# %% [markdown]
# ### The checklist, asserted
#
# The four items of the checklist on this run, and a check that `fit` followed the schedule
# step by step:

# %%
step_loss = np.array(history.step_loss)
first, last = step_loss[:50].mean(), step_loss[-50:].mean()
print(f"loss decreases: mean of the first 50 steps {first:.2f}, of the last 50 "
      f"< {first / 1000:.1e}")
print("    (a thousandth); the last epoch's mean is the lowest")
assert 1.855 <= first < 1.865 and last < first / 1000       # as printed
assert history.train_loss[-1] == min(history.train_loss) < history.train_loss[0] / 1000

print("overfits 10 examples: 100% by epoch 10 (above)")
assert tiny_history.val_accuracy[-1] == 1.0

print("validation accuracy improves: below 70% after epoch 1, above 95% after epoch 2,")
print("    100% in epochs 5 to 8")
assert history.val_accuracy[0] < 0.7 and history.val_accuracy[1] > 0.95
assert history.val_accuracy[4:] == [1.0] * 4

print(f"no divergence: all {len(step_loss)} losses finite, every gradient norm < 20")
assert np.isfinite(step_loss).all() and np.isfinite(history.step_grad_norm).all()
assert np.isfinite(history.val_loss).all() and max(history.step_grad_norm) < 20

assert history.step_lr == [warmup_cosine(s, 1008, 50, 2e-3) for s in range(1008)]

# %% [markdown]
# ### 100% on inputs it never saw
#
# The claim that matters: the held-out test split, then all 5,000 possible puzzles. The second
# number includes the 4,004 training inputs, so the 996 inputs that training never saw
# (validation and test) are also reported on their own.

# %%
test_result = evaluate(model, test)
all_result = evaluate(model, all_examples())
unseen_result = evaluate(model, val + test)
for name, n, result in [("test split", len(test), test_result),
                        ("never trained on", len(val + test), unseen_result),
                        ("all possible inputs", 5000, all_result)]:
    print(f"{name:20} {n:5,} inputs   accuracy {result['accuracy']:.2%}")
assert len(train) + len(val + test) == 5000
assert test_result["accuracy"] == unseen_result["accuracy"] == 1.0
assert all_result["accuracy"] == 1.0

# %% [markdown]
# ### The curves
#
# The loss of every step (thin line), the mean of each epoch and the validation loss, the
# validation accuracy, and the gradient norm before clipping (the plotting code is folded).
# The grey crosses are the same run on the machine that executed this book, read from the
# copy of its model that ships with the package (more on that file below): on that machine
# they sit exactly on your run; on another one they differ a little from epoch 2 on.

# %% tags=["hide-input"]
steps = np.arange(1, len(history.step_loss) + 1)
epoch_end = np.array(history.epoch) * 126
with np.load(SHIPPED_PATH, allow_pickle=False) as f:   # the book's run of this recipe:
    book = json.loads(str(f["metadata"]))["history"]    # its History, JSON in the file

fig, axes = plt.subplot_mosaic([["loss", "loss"], ["accuracy", "grad"]], figsize=(9, 7))
ax = axes["loss"]
ax.semilogy(steps, history.step_loss, color="tab:blue", alpha=0.3, linewidth=0.7,
            label="training loss, per step")
ax.semilogy(epoch_end, history.train_loss, "o-", color="tab:blue",
            label="training loss, epoch mean")
ax.semilogy(epoch_end, history.val_loss, "s-", color="tab:orange",
            label="validation loss")
ax.semilogy(epoch_end, book["train_loss"], "x", color="gray", markersize=9,
            label="the book's run, epoch means")
ax.set(xlabel="step", ylabel="cross-entropy (log scale)", title="Loss")
ax.legend()

ax = axes["accuracy"]
ax.plot(history.epoch, 100 * np.array(history.val_accuracy), "s-", color="tab:orange")
ax.plot(book["epoch"], 100 * np.array(book["val_accuracy"]), "x", color="gray",
        markersize=9)
ax.axhline(100, color="gray", linestyle=":")
ax.set(xlabel="epoch", ylabel="validation accuracy (%)", ylim=(50, 102),
       title="Validation accuracy")

ax = axes["grad"]
ax.semilogy(steps, history.step_grad_norm, color="tab:green", linewidth=0.7)
ax.axhline(1.0, color="gray", linestyle=":", label="clipping threshold")
ax.set(xlabel="step", ylabel="gradient norm (log scale)",
       title="Gradient norm before clipping")
ax.legend()
fig.suptitle("Training the reference model (seed 0)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The loss falls by more than three orders of magnitude; the validation accuracy passes 95% in
# the second epoch and is 100% from the fifth on (the fourth on some machines, among them the
# book's). The gradient norm tells the same story from the inside. It is above the clipping
# threshold at every step of the first epoch, most of the second and about a third of the
# third, while the model works out what the puzzles mean; then its median falls by three
# orders of magnitude, and clipping acts only on a few spikes. What clipping prevents is such
# a spike flooding Adam's running averages; the early clipped steps cost little, since Adam
# divides by the gradient's running scale anyway. The bounds below hold, with some margin, in
# every environment the portability check runs (nine on the book's machine):

# %%
grad_norms = np.array(history.step_grad_norm).reshape(8, 126)         # (epoch, step)
per_epoch = (grad_norms > 1.0).sum(axis=1)                            # steps clipped
print("steps clipped: all 126 in epoch 1, more than 75% in epoch 2, 15-50% in epoch 3,")
print("    1 to 19 in epoch 4, fewer than 20 in epochs 5 and 6, none in epochs 7 and 8")
assert per_epoch[0] == 126 and per_epoch[1] > 0.75 * 126
assert 0.15 < per_epoch[2] / 126 < 0.5 and 1 <= per_epoch[3] < 20
assert per_epoch[4:6].max() < 20 and not per_epoch[6:].any()   # a few spikes, then none
median_first, median_last = np.median(grad_norms[0]), np.median(grad_norms[-1])
print(f"median gradient norm: {median_first:.1f} in the first epoch, "
      "more than 1,000 times smaller in the last")
assert 1000 < median_first / median_last < 2000          # three orders of magnitude
assert 3.65 <= median_first < 3.75                       # as printed
# book: the shipped run's History, read by the plotting cell
assert book["val_accuracy"][3:] == [1.0] * 5 and book["best_epoch"] == 8

# %% [markdown]
# ## Checkpoints: saving and loading a model
#
# Chapter 6 studies this model, and others want to use it, so it goes into a file.
# `save_model` writes an `.npz`, a zip archive of NumPy arrays: one per parameter, named
# `param/` and its dotted name (`param/blocks.0.attention.W_q.W`), plus two text arrays,
# `config` and `metadata`, as JSON.
#
# - **No pickles.** `load_model` opens the file with `allow_pickle=False`. A pickle can run
#   arbitrary code when it is loaded; arrays of numbers and JSON text cannot.
# - **Atomic.** The file is written under a temporary name in the same directory and then
#   renamed over the target, so a reader sees the old file or the new one, never half a file.
# - **Clear errors.** A missing file, a file that is not a model, or a model whose arrays do not
#   fit its config each raise an error that names the path and the problem.
#
# Why the rename makes the write atomic, a write that fails halfway, and every way loading can
# fail are in the appendix [Engineering notes](A1_engineering.ipynb) ("Checkpoints").

# %% tags=["export"]
def _to_json(value):
    """json.dumps fallback for NumPy scalars and arrays in metadata."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} "
                    "is not JSON-serialisable")


def save_model(model: Transformer, path: str | Path, **metadata) -> Path:
    """Write the model's config, metadata and every parameter to an .npz file,
    atomically.

    Writes a temporary file in the same directory, then renames it to `path`.
    metadata must be JSON-serialisable (NumPy numbers and arrays are converted).
    Returns the path.
    """
    path = Path(path)
    arrays = {f"param/{name}": p.data for name, p in model.named_parameters()}
    arrays["config"] = np.array(json.dumps(model.config))
    arrays["metadata"] = np.array(json.dumps(metadata, default=_to_json))  # fails early
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)          # mkstemp makes files readable by the owner only
        os.replace(tmp, path)         # atomic: readers see the old file or the new one
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_model(path: str | Path, model_class: type = Transformer) -> Transformer:
    """Rebuild a model from a file written by save_model (allow_pickle=False).

    ``model_class(**config)`` rebuilds it: chapter 4's Transformer by default
    (chapter 8 passes its Decoder).

    The model is returned in training mode, with its metadata in ``model.metadata``.
    Raises FileNotFoundError if there is no file, ValueError if it is not a model file
    or its arrays do not match its config.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a model file: it is not an .npz (zip) archive "
                         "(truncated or corrupt?)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        config = json.loads(str(arrays.pop("config")))
        metadata = json.loads(str(arrays.pop("metadata")))
        model = model_class(**config)
    except KeyError as e:
        raise ValueError(f"{path} is not a model file written by save_model: "
                         f"no {e} array") from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a model file written by save_model: "
                         f"{e}") from None
    expected = dict(model.named_parameters())
    stored = {k.removeprefix("param/"): v for k, v in arrays.items()}
    if set(stored) != set(expected):
        missing = sorted(set(expected) - set(stored))
        extra = sorted(set(stored) - set(expected))
        raise ValueError(f"{path}: the parameters do not match the config "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, p in expected.items():
        if stored[name].shape != p.data.shape:
            raise ValueError(f"{path}: {name} has shape {stored[name].shape}, "
                             f"but the config needs {p.data.shape}")
    dtype = stored[next(iter(expected))].dtype
    if dtype != next(iter(expected.values())).data.dtype:
        model.to(dtype)                                        # e.g. a float64 model
        expected = dict(model.named_parameters())
    for name, p in expected.items():
        p.data[...] = stored[name]
    model.metadata = metadata
    return model


# %% [markdown]
# The trained model goes to `REFERENCE_PATH`, `artifacts/reference_model.npz` in the
# repository (ignored by git; an installed package uses `~/.cache/transformer_lib`, and
# `TRANSFORMER_LIB_ARTIFACTS` overrides both), with the seed, the epochs and the training
# history as metadata.

# %%
saved_to = save_model(model, REFERENCE_PATH, seed=0, epochs=REFERENCE_EPOCHS,
                      history=asdict(history))
print(f"saved {saved_to.name} in ARTIFACTS ({saved_to.stat().st_size / 1e6:.2f} MB)")

loaded = load_model(REFERENCE_PATH)
ALL = create_batch(all_examples())
model.eval()
loaded.eval()
# same logits
assert np.array_equal(model(ALL.ids, ALL.mask), loaded(ALL.ids, ALL.mask))
assert loaded.config == model.config
assert loaded.metadata["history"] == asdict(history) and loaded.metadata["seed"] == 0
with np.load(saved_to) as f:                        # the names inside the file
    assert set(f.files) == ({f"param/{name}" for name, _ in model.named_parameters()}
                            | {"config", "metadata"})
    assert "param/blocks.0.attention.W_q.W" in f.files
# no temp file left
assert [p for p in os.listdir(ARTIFACTS) if p.endswith(".tmp")] == []
print("reloaded: identical logits on all 5,000 inputs; history and seed kept")

# %% [markdown]
# A damaged file is refused, not half-loaded: here a copy cut short, as an interrupted download
# leaves it (`show_error` prints the temporary directory as `<tmp>`).

# %%
scratch = tempfile.mkdtemp()
good = save_model(Transformer(d_model=16, num_heads=2, num_layers=1, d_ff=32),
                  Path(scratch, "small.npz"))
Path(scratch, "cut.npz").write_bytes(good.read_bytes()[:3000])   # an interrupted copy
show_error(lambda: load_model(Path(scratch, "cut.npz")), ValueError,
           "<tmp>/cut.npz is not a model file", hide=scratch)

# %% [markdown]
# ### The book's copy of the model, and how chapter 6 gets it
#
# Chapter 6 opens the trained model up: which head reads which argument, what the embeddings
# learned. Those findings are about one set of weights, and your run matches the book's bit
# for bit only on a machine that computes exactly like the one that executed the book. So the
# book ships its run, `transformer_lib/reference_model.npz` (`SHIPPED_PATH`), written with
#
#     OPENBLAS_NUM_THREADS=1 python -m transformer_lib train --out transformer_lib/reference_model.npz
#
# which records where it trained (`trained_on`: processor, NumPy version, BLAS kernel and
# threads, SIMD level). `load_or_train_reference()` loads that file for chapter 6, for the
# command line's `predict` and for you. If the file is missing or was trained with another
# config, seed or number of epochs, it trains and saves the model (to `ARTIFACTS` instead of
# the book's copy). A file that is not a model file is not retrained over: `load_model`'s
# `ValueError` stops it (checked at the end of the second cell below).

# %% tags=["export"]
def load_or_train_reference(path: str | Path = SHIPPED_PATH, seed: int = 0,
                            progress: bool = False) -> Transformer:
    """Load the reference model: by default the book's copy that ships with the package.

    Trains it (and saves it to `path`, or to ARTIFACTS instead of the book's copy) when
    the file is missing or was trained with another config, seed or number of epochs.
    ``model.metadata`` holds the seed, the epochs and the History (a dict of lists, as
    ``dataclasses.asdict`` makes it). A file that exists but is not a readable model
    raises ValueError (from ``load_model``) rather than being overwritten.
    """
    path = Path(path)
    if path.exists():
        model = load_model(path)
        same_config = all(model.config.get(k) == v for k, v in REFERENCE_CONFIG.items())
        meta = model.metadata
        same_run = meta.get("seed") == seed and meta.get("epochs") == REFERENCE_EPOCHS
        if same_config and same_run:
            return model
    model, history = train_reference_model(seed=seed, progress=progress)
    metadata = {"seed": seed, "epochs": REFERENCE_EPOCHS, "history": asdict(history)}
    if path.resolve() == SHIPPED_PATH.resolve():      # never overwrite the book's copy
        path = REFERENCE_PATH if seed == 0 else ARTIFACTS / f"model_seed{seed}.npz"
    save_model(model, path, **metadata)
    model.metadata = metadata
    return model


def machine() -> str:
    """What decides the last bits of training here: processor type, NumPy, its BLAS
    kernel and threads (via threadpoolctl, if installed), NumPy's SIMD level."""
    blas, simd = "BLAS unknown", ["unknown"]
    try:
        import threadpoolctl
        info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
        if info:
            kernel = info[0].get("architecture") or ""
            blas = (f"{info[0]['internal_api']} {kernel}".strip()
                    + f", {info[0]['num_threads']} thread(s)")
    except ImportError:
        pass
    try:                                      # NumPy 2's record of its SIMD paths
        from numpy._core._multiarray_umath import __cpu_features__ as features
        simd = [name for name, found in features.items() if found]
    except ImportError:
        pass
    return (f"{platform.machine()}, NumPy {np.__version__}, {blas}, "
            f"SIMD {' '.join(simd)}")


# %% [markdown]
# The book's model is right on every input, and so is yours. On the book's kind of machine
# (the same `machine()` string) your run must even be the same bits, and the cell checks that:
# it is how the tests notice a shipped file that no longer matches the recipe. Elsewhere the
# weights differ in their last digits, as described above, and are not compared.

# %%
reference = load_or_train_reference()
reference.eval()
print(f"the shipped model: seed {reference.metadata['seed']}, "
      f"{reference.metadata['epochs']} epochs, "
      f"{sum(p.data.size for p in reference.parameters()):,} parameters")
assert reference.config == model.config and Path(SHIPPED_PATH).stat().st_size < 1e6
assert evaluate(reference, all_examples())["accuracy"] == 1.0
print("the shipped model and your run: both right on all 5,000 puzzles")
if reference.metadata.get("trained_on") == machine():   # the book's kind of machine:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert np.array_equal(p.data, q.data), (
            f"{name} differs from the shipped model: after changing the recipe, "
            "rewrite it with: python -m transformer_lib train "
            "--out transformer_lib/reference_model.npz")
show_error(lambda: load_or_train_reference(Path(scratch, "cut.npz")), ValueError,
           "<tmp>/cut.npz is not a model file", hide=scratch)

# %% [markdown]
# ## Summary
#
# - **Cross-entropy**, computed as $(z_y - m) - \log\sum_k e^{z_k - m}$, is finite for any
#   logits; its gradient is $(\operatorname{softmax} - \operatorname{one\_hot})/B$.
# - **Optimisers** update one flat buffer of all parameters. SGD with momentum follows a
#   running sum of gradients; Adam moves each parameter by about the learning rate.
# - **Stabilisers**: global-norm clipping shortens rare huge gradients without turning them;
#   warm-up protects the random start, cosine decay lets the end settle.
# - **The loop**: shuffle, forward, loss, backward, clip, step; validate each epoch, keep the
#   best.
# - **Proof**: the gradient through the loss matches central differences; the model memorises
#   10 puzzles, and trained on 4,004 inputs it answers all 5,000 correctly, in seconds. Other
#   seeds mostly do too, not all (the README's seed table; chapter 7).
# - **Machines differ in the last bits**, and training amplifies it; the tests compare what
#   every machine computes, not the progress lines.
# - **Checkpoints** are pickle-free `.npz` files, written atomically; the book's run ships
#   with the package for chapter 6.
#
# From the command line, `python -m transformer_lib train` does what this chapter did, and
# `python -m transformer_lib predict "Max(5, 3, 9)"` asks the saved model.

# %% [markdown]
# ## Exercises
#
# **1. Label smoothing.** Instead of a one-hot target, train towards
# $q = (1 - \alpha)\,\operatorname{one\_hot}(y) + \alpha / V$, with loss $-\sum_j q_j \log p_j$.
# Show that the gradient is $(p - q)/B$, implement it, gradient-check it, and check that
# $\alpha = 0$ gives `CrossEntropyLoss`.

# %% tags=["hide-cell"]
class LabelSmoothingLoss:
    """-sum_j q_j log p_j with q = (1 - alpha) one_hot + alpha / V, mean over the batch.

    d/dz_j of -sum_k q_k (z_k - logsumexp(z)) = -q_j + p_j sum_k q_k = p_j - q_j,
    because q sums to 1.
    """

    def __init__(self, alpha):
        self.alpha = alpha

    def __call__(self, logits, targets):
        B, V = logits.shape
        log_probs = log_softmax(logits)                               # (B, V)
        q = np.full((B, V), self.alpha / V)
        q[np.arange(B), targets] += 1 - self.alpha
        self._cache = (log_probs, q)
        return float(-(q * log_probs).sum(axis=-1).mean())

    def backward(self):
        log_probs, q = self._cache
        return (np.exp(log_probs) - q) / len(q)


logits = np.random.default_rng(3).normal(0, 2, size=(4, 20))
targets = np.array([2, 5, 11, 19])
smooth = LabelSmoothingLoss(alpha=0.1)
smooth(logits, targets)
numeric = numerical_gradient(lambda: smooth(logits, targets), logits)
error = relative_error(smooth.backward(), numeric)
print("label smoothing gradient: relative error < 1e-08")
assert error < 1e-8
plain = CrossEntropyLoss()(logits, targets)
assert abs(LabelSmoothingLoss(alpha=0.0)(logits, targets) - plain) < 1e-12

# %% [markdown]
# **2. Why Adam needs little tuning.** Multiply a gradient by 1,000. How does the first update
# of SGD (no momentum) change, and how does the first update of Adam change?

# %% tags=["hide-cell"]
def first_update(make_optimizer, gradient):
    theta = Parameter(np.zeros(3))
    opt = make_optimizer([theta])
    theta.grad += gradient
    opt.step()
    return -theta.data


g = np.array([0.5, -3.0, 1e-4])
sgd_1, sgd_1000 = (first_update(lambda p: SGD(p, lr=0.01), s * g) for s in (1, 1000))
adam_1, adam_1000 = (first_update(lambda p: Adam(p, lr=0.01), s * g) for s in (1, 1000))
print("SGD: ", sgd_1.tolist(), "->", sgd_1000.tolist())
print("Adam:", adam_1.round(6).tolist(), "->", adam_1000.round(6).tolist())
assert np.allclose(sgd_1000, 1000 * sgd_1)          # SGD: a step 1,000 times larger
assert np.allclose(adam_1000, adam_1, rtol=1e-3)    # Adam: the same step, about lr each
# SGD needs its learning rate retuned whenever the gradient scale changes;
# Adam does not.

# %% [markdown]
# **3. Gradient accumulation.** A batch too large for memory can be processed as micro-batches:
# run forward and backward on each, let the gradients add up in `.grad`, and step once. Show
# that two micro-batches of 16 give the gradient of one batch of 32, once the loss is
# weighted right. (Hint: `CrossEntropyLoss` takes the mean over its batch.)

# %% tags=["hide-cell"]
acc_model = Transformer(d_model=16, num_heads=2, num_layers=2, d_ff=32, seed=3)
acc_model.to(np.float64)
rng = np.random.default_rng(7)
puzzles = [generate_example(rng, num_args=int(k)) for k in rng.integers(2, 6, size=32)]
acc_loss = CrossEntropyLoss()


def gradients_of(parts, weighted=True):
    """Sum of the gradients of each part's mean loss, weighted by the part's share."""
    acc_model.zero_grad()
    for part in parts:
        b = create_batch(part)
        acc_loss(acc_model(b.ids, b.mask), b.targets)
        share = len(part) / 32 if weighted else 1.0     # len(part)/32 of the batch mean
        acc_model.backward(acc_loss.backward() * share)
    return [p.grad.copy() for p in acc_model.parameters()]


whole = gradients_of([puzzles])
halves = gradients_of([puzzles[:16], puzzles[16:]])
worst = max(relative_error(a, b) for a, b in zip(whole, halves))
print(f"batch of 32 vs two micro-batches of 16: every relative error < 1e-12 "
      f"({len(whole)} arrays)")
assert worst < 1e-12
unweighted = gradients_of([puzzles[:16], puzzles[16:]], weighted=False)
assert max(relative_error(a, b) for a, b in zip(whole, unweighted)) > 0.1
# Forgetting the weights doubles the gradient. Each micro-batch pads to its own longest
# sequence, not the whole batch's; the masks make that irrelevant.

