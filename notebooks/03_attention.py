# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Attention
#
# The layers of chapter 2 all work on one position at a time: a `Linear` layer or a `LayerNorm`
# transforms the vector of token 3 without ever looking at token 5. Our puzzles cannot be
# solved that way. Attention is the one layer in a transformer that moves information *between*
# positions, and this chapter builds it, derives its backward pass and proves both correct.
#
# **In this chapter**
#
# - why the puzzles need attention, and two hand-built attention layers that solve `Second` and
#   `Max` / `Min` without any learning;
# - scaled dot-product attention $\mathrm{softmax}(QK^T/\sqrt{d_k})\,V$, and why the
#   $\sqrt{d_k}$ is there (measured, not just claimed);
# - masking: padding keys get *exactly* zero weight, so padding cannot change any real output;
# - the backward pass, derived step by step and checked against numerical gradients;
# - multi-head attention with no Python loop over heads or examples: one fused matmul for
#   $Q$, $K$, $V$, heads split by reshape and transpose, and why $W_k$ needs no bias;
# - a slow, obvious reference implementation with explicit loops that the fast one must match.
#
# Cells marked `export` become the module `transformer_lib.attention`.

# %% [markdown]
# ## Why attention
#
# Look at what each operation needs. The model will read its answer from one position (chapter
# 4 uses the final `[EOS]` token), so the vector there must end up holding the answer:
#
# - `First`, `Second` and `Last` need to **look at a position**: copy the digit that sits at
#   position 2, 3 or just before `)`.
# - `Max` and `Min` need to **compare all digits**: find the largest or smallest, wherever it is.
#
# Both are a *weighted average over positions*, where the weights depend on the data: put
# (almost) all the weight on the right token and the average *is* that token. Attention is
# exactly this. Every position $i$ emits a **query** $q_i$ ("what am I looking for?"), every
# position $j$ a **key** $k_j$ ("what do I contain?") and a **value** $v_j$ ("what do I hand
# over?"). Position $i$ scores each key by a dot product, turns the scores into weights with a
# softmax, and takes the weighted average of the values:
#
# $$
# \text{score}_{ij} = \frac{q_i \cdot k_j}{\sqrt{d_k}}, \qquad
# P_{ij} = \frac{e^{\text{score}_{ij}}}{\sum_{j'} e^{\text{score}_{ij'}}}, \qquad
# \text{out}_i = \sum_j P_{ij}\, v_j .
# $$
#
# With all positions stacked as rows of matrices $Q$ ($T_q \times d_k$), $K$ ($T_k \times d_k$)
# and $V$ ($T_k \times d_v$), that is one line:
#
# $$
# \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^T}{\sqrt{d_k}}\right) V,
# $$
#
# with the softmax taken along each row. Row $i$ of the weight matrix
# $P = \mathrm{softmax}(QK^T/\sqrt{d_k})$ is a probability distribution over the keys: it says
# where query $i$ looks.

# %% [markdown]
# ## Why divide by $\sqrt{d_k}$
#
# If the entries of $q$ and $k$ are independent with mean 0 and variance 1 (roughly what a
# well-initialised network produces), then $q \cdot k = \sum_{m=1}^{d_k} q_m k_m$ is a sum of
# $d_k$ terms of variance 1, so its variance is $d_k$. Dividing by $\sqrt{d_k}$ brings it back to
# 1, whatever the head size. Measured:

# %%
import numpy as np

rng = np.random.default_rng(0)
table = [" d_k   var(q·k)   var(q·k / sqrt(d_k))"]
for d_k in (4, 16, 64, 256):
    q = rng.normal(size=(20_000, d_k))
    k = rng.normal(size=(20_000, d_k))
    dots = (q * k).sum(axis=1)                       # 20,000 dot products
    raw, scaled = dots.var(), (dots / np.sqrt(d_k)).var()
    table.append(f"{d_k:4}   {raw:8.1f}   {scaled:8.3f}")
    assert abs(raw / d_k - 1) < 0.05 and abs(scaled - 1) < 0.05
print("\n".join(table))

# %% [markdown]
# Why does the variance matter? The softmax turns *differences* between scores into ratios of
# weights. Scores with a standard deviation of 8 (that is $d_k = 64$ unscaled) differ by tens,
# so $e^{\text{score}}$ puts nearly all the weight on one key: the softmax **saturates**. A
# saturated softmax also passes almost no gradient: its backward pass (derived below)
# multiplies the gradient of each score by a factor that vanishes when the weights are
# one-hot. Both effects, for 8 keys and $d_k = 64$ at initialisation:

# %%
from transformer_lib.layers import softmax         # chapter 2's, along the last axis

d_k, T, n = 64, 8, 5_000
q = rng.normal(size=(n, 1, d_k))                     # one query per row
k = rng.normal(size=(n, T, d_k))                     # 8 keys per row
dots = (q @ k.swapaxes(1, 2))[:, 0]                  # (n, T)
G = rng.normal(size=(n, T))                          # a random upstream gradient dL/dP
saturation = {}
print(f"{'':9} {'mean largest weight':>19}   {'rows with one weight > 0.99':>27}   "
      f"{'mean |dL/dscore|':>16}")
for name, scores in (("unscaled", dots), ("scaled", dots / np.sqrt(d_k))):
    P = softmax(scores)
    dS = P * (G - (G * P).sum(axis=1, keepdims=True))   # gradient reaching the scores
    largest = P.max(axis=1)                               # the top weight of each row
    saturation[name] = (largest.mean(), (largest > 0.99).mean(), np.abs(dS).mean())
    print(f"{name:9} {saturation[name][0]:19.2f}   {saturation[name][1]:27.1%}   "
          f"{saturation[name][2]:16.3f}")

assert saturation["unscaled"][0] > 0.8 and saturation["scaled"][0] < 0.5
assert saturation["unscaled"][1] > 0.3 and saturation["scaled"][1] == 0
assert saturation["scaled"][2] > 3 * saturation["unscaled"][2]

# %% [markdown]
# Without the scaling, a third of the rows are already one-hot before training starts, and the
# scores receive about four times less gradient: the layer would start out committed to random
# choices and learn slowly to undo them. With it, no row starts one-hot (the top weight
# averages under one half here) and attention sharpens only as training finds reasons to.

# %% [markdown]
# The figure repeats the measurement for head sizes from 1 to 256 (8 keys, 5,000 rows of
# random $q$ and $k$ with unit-variance entries, as above). Left: the largest weight of each
# row, its median and the band in which 80% of the rows lie; right: the share of rows that
# are already one-hot (largest weight above 0.99). Unscaled, the softmax saturates more and
# more as $d_k$ grows; scaled, the distribution stays almost where it is (its median between
# 0.25 and 0.4 for every head size). (At $d_k = 1$ the two coincide: $\sqrt{1} = 1$.)

# %%
import matplotlib.pyplot as plt


def top_weights(d_k, scaled, rows=5_000, keys=8, seed=1):
    """The largest attention weight of each of `rows` random queries (`keys` keys)."""
    gen = np.random.default_rng(seed)                 # the same q, k for both variants
    q_ = gen.normal(size=(rows, 1, d_k))
    k_ = gen.normal(size=(rows, keys, d_k))
    s_ = (q_ @ k_.swapaxes(1, 2))[:, 0]               # (rows, keys)
    return softmax(s_ / np.sqrt(d_k) if scaled else s_).max(axis=1)   # (rows,)


head_sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
tops = {name: np.array([top_weights(d, name == "scaled") for d in head_sizes])
        for name in ("unscaled", "scaled")}               # (head sizes, rows)

fig, (ax_w, ax_h) = plt.subplots(1, 2, figsize=(10, 4))
for name, color in (("unscaled", "tab:red"), ("scaled", "tab:blue")):
    low, median, high = np.quantile(tops[name], [0.1, 0.5, 0.9], axis=1)
    label = "$q \\cdot k$" if name == "unscaled" else "$q \\cdot k / \\sqrt{d_k}$"
    ax_w.fill_between(head_sizes, low, high, color=color, alpha=0.2)
    ax_w.plot(head_sizes, median, "o-", color=color, label=f"{label}: median, 10-90%")
    ax_h.plot(head_sizes, 100 * (tops[name] > 0.99).mean(axis=1), "o-", color=color,
              label=label)
ax_w.axhline(1 / 8, color="gray", ls=":", label="uniform over 8 keys")
ax_w.set_ylim(0, 1.02)
ax_w.set_ylabel("largest attention weight of a row")
ax_w.set_title("Top attention weight per row, scaled vs unscaled")
ax_h.set_ylim(-2, 100)
ax_h.set_ylabel("rows with one weight > 0.99 (%)")
ax_h.set_title("Rows that start one-hot")
for ax in (ax_w, ax_h):
    ax.set_xscale("log", base=2)
    ax.set_xticks(head_sizes, [str(d) for d in head_sizes])
    ax.set_xlabel("head size $d_k$")
    ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
plt.show()

median_of = {name: np.median(tops[name], axis=1) for name in tops}
print("median top weight, d_k = " + ", ".join(map(str, head_sizes)))
for name in tops:
    print(f"  {name:9}", "  ".join(f"{m:.2f}" for m in median_of[name]))
assert np.array_equal(tops["scaled"][0], tops["unscaled"][0])          # d_k = 1
assert (np.diff(median_of["unscaled"]) > 0).all()           # saturates as d_k grows
assert median_of["unscaled"][head_sizes.index(64):].min() > 0.95
assert (tops["unscaled"][-1] > 0.99).mean() > 0.5           # d_k 256: most rows one-hot
assert 0.25 < median_of["scaled"].min() and median_of["scaled"].max() < 0.4
assert np.quantile(tops["scaled"], 0.9, axis=1).max() < 0.6
assert (tops["scaled"] > 0.99).mean(axis=1).max() < 0.005   # scaled: almost never

# %% [markdown]
# ## Masking the padding
#
# A batch pads shorter sequences with `[PAD]` (chapter 1), and its mask, shape `(B, T)`, is
# `True` for real tokens. Padding must be invisible: no query may put weight on a padding key,
# otherwise the output of `Max ( 5 3 9 ) [EOS]` would depend on how long the *other* sequences
# in its batch happen to be.
#
# The fix is to overwrite the scores of padding keys with a very negative number before the
# softmax. We use `NEG_INF = -1e9` rather than `-np.inf`:
#
# - $e^{-10^9 - \max}$ underflows to exactly `0.0` in float32 and float64, so padding keys get
#   **exactly** zero weight, not merely a small one;
# - `-np.inf` would do the same, except in a row where every key is masked: there
#   $-\infty - (-\infty)$ is `nan`, and one `nan` poisons the whole batch. With a finite value
#   such a row just becomes uniform. (It never happens for a real query, since every sequence
#   has at least one real token; it is a safety net.)
#
# Padding *queries* (rows) are not masked: they compute some harmless average of real values
# that nothing downstream reads. Masking keys is what keeps real positions clean.

# %% [markdown]
# **Masking the future.** The same trick hides other keys. A model that writes text one token
# at a time (chapter 8's decoder) must not let position $i$ see positions after it, so its mask
# is lower-triangular: query $i$ may look at key $j$ only if $j \le i$. `causal_mask(T)` is that
# `(T, T)` matrix (`causal_mask(T, past)` adds `past` earlier keys, for chapter 8's
# cache). A mask with as many axes as the scores, such as
# `causal_mask(T)[None, None] & mask[:, None, None, :]` of shape `(B, 1, T, T)` (causal *and*
# padding), is applied as it is; a `(B, T)` mask is a key mask, as above.

# %% [markdown]
# ## The code
#
# The library function works on any number of leading batch axes, so the same code serves a
# single head `(B, T, d_k)` and many heads at once `(B, H, T, d_k)`. `_key_mask` reshapes the
# `(B, T)` mask to `(B, 1, ..., 1, T)` so that it broadcasts over heads and over queries.
#
# Two details are there for speed, because attention runs on tiny arrays (T ≤ 10) many
# thousands of times during training:
#
# - the softmax is chapter 2's `softmax`: it uses `row_max` and `row_sum` instead of `.max(-1)`
#   and `.sum(-1)`, which are slow on a short last axis, and works in place on one new array
#   (the backward pass uses `row_sum` too);
# - $1/\sqrt{d_k}$ is cast to the array's dtype: a NumPy float64 scalar would silently promote
#   float32 scores to float64 (twice the memory traffic).

# %% tags=["export"]
import numpy as np
import numpy.typing as npt
from transformer_lib.layers import Module, Linear, DEFAULT_DTYPE, row_sum, softmax

NEG_INF = -1e9   # masked score: exp(NEG_INF - max) is exactly 0.0, and never nan


# %% tags=["export"]
def _key_mask(mask: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a key mask (B, T) to (B, 1, ..., 1, T) with ndim axes, like the scores.
    """
    return mask.reshape(mask.shape[0], *([1] * (ndim - 2)), mask.shape[-1])


def causal_mask(T: int, past: int = 0) -> np.ndarray:
    """(T, past + T) bool, True where query i may see key j, that is j <= past + i.

    ``past`` keys come before the T queries (chapter 8's KV cache); with ``past=0``
    this is the lower-triangular (T, T) matrix."""
    return np.arange(past + T) <= np.arange(past, past + T)[:, None]


def scaled_dot_product_attention(
    Q: np.ndarray, K: np.ndarray, V: np.ndarray, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled dot-product attention, ``softmax(Q K^T / sqrt(d_k)) V``.

    Parameters
    ----------
    Q : array, shape (..., T_q, d_k)
        Queries. Leading axes (batch ``B``, heads ``H``, ...) are independent.
    K : array, shape (..., T_k, d_k)
        Keys.
    V : array, shape (..., T_k, d_v)
        Values.
    mask : bool array, shape (B, T_k) or one that broadcasts to the scores, optional
        True where a query may look. A 2-D mask is a key mask, True for real keys and
        False for padding (``B`` is the first axis of ``K``). A mask with as many axes
        as the scores ``(..., T_q, T_k)`` is applied as it is: a causal mask, or causal
        and padding together (chapter 8). Masked keys get exactly zero weight.

    Returns
    -------
    out : array, shape (..., T_q, d_v)
        Weighted averages of the values.
    weights : array, shape (..., T_q, T_k)
        The attention weights; each row sums to 1 over the real keys.

    Raises
    ------
    ValueError
        If the shapes of ``Q``, ``K``, ``V`` or ``mask`` do not fit together.
    """
    if Q.shape[-1] != K.shape[-1] or K.shape[-2] != V.shape[-2]:
        raise ValueError(f"Q {Q.shape}, K {K.shape}, V {V.shape} do not fit: need "
                         "Q (..., T_q, d_k), K (..., T_k, d_k), V (..., T_k, d_v)")
    d_k = Q.shape[-1]
    scores = Q @ K.swapaxes(-1, -2) / np.sqrt(d_k).astype(Q.dtype)     # (..., T_q, T_k)
    if mask is not None and np.ndim(mask) == scores.ndim > 2:   # a full mask
        try:
            fits = np.broadcast_shapes(np.shape(mask), scores.shape) == scores.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"mask has shape {np.shape(mask)}, which does not "
                             f"broadcast to the scores' shape {scores.shape}")
        scores = np.where(mask, scores, NEG_INF)
    elif mask is not None:                                       # a key mask
        if K.ndim < 3 or np.shape(mask) != (K.shape[0], K.shape[-2]):
            raise ValueError(f"mask has shape {np.shape(mask)} but the keys have shape "
                             f"{K.shape}; expected (B, T_k): "
                             "the first and the key axis of K")
        scores = np.where(_key_mask(mask, scores.ndim), scores, NEG_INF)
    weights = softmax(scores)              # (..., T_q, T_k), rows sum to 1 (chapter 2)
    return weights @ V, weights            # (..., T_q, d_v), (..., T_q, T_k)


# %% [markdown]
# ## Attention by hand: the two kinds of lookup
#
# Before any learning, can attention do what our puzzles need? We can choose $Q$, $K$ and $V$
# ourselves. In both demos the value of a digit token is its number (and 0 for other tokens),
# and only the query of the last position, `[EOS]`, matters.
#
# **Look at a position** (`Second`). Let each key be the one-hot vector of its position, and
# let the `[EOS]` query be a large multiple of the one-hot vector of position 3, where the
# second argument sits (`Second` `(` `5` **`3`** `9` `)` `[EOS]`). The score of key 3 is then
# large and all others are 0.
#
# **Compare all digits** (`Max`, `Min`). Let each key be $(\text{digit}, \text{is-not-a-digit})$
# and the query $(\beta, -100)$ with $\beta = 10$: the score is $10 \times$ the digit for digits
# and $-100$ for everything else, so the softmax concentrates on the largest digit. With
# $\beta = -10$ it finds the smallest. (The softmax is a *soft* arg-max; sharper with larger
# $\beta$.) In both demos the query is multiplied by $\sqrt{d_k}$ to cancel the scaling.

# %%
from transformer_lib.data import ID_TO_TOKEN, detokenize, encode


def digit_values(ids):
    """(T,) ids -> (T, 1) values: the digit for digit tokens, 0 elsewhere."""
    tokens = [ID_TO_TOKEN[i] for i in ids]
    return np.array([[float(t) if t.isdigit() else 0.0] for t in tokens])


# Look at a position: Second ( 5 3 9 ) [EOS]
ids = encode("Second(5, 3, 9)")
T = len(ids)
K_pos = np.eye(T)[None]                                  # (1, T, T): key j = one-hot(j)
Q_pos = np.zeros((1, T, T))
Q_pos[0, -1, 3] = 20 * np.sqrt(T)                        # [EOS] asks for position 3
out, P = scaled_dot_product_attention(Q_pos, K_pos, digit_values(ids)[None])
print(f"{detokenize(ids):24} -> [EOS] reads {out[0, -1, 0]:.4f}",
      f"  weights {np.round(P[0, -1], 3)}")
assert abs(out[0, -1, 0] - 3) < 1e-6

# Compare all digits: Max ( 5 3 9 ) and Min ( 5 3 9 )
for op, beta, answer in (("Max", 10.0, 9), ("Min", -10.0, 3)):
    ids = encode(f"{op}(5, 3, 9)")
    values = digit_values(ids)                                        # (T, 1)
    is_digit = np.array([ID_TO_TOKEN[i].isdigit() for i in ids])
    K_cmp = np.stack([values[:, 0], ~is_digit], axis=1)[None]         # (1, T, 2)
    Q_cmp = np.tile([beta, -100.0], (len(ids), 1))[None] * np.sqrt(2)  # (1, T, 2)
    out, P = scaled_dot_product_attention(Q_cmp, K_cmp, values[None])
    print(f"{detokenize(ids):24} -> [EOS] reads {out[0, -1, 0]:.4f}",
          f"  weights {np.round(P[0, -1], 3)}")
    assert abs(out[0, -1, 0] - answer) < 1e-6

# %% [markdown]
# Both work with a single attention layer. The transformer has to *learn* projections that
# produce such queries and keys from token embeddings and positional encodings, and it gets
# several heads so that it can look up by position and compare by content at the same time.
# The rest of this chapter makes the layer trainable and proves it correct.

# %% [markdown]
# ## Checking the forward pass
#
# A small batch: two sequences padded to the same length, with random $Q$, $K$, $V$ for two
# heads. Every row of weights must sum to 1, every padding key must get exactly 0 (`== 0.0`,
# not "close to"), and the output keeps the query axis and the value width.

# %%
from transformer_lib.data import pad_sequences, show_error

ids, mask = pad_sequences([encode("Max(5, 3, 9)"), encode("Min(4, 2)")])  # (2, 7) each
B, T = ids.shape
H, d_k, d_v = 2, 4, 3
rng = np.random.default_rng(1)
Q, K = rng.normal(size=(2, B, H, T, d_k)).astype(np.float32)
V = rng.normal(size=(B, H, T, d_v)).astype(np.float32)

out, weights = scaled_dot_product_attention(Q, K, V, mask)
print("mask:\n", mask.astype(int))
print("weights of sequence 1, Min ( 4 2 ) [EOS] [PAD], head 0:")
print(np.round(weights[1, 0], 3))

assert out.shape == (B, H, T, d_v) and weights.shape == (B, H, T, T)
assert out.dtype == weights.dtype == np.float32                    # no silent float64
assert np.allclose(weights.sum(axis=-1), 1.0)         # each query: a distribution
assert not mask.all()                                 # there is padding to test
for b in range(B):
    assert (weights[b][..., ~mask[b]] == 0.0).all()   # padding keys: exactly 0
    assert (weights[b][..., mask[b]] > 0).all()       # real keys: some weight

# a row whose keys are all masked becomes uniform instead of nan;
# with -inf it would be nan
no_keys = np.zeros((B, T), dtype=bool)
_, weights_all_masked = scaled_dot_product_attention(Q, K, V, no_keys)
assert np.allclose(weights_all_masked, 1 / T)
with np.errstate(invalid="ignore"):
    assert np.isnan(np.exp(np.full(T, -np.inf) - (-np.inf))).all()
# why the scale is cast: a float64 scalar would promote float32 scores
assert (Q / np.sqrt(d_k)).dtype == np.float64
assert (Q / np.sqrt(d_k).astype(Q.dtype)).dtype == np.float32

show_error(lambda: scaled_dot_product_attention(Q, K, V, mask[:, :5]),
           ValueError, "mask has shape (2, 5) but the keys have shape (2, 2, 7, 4)")
show_error(lambda: scaled_dot_product_attention(Q, K[..., :3], V),
           ValueError, "do not fit")

# %% [markdown]
# And the causal mask: each query's weights end at its own position, so changing the values
# of later positions leaves the earlier outputs exactly as they were.

# %%
from transformer_lib.attention import causal_mask

assert (causal_mask(T) == np.tril(np.ones((T, T), dtype=bool))).all()
assert (causal_mask(3, past=4) == causal_mask(7)[4:]).all()    # the last 3 queries
both = causal_mask(T)[None, None] & mask[:, None, None, :]      # (B, 1, T, T)
out_c, weights_c = scaled_dot_product_attention(Q, K, V, both)
print("causal weights of sequence 1, head 0:")
print(np.round(weights_c[1, 0], 3))
assert (np.triu(weights_c, k=1) == 0.0).all()                   # no key after its query
assert (weights_c[1][..., ~mask[1]] == 0.0).all()               # nor padding
assert np.allclose(weights_c.sum(axis=-1), 1.0)
V_later = V.copy()
V_later[:, :, 3:] += 100.0                                      # change positions 3...
K_later = K.copy()
K_later[:, :, 3:] -= 5.0
out_later, _ = scaled_dot_product_attention(Q, K_later, V_later, both)
assert (out_later[:, :, :3] == out_c[:, :, :3]).all()           # 0-2: bit for bit
assert not np.allclose(out_later[:, :, 3:], out_c[:, :, 3:])
too_long = causal_mask(T + 1)[None, None]                       # (1, 1, 8, 8)
show_error(lambda: scaled_dot_product_attention(Q, K, V, too_long),
           ValueError, "does not broadcast to the scores' shape (2, 2, 7, 7)")

# %% [markdown]
# ## The backward pass, step by step
#
# Write the forward pass for one head as a chain of simple steps (masking only replaces some
# scores by a constant, so it is left out of the notation):
#
# $$
# S = \frac{QK^T}{\sqrt{d_k}}, \qquad P = \mathrm{softmax}(S) \text{ (row-wise)}, \qquad O = PV .
# $$
#
# Backward, we receive $dO = \partial L / \partial O$ (same shape as $O$) and walk the chain in
# reverse:
#
# 1. **Through $O = PV$.** A matrix product $O = PV$ sends gradients back as
#    $dV = P^T dO$ and $dP = dO\, V^T$. (Check the shapes: $P^T$ is $T_k \times T_q$ and $dO$
#    is $T_q \times d_v$, so $dV$ is $T_k \times d_v$ like $V$.)
# 2. **Through the softmax**, one row at a time. For $p = \mathrm{softmax}(s)$ the Jacobian is
#    $\partial p_j / \partial s_m = p_j(\delta_{jm} - p_m)$, so
#    $ds_m = \sum_j dp_j\, p_j (\delta_{jm} - p_m) = p_m \big(dp_m - \sum_j dp_j p_j\big)$.
#    For all rows at once:
#
#    $$
#    dS = P \odot \big(dP - \mathrm{rowsum}(dP \odot P)\big).
#    $$
#
#    This is the vector-Jacobian product of chapter 2: we never build the $T \times T$
#    Jacobian of each row. If a row of $P$ is nearly one-hot, then for every $m$ one of the
#    two factors is close to 0: $p_m$ for the keys that get no weight, and
#    $dp_m - \sum_j dp_j p_j \approx dp_m - dp_m$ for the one that gets it all. That is the
#    saturation we measured above.
# 3. **Through $S = QK^T/\sqrt{d_k}$**, another matrix product:
#
#    $$
#    dQ = \frac{dS\, K}{\sqrt{d_k}}, \qquad dK = \frac{dS^T Q}{\sqrt{d_k}}.
#    $$
#
# The mask needs no special treatment: masked entries of $P$ are exactly 0, so step 2 gives them
# $dS = 0$, which is right because a constant score has no gradient. That is why the backward
# function does not take the mask. It takes the `weights` that the forward pass returned, so
# nothing is recomputed.

# %% tags=["export"]
def scaled_dot_product_attention_backward(
    grad_out: np.ndarray, Q: np.ndarray, K: np.ndarray, V: np.ndarray,
    weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``scaled_dot_product_attention`` with respect to Q, K and V.

    Parameters
    ----------
    grad_out : array, shape (..., T_q, d_v)
        dL/d(out), the gradient of the loss with respect to the attention output.
    Q, K, V : arrays, shapes (..., T_q, d_k), (..., T_k, d_k), (..., T_k, d_v)
        The inputs of the forward pass.
    weights : array, shape (..., T_q, T_k)
        The weights returned by the forward pass. Masked keys hold exactly 0, so no
        mask is needed here: their score gradients come out as 0.

    Returns
    -------
    dQ, dK, dV : arrays with the shapes of Q, K and V.
    """
    d_k = Q.shape[-1]
    dV = weights.swapaxes(-1, -2) @ grad_out       # P^T dO            (..., T_k, d_v)
    dP = grad_out @ V.swapaxes(-1, -2)             # dO V^T            (..., T_q, T_k)
    dS = weights * (dP - row_sum(dP * weights))    # softmax backward  (..., T_q, T_k)
    dS /= np.sqrt(d_k).astype(dS.dtype)            # through the 1/sqrt(d_k)
    dQ = dS @ K                                    # (..., T_q, d_k)
    dK = dS.swapaxes(-1, -2) @ Q                   # (..., T_k, d_k)
    return dQ, dK, dV


# %% [markdown]
# ### Gradient check
#
# The proof is numerical. In float64, take a random upstream gradient $G$ and the scalar
# $L = \sum O \odot G$, whose gradient with respect to $O$ is exactly $G$. Then compare the
# backward pass with central differences of $L$ for every entry of $Q$, $K$ and $V$, using
# `numerical_gradient` and `relative_error` from chapter 2. The batch has padding, so the
# masked path is checked too.

# %%
from transformer_lib.layers import numerical_gradient, relative_error

rng = np.random.default_rng(2)
Q64, K64 = rng.normal(size=(2, B, H, T, d_k))        # float64
V64 = rng.normal(size=(B, H, T, d_v))
G = rng.normal(size=(B, H, T, d_v))                  # random upstream gradient dL/dO


def loss():
    return float((scaled_dot_product_attention(Q64, K64, V64, mask)[0] * G).sum())


out64, weights64 = scaled_dot_product_attention(Q64, K64, V64, mask)
dQ, dK, dV = scaled_dot_product_attention_backward(G, Q64, K64, V64, weights64)
for name, analytic, x in (("Q", dQ, Q64), ("K", dK, K64), ("V", dV, V64)):
    error = relative_error(analytic, numerical_gradient(loss, x))
    assert error <= 1e-6, f"gradient of {name} is wrong: relative error {error:.1e}"
    assert error < 1e-8, f"gradient of {name}: relative error {error:.1e}, not < 1e-8"
    print(f"d{name}: relative error < 1e-08")

# padding keys get exactly 0 weight in float64 too, and no gradient at all
assert (weights64[1, :, :, -1] == 0.0).all()
assert (dK[1, :, -1] == 0).all() and (dV[1, :, -1] == 0).all()

# the check can fail: forgetting the 1/sqrt(d_k) in the backward pass
# makes dQ twice too large
wrong_error = relative_error(dQ * np.sqrt(d_k), numerical_gradient(loss, Q64))
print(f"dQ without the 1/sqrt(d_k): relative error {wrong_error:.1e}")
assert wrong_error > 0.1

# %% [markdown]
# What is left of a correct gradient is the rounding noise of central differences with
# `eps = 1e-6` in float64, below $10^{-8}$ (its digits differ from one machine to the next,
# so, as in chapter 2, the notebook prints the bound). A wrong formula gives errors many orders
# of magnitude larger, like the $0.33$ of a forgotten $1/\sqrt{d_k}$ (a gradient twice too
# large: $\|2a - a\| / \|3a\| = 1/3$), which the mathematics determines. The gradients of
# padding keys are exactly zero, as the derivation predicted.

# %% [markdown]
# ## Multi-head attention
#
# One head gives each query one distribution over the keys: it can look up a position *or*
# compare digits, not both. **Multi-head attention** runs $H$ heads side by side, each with its
# own projections into a smaller space of $d_k = d_\text{model} / H$ dimensions, so $H$ heads
# cost about as much as one big head:
#
# $$
# \mathrm{head}_h = \mathrm{Attention}\big(x W_q^{(h)} + b_q^{(h)},\;
# x W_k^{(h)},\; x W_v^{(h)} + b_v^{(h)}\big),
# $$
#
# $$
# \mathrm{MHA}(x) = [\mathrm{head}_1 \,|\, \cdots \,|\, \mathrm{head}_H]\, W_o + b_o .
# $$
#
# This is *self*-attention: queries, keys and values all come from the same input $x$, shape
# `(B, T, D)` with $D = d_\text{model}$. The output has the same shape as the input, which is
# what lets chapter 4 add it back to $x$ (the residual connection, `x = norm1(x + attention(x))`).
#
# ### The heads without a loop
#
# Stack the per-head matrices side by side and $W_q = [W_q^{(1)} | \cdots | W_q^{(H)}]$ is one
# ordinary $D \times D$ `Linear`: head $h$ owns columns $h d_k$ to $(h+1) d_k$. One matmul
# computes all heads' queries, and a reshape and a transpose move the heads to a batch axis:
#
# ```text
# x @ W_q + b_q           (B, T, D)            D = H * d_k features per position
#   .reshape(B, T, H, d_k) (B, T, H, d_k)      split the features into H chunks of d_k
#   .transpose(0, 2, 1, 3) (B, H, T, d_k)      heads become a batch axis, like B
# attention                (B, H, T, d_k)      batched over all B*H (example, head) pairs
#   .transpose(0, 2, 1, 3) (B, T, H, d_k)
#   .reshape(B, T, D)      (B, T, D)           = [head_1 | ... | head_H] concatenated
# @ W_o + b_o              (B, T, D)
# ```
#
# A reshape never moves data: it only reinterprets it, so the last axis of length $D$ is read as
# $H$ consecutive chunks of $d_k$. On a tiny array of feature numbers:

# %%
B_demo, T_demo, H_demo, dk_demo = 1, 2, 3, 2
D_demo = H_demo * dk_demo
features = np.arange(T_demo * D_demo).reshape(B_demo, T_demo, D_demo)      # (B, T, D)
heads = features.reshape(B_demo, T_demo, H_demo, dk_demo).transpose(0, 2, 1, 3)
print("x, (B, T, D) = (1, 2, 6):\n", features[0])
for h in range(H_demo):                                         # heads: (B, H, T, d_k)
    print(f"head {h}, (T, d_k) = (2, 2):\n", heads[0, h])
    # head h holds feature columns h*d_k ... (h+1)*d_k - 1 of every position
    assert (heads[0, h] == features[0, :, h * dk_demo:(h + 1) * dk_demo]).all()
# the inverse transpose and reshape concatenate the heads again
back = heads.transpose(0, 2, 1, 3).reshape(B_demo, T_demo, D_demo)
assert (back == features).all()

# %% [markdown]
# ### One matmul for $Q$, $K$ and $V$
#
# The three projections read the same $x$, so they can share one matmul: concatenate the weights
# into $[W_q | W_k | W_v]$, shape $(D, 3D)$, and compute all of $Q$, $K$, $V$ for all heads and
# all positions with a single `(B*T, D) @ (D, 3D)`. The result reshapes to `(B, T, 3, H, d_k)`
# and one transpose to `(3, B, H, T, d_k)` hands out $Q$, $K$ and $V$ already split into heads.
# The backward pass mirrors it: one matmul gives the weight gradients of all three projections,
# one more the gradient for $x$. Fewer, larger matmuls matter in NumPy, where each call has a
# fixed overhead and our arrays are small. The price: `W_q`, `W_k` and `W_v` are `Linear`
# layers whose own `forward` and `backward` the layer never calls (both docstrings say so), so
# below we check the fused matmul against them and the whole layer by its gradient check.
#
# ### Why $W_k$ has no bias
#
# A bias on the keys, $k_j = x_j W_k + b_k$, adds the same amount to every score in a row:
#
# $$
# q_i \cdot k_j = q_i \cdot (x_j W_k) + \underbrace{q_i \cdot b_k}_{\text{same for every } j} .
# $$
#
# The softmax is shift-invariant, $\mathrm{softmax}(s + c) = \mathrm{softmax}(s)$, so the weights,
# and the output, do not depend on $b_k$ at all. Its gradient is exactly zero (the rows of $dS$
# sum to zero), so it would be a parameter that never learns. We leave it out. The query bias is
# different: $(q_i + b_q) \cdot k_j$ adds $b_q \cdot k_j$, which *does* depend on $j$. Both claims
# are checked below with numbers.
#
# ### The layer
#
# `forward` caches what `backward` needs (only in training mode, as every module does) and keeps
# the attention weights `(B, H, T, T)` of the last call in `attn_weights`, in eval mode too, for
# the plots of chapter 6. Bad input gets a `ValueError` that says what is wrong.

# %% tags=["export"]
class MultiHeadAttention(Module):
    """Multi-head self-attention: ``num_heads`` dot-product attentions side by side.

    ``out = [head_1 | ... | head_H] @ W_o + b_o`` with
    ``head_h = attention(x W_q^h + b_q^h, x W_k^h, x W_v^h + b_v^h)``.

    Parameters
    ----------
    d_model : int
        Width ``D`` of the input and output; must be divisible by ``num_heads``.
    num_heads : int
        Number of heads ``H``; each works in ``d_k = d_model // num_heads`` dimensions.
    rng : numpy.random.Generator, optional
        Initialises the projections (default ``np.random.default_rng(0)``).
    dtype : numpy float dtype
        Parameter dtype (float32 by default).

    Attributes
    ----------
    W_q, W_k, W_v, W_o : Linear(d_model, d_model)
        The projections. ``W_k`` has no bias: a key bias shifts all scores of a row by
        the same amount, which the softmax ignores, so it would never change the output
        or receive a gradient. ``W_o`` runs through ``Linear``'s forward and backward;
        ``W_q``, ``W_k``, ``W_v`` do not: ``forward`` concatenates their weights into
        one (D, 3D) matmul and ``backward`` writes their gradients itself (chapter 2's
        ``Linear`` says so too).
    attn_weights : array, shape (B, H, T, T), or None
        Attention weights of the last forward pass (in eval mode too), for plots.
    """

    def __init__(self, d_model: int, num_heads: int,
                 rng: np.random.Generator | None = None,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE):
        if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by "
                             f"num_heads={num_heads}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.d_model, self.num_heads = d_model, num_heads
        self.d_k = d_model // num_heads
        self.W_q = Linear(d_model, d_model, rng, dtype=dtype)
        # no key bias: the softmax ignores it (it shifts a whole row of scores)
        self.W_k = Linear(d_model, d_model, rng, bias=False, dtype=dtype)
        self.W_v = Linear(d_model, d_model, rng, dtype=dtype)
        self.W_o = Linear(d_model, d_model, rng, dtype=dtype)
        self.attn_weights = None          # (B, H, T, T) of the last forward, for plots
        self._cache = None

    def forward(self, x: np.ndarray, mask: np.ndarray | None = None,
                cache=None) -> np.ndarray:
        """Self-attention over the positions of ``x``.

        Parameters
        ----------
        x : array, shape (B, T, d_model)
        mask : bool array, shape (B, T) or (B or 1, H or 1, T, T_k), optional
            (B, T): True for real tokens, False for padding; padding keys get zero
            weight. 4-D: True where query i may look at key j (causal, chapter 8).
        cache : optional, chapter 8's ``KVCache`` for this layer
            Its ``append(K, V)`` stores the new keys and values (B, H, T, d_k) and
            returns all of them so far, (B, H, T_k, d_k): the queries of ``x`` then
            attend to earlier positions too (incremental decoding, eval mode only).

        Returns
        -------
        array, shape (B, T, d_model)
        """
        x = np.asarray(x)
        if x.ndim != 3:
            hint = ("; for a single sequence add a batch axis, x[None]"
                    if x.ndim == 2 else "")
            raise ValueError(f"MultiHeadAttention expects x of shape (B, T, d_model), "
                             f"got a {x.ndim}-D array of shape {x.shape}{hint}")
        B, T, D = x.shape
        if D != self.d_model:
            raise ValueError(f"x has last dimension {D} but d_model is {self.d_model}")
        if mask is not None and np.ndim(mask) != 4 and np.shape(mask) != (B, T):
            raise ValueError(f"mask has shape {np.shape(mask)} but x has batch {B} and "
                             f"length {T}; expected a (B, T) mask, "
                             "True for real tokens")
        if cache is not None and self.training:
            raise RuntimeError("a KV cache is for generation: call .eval() first "
                               "(backward cannot reach the cached keys)")
        H, d_k = self.num_heads, self.d_k
        # Q, K and V in one matmul: [W_q | W_k | W_v] is (D, 3D); the key bias is zero
        W = np.concatenate([self.W_q.W.data, self.W_k.W.data, self.W_v.W.data], axis=1)
        b_k = np.zeros_like(self.W_q.b.data)
        b = np.concatenate([self.W_q.b.data, b_k, self.W_v.b.data])     # (3D,)
        qkv = x.reshape(B * T, D) @ W                                   # (B*T, 3D)
        qkv += b                                      # in place: no second (B*T, 3D)
        # split into Q, K, V and heads; the transpose is a view, no copy
        # (B, H, T, d_k)
        Q, K, V = qkv.reshape(B, T, 3, H, d_k).transpose(2, 0, 3, 1, 4)
        if cache is not None:       # keys and values of earlier positions too
            K, V = cache.append(K, V)                             # (B, H, T_k, d_k)
        # one batched attention over all B*H (example, head) pairs
        heads, weights = scaled_dot_product_attention(Q, K, V, mask)    # (B, H, T, d_k)
        concat = heads.transpose(0, 2, 1, 3).reshape(B, T, D)           # (B, T, D)
        self.attn_weights = weights                                   # (B, H, T, T_k)
        if self.training:
            self._cache = (x, Q, K, V, weights)
        return self.W_o(concat)                                         # (B, T, D)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Accumulate the projections' gradients; return dL/dx, (B, T, d_model)."""
        x, Q, K, V, weights = self._check_cache(self._cache)
        B, T, D = x.shape
        H, d_k = self.num_heads, self.d_k
        d_concat = self.W_o.backward(grad_out)                          # (B, T, D)
        d_heads = d_concat.reshape(B, T, H, d_k).transpose(0, 2, 1, 3)  # (B, H, T, d_k)
        dQ, dK, dV = scaled_dot_product_attention_backward(d_heads, Q, K, V, weights)
        # undo the split: 3 x (B, H, T, d_k) -> (B, T, 3, H, d_k) -> (B*T, 3D), written
        # in one copy (np.stack and then a transposed reshape would copy twice)
        d_qkv = np.empty((B, T, 3, H, d_k), dtype=dQ.dtype)
        for i, d in enumerate((dQ, dK, dV)):
            d_qkv[:, :, i] = d.transpose(0, 2, 1, 3)                    # (B, T, H, d_k)
        d_qkv = d_qkv.reshape(B * T, 3 * D)
        x2 = x.reshape(B * T, D)
        dW = x2.T @ d_qkv             # (D, 3D): the three weight gradients at once
        db = d_qkv.sum(axis=0)        # (3D,); its K part sums to 0 (no key bias)
        for i, lin in enumerate((self.W_q, self.W_k, self.W_v)):
            lin.W.grad += dW[:, i * D:(i + 1) * D]
            if lin.b is not None:
                lin.b.grad += db[i * D:(i + 1) * D]
        W = np.concatenate([self.W_q.W.data, self.W_k.W.data, self.W_v.W.data], axis=1)
        return (d_qkv @ W.T).reshape(B, T, D)                 # (B, T, D)


# %% [markdown]
# ## Checking multi-head attention
#
# A layer with $d_\text{model} = 16$ and 4 heads, on a batch of two sequences of different
# length. The inputs are random vectors, including at the padding positions, so that any leak
# from padding would show.

# %%
d_model, num_heads = 16, 4
mha = MultiHeadAttention(d_model, num_heads, rng=np.random.default_rng(3))
for name, p in mha.named_parameters():
    print(f"{name:6} {p.shape}")

rng = np.random.default_rng(4)
x = rng.normal(size=(B, T, d_model)).astype(np.float32)   # (B, T, D), padding included
y = mha(x, mask)

assert y.shape == x.shape and y.dtype == np.float32      # output shape = input shape
assert mha.attn_weights.shape == (B, num_heads, T, T)
assert [name for name, _ in mha.named_parameters()] == \
    ["W_q.W", "W_q.b", "W_k.W", "W_v.W", "W_v.b", "W_o.W", "W_o.b"]   # no W_k.b
assert np.allclose(mha.attn_weights.sum(axis=-1), 1.0)   # rows sum to 1 over real keys
assert (mha.attn_weights[1, :, :, ~mask[1]] == 0.0).all()   # padding keys: exactly 0

# %% [markdown]
# **The fused matmul equals three separate projections.** `W_q`, `W_k` and `W_v` are ordinary
# `Linear` layers, so we can also apply them one by one and compare with the $Q$, $K$, $V$
# the layer cached. They agree to float32 rounding. Whether they also agree bit for bit
# depends on how your BLAS library splits the two matrix products into blocks, so that is not
# what we test.

# %%
mha.train()
mha(x, mask)
_, Q_fused, K_fused, V_fused, _ = mha._cache                     # each (B, H, T, d_k)


def split_heads(t):
    """(B, T, D) -> (B, H, T, d_k)"""
    return t.reshape(B, T, num_heads, d_model // num_heads).transpose(0, 2, 1, 3)


projections = (("Q", Q_fused, mha.W_q), ("K", K_fused, mha.W_k),
               ("V", V_fused, mha.W_v))
for name, fused, lin in projections:
    separate = split_heads(lin(x))                               # (B, H, T, d_k)
    assert np.allclose(fused, separate, rtol=1e-5, atol=1e-6)
    print(f"{name}: fused and separate agree to float32 rounding "
          "(rtol 1e-5, atol 1e-6)")

# %% [markdown]
# **A slow, obvious reference.** The vectorised layer is fast but dense. Here is the same
# computation written the way the formula reads, with explicit loops over examples, heads, and
# query positions, each head's columns sliced out of the projection matrices by hand. It also
# takes an optional key bias, which the real layer does not have. Masked keys get a true
# $-\infty$ here.

# %%
def reference_attention(mha, x, mask=None, key_bias=None):
    """Multi-head self-attention with Python loops: slow but obvious. (B, T, D) -> same.
    """
    B, T, D = x.shape
    d_k = mha.d_k
    out = np.zeros((B, T, D))
    for b in range(B):                                           # each example
        real = np.ones(T, dtype=bool) if mask is None else mask[b]
        heads = []
        for h in range(mha.num_heads):                           # each head
            cols = slice(h * d_k, (h + 1) * d_k)                 # this head's columns
            q = x[b] @ mha.W_q.W.data[:, cols] + mha.W_q.b.data[cols]     # (T, d_k)
            k = x[b] @ mha.W_k.W.data[:, cols]                            # (T, d_k)
            if key_bias is not None:
                k = k + key_bias[cols]
            v = x[b] @ mha.W_v.W.data[:, cols] + mha.W_v.b.data[cols]     # (T, d_k)
            head = np.zeros((T, d_k))
            for i in range(T):                                   # each query
                scores = np.array([q[i] @ k[j] / np.sqrt(d_k) if real[j] else -np.inf
                                   for j in range(T)])
                p = np.exp(scores - scores.max())
                p /= p.sum()
                head[i] = p @ v                         # weighted average of values
            heads.append(head)
        out[b] = np.concatenate(heads, axis=1) @ mha.W_o.W.data + mha.W_o.b.data
    return out


# the same parameters (same seed), in float64
mha64 = MultiHeadAttention(d_model, num_heads, np.random.default_rng(3)).to(np.float64)
x64 = x.astype(np.float64)
y_fast = mha64(x64, mask)
y_slow = reference_attention(mha64, x64, mask)
assert np.abs(y_fast - y_slow).max() < 1e-12
print("vectorised vs loops: largest difference < 1e-12")
# and the float32 layer agrees to float32 precision
assert np.allclose(mha(x, mask), y_slow, rtol=1e-4, atol=1e-5)

# %% [markdown]
# **A key bias changes nothing.** Run the reference with a large random key bias: the output is
# the same to the last few bits. And its gradient would be the sum of $dK$ over the key positions,
# which the backward pass shows is zero: each row of $dS$ sums to zero, because
# $\sum_m p_m (dp_m - \sum_j dp_j p_j) = 0$.

# %%
key_bias = 5 * np.random.default_rng(5).normal(size=d_model)
y_biased = reference_attention(mha64, x64, mask, key_bias=key_bias)
assert np.abs(y_biased - y_slow).max() < 1e-12
print("with a key bias: largest change of the output < 1e-12")

# a query bias, by contrast, does change the output
mha_q = MultiHeadAttention(d_model, num_heads, np.random.default_rng(3)).to(np.float64)
mha_q.W_q.b.data[:] = key_bias
print(f"with the same vector as query bias: largest change "
      f"{np.abs(mha_q(x64, mask) - y_slow).max():.1e}")
assert not np.allclose(mha_q(x64, mask), y_slow, atol=1e-3)

# the gradient a key bias would receive: dK summed over the key positions, per head
mha64.train()
mha64(x64, mask)
_, Q_c, K_c, V_c, W_c = mha64._cache
dQ_c, dK_c, dV_c = scaled_dot_product_attention_backward(
    np.random.default_rng(6).normal(size=Q_c.shape), Q_c, K_c, V_c, W_c)
assert np.abs(dK_c.sum(axis=-2)).max() < 1e-12
print("largest |sum over keys of dK| < 1e-12   "
      f"(typical |dK|: {np.abs(dK_c).mean():.1e})")

# %% [markdown]
# **Padding changes nothing at the real positions.** Run the same two sequences again, padded to
# length 10 instead of 7, with fresh random vectors at all the padding positions. The outputs at
# the real positions must be the same as before. (Only equal up to rounding: with more columns
# of zero weight, NumPy's matmul may add the same numbers in a different order.)

# %%
T_long = 10
# new random padding, same first 7 positions
x_long = rng.normal(size=(B, T_long, d_model)).astype(np.float32)
x_long[:, :T] = x
mask_long = np.zeros((B, T_long), dtype=bool)
mask_long[:, :T] = mask
y_long = mha(x_long, mask_long)

real = mask  # (B, T) real positions
assert np.allclose(y_long[:, :T][real], y[real], rtol=1e-5, atol=1e-6)
print(f"outputs at the {real.sum()} real positions, padded to {T} vs {T_long}: "
      "equal to float32 rounding")
print("    (rtol 1e-5, atol 1e-6)")
# the same in float64, where rounding is half a billion times (2**29) smaller
y64_long = mha64(x_long.astype(np.float64), mask_long)
y64 = mha64(x64, mask)
assert np.allclose(y64_long[:, :T][real], y64[real], rtol=1e-12, atol=1e-12)

# without the mask, padding would leak into the real positions
leak = np.abs(mha(x_long, None)[:, :T][real] - y[real]).max()
print(f"the same without a mask: largest difference {leak:.1e}")
assert leak > 1e-2

# %% [markdown]
# **Clear errors.** The most likely mistakes are a missing batch axis, the wrong width, and a
# mask from a different batch:

# %%
show_error(lambda: mha(x[0]), ValueError,
           "expects x of shape (B, T, d_model), got a 2-D array of shape (7, 16); "
           "for a single sequence add a batch axis, x[None]")
show_error(lambda: mha(x[..., :8]), ValueError,
           "x has last dimension 8 but d_model is 16")
show_error(lambda: mha(np.zeros((2, 6, d_model)), mask[:, :5]),
           ValueError, "mask has shape (2, 5) but x has batch 2 and length 6")
show_error(lambda: MultiHeadAttention(16, 3),
           ValueError, "d_model=16 is not divisible by num_heads=3")

# %% [markdown]
# ### Gradient check of the layer
#
# `gradient_check` from chapter 2 perturbs the input and every entry of every parameter, in
# float64, against a random upstream gradient. A small layer keeps it quick: $d_\text{model} = 8$,
# 2 heads, a batch of 2 padded sequences of length 5.

# %%
from transformer_lib.layers import gradient_check

small = MultiHeadAttention(8, 2, rng=np.random.default_rng(7)).to(np.float64)
x_small = np.random.default_rng(8).normal(size=(2, 5, 8))
mask_small = np.array([[True] * 5, [True] * 3 + [False] * 2])
errors = gradient_check(small, x_small, mask=mask_small, seed=9)
for name, error in errors.items():
    assert error < 1e-8, f"{name}: relative error {error:.1e}, not < 1e-8"
    print(f"{name:6} relative error < 1e-08")
assert list(errors) == ["input", "W_q.W", "W_q.b", "W_k.W", "W_v.W", "W_v.b",
                        "W_o.W", "W_o.b"]
assert max(errors.values()) <= 1e-6, errors

# %% [markdown]
# Every gradient matches to better than $10^{-8}$. As for every module, `backward` *accumulates*
# into `.grad` (a second call without `zero_grad()` adds the same amount again):

# %%
small.zero_grad()
small(x_small, mask_small)
G_small = np.random.default_rng(10).normal(size=x_small.shape)
small.backward(G_small)
once = {name: p.grad.copy() for name, p in small.named_parameters()}
small.backward(G_small)
assert all(np.allclose(p.grad, 2 * once[name]) for name, p in small.named_parameters())

# %% [markdown]
# ## What an untrained layer looks at
#
# We run a *random, untrained* layer ($d_\text{model} = 16$, 4 heads) on a batch of two puzzles
# of different length, `Max(5, 3, 9)` and `Second(7, 1, 4, 2)`, as the model of chapter 4 will
# see them: token embeddings plus positional encodings. The heatmap shows the weights of the
# first, shorter puzzle, padded by one `[PAD]` to the 8 tokens of the second. Rows are queries,
# columns are keys; each row sums to 1. The `[PAD]` column is exactly zero in every head. Its
# row is not: a padding query still attends to the real tokens, but nothing reads its output.
#
# Untrained, the heads attend in arbitrary patterns: some rows are broad, others fix on one
# token for no reason related to the puzzle. (Exact zeros are printed as `0`, weights that are
# merely small as `.00`.) What a *trained* model attends to, and whether it learns the lookups
# built by hand above, is chapter 6.

# %%
import matplotlib.pyplot as plt
from transformer_lib.data import VOCAB_SIZE
from transformer_lib.layers import Embedding, PositionalEncoding

texts = ["Max(5, 3, 9)", "Second(7, 1, 4, 2)"]
ids, mask = pad_sequences([encode(t) for t in texts])                # (2, 8)
rng = np.random.default_rng(11)
embed = Embedding(VOCAB_SIZE, 16, rng)
attention = MultiHeadAttention(16, 4, rng).eval()
attention(PositionalEncoding(16)(embed(ids)), mask)
weights = attention.attn_weights                                     # (B, H, T, T)
tokens = [ID_TO_TOKEN[i] for i in ids[0]]
print(" ".join(tokens))
assert " ".join(tokens) == "Max ( 5 3 9 ) [EOS] [PAD]"
assert (weights[0, :, :, -1] == 0.0).all() and np.allclose(weights.sum(axis=-1), 1.0)
assert mask.sum(axis=1).tolist() == [7, 8]     # one [PAD] in the first puzzle
assert (weights[0, :, -1, :-1] > 0).all()      # the [PAD] query's row is not 0

fig, axes = plt.subplots(2, 2, figsize=(10, 9.5), constrained_layout=True)
for h, ax in enumerate(axes.flat):
    image = ax.imshow(weights[0, h], cmap="viridis", vmin=0, vmax=weights[0].max())
    for i in range(len(tokens)):
        for j in range(len(tokens)):
            value = weights[0, h, i, j]
            label = f"{value:.2f}".lstrip("0") if value else "0"    # exact zeros: "0"
            color = "white" if value < 0.6 * weights[0].max() else "black"
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90)
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_xlabel("key (looked at)")
    ax.set_ylabel("query (looking)")
    ax.set_title(f"head {h}")
fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
fig.suptitle("UNTRAINED random layer: attention weights on "
             "'Max ( 5 3 9 ) [EOS] [PAD]'\n"
             "(the padding key column is exactly 0 in every head)")
plt.show()

# %% [markdown]
# ## How much the vectorisation buys
#
# The reference implementation and the layer compute the same thing. On a batch the size used
# in training (32 puzzles of 7 tokens, $d_\text{model} = 64$, 4 heads), the loops cost this
# much more (timings vary from machine to machine, so they are printed, not tested):

# %%
# NBVAL_IGNORE_OUTPUT
import timeit

bench = MultiHeadAttention(64, 4, rng=np.random.default_rng(12)).eval()
x_bench = np.random.default_rng(13).normal(size=(32, 7, 64)).astype(np.float32)
assert x_bench.shape[1] == len(encode("Max(5, 3, 9)"))  # 3 arguments, as in training
fast = min(timeit.repeat(lambda: bench(x_bench), number=20, repeat=5)) / 20
slow = min(timeit.repeat(lambda: reference_attention(bench, x_bench),
                         number=1, repeat=2))
print(f"vectorised {fast * 1e6:7.0f} µs per batch\n"
      f"loops      {slow * 1e6:7.0f} µs per batch  ({slow / fast:.0f}x slower)")

# %% [markdown]
# ## Summary
#
# - Attention lets every position take a data-dependent weighted average of the values at all
#   positions: $\mathrm{softmax}(QK^T/\sqrt{d_k})V$. By choosing $Q$ and $K$ it can look up a
#   position (`First`, `Second`, `Last`) or compare contents (`Max`, `Min`).
# - Dividing by $\sqrt{d_k}$ keeps the scores at variance 1; without it the softmax starts out
#   saturated and passes about four times less gradient.
# - Padding keys get the score `NEG_INF = -1e9`, hence exactly zero weight: outputs at real
#   positions do not depend on padding.
# - Backward: $dV = P^T dO$, $dP = dO\,V^T$, $dS = P \odot (dP - \mathrm{rowsum}(dP \odot P))$,
#   $dQ = dS\,K/\sqrt{d_k}$, $dK = dS^T Q/\sqrt{d_k}$, confirmed to better than $10^{-8}$
#   by numerical gradients.
# - `MultiHeadAttention` computes $Q$, $K$, $V$ with one matmul, splits heads by reshape and
#   transpose, and uses batched matmuls: no Python loop over heads or examples. It matches a
#   loop-by-loop reference. $W_k$ has no bias, because a key bias cannot change the output.
#
# Chapter 4 wraps this layer with a feed-forward network, residual connections and layer norm
# into a transformer block.

# %% [markdown]
# ## Exercises
#
# **Exercise 1 (causal mask).** Language models such as GPT may not look ahead: query $i$ may
# only attend to keys $j \le i$. Write `causal_attention(Q, K, V)` for `(..., T, d_k)` arrays
# and show that (a) the weights above the diagonal are exactly 0, (b) the first position only
# attends to itself, and (c) changing the last position's key and value leaves all other outputs
# unchanged.

# %% tags=["hide-cell"]
def causal_attention(Q, K, V):
    """Attention where query i sees only keys j <= i. Q, K, V: (..., T, d)."""
    T = Q.shape[-2]
    allowed = np.tril(np.ones((T, T), dtype=bool))        # (T, T): True where j <= i
    scores = Q @ K.swapaxes(-1, -2) / np.sqrt(Q.shape[-1])       # (..., T, T)
    scores = np.where(allowed, scores, NEG_INF)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ V, weights


rng = np.random.default_rng(20)
Qc, Kc, Vc = rng.normal(size=(3, 2, 6, 4))                       # (B, T, d_k) each
out_c, P_c = causal_attention(Qc, Kc, Vc)
above = np.triu(np.ones((6, 6), dtype=bool), k=1)               # j > i
assert (P_c[:, above] == 0).all()                                 # (a)
assert (P_c[:, 0, 0] == 1).all()                                  # (b)
Kc2, Vc2 = Kc.copy(), Vc.copy()
Kc2[:, -1], Vc2[:, -1] = rng.normal(size=(2, 2, 4))              # change the future
out_c2, _ = causal_attention(Qc, Kc2, Vc2)
assert np.allclose(out_c2[:, :-1], out_c[:, :-1])                # (c) the past: same
assert not np.allclose(out_c2[:, -1], out_c[:, -1])              #     the last: changed
print(np.round(P_c[0], 2))

# %% [markdown]
# **Exercise 2 (attention does not know positions).** Permute the positions of the input (and
# of the mask) of a `MultiHeadAttention` layer. Show that the output is permuted the same way:
# attention is *permutation-equivariant*. Then show the consequence for our puzzles: without
# positional encodings, the `[EOS]` output for `First ( 5 3 9 )` and `First ( 9 3 5 )` is
# identical, so a model built from such layers could not get both right. Chapter 7 trains the
# model without positional encoding and measures exactly this.

# %% tags=["hide-cell"]
layer = MultiHeadAttention(16, 4, rng=np.random.default_rng(21)).to(np.float64)
x_p = np.random.default_rng(22).normal(size=(2, 7, 16))
mask_p = np.array([[True] * 7, [True] * 5 + [False] * 2])
perm = np.random.default_rng(23).permutation(7)
# permute the input, or permute the output: the same
assert np.allclose(layer(x_p[:, perm], mask_p[:, perm]), layer(x_p, mask_p)[:, perm])

embed = Embedding(VOCAB_SIZE, 16, np.random.default_rng(24)).to(np.float64)
ids_p, mask_p = pad_sequences([encode("First(5, 3, 9)"), encode("First(9, 3, 5)")])
y_p = layer(embed(ids_p), mask_p)                        # no positional encoding
assert np.abs(y_p[0, -1] - y_p[1, -1]).max() < 1e-12    # [EOS]: same set of tokens
y_pe = layer(PositionalEncoding(16).to(np.float64)(embed(ids_p)), mask_p)
assert not np.allclose(y_pe[0, -1], y_pe[1, -1])         # positions tell them apart
print("[EOS] outputs differ by less than 1e-12 without and by "
      f"{np.abs(y_pe[0, -1] - y_pe[1, -1]).max():.1e} with positional encoding")

# %% [markdown]
# **Exercise 3 (the value bias is redundant too).** Unlike a key bias, the value bias $b_v$ does
# change the output and does receive a gradient. Yet it adds nothing a layer without it could not
# do: show that a layer with $b_v$ computes exactly the same as one with $b_v = 0$ and output
# bias $b_o + b_v W_o$. (Hint: each row of attention weights sums to 1.)

# %% tags=["hide-cell"]
x_v = np.random.default_rng(28).normal(size=(2, 7, 16))
mask_v = np.array([[True] * 7, [True] * 4 + [False] * 3])
with_bv = MultiHeadAttention(16, 4, rng=np.random.default_rng(25)).to(np.float64)
with_bv.W_v.b.data[:] = np.random.default_rng(26).normal(size=16)
with_bv.W_o.b.data[:] = np.random.default_rng(27).normal(size=16)
folded = MultiHeadAttention(16, 4, rng=np.random.default_rng(25)).to(np.float64)
folded.W_v.b.data[:] = 0
# sum_j P_ij (v_j + b_v) = sum_j P_ij v_j + b_v, and b_v W_o moves into the output bias
folded.W_o.b.data[:] = with_bv.W_o.b.data + with_bv.W_v.b.data @ with_bv.W_o.W.data
assert np.allclose(with_bv(x_v, mask_v), folded(x_v, mask_v), rtol=1e-12, atol=1e-12)
print("b_v folded into b_o: same output")
