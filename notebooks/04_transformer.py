# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. The transformer
#
# Chapter 2 built the layers and chapter 3 built multi-head attention. This chapter puts them
# together into the model that chapter 5 trains: token ids go in, and one answer comes out per
# sequence, as a score (a *logit*) for each of the 20 tokens.
#
# **In this chapter** you will
#
# - see the whole model as one picture, with the shape of the data at every step;
# - build the position-wise **feed-forward network** and the **transformer block**, post-norm
#   as in the 2017 paper: `x = norm1(x + attention(x))`, then `x = norm2(x + ffn(x))`;
# - learn why **residual connections** let the gradient through, and check it by switching the
#   sub-layers off;
# - choose how the model turns a sequence into **one answer** (the *read-out*);
# - count the **parameters** line by line;
# - prove the model right with a testing checklist: every shape, a non-zero,
#   finite gradient for every parameter, a gradient check of the whole model, and padding
#   that changes nothing.
#
# Cells marked `export` become the module `transformer_lib.transformer`.

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.patches import FancyBboxPatch

from transformer_lib.data import (ID_TO_TOKEN, PAD_ID, VOCAB_SIZE, create_batch, encode,
                                  generate_example)
from transformer_lib.data import show_error  # chapter 1: assert an error and print it
from transformer_lib.layers import LayerNorm, gradient_check


# %% [markdown]
# ## The model at a glance
#
# A batch holds $B$ sequences of $T$ token ids (chapter 1 pads them to the same length and
# gives a mask that is `True` for real tokens). The model
#
# 1. looks up a vector of $D$ = `d_model` numbers for every token (the **embedding**) and adds
#    the sinusoidal **positional encoding**, so that the same digit in different places looks
#    different;
# 2. passes the $(B, T, D)$ array through $N$ = `num_layers` **transformer blocks**. Each block
#    lets every position look at every real position (multi-head attention), then transforms
#    each position on its own (the feed-forward network). Each of the two *sub-layers* is
#    wrapped in a residual connection and a layer normalisation: "Add & Norm";
# 3. **reads out** one vector per sequence, $(B, D)$;
# 4. projects it to one logit per vocabulary token, $(B, V)$. The largest logit is the answer.
#
# The picture shows the data flow; the numbers on the right are the shapes. (In the book, the
# code that draws it is behind a toggle.)

# %% tags=["hide-input"]
def draw_architecture():
    fig, ax = plt.subplots(figsize=(8, 9.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 12)
    ax.axis("off")
    cx, w, h = 5.0, 5.6, 0.62

    def box(y, text, color):
        ax.add_patch(FancyBboxPatch((cx - w / 2, y - h / 2), w, h,
                                    boxstyle="round,pad=0.05", facecolor=color,
                                    edgecolor="black"))
        ax.text(cx, y, text, ha="center", va="center", fontsize=10)

    def arrow(y_from, y_to, shape=None):
        ax.annotate("", xy=(cx, y_to + h / 2 + 0.05),
                    xytext=(cx, y_from - h / 2 - 0.05),
                    arrowprops=dict(arrowstyle="-|>", color="black"))
        if shape:
            ax.text(cx + 0.15, (y_from + y_to) / 2, shape, ha="left", va="center",
                    fontsize=9, color="tab:blue", family="monospace")

    def residual(y_start, y_add):
        """Skip path: from just above a sub-layer, around it on the left, into its
        Add & Norm."""
        left = cx - w / 2 - 0.55
        ax.plot([cx, left, left], [y_start, y_start, y_add], color="tab:red", lw=1.5)
        ax.annotate("", xy=(cx - w / 2 - 0.05, y_add), xytext=(left, y_add),
                    arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.5))

    ys = dict(ids=11.4, emb=10.3, pos=9.2, att=7.9, add1=6.8, ffn=5.7, add2=4.6,
              read=3.0, out=1.9, logits=0.8)
    box(ys["ids"], "token ids  (from create_batch, with mask)", "#eeeeee")
    box(ys["emb"], "Embedding: one row of a (V, D) table per token", "#cfe2f3")
    box(ys["pos"], "+ positional encoding  (sin/cos, no parameters)", "#cfe2f3")
    box(ys["att"], "multi-head self-attention  (mask: [PAD] keys ignored)", "#fde9c9")
    box(ys["add1"], "Add & Norm:  x = norm1(x + attention(x))", "#d9ead3")
    box(ys["ffn"], "FeedForward:  D -> d_ff -> D, each position alone", "#fde9c9")
    box(ys["add2"], "Add & Norm:  x = norm2(x + ffn(x))", "#d9ead3")
    box(ys["read"], "read-out: hidden state at [EOS] ('eos') or mean ('mean')",
        "#ead1dc")
    box(ys["out"], "output Linear:  D -> V", "#cfe2f3")
    box(ys["logits"], "logits: one score per vocabulary token", "#eeeeee")
    arrow(ys["ids"], ys["emb"], "(B, T)")
    arrow(ys["emb"], ys["pos"], "(B, T, D)")
    arrow(ys["pos"], ys["att"], "(B, T, D)")
    arrow(ys["att"], ys["add1"], "(B, T, D)")
    arrow(ys["add1"], ys["ffn"], "(B, T, D)")
    arrow(ys["ffn"], ys["add2"], "(B, T, D)")
    arrow(ys["add2"], ys["read"], "(B, T, D)")
    arrow(ys["read"], ys["out"], "(B, D)")
    arrow(ys["out"], ys["logits"], "(B, V)")
    residual((ys["pos"] + ys["att"]) / 2, ys["add1"])
    residual((ys["add1"] + ys["ffn"]) / 2, ys["add2"])
    # the block: a dashed frame around attention ... norm2
    top, bottom = (ys["pos"] + ys["att"]) / 2 + 0.12, ys["add2"] - h / 2 - 0.2
    ax.add_patch(FancyBboxPatch((cx - w / 2 - 0.9, bottom), w + 1.3, top - bottom,
                                boxstyle="round,pad=0.05", fill=False, linestyle="--",
                                edgecolor="gray"))
    ax.text(cx + w / 2 + 0.65, (top + bottom) / 2,
            "TransformerBlock\n× num_layers\n(post-norm)",
            ha="left", va="center", fontsize=10, color="dimgray")
    ax.text(cx - w / 2 - 0.65, (ys["att"] + ys["add1"]) / 2, "residual", rotation=90,
            ha="right", va="center", fontsize=9, color="tab:red")
    ax.set_title("The transformer of this book: B sequences of T tokens -> B answers",
                 fontsize=12)
    fig.tight_layout()
    plt.show()


draw_architecture()

# %% [markdown]
# The names match the code: the model has `embedding`, `pos_encoding`, a list `blocks` and
# `output`; each block has `attention`, `norm1`, `ffn` and `norm2`. The symbols are those of the
# paper: $B$ batch size, $T$ sequence length, $D$ = `d_model`, $d_{ff}$ = `d_ff`, $V$ =
# `vocab_size`.
#
# **Post-norm.** The normalisation comes *after* the residual sum, as in the original paper
# ("Attention Is All You Need", 2017; its "Add & Norm"). Many recent
# models use *pre-norm*, `x = x + attention(norm1(x))`, which keeps a clean path from the output
# back to the embedding and trains very deep stacks more easily (Xiong et al., "On Layer
# Normalization in the Transformer Architecture", 2020). This book uses post-norm throughout;
# the first exercise builds a pre-norm block for comparison.

# %% [markdown]
# ## The feed-forward network
#
# Attention moves information *between* positions, but every output of attention is a weighted
# average of value vectors, and the values are linear functions of the inputs. The feed-forward
# network (FFN) adds computation at each position: the same two-layer perceptron with a ReLU
# is applied to every position separately,
#
# $$\mathrm{FFN}(x) = \max(0,\; x W_1 + b_1)\, W_2 + b_2,
# \qquad W_1 \in \mathbb{R}^{D \times d_{ff}},\; W_2 \in \mathbb{R}^{d_{ff} \times D}.$$
#
# It widens each position's vector from $D$ to $d_{ff}$ (the paper, and this book, use
# $d_{ff} = 4D$), applies the ReLU, and narrows it back to $D$, so its output can be added to its
# input. There is nothing new to derive for the backward pass: it is the chain rule through the
# three layers of chapter 2 in reverse order, `linear2` → `relu` → `linear1`, each of which
# already knows its own backward (and accumulates its parameters' gradients).

# %% tags=["export"]
import numpy as np
import numpy.typing as npt

from transformer_lib.attention import MultiHeadAttention
from transformer_lib.data import PAD_ID
from transformer_lib.layers import (DEFAULT_DTYPE, Embedding, LayerNorm, Linear, Module,
                                    PositionalEncoding, ReLU)

# how Transformer turns (B, T, D) into one vector per sequence
READOUTS = ("eos", "mean")

# %% tags=["export"]
class FeedForward(Module):
    """Position-wise feed-forward network, ``linear2(relu(linear1(x)))``.

    ``FFN(x) = max(0, x W_1 + b_1) W_2 + b_2``, applied to every position on its own.

    Parameters
    ----------
    d_model : int
        Width D of the input and of the output.
    d_ff : int
        Width of the hidden layer (the paper uses ``4 * d_model``).
    rng : numpy.random.Generator, optional
        Source of the initial weights (default ``np.random.default_rng(0)``).
    dtype : numpy float dtype
        float32 by default.
    """

    def __init__(self, d_model: int, d_ff: int, rng: np.random.Generator | None = None,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        # W_1 (D, d_ff), b_1 (d_ff,)
        self.linear1 = Linear(d_model, d_ff, rng, dtype=dtype)
        self.relu = ReLU()
        # W_2 (d_ff, D), b_2 (D,)
        self.linear2 = Linear(d_ff, d_model, rng, dtype=dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., D) -> (..., D)."""
        h = self.relu(self.linear1(x))        # (..., d_ff)
        return self.linear2(h)                # (..., D)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out (..., D) -> gradient for x (..., D); accumulates into the four
        parameters."""
        g = self.linear2.backward(grad_out)   # (..., d_ff)
        g = self.relu.backward(g)             # (..., d_ff), zero where the ReLU was off
        return self.linear1.backward(g)       # (..., D)


# %% [markdown]
# Three checks: the shapes go $D \to d_{ff} \to D$; the FFN really works on each position alone
# (running it on one position gives the same numbers as running it on the whole batch); and
# its backward pass agrees with central differences (chapter 2's `gradient_check`, float64, a
# random upstream gradient, every parameter and the input).

# %%
ffn = FeedForward(d_model=16, d_ff=32, rng=np.random.default_rng(1))
x = np.random.default_rng(2).normal(size=(3, 5, 16)).astype(np.float32)     # (B, T, D)
hidden = ffn.relu(ffn.linear1(x))
print("x", x.shape, "-> hidden", hidden.shape, "-> out", ffn(x).shape)
assert hidden.shape == (3, 5, 32) and ffn(x).shape == x.shape

# position-wise: position t alone gives the same output as position t inside the batch
for t in range(5):
    np.testing.assert_allclose(ffn(x[:, t:t + 1])[:, 0], ffn(x)[:, t],
                               rtol=1e-6, atol=1e-6)

ffn64 = FeedForward(16, 32, rng=np.random.default_rng(1)).to(np.float64)
errors = gradient_check(ffn64, x.astype(np.float64))
for name, err in errors.items():
    assert err < 1e-8, f"{name}: relative error {err:.1e}, not < 1e-8"
    print(f"  {name:10} relative error < 1e-08")
assert set(errors) == {"input", "linear1.W", "linear1.b", "linear2.W", "linear2.b"}
assert max(errors.values()) <= 1e-6

# %% [markdown]
# ## The transformer block
#
# A block is two sub-layers, each inside the same wrapper, "Add & Norm":
#
# $$x \leftarrow \mathrm{LayerNorm}_1\big(x + \mathrm{Attention}(x)\big), \qquad
#   x \leftarrow \mathrm{LayerNorm}_2\big(x + \mathrm{FFN}(x)\big).$$
#
# **Why the "Add".** A sub-layer does not replace its input; it adds a correction to it. That is
# easy to learn (a sub-layer that outputs zeros leaves the input as it is) and, more importantly,
# it is easy for the gradient. Write $y = x + f(x)$ and let $g = \partial L / \partial y$ be the
# gradient arriving from above. By the chain rule
#
# $$\frac{\partial L}{\partial x} = g + J_f(x)^{\top} g ,$$
#
# where $J_f$ is the Jacobian of the sub-layer. The first term does not depend on $f$ at all: even
# if $f$ is badly initialised, or its weights are tiny, the gradient $g$ still reaches the layers
# below. Without the residual connection only $J_f^{\top} g$ arrives, and the gradient at the
# embedding is a product of one Jacobian per sub-layer with no identity term: if any one factor
# is (nearly) zero, so is everything below it.
#
# **Why the "Norm".** Adding vectors makes them grow; `LayerNorm` (chapter 2) rescales each
# position's vector to mean 0 and variance 1 (then applies the learned `gamma` and `beta`) so that
# every block sees inputs of the same size.
#
# **Backward, step by step.** The forward pass is four steps, so the backward pass is the same
# four steps in reverse, each one a `backward` we already have:
#
# 1. through `norm2`: $g \leftarrow \mathrm{norm2.backward}(g)$;
# 2. through the FFN residual: $g \leftarrow g + \mathrm{ffn.backward}(g)$ (the identity path plus
#    the sub-layer path, the formula above);
# 3. through `norm1`: $g \leftarrow \mathrm{norm1.backward}(g)$;
# 4. through the attention residual: $g \leftarrow g + \mathrm{attention.backward}(g)$.
#
# The mask goes only to attention: it is the one place where positions meet, and the only place
# where padding could leak into real tokens.
#
# **The ablation flags.** `residual=False` drops the "Add" (`x = norm1(attention(x))`) and
# `layer_norm=False` drops the "Norm" (`x = x + attention(x)`, and the block has no `norm1`,
# `norm2`). They are off the normal path and exist so that chapter 7 can measure what each
# ingredient is worth; everything below uses the defaults unless it says otherwise.

# %% tags=["export"]
class TransformerBlock(Module):
    """One post-norm transformer block (the 2017 paper's order, its "Add & Norm").

    ``x = norm1(x + attention(x, mask))`` then ``x = norm2(x + ffn(x))``.

    Parameters
    ----------
    d_model : int
        Width D of every position's vector.
    num_heads : int
        Number of attention heads; must divide ``d_model``.
    d_ff : int
        Hidden width of the feed-forward network.
    rng : numpy.random.Generator, optional
        Source of the initial weights (default ``np.random.default_rng(0)``).
    residual : bool
        Keep the residual connections (default). ``False`` is an ablation for chapter 7:
        ``x = norm1(attention(x))``, ``x = norm2(ffn(x))``.
    layer_norm : bool
        Keep the layer normalisations (default). ``False`` is an ablation for chapter 7:
        ``x = x + attention(x)``, ``x = x + ffn(x)``, and ``norm1``/``norm2`` are
        ``None``.
    dtype : numpy float dtype
        float32 by default.
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int,
                 rng: np.random.Generator | None = None, residual: bool = True,
                 layer_norm: bool = True, dtype: npt.DTypeLike = DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        self.residual, self.layer_norm = residual, layer_norm
        self.attention = MultiHeadAttention(d_model, num_heads, rng, dtype=dtype)
        self.norm1 = LayerNorm(d_model, dtype=dtype) if layer_norm else None
        self.ffn = FeedForward(d_model, d_ff, rng, dtype=dtype)
        self.norm2 = LayerNorm(d_model, dtype=dtype) if layer_norm else None

    def forward(self, x: np.ndarray, mask: np.ndarray | None = None,
                cache=None) -> np.ndarray:
        """x (B, T, D), mask (B, T) True for real tokens -> (B, T, D).

        ``mask`` and ``cache`` go to the attention as they are (chapter 8 passes a
        causal mask and a KV cache)."""
        a = self.attention(x, mask, cache)    # (B, T, D): positions look at each other
        x = x + a if self.residual else a     # Add
        if self.norm1 is not None:
            x = self.norm1(x)                 # Norm
        f = self.ffn(x)                       # (B, T, D): each position on its own
        x = x + f if self.residual else f     # Add
        return self.norm2(x) if self.norm2 is not None else x   # Norm

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out (B, T, D) -> gradient for x (B, T, D); accumulates into every
        parameter."""
        g = self.norm2.backward(grad_out) if self.norm2 is not None else grad_out
        g_ffn = self.ffn.backward(g)
        # residual: the gradient also flows around the FFN
        g = g + g_ffn if self.residual else g_ffn
        if self.norm1 is not None:
            g = self.norm1.backward(g)
        g_att = self.attention.backward(g)
        return g + g_att if self.residual else g_att   # ... and around attention


# %% [markdown]
# The block keeps the shape, and its hand-written backward agrees with central differences for
# the input and for all 15 parameters. The mask comes from a real padded batch, so the check also
# covers the masking in attention. As in chapters 2 and 3, what remains of a correct gradient is
# rounding noise, printed as the bound it stays below. For a block, and later for the whole
# model, that bound is $10^{-7}$: the largest errors come too close to $10^{-8}$ for that
# bound to hold on every machine.

# %%
examples = [generate_example(np.random.default_rng(s), num_args=k)
            for s, k in zip(range(3), (3, 2, 4))]
small_batch = create_batch(examples)  # lengths 7, 6 and 8: two rows are padded
assert not small_batch.mask.all()

block = TransformerBlock(16, 4, 32, rng=np.random.default_rng(3)).to(np.float64)
x = np.random.default_rng(4).normal(size=(*small_batch.ids.shape, 16))  # (B, T, D)
assert block(x, small_batch.mask).shape == x.shape

errors = gradient_check(block, x, mask=small_batch.mask)
print("\n".join(f"{ex.text:22} mask {m.astype(int)}"
                for ex, m in zip(examples, small_batch.mask)))
print(f"{len(errors)} gradients checked, every relative error < 1e-07")
assert len(errors) == 1 + 15 and max(errors.values()) <= 1e-6
assert max(errors.values()) < 1e-7, errors

# %% [markdown]
# ### Do the residual connections work?
#
# We verify it with a test that isolates the residual path: set the output
# weights of both sub-layers to zero (`W_o` of attention and `linear2` of the FFN, weights and
# biases). Both sub-layers now output exactly zero, so the block computes
# `norm2(norm1(x + 0) + 0)`: its output and its input gradient must be those of the two layer
# norms alone, and the gradient must still be far from zero. Without residual connections
# the same block computes `norm2(norm1(0) + 0)`, a constant, and must pass back *exactly* zero.

# %%
def zero_sublayers(block: TransformerBlock) -> None:
    """Make both sub-layers output exactly 0 by zeroing their output projections."""
    for layer in (block.attention.W_o, block.ffn.linear2):
        layer.W.data[...] = 0
        layer.b.data[...] = 0


g = np.random.default_rng(5).normal(size=x.shape)  # an upstream gradient (B, T, D)
# same init: gamma 1, beta 0
norms_only = [LayerNorm(16).to(np.float64), LayerNorm(16).to(np.float64)]
expected_out = norms_only[1](norms_only[0](x))
expected_grad = norms_only[0].backward(norms_only[1].backward(g))

for residual in (True, False):
    blk = TransformerBlock(16, 4, 32, rng=np.random.default_rng(3),
                           residual=residual).to(np.float64)
    zero_sublayers(blk)
    out = blk(x, small_batch.mask)
    grad_in = blk.backward(g)
    print(f"residual={residual!s:5}  |gradient reaching the block's input| = "
          f"{np.linalg.norm(grad_in):.3f}")
    if residual:
        np.testing.assert_allclose(out, expected_out, atol=1e-12)
        np.testing.assert_allclose(grad_in, expected_grad, atol=1e-12)
        assert np.linalg.norm(grad_in) > 1.0
    else:
        assert np.all(grad_in == 0)

# %% [markdown]
# With the residual connections, a block whose sub-layers contribute nothing is still a good
# conductor of gradient: exactly the two layer norms' gradient comes through. Without them, the
# gradient stops dead. (We will repeat this test on the whole model below, looking at the
# gradient that reaches the embedding.)

# %% [markdown]
# ## Reading out one answer per sequence
#
# After the blocks there is one $D$-vector per *position*, $(B, T, D)$, but each puzzle has one
# answer. Something has to turn $T$ vectors into one. `Transformer` offers two documented
# options, chosen with `readout=`:
#
# - **`"eos"` (the default): the hidden state at the last real token.** Every input ends in
#   `[EOS]`, so this is the vector of the `[EOS]` position. In every block that position attends
#   to all the real tokens, so it can gather whatever the answer needs, like the `[CLS]` token
#   of BERT, which is read out for classification in the same way. For `Second ( 5 3 9 )` the
#   `[EOS]` query can learn to attend to the fourth token and copy its value; for `Max` it can
#   attend to the largest digit. The answer is *routed* to one place by attention, and only that
#   place is read.
# - **`"mean"`: the average of the hidden states of the real tokens** (padding excluded). This
#   is simple and uses every position, but it mixes the answer with everything else: the
#   vectors of `(`, `)`, the operation and the other digits are averaged in too, so the answer
#   has to survive an average of seven vectors, or every position has to learn to carry it.
#
# Both are differentiable and cheap, and both can be trained. We make `"eos"` the default
# because it lets attention do the job it is good at; chapter 7 measures the difference instead
# of us guessing it here.
#
# In formulas, both read-outs are a weighted sum over positions,
# $\;h_b = \sum_t r_{bt}\, x_{bt}$, with read-out weights $r_{bt}$ that are one-hot at the last
# real token (`"eos"`) or $1/n_b$ on each of the $n_b$ real tokens (`"mean"`), and 0 on padding
# in both cases. So the backward pass is just as simple: position $t$ receives
# $r_{bt}\, \partial L/\partial h_b$.

# %% [markdown]
# The position of the last real token is the one `"eos"` reads. It is computed once, here, and
# used by the model, by the walk-through below and by chapter 6's attention plots. It finds the
# last `True` of each mask row, so it does not assume right padding.

# %% tags=["export"]
def readout_positions(mask: npt.ArrayLike) -> np.ndarray:
    """(B,) int array: the index of the last True of each row of a (B, T) mask, the
    position the ``"eos"`` read-out reads (the ``[EOS]`` of every encoded input)."""
    mask = np.asarray(mask, dtype=bool)                    # (B, T)
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


# %% [markdown]
# ## The whole model
#
# `Transformer` chains everything. Its `forward(ids, mask)` takes a $(B, T)$ array of token ids
# and the mask (if you leave the mask out, it is `ids != PAD_ID`), and returns logits $(B, V)$.
# Its `backward(grad_logits)` runs everything in reverse and stops at the embedding: the ids
# are integers, so there is no gradient for the input, and the positional encoding is a
# constant that passes the gradient through unchanged.
#
# The model checks its input before using it, because NumPy would not: a negative id silently
# indexes the embedding table from the end, and a mask of the wrong shape might broadcast.
# Each mistake gets a `ValueError` that says what is wrong and where.
#
# The third ablation flag lives here: `positional=False` leaves out the positional encoding
# (for chapter 7). `residual` and `layer_norm` are passed on to every block, and `.config`
# records all the arguments except `dtype`, so that a saved model can be rebuilt (chapter 5).

# %% tags=["export"]
class Transformer(Module):
    """Encoder-only transformer that answers each sequence with one token.

    ids (B, T) -> embedding + positional encoding (B, T, D) -> ``num_layers`` post-norm
    blocks (B, T, D) -> read-out (B, D) -> output projection -> logits (B, V).

    Parameters
    ----------
    vocab_size : int
        V, the number of tokens (20 for the book's language).
    d_model : int
        D, the width of every position's vector.
    num_heads : int
        Attention heads per block; must divide ``d_model``.
    num_layers : int
        N, the number of transformer blocks.
    d_ff : int
        Hidden width of each block's feed-forward network.
    max_len : int
        Longest sequence the positional encoding (and the model) accepts.
    readout : {"eos", "mean"}
        How a sequence becomes one vector: ``"eos"`` takes the hidden state at the last
        real token (the ``[EOS]`` of every encoded input), ``"mean"`` averages the real
        tokens.
    positional : bool
        Add the sinusoidal positional encoding (default). ``False`` is an ablation
        (chapter 7).
    residual : bool
        Residual connections in every block (default). ``False`` is an ablation
        (chapter 7).
    layer_norm : bool
        Layer normalisation in every block (default). ``False`` is an ablation
        (chapter 7).
    seed : int
        Seed of the initial weights: the same seed gives the same model.
    dtype : numpy float dtype
        float32 by default; use ``model.to(np.float64)`` for gradient checks.

    Attributes
    ----------
    embedding, pos_encoding, blocks, output
        The layers; ``pos_encoding`` is ``None`` when ``positional=False``.
    config : dict
        The constructor arguments (except dtype), enough to rebuild the model.
    """

    def __init__(self, vocab_size: int = 20, d_model: int = 64, num_heads: int = 4,
                 num_layers: int = 2, d_ff: int = 256, max_len: int = 64,
                 readout: str = "eos", positional: bool = True, residual: bool = True,
                 layer_norm: bool = True, seed: int = 0,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE):
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
        self.config = dict(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
                           num_layers=num_layers, d_ff=d_ff, max_len=max_len,
                           readout=readout, positional=positional, residual=residual,
                           layer_norm=layer_norm, seed=seed)
        rng = np.random.default_rng(seed)
        self.embedding = Embedding(vocab_size, d_model, rng, dtype=dtype)  # W (V, D)
        self.pos_encoding = (PositionalEncoding(d_model, max_len, dtype=dtype)
                             if positional else None)
        self.blocks = [TransformerBlock(d_model, num_heads, d_ff, rng, residual,
                                        layer_norm, dtype=dtype)
                       for _ in range(num_layers)]
        self.output = Linear(d_model, vocab_size, rng, dtype=dtype)  # W (D, V), b (V,)
        self.readout = readout
        self._cache = None

    def _check_inputs(self, ids, mask) -> tuple[np.ndarray, np.ndarray]:
        """Validate ids (B, T) and mask (B, T); return them as an int array and a bool
        array."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            hint = "; for a single sequence use ids[None]" if ids.ndim == 1 else ""
            raise ValueError("ids must be a 2-D array (B, T) of token ids, "
                             f"got shape {ids.shape}{hint}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"ids is empty (shape {ids.shape}): "
                             "a batch needs at least one token per sequence")
        V, max_len = self.config["vocab_size"], self.config["max_len"]
        if ids.shape[1] > max_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_len "
                             f"{max_len}; build the model with a larger max_len")
        if ids.min() < 0 or ids.max() >= V:
            b, t = np.argwhere((ids < 0) | (ids >= V))[0]
            raise ValueError(f"token id {ids[b, t]} at position ({b}, {t}) "
                             f"(sequence {b}, token {t}) is out of range 0–{V - 1} "
                             f"(vocab_size={V})")
        if mask is None:
            mask = ids != PAD_ID
        else:
            mask = np.asarray(mask)
            if mask.shape != ids.shape:
                raise ValueError(f"mask shape {mask.shape} does not match ids shape "
                                 f"{ids.shape}")
            mask = mask.astype(bool, copy=False)
        empty = ~mask.any(axis=1)
        if empty.any():
            raise ValueError(f"sequence {np.flatnonzero(empty)[0]} has no real tokens "
                             "(its mask row is all False); every sequence needs "
                             "at least its [EOS]")
        return ids, mask

    def forward(self, ids: npt.ArrayLike, mask: npt.ArrayLike | None = None,
                attn_mask: dict | None = None) -> np.ndarray:
        """Logits for the answer of every sequence.

        Parameters
        ----------
        ids : int array, shape (B, T)
            Token ids, right-padded with ``PAD_ID`` (as ``create_batch`` makes them).
        mask : bool array, shape (B, T), optional
            True for real tokens; default ``ids != PAD_ID``.
        attn_mask : {layer index (from 0): bool array}, optional
            Arrays that broadcast to (B, H, T, T), True where query t may attend to key
            s in that layer, on top of the padding mask (chapter 6 cuts attention edges
            with it). Layers not named use the padding mask alone.

        Returns
        -------
        logits : array, shape (B, V)
            One score per vocabulary token; the answer is the argmax.

        Raises
        ------
        ValueError
            If ids are not a 2-D integer array, an id is outside ``0..V-1`` (naming it
            and its position), the sequences are longer than ``max_len``, the mask's
            shape differs from the ids', a sequence has no real token, or
            ``attn_mask`` names a layer the model does not have.
        """
        ids, mask = self._check_inputs(ids, mask)     # (B, T) int, (B, T) bool
        attn_mask = {} if attn_mask is None else attn_mask
        unknown = sorted(set(attn_mask) - set(range(len(self.blocks))))
        if unknown:
            raise ValueError(f"attn_mask names layer {unknown[0]}, but the model has "
                             f"layers 0..{len(self.blocks) - 1}")
        x = self.embedding(ids)                       # (B, T, D)
        if self.pos_encoding is not None:
            # (B, T, D) + sin/cos of the position
            x = self.pos_encoding(x)
        for layer, block in enumerate(self.blocks):
            if layer in attn_mask:                    # (B, H, T, T): padding & edges
                x = block(x, mask[:, None, None, :] & attn_mask[layer])
            else:
                x = block(x, mask)                    # (B, T, D)
        B, T, D = x.shape
        if self.readout == "eos":                     # the last real token ([EOS])
            last = readout_positions(mask)            # (B,)
            pooled = x[np.arange(B), last]            # (B, D)
            cache = (x.shape, last)
        else:                                         # the mean over real tokens
            # (B, T), rows sum to 1
            w = (mask / mask.sum(axis=1, keepdims=True)).astype(x.dtype)
            pooled = np.einsum("btd,bt->bd", x, w)    # (B, D)
            cache = (x.shape, w)
        if self.training:
            self._cache = cache
        return self.output(pooled)                    # (B, V)

    def backward(self, grad_logits: np.ndarray) -> None:
        """Backpropagate grad_logits (B, V) down to the embedding, accumulating every
        ``.grad``.

        Returns None: the input ids are integers and have no gradient.
        """
        shape, r = self._check_cache(self._cache)
        B, T, D = shape
        expected = (B, self.output.W.data.shape[1])   # (B, V): the output layer's width
        if grad_logits.shape != expected:
            raise ValueError(f"grad_logits has shape {grad_logits.shape}, but the last "
                             f"forward produced logits of shape {expected}")
        g_pooled = self.output.backward(grad_logits)  # (B, D)
        if self.readout == "eos":
            # (B, T, D): only the read-out position receives gradient
            g = np.zeros(shape, dtype=g_pooled.dtype)
            g[np.arange(B), r] = g_pooled
        else:
            g = r[:, :, None] * g_pooled[:, None, :]  # (B, T, D): w[b, t] * g_pooled[b]
        for block in reversed(self.blocks):
            g = block.backward(g)                     # (B, T, D)
        # the positional encoding is a constant: the gradient passes through
        self.embedding.backward(g)
        return None


# %% [markdown]
# ### Following the shapes
#
# The shape after each stage should be (B, T) → (B, T, D) → … → (B, V). The cell below walks a real batch through the
# reference model (`d_model=64`, 4 heads, 2 blocks, `d_ff=256`) one sub-layer at a time, writes
# down every intermediate shape, and translates it back into symbols. Then it checks that the
# walk computed exactly what `model(ids, mask)` computes, so the table describes the real
# forward pass and not a retelling of it.

# %%
model = Transformer()  # the reference configuration
batch = create_batch([generate_example(np.random.default_rng(s), num_args=k)
                      for s, k in zip(range(4), (3, 2, 5, 4))])  # B = 4, T = 9 (padded)
ids, mask = batch.ids, batch.mask
B, T = ids.shape
D, F, V = model.config["d_model"], model.config["d_ff"], model.config["vocab_size"]
# .config holds every constructor argument except dtype
assert set(model.config) == set(inspect.signature(Transformer).parameters) - {"dtype"}
symbol = {B: "B", T: "T", D: "D", F: "d_ff", V: "V"}
assert len(symbol) == 5, ("choose B and T different from D, d_ff and V so the symbols "
                          "are unambiguous")

rows = [("ids", ids.shape)]
x = model.embedding(ids)
rows.append(("embedding", x.shape))
x = model.pos_encoding(x)
rows.append(("+ positional encoding", x.shape))
for i, blk in enumerate(model.blocks):
    a = blk.attention(x, mask)
    rows.append((f"block {i}: attention", a.shape))
    x = blk.norm1(x + a)
    rows.append((f"block {i}: norm1(x + attention)", x.shape))
    hidden = blk.ffn.relu(blk.ffn.linear1(x))
    rows.append((f"block {i}: ffn hidden layer", hidden.shape))
    f = blk.ffn.linear2(hidden)
    rows.append((f"block {i}: ffn", f.shape))
    x = blk.norm2(x + f)
    rows.append((f"block {i}: norm2(x + ffn)", x.shape))
last = readout_positions(mask)  # (B,): the [EOS] of each sequence
pooled = x[np.arange(B), last]
rows.append(("read-out ([EOS] position)", pooled.shape))
logits = model.output(pooled)
rows.append(("output projection = logits", logits.shape))

print(f"{'stage':32} {'shape':14} symbols")
for stage, shape in rows:
    print(f"{stage:32} {str(shape):14} ({', '.join(symbol[n] for n in shape)})")

symbols = [tuple(symbol[n] for n in shape) for _, shape in rows]
per_block = [("B", "T", "D"), ("B", "T", "D"), ("B", "T", "d_ff"), ("B", "T", "D"),
             ("B", "T", "D")]
assert symbols == [("B", "T"), ("B", "T", "D"), ("B", "T", "D"), *per_block, *per_block,
                   ("B", "D"), ("B", "V")]
assert all(ID_TO_TOKEN[i] == "[EOS]" for i in ids[np.arange(B), last])
assert np.array_equal(logits, model(ids, mask))

# %% [markdown]
# ### The read-out, checked
#
# The figure shows the read-out weights $r_{bt}$ of the two options for this batch: which
# positions' final vectors make up each sequence's answer vector. `"eos"` takes exactly one, the
# `[EOS]`; `"mean"` spreads the weight evenly over the real tokens; padding gets nothing in
# either case. Below the figure, both are checked against a direct computation from the final
# hidden states `x` of the walk above.

# %%
r_eos = np.zeros((B, T))
r_eos[np.arange(B), last] = 1.0
r_mean = mask / mask.sum(axis=1, keepdims=True)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), sharey=True)
for ax, r, name in zip(axes, (r_eos, r_mean), ('readout="eos"', 'readout="mean"')):
    im = ax.imshow(r, cmap="Purples", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))
    for b in range(B):
        for t in range(T):
            ax.text(t, b, ID_TO_TOKEN[ids[b, t]].replace("[PAD]", "pad"),
                    ha="center", va="center", fontsize=8,
                    color="white" if r[b, t] > 0.5 else "black")
    ax.set_title(name)
    ax.set_xlabel("position t")
    ax.set_xticks(range(T))
axes[0].set_ylabel("sequence b")
axes[0].set_yticks(range(B))
fig.suptitle("Read-out weight $r_{bt}$ of each position: "
             "which final vectors make up the answer")
fig.colorbar(im, ax=axes, label="weight $r_{bt}$ (square-root scale)", shrink=0.9)
plt.show()

assert np.all(r_eos[~mask] == 0) and np.all(r_mean[~mask] == 0)
assert np.allclose(r_eos.sum(axis=1), 1) and np.allclose(r_mean.sum(axis=1), 1)
model_mean = Transformer(readout="mean")     # same seed, so the same weights as `model`
assert all(np.array_equal(p.data, q.data)
           for p, q in zip(model.parameters(), model_mean.parameters()))
np.testing.assert_allclose(model_mean(ids, mask),
                           model.output(np.einsum("btd,bt->bd", x, r_mean)),
                           rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(model(ids, mask),
                           model.output(np.einsum("btd,bt->bd", x, r_eos)),
                           rtol=1e-5, atol=1e-6)
print("both read-outs equal the weighted sums of the final hidden states")

# %% [markdown]
# ### Cutting attention edges
#
# `forward(ids, mask, attn_mask)` can also remove chosen attention edges in chosen layers, on
# top of the padding mask: `attn_mask[l]` is True where a query may attend to a key in layer
# `l`. Chapter 6 uses it to test which edges the trained model really needs, through this same
# forward pass. A mask that allows everything changes nothing, bit for bit; a cut edge gets
# exactly zero weight.

# %%
allow_all = np.ones((1, 1, T, T), dtype=bool)             # broadcasts to (B, H, T, T)
assert np.array_equal(model(ids, mask, attn_mask={0: allow_all, 1: allow_all}),
                      model(ids, mask))
no_self = ~np.eye(T, dtype=bool)[None, None]        # layer 2: no token looks at itself
logits_cut = model(ids, mask, attn_mask={1: no_self})
w_cut = model.blocks[1].attention.attn_weights            # (B, H, T, T)
assert (np.diagonal(w_cut, axis1=-2, axis2=-1) == 0).all()
assert np.allclose(w_cut.sum(axis=-1), 1)                 # renormalised over the rest
assert not np.allclose(logits_cut, model(ids, mask))
print("allowing every edge changes no bit; a cut edge gets weight exactly 0")

# %% [markdown]
# ### Bad input, clear errors
#
# Each of these mistakes would otherwise fail deep inside NumPy, or worse, not fail at all
# (a negative id is a valid NumPy index; it would quietly read another token's embedding).

# %%
good = encode("Max(5, 3, 9)")
show_error(lambda: model(np.array(good)),
           ValueError, "ids must be a 2-D array (B, T) of token ids, got shape (7,)")
show_error(lambda: model(np.array([good], dtype=float)),
           ValueError, "ids must be integer token ids")
show_error(lambda: model(np.array([good, good[:3] + [25] + good[4:]])), ValueError,
           "token id 25 at position (1, 3) (sequence 1, token 3) is out of range 0–19")
show_error(lambda: model(np.array([[-1] + good[1:]])),
           ValueError, "token id -1 at position (0, 0)")
# what NumPy alone would have done with id -1: silently return the last token's row
W_E = model.embedding.W.data
assert np.array_equal(W_E[np.array([[-1]])][0, 0], W_E[VOCAB_SIZE - 1])
show_error(lambda: model(np.ones((1, 65), dtype=int)),
           ValueError, "sequence length 65 exceeds max_len 64")
show_error(lambda: model(ids, mask[:, :-1]),
           ValueError, "mask shape (4, 8) does not match ids shape (4, 9)")
show_error(lambda: model(np.array([good, [PAD_ID] * 7])),
           ValueError, "sequence 1 has no real tokens")
show_error(lambda: model(ids, mask, attn_mask={2: allow_all}),
           ValueError, "attn_mask names layer 2, but the model has layers 0..1")
show_error(lambda: Transformer(readout="cls"),
           ValueError, "unknown readout 'cls'; choose one of ('eos', 'mean')")
model(ids, mask)  # a training-mode forward of B = 4 sequences
show_error(lambda: model.backward(np.ones((4, 21))), ValueError,
           "grad_logits has shape (4, 21), but the last forward produced logits of "
           "shape (4, 20)")

# %% [markdown]
# ## Counting the parameters
#
# Where do the reference model's parameters live? With $V = 20$, $D = 64$, $d_{ff} = 256$ and two
# blocks:
#
# | part | parameters | count |
# |---|---|---|
# | embedding | $V \times D$ table | $20 \cdot 64 = 1{,}280$ |
# | attention `W_q`, `W_v`, `W_o` | $D \times D$ weight + $D$ bias, each | $3 \cdot (64 \cdot 64 + 64) = 12{,}480$ |
# | attention `W_k` | $D \times D$, no bias (a key bias has zero gradient, chapter 3) | $4{,}096$ |
# | `norm1`, `norm2` | `gamma` and `beta`, $D$ each, per norm | $2 \cdot 2 \cdot 64 = 256$ |
# | FFN `linear1` | $D \times d_{ff}$ + $d_{ff}$ | $64 \cdot 256 + 256 = 16{,}640$ |
# | FFN `linear2` | $d_{ff} \times D$ + $D$ | $256 \cdot 64 + 64 = 16{,}448$ |
# | **one block** | sum of the five lines above | $49{,}920$ |
# | output | $D \times V$ + $V$ | $64 \cdot 20 + 20 = 1{,}300$ |
# | **model** | $1{,}280 + 2 \cdot 49{,}920 + 1{,}300$ | $102{,}420$ |
#
# The positional encoding has no parameters. Two thirds of every block is the FFN, and the
# embedding and output together are under 3%. The formula, written once as code, must equal what
# the model actually holds:

# %% tags=["export"]
def parameters_by_formula(vocab_size: int, d_model: int, num_layers: int,
                          d_ff: int) -> int:
    """Number of parameters of Transformer(...) with residual and layer norms, by
    formula (the table above); ``model.num_parameters()`` counts them."""
    V, D, F = vocab_size, d_model, d_ff
    attention = 3 * (D * D + D) + D * D        # W_q, W_v, W_o with bias; W_k without
    norms = 2 * (2 * D)                        # norm1 and norm2: gamma and beta
    ffn = (D * F + F) + (F * D + D)            # linear1, linear2
    return V * D + num_layers * (attention + norms + ffn) + (D * V + V)


# %%
def print_parameters(model: Transformer) -> None:
    """One line per parameter of the embedding, block 0 and the output; later blocks
    summed."""
    per_block: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks" and parts[1] != "0":
            per_block[f"blocks.{parts[1]}"] = (per_block.get(f"blocks.{parts[1]}", 0)
                                               + p.data.size)
            continue
        print(f"  {name:32} {str(p.data.shape):10} {p.data.size:>8,}")
    for name, n in per_block.items():
        print(f"  {name + '.* (same as blocks.0)':32} {'':10} {n:>8,}")


print_parameters(model)
total = model.num_parameters()
block_total = model.blocks[0].num_parameters()
print(f"  {'total':32} {'':10} {total:>8,}   (one block {block_total:,})")
assert block_total == 49_920 and total == 102_420
ffn_total = model.blocks[0].ffn.num_parameters()
ends = model.embedding.num_parameters() + model.output.num_parameters()
print(f"FFN share of a block {ffn_total / block_total:.1%}; "
      f"embedding + output {ends / total:.1%} of the model")
assert 0.66 < ffn_total / block_total < 0.67 and ends / total < 0.03
assert total == parameters_by_formula(vocab_size=20, d_model=64, num_layers=2,
                                      d_ff=256)
assert model.blocks[0].attention.W_k.b is None

# %% [markdown]
# ## The testing checklist
#
# Our testing checklist: the shape tests are done (the walk-through in "Following the shapes").
# Here come the gradient tests, then padding.
#
# ### Every parameter gets a gradient, and a reasonable one
#
# One forward and backward pass on a real batch of 32 examples, with the gradient of the
# cross-entropy loss, $\partial L/\partial\,\text{logits} = (\mathrm{softmax}(\text{logits}) -
# \text{one-hot}(\text{target}))/B$ (chapter 5 derives it). Every parameter must receive a
# gradient that is finite (no NaN or inf) and not all zero: a parameter whose gradient is zero
# would never learn, which usually means a forgotten `backward` or a broken connection. The
# figure shows the size of each gradient, to check that none vanishes or explodes.

# %%
def loss_gradient(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """d(mean cross-entropy)/d(logits), (B, V)."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(targets)), targets] -= 1.0
    return p / len(targets)


# 32 examples, padded
big_batch = create_batch([generate_example(np.random.default_rng(10 + s), num_args=k)
                          for s, k in enumerate([3] * 28 + [2, 2, 4, 5])])
model = Transformer()
model.zero_grad()
model.backward(loss_gradient(model(big_batch.ids, big_batch.mask), big_batch.targets))

names, grad_norms = [], []
for name, p in model.named_parameters():
    assert np.all(np.isfinite(p.grad)), f"{name} has a NaN or inf gradient"
    assert np.any(p.grad != 0), f"{name} received no gradient"
    names.append(name)
    grad_norms.append(np.linalg.norm(p.grad))
grad_norms = np.array(grad_norms)
print(f"{len(names)} parameters, all with finite, non-zero gradients;")
print(f"    norms from {grad_norms.min():.1e} ({names[grad_norms.argmin()]}) "
      f"to {grad_norms.max():.1e} ({names[grad_norms.argmax()]})")
assert 1e-4 < grad_norms.min() and grad_norms.max() < 10

fig, ax = plt.subplots(figsize=(8, 8))
ax.barh(range(len(names)), grad_norms, color="tab:blue")
ax.set_yticks(range(len(names)), names, fontsize=8)
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlim(1e-2, 10)
ax.set_xlabel("gradient norm ||dL/dp|| (log scale)")
ax.set_title("Gradient of every parameter after one backward pass at initialisation")
fig.tight_layout()
plt.show()

# %% [markdown]
# "Not all zero" is a statement about each parameter array, not each entry, and the exceptions
# inside the embedding table are instructive. A token that is not in the batch gets no
# gradient in its row, naturally; the comma never occurs at all, because `encode` drops it.
# More interesting is `[PAD]`: it occurs in the batch, yet its row gets *exactly* zero. Padding
# keys get zero attention weight and the read-out ignores padded positions, so nothing that
# depends on a padding token's vector ever reaches the loss. The gradient says so with no
# rounding at all.

# %%
W_grad = model.embedding.W.grad                                   # (V, D)
present = np.unique(big_batch.ids[big_batch.mask])
assert PAD_ID in big_batch.ids and PAD_ID not in present
for token_id in range(VOCAB_SIZE):
    has_gradient = bool(np.any(W_grad[token_id] != 0))
    assert has_gradient == (token_id in present), ID_TO_TOKEN[token_id]
zero_rows = [ID_TO_TOKEN[i] for i in range(VOCAB_SIZE) if not np.any(W_grad[i])]
print("embedding rows with exactly zero gradient:", zero_rows)
assert "[PAD]" in zero_rows and "," in zero_rows

# %% [markdown]
# ### Residual connections in the whole model
#
# Now the gradient that reaches the embedding when the blocks' sub-layers are
# zeroed. We zero the output projections of both sub-layers in *every* block, so attention and
# FFN contribute nothing anywhere; the only way from the loss back to the embedding is then
# through the residual connections (and the layer norms). With residuals the embedding still
# receives a clear gradient; without them it receives exactly zero.

# %%
for residual in (True, False):
    m = Transformer(residual=residual)
    for blk in m.blocks:
        zero_sublayers(blk)
    m.zero_grad()
    m.backward(loss_gradient(m(big_batch.ids, big_batch.mask), big_batch.targets))
    emb_grad = np.linalg.norm(m.embedding.W.grad)
    print(f"residual={residual!s:5}  sub-layers zeroed in both blocks:")
    print(f"    |gradient reaching the embedding| = {emb_grad:.3e}")
    if residual:
        assert emb_grad > 1e-3 and np.all(np.isfinite(m.embedding.W.grad))
    else:
        assert emb_grad == 0

# %% [markdown]
# ### The whole-model gradient check
#
# The strongest test of all: the gradient that `backward` computes for every single parameter,
# from the output projection down to the embedding, must agree with central differences of
# the model's output. As for the layers: float64, a random upstream gradient, a relative error
# of at most $10^{-6}$. The batch is three real examples of different lengths (so it contains
# padding), and the model is small (`d_model=16`, 4 heads, `d_ff=32`, 2 layers, about 5,000
# parameters), because each parameter entry costs two forward passes.
#
# We check both read-outs and each ablation flag, since each changes the backward pass. For the
# three ablations the model is half as wide (`d_model=8`, 4 heads, `d_ff=16`, still 2 layers)
# to keep the notebook fast; what the flags change (a missing positional encoding, residual or
# norm) does not depend on the width.

# %%
configs = [                                   # (configuration, bound of its errors)
    (dict(d_model=16, d_ff=32, readout="eos"), 1e-7),
    (dict(d_model=16, d_ff=32, readout="mean"), 1e-7),
    (dict(d_model=8, d_ff=16, positional=False), 1e-7),
    (dict(d_model=8, d_ff=16, residual=False), 1e-6),
    (dict(d_model=8, d_ff=16, layer_norm=False), 1e-7),
]
table = [f"{'configuration':46} {'parameters':>10} {'min |grad|':>10}  "
         "max relative error"]
worst_errors, min_grads = [], {}
for cfg, bound in configs:
    small = (Transformer(num_heads=4, num_layers=2, max_len=16, seed=1, **cfg)
             .to(np.float64))
    errors = gradient_check(small, small_batch.ids, mask=small_batch.mask)
    # every parameter checked
    assert set(errors) == {name for name, _ in small.named_parameters()}
    n_params = small.num_parameters()
    # the smallest gradient (gradient_check leaves the analytic ones in .grad)
    min_grads[str(cfg)] = min(np.linalg.norm(p.grad) for p in small.parameters())
    assert max(errors.values()) < bound, (cfg, errors)
    table.append(f"{str(cfg):46} {n_params:>10,} {min_grads[str(cfg)]:>10.1e}  "
                 f"< {bound:.0e}")
    worst_errors.append(max(errors.values()))
print("\n".join(table))
assert max(worst_errors) <= 1e-6
# without residual connections, the smallest gradient is over 50 times smaller
no_residual = min_grads.pop(str(dict(d_model=8, d_ff=16, residual=False)))
assert no_residual < min(min_grads.values()) / 50

# %% [markdown]
# Each row prints the bound its largest error stays below. Four of the five configurations stay
# below $10^{-7}$, like the single block. For the model without residual connections the bound
# is the tolerance $10^{-6}$ itself: its errors are too large for $10^{-7}$ to hold on every
# machine. The column `min |grad|`, the norm of the smallest parameter gradient, shows why: in
# that model some parameters of the upper block's attention receive a gradient more than fifty
# times smaller than any parameter of the other models. The rounding noise of central
# differences is about the same in every model, so it is a larger fraction of that smaller
# gradient. The backward pass is right; the check is just less precise there.

# %% [markdown]
# ### Padding changes nothing
#
# Chapter 3 showed that padding cannot change attention's outputs at real positions. For the
# whole model the claim is stronger: the logits of a sequence are the same whether it is alone,
# in a batch with longer sequences, or followed by any amount of extra padding. We check it for
# both read-outs, in the default float32, where "the same" means equal up to rounding: another
# batch shape can change the order in which the matrix products add up their numbers.

# %%
for readout in READOUTS:
    m = Transformer(readout=readout, seed=2)
    logits = m(batch.ids, batch.mask)                # (B, V)
    extra = 5                                        # pad every row further
    ids_more = np.pad(batch.ids, ((0, 0), (0, extra)), constant_values=PAD_ID)
    mask_more = np.pad(batch.mask, ((0, 0), (0, extra)), constant_values=False)
    np.testing.assert_allclose(m(ids_more, mask_more), logits, rtol=1e-5, atol=1e-5)
    for b in range(B):                               # each sequence on its own
        alone = batch.ids[b][batch.mask[b]][None]    # (1, n_b), no padding
        np.testing.assert_allclose(m(alone)[0], logits[b], rtol=1e-5, atol=1e-5)
    print(f"readout={readout!r}: same logits with {extra} extra padding tokens and "
          "for each sequence alone,")
    print("    to float32 rounding (rtol = atol = 1e-5)")

# %% [markdown]
# And the mask is what makes this true. If we lie to the model and call the padding real, the
# padded sequences get different logits, with either read-out (the same models as above, one
# per read-out, seed 2);
# the one sequence without padding, the longest, keeps its logits:

# %%
print("sequence lengths:", batch.mask.sum(axis=1))
for readout in READOUTS:
    m = Transformer(readout=readout, seed=2)
    logits = m(batch.ids, batch.mask)                # (B, V), the truth
    lie = m(batch.ids, np.ones_like(batch.mask))     # (B, V), padding called real
    changed = ~np.isclose(lie, logits, rtol=1e-5, atol=1e-5).all(axis=1)
    print(f"readout={readout!r}: logits changed {changed}")
    assert np.array_equal(changed, ~batch.mask.all(axis=1))

# %% [markdown]
# ## Summary
#
# - The model is embedding + positional encoding → `num_layers` post-norm blocks → read-out →
#   output projection: $(B, T) \to (B, T, D) \to \dots \to (B, D) \to (B, V)$, each shape
#   measured on a real batch.
# - A block is `x = norm1(x + attention(x))`, `x = norm2(x + ffn(x))`; the FFN is
#   `linear2(relu(linear1(x)))`, $D \to d_{ff} \to D$, applied to every position alone. Their
#   backward passes are the chain rule over layers we already had.
# - A residual connection passes the gradient $g + J_f^\top g$: with the sub-layers switched off,
#   a clear gradient still reaches the embedding; without residuals, exactly none does.
# - The model answers through the hidden state of `[EOS]` by default (`readout="eos"`), which
#   attention can fill with exactly what the answer needs; `readout="mean"` averages all real
#   tokens instead. Padding gets zero weight in both, and the logits do not depend on padding.
# - The reference model has 102,420 parameters; two thirds of every block is the FFN. The
#   formula matches the model.
# - Every parameter gets a finite, non-zero gradient; the whole model passes the gradient check
#   at $\le 10^{-6}$ for both read-outs and every ablation flag.
#
# Chapter 5 trains this model.

# %% [markdown]
# ## Exercises
#
# **1. A pre-norm block.** Write `PreNormBlock`, a subclass of `TransformerBlock` whose forward
# pass is `x = x + attention(norm1(x))`, then `x = x + ffn(norm2(x))`, with a matching backward
# pass. Gradient-check it. Then zero its sub-layers' output projections as above: what does the
# block compute, and what gradient does it pass back? Why does that help deep stacks?

# %% tags=["hide-cell"]
class PreNormBlock(TransformerBlock):
    """Pre-norm: x = x + attention(norm1(x)); x = x + ffn(norm2(x))."""

    def forward(self, x, mask=None):
        x = x + self.attention(self.norm1(x), mask)           # (B, T, D)
        return x + self.ffn(self.norm2(x))                     # (B, T, D)

    def backward(self, grad_out):
        g = grad_out + self.norm2.backward(self.ffn.backward(grad_out))
        return g + self.norm1.backward(self.attention.backward(g))


pre = PreNormBlock(16, 4, 32, rng=np.random.default_rng(3)).to(np.float64)
x = np.random.default_rng(4).normal(size=(*small_batch.ids.shape, 16))
errors = gradient_check(pre, x, mask=small_batch.mask)
assert max(errors.values()) <= 1e-6 and max(errors.values()) < 1e-7, errors
print("pre-norm block: every relative error < 1e-07")

# With zeroed sub-layers a pre-norm block is the identity, and it passes the gradient
# back unchanged: the residual path from output to input has no layer norm on it at all.
zero_sublayers(pre)
g = np.random.default_rng(5).normal(size=x.shape)
assert np.array_equal(pre(x, small_batch.mask), x)
assert np.array_equal(pre.backward(g), g)
print("zeroed sub-layers: output == input and input gradient == upstream gradient, "
      "exactly")

# %% [markdown]
# **2. Count for a wider model.** Use the parameter table to count, by hand or with
# `parameters_by_formula`, the parameters of `Transformer(d_model=128, d_ff=512)` (other arguments as
# the reference). Check against the model. By what factor did the count grow when the width
# doubled, and why is it close to 4?

# %% tags=["hide-cell"]
wide = Transformer(d_model=128, d_ff=512)
by_hand = 20 * 128 + 2 * (3 * (128 * 128 + 128) + 128 * 128 + 4 * 128
                          + 128 * 512 + 512 + 512 * 128 + 128) + 128 * 20 + 20
n_wide = wide.num_parameters()
print(f"d_model=128: {n_wide:,} parameters, {n_wide / 102_420:.2f} times the reference")
assert n_wide == by_hand == parameters_by_formula(20, 128, 2, 512) == 401_428
# Almost every parameter sits in a D x D or D x d_ff matrix, and d_ff = 4 D, so the
# count is about 12 D^2 per block: doubling D multiplies it by about 4. Only the
# embedding, output and biases grow linearly, which is why the factor is a little
# below 4.
assert 3.8 < n_wide / 102_420 < 4

# %% [markdown]
# **3. What the positions are for.** Build `Transformer(positional=False)` and compare its logits
# for `First ( 5 3 9 )` and `First ( 9 3 5 )`. What do you find, and what does it mean for how
# well such a model can do `First`, `Second` and `Last`? Does the read-out matter? (Chapter 7
# trains this ablation.)

# %% tags=["hide-cell"]
a_b = np.array([encode("First(5, 3, 9)"), encode("First(9, 3, 5)")])
for readout in READOUTS:
    no_pos = Transformer(positional=False, readout=readout)(a_b)
    with_pos = Transformer(positional=True, readout=readout)(a_b)
    np.testing.assert_allclose(no_pos[0], no_pos[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(with_pos[0], with_pos[1], rtol=1e-3, atol=1e-3)
    print(f"readout={readout!r}: without positions the same logits to float32 rounding")
    print("    (rtol = atol = 1e-5); with positions they differ by up to "
          f"{np.abs(with_pos[0] - with_pos[1]).max():.1e}")
# Without positional encoding, attention sees a *set* of tokens: permuting the digits
# permutes the positions' vectors and leaves the [EOS] vector (and the mean) unchanged.
# The two inputs get the same answer although the right answers are 5 and 9, so at most
# one can be right. Order-based operations are out of reach, whatever the read-out; Max
# and Min do not need the order.
