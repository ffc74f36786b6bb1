# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Engineering notes
#
# The chapters follow one path: concept, derivation, code, proof. Some of their code is
# written the way it is for reasons that have nothing to do with transformers: speed on small
# arrays, floating-point precision, NumPy's type rules, files that must never be half-written.
# This appendix collects those reasons, each with its measurement and its asserts, so that the
# chapters can say in one sentence what a line of code does and point here for why.
#
# It is executed and tested like a chapter (`pytest --nbval` re-runs it and compares its
# outputs), and it imports everything it discusses from `transformer_lib`, so it checks the
# code the chapters export, not a copy. It follows the book's rules for outputs that depend on
# the machine: a timing is printed in a cell marked `# NBVAL_IGNORE_OUTPUT`, which the tests
# run but do not compare, and a number whose last digits are rounding noise is printed as the
# bound its assert checks.
#
# | section | code | chapter |
# |---|---|---|
# | One matrix product over all positions | `Linear` | 2 |
# | The embedding's gradient as a matrix product | `Embedding.backward` | 2 |
# | Why the gradient check needs float64 | `gradient_check` | 2 |
# | Fast reductions over short rows | `row_max`, `row_sum` | 2 |
# | The softmax Jacobian, materialised | `Softmax.backward` | 2 |
# | One flat buffer for all parameters | `flatten_parameters`, `Optimizer` | 5 |
# | Python floats, not NumPy scalars | `Adam.step`, attention's `1/sqrt(d_k)` | 5, 3 |
# | Why the same seed trains differently on another machine | `fit` | 5 |
# | Checkpoints: atomic writes, damaged files | `save_model`, `load_model` | 5 |

# %%
import timeit
from collections.abc import Callable

import matplotlib.pyplot as plt
import numpy as np

from transformer_lib.data import show_error
from transformer_lib.layers import (Linear, Softmax, numerical_gradient, relative_error,
                                    row_max, row_sum)

TOLERANCE = 1e-6        # chapter 2: gradient_check passes at or below this
ROUNDING_BOUND = 1e-8   # chapter 2: a correct float64 backward pass stays below this


def microseconds(call: Callable[[], object], number: int = 100) -> float:
    """The best of three timings of `number` calls, per call, in microseconds."""
    return min(timeit.repeat(call, number=number, repeat=3)) / number * 1e6

# %% [markdown]
# ## One matrix product over all positions
#
# *Chapter 2, `Linear`.* The input of a `Linear` layer has shape `(B, T, in)`. Given a 3-D
# array, NumPy's `@` computes a stack of `B` separate products, one BLAS call per example.
# `Linear` instead reshapes the input to `(B·T, in)`, which is free (a view of the same
# memory), and makes one product. The reshape matters most in the backward pass: there
# $X^\top G$ must sum over all $B \cdot T$ positions. With the reshape that is one product;
# without it, `B` products of shape `(in, out)` and then a sum over the batch, which builds a
# `(B, in, out)` temporary (or an `einsum`). All three give the same numbers up to rounding:

# %%
rng = np.random.default_rng(0)
B, T, d_in, d_out = 32, 8, 64, 256                    # the reference model's FFN, W_1
X = rng.normal(size=(B, T, d_in)).astype(np.float32)  # (B, T, in)
G = rng.normal(size=(B, T, d_out)).astype(np.float32) # (B, T, out)
layer = Linear(d_in, d_out, np.random.default_rng(1))
W = layer.W.data                                      # (in, out)

X2, G2 = X.reshape(-1, d_in), G.reshape(-1, d_out)    # (B*T, in), (B*T, out)
assert np.shares_memory(X2, X)                        # the reshape copies nothing
forward_2d = (X2 @ W).reshape(B, T, d_out)            # one product
forward_3d = X @ W                                    # B products
grad_W_2d = X2.T @ G2                                 # one product, sums B*T rows
grad_W_3d = (X.swapaxes(1, 2) @ G).sum(axis=0)        # (B, in, out), then a sum
grad_W_einsum = np.einsum("bti,btj->ij", X, G)

layer(X)
layer.backward(G)
assert np.allclose(layer(X), forward_3d + layer.b.data, rtol=1e-5, atol=1e-5)
assert np.allclose(forward_2d, forward_3d, rtol=1e-5, atol=1e-5)
assert np.allclose(layer.W.grad, grad_W_3d, rtol=1e-4, atol=1e-3)
assert np.allclose(grad_W_2d, grad_W_einsum, rtol=1e-4, atol=1e-3)
print("forward and dL/dW: one 2-D product == B products == einsum, "
      "up to float32 rounding")

# %% [markdown]
# How long each takes depends on the BLAS library and on how many cores are free (this cell's
# output is not compared by the tests). In the forward pass the stack of products can be
# about as fast as the single one; the sum over the batch in the backward pass is where the
# single product wins. `benchmarks/benchmark.py` measures whole training steps.

# %%
# NBVAL_IGNORE_OUTPUT
print(f"(B, T, in, out) = {(B, T, d_in, d_out)}, float32")
for label, call in [("forward, one 2-D product", lambda: X2 @ W),
                    ("forward, B products (3-D @)", lambda: X @ W),
                    ("dL/dW, one 2-D product", lambda: X2.T @ G2),
                    ("dL/dW, B products + sum",
                     lambda: (X.swapaxes(1, 2) @ G).sum(axis=0)),
                    ("dL/dW, einsum", lambda: np.einsum("bti,btj->ij", X, G))]:
    print(f"  {label:30} {microseconds(call, 20):8.0f} us")

# %% [markdown]
# ## The embedding's gradient as a matrix product
#
# *Chapter 2, `Embedding.backward`.* The gradient of the embedding table adds the upstream
# gradient of every position into the row of its token. `np.add.at(W.grad, ids, G)` does that
# correctly, one position at a time (an unbuffered loop, so repeated ids add up); `Embedding`
# writes the same sum as the one-hot matrix product $O^\top G$, one BLAS call, cheap because
# the vocabulary has only $V = 20$ rows. The two agree, and the naive `W.grad[ids] += G` does
# not (chapter 2 shows why):

# %%
from transformer_lib.data import VOCAB_SIZE
from transformer_lib.layers import Embedding

rng = np.random.default_rng(0)
ids = rng.integers(0, VOCAB_SIZE, size=(32, 8))                     # (B, T)
emb = Embedding(VOCAB_SIZE, 64, np.random.default_rng(1))
G_emb = rng.normal(size=(32, 8, 64)).astype(np.float32)             # (B, T, D)
emb(ids)
emb.backward(G_emb)
scatter = np.zeros_like(emb.W.data)
np.add.at(scatter, ids, G_emb)
assert np.allclose(emb.W.grad, scatter, rtol=1e-5, atol=1e-5)
print("one-hot matrix product == np.add.at, up to float32 rounding")

# %%
# NBVAL_IGNORE_OUTPUT
def one_hot_product():
    one_hot = (ids.reshape(-1, 1) == np.arange(VOCAB_SIZE)).astype(np.float32)
    return one_hot.T @ G_emb.reshape(-1, 64)                       # (V, D)


def add_at():
    out = np.zeros((VOCAB_SIZE, 64), dtype=np.float32)
    np.add.at(out, ids, G_emb)
    return out


print(f"(B, T, D) = {G_emb.shape}, V = {VOCAB_SIZE}, float32")
print(f"  one-hot matrix product {microseconds(one_hot_product):6.0f} us")
print(f"  np.add.at              {microseconds(add_at):6.0f} us")

# %% [markdown]
# ## Why the gradient check needs float64
#
# *Chapter 2, `gradient_check`.* The checker refuses float32 parameters and inputs. Here is
# why. We estimate the gradient of $f(x) = \sum_i G_i \sin x_i$ for 100 points, whose exact
# gradient $G_i \cos x_i$ we know, in both precisions and for steps $\varepsilon$ from
# $10^{-1}$ down to $10^{-10}$. Two errors compete. The *truncation* error, the terms of the
# Taylor expansion that central differences drop, shrinks like $\varepsilon^2$. For this $f$
# it is known exactly: every estimate is the true derivative times
# $\sin\varepsilon / \varepsilon$, so the relative error is
# $(1 - \sin\varepsilon/\varepsilon)/(1 + \sin\varepsilon/\varepsilon) \approx
# \varepsilon^2/12$ on any machine. The *rounding* error grows like $u/\varepsilon$, where $u$
# is the machine precision ($10^{-16}$ in float64, $6 \cdot 10^{-8}$ in float32), and its
# digits depend on your CPU and its libraries, so the figure shows it and the text below
# prints only bounds. In float64 the error follows $\varepsilon^2/12$ down to
# $\varepsilon = 10^{-4}$, bottoms out below $10^{-9}$, and grows again once rounding takes
# over; `gradient_check`'s step $10^{-6}$ keeps it below $10^{-8}$. In float32 rounding
# dominates from $\varepsilon = 10^{-2}$ on (every smaller step makes the error larger), and
# even the best step stays more than ten times above the threshold of $10^{-6}$.

# %%
rng = np.random.default_rng(0)
points, G_sin = rng.uniform(-2, 2, 100), rng.normal(size=100)
exact = G_sin * np.cos(points)
steps = np.array([1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10])
sweep = {}                                 # dtype -> relative error at each step
for dtype in (np.float32, np.float64):
    p, Gd = points.astype(dtype), G_sin.astype(dtype)
    f = lambda p=p, Gd=Gd: float((Gd * np.sin(p)).sum())   # bound now, not later
    sweep[dtype] = np.array([relative_error(exact, numerical_gradient(f, p, eps)
                                            .astype(np.float64)) for eps in steps])

fig, ax = plt.subplots(figsize=(7, 4.5))
ax.loglog(steps, sweep[np.float32], "o-", color="tab:orange", label="float32")
ax.loglog(steps, sweep[np.float64], "o-", color="tab:blue", label="float64")
ax.loglog(steps, steps**2 / 12, ":", color="gray",
          label="truncation, $\\varepsilon^2/12$")
ax.axhline(TOLERANCE, color="tab:red", lw=1, label="threshold $10^{-6}$")
ax.axvline(1e-6, color="black", lw=0.8, ls="--", label="gradient_check's step")
ax.set_ylim(1e-12, 3)
ax.invert_xaxis()
ax.set_xlabel("step $\\varepsilon$ (smaller to the right)")
ax.set_ylabel("relative error")
ax.set_title("Central differences: truncation falls like $\\varepsilon^2$, "
             "rounding grows like $1/\\varepsilon$\n"
             "(the rounding part differs from machine to machine)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

err32, err64 = sweep[np.float32], sweep[np.float64]
print("float64, where truncation dominates, the error is eps**2 / 12:")
for eps, error in zip(steps[:4], err64[:4]):
    print(f"  eps {eps:.0e}: relative error {error:.1e}")
    assert abs(error / (eps**2 / 12) - 1) < 0.01
at_default = err64[steps == 1e-6][0]
print(f"float64: relative error < 1e-09 at the best step, < {ROUNDING_BOUND:.0e} "
      "at gradient_check's step 1e-06")
print(f"float32: relative error > 1e-05 even at the best step, ten times the threshold "
      f"{TOLERANCE:.0e}")
assert err64.min() < 1e-9 and at_default < ROUNDING_BOUND and err32.min() > 1e-5
assert err64[steps == 1e-8][0] > 100 * err64.min()    # rounding takes over
assert np.all(np.diff(err32[1:7]) > 0)      # float32: eps 1e-2 ... 1e-7, ever worse

# %% [markdown]
# ## Fast reductions over short rows
#
# *Chapter 2, `row_max` and `row_sum`; used by LayerNorm, Softmax and attention.* LayerNorm
# and softmax need a mean, a sum or a maximum over the last axis, and in this model that axis
# is short: softmax runs over the keys of a sequence, at most about 10 of them. NumPy handles
# `x.max(axis=-1)` over a short last axis badly: it starts its inner loop once per row, and for
# rows of 8 numbers the bookkeeping costs more than the arithmetic. Two rewrites avoid it.
#
# - `row_max` takes the maximum *across columns* instead: `T - 1` calls of `np.maximum`, each
#   over a whole column of the array (all `B·H·T` rows at once, written into one buffer). For
#   rows longer than 32 (chapter 8's generation) it falls back to NumPy's reduction.
# - `row_sum` multiplies by a column of ones, `x @ ones((T, 1))`. The matrix product adds up
#   every row in one BLAS call and works for any length (LayerNorm sums over
#   $d_{\text{model}} = 64$).
#
# **Proof** that they compute the same thing, on an attention-sized array `(B, H, T, T)`. The
# maximum is exact (it only compares). The sum may differ in the last bits, because a matrix
# product adds in a different order.

# %%
# (B, H, T, T)
scores = np.random.default_rng(0).normal(size=(32, 4, 8, 8)).astype(np.float32)
assert np.array_equal(row_max(scores), scores.max(axis=-1, keepdims=True))
assert np.allclose(row_sum(scores), scores.sum(axis=-1, keepdims=True),
                   rtol=1e-5, atol=1e-5)
assert row_max(scores).shape == row_sum(scores).shape == (32, 4, 8, 1)
wide = np.random.default_rng(1).normal(size=(64, 64))  # LayerNorm-sized rows
assert np.allclose(row_sum(wide), wide.sum(axis=-1, keepdims=True),
                   rtol=1e-12, atol=1e-12)
assert np.array_equal(row_max(wide), wide.max(axis=-1, keepdims=True))  # the fallback
print("row_max == .max(-1) exactly; row_sum == .sum(-1) up to rounding")

# %% [markdown]
# How much these rewrites save depends on your CPU and the array sizes. The cell below measures
# it on your machine. Its output changes from run to run, so the test suite ignores it. Proper
# benchmarks live outside the notebooks.

# %%
# NBVAL_IGNORE_OUTPUT
pairs = [("max over last axis", lambda: scores.max(axis=-1, keepdims=True),
          lambda: row_max(scores)),
         ("sum over last axis", lambda: scores.sum(axis=-1, keepdims=True),
          lambda: row_sum(scores))]
print(f"(B, H, T, T) = {scores.shape}, float32")
for label, plain, ours in pairs:
    t_plain, t_ours = microseconds(plain), microseconds(ours)
    print(f"{label:20} NumPy {t_plain:6.0f} us   ours {t_ours:6.0f} us   "
          f"({t_plain / t_ours:.1f}x)")

# %% [markdown]
# ## The softmax Jacobian, materialised
#
# *Chapter 2, `Softmax.backward`.* Each row of scores has its own $T \times T$ Jacobian
# $\operatorname{diag}(y) - y y^\top$. For attention scores of shape `(B, H, T, T)` that makes
# `B·H·T` Jacobians, `B·H·T³` numbers: $T$ times the memory of the scores, and $T$ times the
# work of the two-line vector-Jacobian product (VJP) that `Softmax.backward` computes. Below we
# build all of them for a small attention-sized tensor. The result is the same up to rounding,
# and the memory is $T$ times larger.

# %%
softmax_layer = Softmax()
B, H, T = 2, 2, 8
att_scores = np.random.default_rng(0).normal(size=(B, H, T, T))   # (B, H, T, T)
G_att = np.random.default_rng(1).normal(size=(B, H, T, T))
w = softmax_layer(att_scores)
vjp = softmax_layer.backward(G_att)
diag_part = np.einsum("bhqi,ik->bhqik", w, np.eye(T))             # diag(y), per row
jacobians = diag_part - np.einsum("bhqi,bhqk->bhqik", w, w)       # (B, H, T, T, T)
materialised = np.einsum("bhqik,bhqi->bhqk", jacobians, G_att)    # J^T g, row by row
assert np.allclose(materialised, vjp)
assert jacobians.nbytes == T * att_scores.nbytes
print(f"scores {att_scores.nbytes:,} bytes; all Jacobians {jacobians.nbytes:,} bytes "
      f"(T = {T} times more)")

print(f"\n{'T':>6} {'scores (float32)':>18} {'Jacobians (float32)':>20}   "
      "per example and head")
for T_ in (8, 512, 2048):
    print(f"{T_:>6} {T_ * T_ * 4:>16,} B {T_ ** 3 * 4:>18,} B")

# %% [markdown]
# At our $T \le 10$ the Jacobians would merely waste time. At the context length of a modern
# language model (thousands of tokens), one head of one example would need tens of gigabytes.
# The VJP needs nothing beyond $y$, which the forward pass already computed.
#
# ## One flat buffer for all parameters
#
# *Chapter 5, `flatten_parameters` and the `Optimizer` base class.* The reference model has 33
# parameter arrays. Adam's update is about ten array operations, so applied array by array it
# would make about 330 NumPy calls per step, most of them on arrays so small that the fixed
# cost of a call dominates. The optimiser therefore moves all parameters into one flat array
# (and all gradients into another) and makes every parameter's `.data` and `.grad` a view into
# it. The views share the buffers' memory, keep their values, and writes go both ways:

# %%
from transformer_lib.training import Adam, flatten_parameters
from transformer_lib.transformer import Transformer

model = Transformer(d_model=64, num_heads=4, num_layers=2, d_ff=256, seed=0)
before = [p.data.copy() for p in model.parameters()]
flat_data, flat_grad = flatten_parameters(model.parameters())
W_q = model.blocks[0].attention.W_q.W
print(f"flat buffers of {flat_data.size:,} numbers; "
      f"W_q.W shares memory with them: {np.shares_memory(W_q.data, flat_data)}")
assert flat_data.shape == flat_grad.shape == (102_420,)
assert all(np.array_equal(b, p.data)                       # the values are kept
           for b, p in zip(before, model.parameters()))
assert all(np.shares_memory(p.data, flat_data) and np.shares_memory(p.grad, flat_grad)
           for p in model.parameters())
flat_data[:] = 0.0                       # writing the buffer writes every parameter
assert not W_q.data.any()
model.embedding.W.grad[:] = 1.0          # and a layer's gradient lands in the buffer
assert flat_grad[:model.embedding.W.data.size].min() == 1.0

# %% [markdown]
# The flat buffer also makes the global gradient norm of clipping one dot product, and a copy
# of the best epoch's parameters one `data.copy()`. It is also why chapter 2 says to call
# `model.to(dtype)` *before* creating an optimiser: `to` replaces the arrays, so afterwards
# the optimiser would update a buffer that the model no longer reads. And one buffer has one
# dtype, so a model with mixed dtypes is refused:

# %%
from transformer_lib.layers import Parameter

late = Transformer(d_model=16, num_heads=2, num_layers=1, d_ff=32, seed=0)
optimizer = Adam(late.parameters(), lr=1e-3)
assert np.shares_memory(late.embedding.W.data, optimizer.data)
late.to(np.float64)                                  # too late: new arrays
assert not any(np.shares_memory(p.data, optimizer.data) for p in late.parameters())
show_error(lambda: flatten_parameters([Parameter(np.zeros(2, dtype=np.float32)),
                                       Parameter(np.zeros(2))]),
           ValueError, "parameters have mixed dtypes ['float32', 'float64']")

# %% [markdown]
# What the flat buffer saves, measured against the same Adam arithmetic done array by array:

# %%
# NBVAL_IGNORE_OUTPUT
fresh = Transformer(d_model=64, num_heads=4, num_layers=2, d_ff=256, seed=0)
params = fresh.parameters()
for p in params:
    p.grad[...] = 1e-3
per_array = [(p, np.zeros_like(p.data), np.zeros_like(p.data)) for p in params]


def adam_array_by_array(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, t=1):
    """The same update as Adam.step, one parameter array at a time."""
    for p, m, v in per_array:
        m *= b1
        m += (1 - b1) * p.grad
        v *= b2
        v += (1 - b2) * p.grad * p.grad
        p.data -= lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)


t_arrays = microseconds(adam_array_by_array, 50)
flat_adam = Adam(params, lr=1e-3)
t_flat = microseconds(flat_adam.step, 50)
print(f"one Adam step, 33 arrays one by one: {t_arrays:6.0f} us")
print(f"one Adam step, one flat buffer:      {t_flat:6.0f} us  "
      f"({t_arrays / t_flat:.1f}x)")

# %% [markdown]
# ## Python floats, not NumPy scalars
#
# *Chapter 5, `Adam.step`; chapter 3, attention's $1/\sqrt{d_k}$.* NumPy 2 (NEP 50) decides
# the type of an operation from its operands' types, and a Python `float` is "weak": it adopts
# the array's type. So `float32 array * 0.5` stays a float32 operation. A NumPy `float64`
# scalar, such as `np.sqrt(2.0)` or `np.cos(x)` returns, is "strong": it turns the operation
# into float64 arithmetic, with the result float64, or, in place (`a *= s`), converted back to
# float32 on the way out. That is why every scalar in `Adam.step` is a Python float
# (`math.sqrt`, `float(self.lr)`), and why chapter 3 casts $1/\sqrt{d_k}$ to the array's
# dtype. The rules:

# %%
import math

a32 = np.random.default_rng(0).normal(size=102_420).astype(np.float32)
assert (a32 * 0.5).dtype == np.float32                    # a Python float adopts it
assert (a32 * np.float64(0.5)).dtype == np.float64        # a NumPy float64 promotes
assert (a32 * np.sqrt(2.0)).dtype == np.float64           # np.sqrt returns np.float64
assert (a32 * math.sqrt(2.0)).dtype == np.float32         # math.sqrt returns a float
assert (a32 / np.sqrt(64).astype(np.float32)).dtype == np.float32   # chapter 3's cast

# The two also round differently: the Python float is first rounded to float32.
scale = 1 / math.sqrt(1 - 0.999)                  # Adam's bias correction at step 1
weak = a32 * scale                                # float32 * float32(scale)
strong = (a32 * np.float64(scale)).astype(np.float32)    # float64 product, then rounded
differ = weak != strong
ulps = np.abs(weak - strong) / np.spacing(np.abs(strong))
print(f"float32 array * Python float: {weak.dtype}; * NumPy float64: "
      f"{(a32 * np.float64(scale)).dtype}")
print(f"the two disagree in the last bit for {differ.mean():.0%} of the "
      f"{a32.size:,} numbers,")
print("    by at most 1 unit in the last place")
assert differ.any() and ulps.max() <= 1

# %% [markdown]
# The speed difference, measured on an array the size of the reference model's parameters
# (`benchmarks/benchmark.py` measures the same; this cell's output is not compared):

# %%
# NBVAL_IGNORE_OUTPUT
t_strong = microseconds(lambda: a32.__imul__(np.float64(1.0)), 200)
t_weak = microseconds(lambda: a32.__imul__(1.0), 200)
print(f"float32 array of {a32.size:,} numbers *= NumPy float64: {t_strong:5.0f} us;")
print(f"    *= Python float: {t_weak:5.0f} us ({t_strong / t_weak:.0f}x)")

# %% [markdown]
# ## Why the same seed trains differently on another machine
#
# *Chapter 5, `fit`.* Floating-point addition rounds after every step, so it is not
# associative: the order in which numbers are added changes the last bits of the sum. A matrix
# product adds up its terms in an order that its BLAS library chooses for the processor (block
# sizes, SIMD width, threads), so two machines can round the same product differently. Both
# effects, in float32 and with a fixed order (each addition below is a single IEEE operation,
# so every machine gets exactly these results):

# %%
one, big = np.float32(1.0), np.float32(1e8)
assert (big + -big) + one == 1.0 and big + (-big + one) == 0.0   # 1e8 - 1 rounds to 1e8

values = np.random.default_rng(0).normal(size=10_000).astype(np.float32)
forwards = backwards = np.float32(0.0)
for v in values:
    forwards += v                                        # first to last
for v in values[::-1]:
    backwards += v                                       # last to first
exact = math.fsum(values.astype(np.float64))
print(f"(1e8 - 1e8) + 1 = {(big + -big) + one}, "
      f"1e8 + (-1e8 + 1) = {big + (-big + one)}")
print(f"10,000 float32 numbers summed first to last: {forwards:.6f};")
print(f"    last to first: {backwards:.6f}; exactly: {exact:.6f}")
assert forwards != backwards
assert abs(forwards - exact) < 1e-3 and abs(backwards - exact) < 1e-3

# %% [markdown]
# Training feeds every step's result into the next one, so such last-bit differences grow:
# after a thousand steps the weights, and the losses `fit` prints with three digits, differ
# visibly from machine to machine, while (for the book's recipe and seed) the answers stay the
# same. That is why chapter 5 prints training progress in cells the tests do not compare,
# asserts only what holds on every machine, and ships the book's own run for chapter 6.
# `tools/portability.py` re-runs the notebooks under imitated machines (other BLAS kernels,
# SIMD levels and thread counts) to check that the stored outputs hold there too.

# %% [markdown]
# ## Checkpoints: atomic writes, damaged files
#
# *Chapter 5, `save_model` and `load_model`.* A checkpoint must never be half-written: a
# reader (chapter 6, the command line) could load a model that is part new, part nothing.
# `save_model` therefore writes the whole file under a temporary name in the *same directory*
# (`tempfile.mkstemp`), and only then renames it over the target with `os.replace`. Within
# one filesystem a rename is atomic: anyone opening the path sees the old file or the new one,
# never a mixture, and a crash or an error during the write leaves the old file intact. (The
# same directory matters: a rename across filesystems is a copy, which is not atomic.)
# `mkstemp` creates the file readable by its owner only, so `save_model` sets the usual
# `rw-r--r--` before the rename.
#
# The test makes a write fail halfway: `np.savez` writes part of the archive and then raises,
# as a full disk would. The old checkpoint is untouched and no temporary file is left behind.

# %%
import os
import stat
import tempfile
from pathlib import Path
from unittest import mock

from transformer_lib.training import load_model, save_model

scratch = tempfile.mkdtemp()
target = Path(scratch, "model.npz")
small = Transformer(d_model=16, num_heads=2, num_layers=1, d_ff=32, seed=0)
save_model(small, target, note="the old file")
old_bytes = target.read_bytes()
assert stat.S_IMODE(target.stat().st_mode) == 0o644     # rw-r--r--, not mkstemp's 0o600


def savez_then_fail(file, **arrays):
    file.write(b"PK\x03\x04 part of an archive")           # some bytes reach the disk
    raise OSError("No space left on device")


with mock.patch.object(np, "savez", savez_then_fail):
    show_error(lambda: save_model(Transformer(d_model=16, num_heads=2, num_layers=1,
                                              d_ff=32, seed=1), target, note="new"),
               OSError, "No space left on device")
assert target.read_bytes() == old_bytes                    # the old file, intact
assert load_model(target).metadata == {"note": "the old file"}
assert sorted(os.listdir(scratch)) == ["model.npz"]         # no temporary file left

# metadata that JSON cannot store fails before anything is written
show_error(lambda: save_model(small, target, digits={1, 2}), TypeError,
           "metadata value {1, 2} of type set is not JSON-serialisable")
assert target.read_bytes() == old_bytes and sorted(os.listdir(scratch)) == ["model.npz"]
print("a failed write leaves the old checkpoint and no temporary file")

# %% [markdown]
# And every way loading can go wrong, each with the message `load_model` gives: no file, a
# file that is not a zip archive, a copy cut short, an `.npz` that `save_model` did not
# write, and arrays that do not fit the stored config. (Messages that contain the scratch
# directory print it as `<tmp>`, so the output is the same on every run.)

# %%
import json

good = save_model(Transformer(d_model=16, num_heads=2, num_layers=1, d_ff=32),
                  Path(scratch, "small.npz"))

show_error(lambda: load_model(Path(scratch, "missing.npz")), FileNotFoundError,
           "no model file at <tmp>/missing.npz", hide=scratch)

Path(scratch, "notes.npz").write_text("not a model at all")
show_error(lambda: load_model(Path(scratch, "notes.npz")), ValueError,
           "<tmp>/notes.npz is not a model file: it is not an .npz (zip) archive",
           hide=scratch)

Path(scratch, "cut.npz").write_bytes(good.read_bytes()[:3000])   # an interrupted copy
show_error(lambda: load_model(Path(scratch, "cut.npz")), ValueError,
           "<tmp>/cut.npz is not a model file", hide=scratch)

np.savez(Path(scratch, "arrays.npz"), weights=np.zeros(3))       # an .npz, but not ours
show_error(lambda: load_model(Path(scratch, "arrays.npz")), ValueError,
           "<tmp>/arrays.npz is not a model file written by save_model: "
           "no 'config' array",
           hide=scratch)


def with_config(arrays, **changes):
    """The same arrays under a config with some entries changed."""
    config = {**json.loads(str(arrays["config"])), **changes}
    return {**arrays, "config": np.array(json.dumps(config))}


with np.load(good) as f:                      # the small model's arrays...
    arrays = {k: f[k] for k in f.files}
np.savez(Path(scratch, "mismatch.npz"),
         **with_config(arrays, d_model=32))   # ...d_model 32?
show_error(lambda: load_model(Path(scratch, "mismatch.npz")), ValueError,
           "<tmp>/mismatch.npz: embedding.W has shape (20, 16), "
           "but the config needs (20, 32)",
           hide=scratch)

np.savez(Path(scratch, "layers.npz"),
         **with_config(arrays, num_layers=2))  # two layers?
show_error(lambda: load_model(Path(scratch, "layers.npz")), ValueError,
           "the parameters do not match the config "
           "(missing ['blocks.1.attention.W_k.W'",
           hide=scratch)
