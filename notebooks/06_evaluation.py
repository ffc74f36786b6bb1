# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Evaluation and visualisation
#
# Chapter 5 trained a two-layer transformer until it answered every puzzle correctly. A score
# of 100% says *that* the model works, not *how*. This chapter opens the model up. Every
# figure comes from the real trained model, and every sentence that interprets a figure is
# checked by an `assert` underneath it.
#
# **In this chapter**
#
# - measure the model properly: learning curves, accuracy per operation on the held-out test
#   set and on all 5,000 possible inputs, and confusion matrices;
# - use the model: `predict(model, "Max(5, 3, 9)")` returns `"9"`;
# - look inside: the attention weights of every head in every layer, for single puzzles and
#   averaged over thousands;
# - test hypotheses about what each head does ("it attends to the first argument", "it
#   attends to the largest digit") by measuring them, and test the *causal* story by cutting
#   attention edges and watching what breaks; draw the circuit that survives the test;
# - see whether the model has learned that digits have an order;
# - probe the edges: ties, extreme digits, the inputs the model is least sure of, and inputs
#   it was never trained on (four arguments, a missing bracket).
#
# The reusable pieces (plots, head scores, the knock-out forward pass) are exported to
# `transformer_lib.evaluation`.

# %% [markdown]
# ## The model and the data
#
# `load_or_train_reference()` loads the book's reference model, the file
# `transformer_lib/reference_model.npz` that ships with the package. It was trained once, by
# chapter 5's recipe (seed 0, Adam, 8 epochs), with
# `python -m transformer_lib train --out transformer_lib/reference_model.npz`. Why not train
# it here? Training is deterministic on one machine, but another machine's BLAS kernels and
# SIMD instructions round differently in the last bits, and after 1,000 steps such
# differences can grow into a model whose heads divide the work differently. Every figure and
# number below is about *this* set of weights, the same for every reader; its metadata
# records the training history and the machine it was trained on. It is the configuration of
# chapter 4:
# $d_{model} = 64$, 4 heads of $d_k = 16$, $d_{ff} = 256$, two post-norm blocks
# (`x = norm1(x + attention(x))`, then `x = norm2(x + ffn(x))`), and the answer read at the
# last real token, `[EOS]`.
#
# We evaluate mainly on two sets. The *test split* holds the inputs that training never saw.
# `all_examples()` holds all 5,000 inputs: with three digits and five operations, that is
# the whole language, so accuracy on it is exact, with no sampling noise. Chapter 1's split
# divides exactly these 5,000 inputs, stratified by (operation, answer), into training,
# validation and test inputs, so every input is in exactly one of the three splits.

# %%
import textwrap
from pprint import pprint

import matplotlib.pyplot as plt
import numpy as np

from transformer_lib.data import (EOS_ID, ID_TO_TOKEN, OPERATIONS, TOKEN_TO_ID,
                                  all_examples, create_batch, detokenize, encode,
                                  generate_dataset, pad_sequences)
from transformer_lib.training import default_splits, evaluate, load_or_train_reference
from transformer_lib.transformer import Transformer

model = load_or_train_reference()
history = model.metadata["history"]
train, val, test = default_splits(seed=0)
everything = all_examples()
pprint(model.config, width=88, sort_dicts=False)
print("trained on:", model.metadata["trained_on"].split(", SIMD")[0])  # and SIMD level
print(f"train {len(train):,}   val {len(val):,}   test {len(test):,}   "
      f"all inputs {len(everything):,}")
assert model.config["readout"] == "eos" and len(model.blocks) == 2
assert model.blocks[0].attention.num_heads == 4
assert model.metadata["seed"] == 0 and model.metadata["epochs"] == 8
# the three splits are disjoint and together hold every input once
assert sorted(ex.text for part in (train, val, test) for ex in part) == sorted(
    ex.text for ex in everything)

# %% [markdown]
# ## Learning curves
#
# The training history is stored with the model, in `model.metadata["history"]`: these are
# the curves of the run that produced the shipped weights. Three views of it: the loss of
# every optimisation step, the mean training loss and the validation loss per epoch, and the
# validation accuracy per epoch. The loss axes are logarithmic, because the interesting part
# happens when the loss is already small.
#
# `plot_training_curves` is the first export of this chapter. Like every plotting function
# here it *returns* the figure instead of showing it, so it can be reused, saved, or
# arranged; the notebook cell calls `plt.show()`. The plotting code, here and below, is
# folded away: it draws, it does not compute.

# %% tags=["export"]
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from transformer_lib.data import (ID_TO_TOKEN, OPERATIONS, PAD_ID, TOKEN_TO_ID, Example,
                                  encode, pad_sequences)
from transformer_lib.layers import softmax
from transformer_lib.transformer import Transformer, readout_positions

if TYPE_CHECKING:                # for the annotations; plots import it when they run
    import matplotlib.pyplot as plt

_DIGIT_IDS = np.array([TOKEN_TO_ID[str(d)] for d in range(10)])


def _pyplot():
    """matplotlib is needed for plots only; predict() and the metrics work without it.
    """
    import matplotlib.pyplot as plt
    return plt


# %% tags=["export", "hide-input"]
def plot_training_curves(history: dict) -> "plt.Figure":
    """Step loss, epoch losses and validation accuracy of a training run, from
    ``model.metadata["history"]`` (chapter 5). Returns the matplotlib Figure."""
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.6),
                                        constrained_layout=True)
    epochs, steps = history["epoch"], np.arange(1, len(history["step_loss"]) + 1)
    ax1.plot(steps, history["step_loss"], lw=0.8)
    for e in epochs[:-1]:
        ax1.axvline(e * len(steps) / len(epochs), color="grey", lw=0.5, ls=":")
    ax1.set(yscale="log", xlabel="optimisation step (dotted lines: epoch ends)",
            ylabel="cross-entropy loss", title="Loss of every training step")
    ax2.plot(epochs, history["train_loss"], "o-", label="training (epoch mean)")
    ax2.plot(epochs, history["val_loss"], "s-", label="validation (epoch end)")
    ax2.set(yscale="log", xlabel="epoch", ylabel="cross-entropy loss",
            title="Loss per epoch", xticks=epochs)
    ax2.legend()
    best, val_acc = history["best_epoch"], np.asarray(history["val_accuracy"]) * 100
    ax3.plot(epochs, val_acc, "s-", color="tab:green")
    ax3.plot([best], [val_acc[best - 1]], "*", ms=16, color="tab:red",
             label=f"best epoch ({best}): the model we use")
    ax3.set(xlabel="epoch", ylabel="validation accuracy (%)",
            title="Validation accuracy", xticks=epochs)
    ax3.legend(loc="lower right")
    return fig


# %% tags=["full-width"]
fig = plot_training_curves(history)
plt.show()

# %% [markdown]
# The loss of a training step falls by almost four orders of magnitude, from 3.3 at the
# first step to 0.0005 at the last. The training loss per epoch is a mean over the steps of
# that epoch, so it lags behind the validation loss, which is measured at the end of the
# epoch; that is why it sits *above* the validation loss in the first six epochs, while the
# loss is still falling, which is not a sign of anything wrong. In the last two epochs the
# learning rate has decayed, both losses have levelled off at about 0.0005, and the
# training loss is the lower one by a hair. Validation accuracy reaches 99.4% after epoch 2,
# dips once (epoch 3, when the validation loss rises a little), and is 100% from epoch 4 on,
# when the validation loss drops more than twentyfold.
#
# `fit` keeps the parameters of the best epoch (highest validation accuracy, then lowest
# validation loss) and restores them at the end, so the saved model should be exactly that
# checkpoint. We check it: evaluating the loaded model on the validation split must reproduce
# the numbers recorded for the best epoch.

# %%
best = history["best_epoch"]
ev = evaluate(model, val)
print(f"best epoch {best}: recorded val loss {history['val_loss'][best - 1]:.6f}, "
      f"accuracy {history['val_accuracy'][best - 1]:.2%}")
print(f"loaded model:  val loss {ev['loss']:.6f}, accuracy {ev['accuracy']:.2%}")
assert (ev["accuracy"] == max(history["val_accuracy"])
        == history["val_accuracy"][best - 1])
assert np.isclose(ev["loss"], history["val_loss"][best - 1], rtol=1e-5)
first_step, last_step = history["step_loss"][0], history["step_loss"][-1]
print(f"step loss: {first_step:.2f} at the first step, {last_step:.5f} at the last")
assert 1_000 < first_step / last_step < 10_000                 # almost four orders
assert round(first_step, 1) == 3.3 and round(last_step, 4) == 0.0005
train_above = [e for e, tl, vl in zip(history["epoch"], history["train_loss"],
                                      history["val_loss"]) if tl > vl]
print("epochs with the training loss above the validation loss:", train_above)
assert train_above == [1, 2, 3, 4, 5, 6]
assert all(round(loss, 4) == 0.0005 for loss in
           history["train_loss"][6:] + history["val_loss"][6:])    # levelled off
val_acc = history["val_accuracy"]
assert round(val_acc[1], 3) == 0.994 and val_acc[2] < val_acc[1]  # the one dip
assert history["val_loss"][2] > history["val_loss"][1]
assert min(e for e, a in zip(history["epoch"], val_acc) if a == 1.0) == 4
assert all(a == 1.0 for a in val_acc[3:])
assert history["val_loss"][2] / history["val_loss"][3] > 20   # epoch 3 -> 4

# %% [markdown]
# ## Running the model and keeping its attention
#
# To look inside we need more than the logits. Every `MultiHeadAttention` keeps the attention
# weights of its last forward pass in `attn_weights`, shape $(B, H, T, T)$: for each example
# and head, row $t$ is the softmax distribution that query position $t$ puts over the key
# positions. `forward_with_attention` runs the model in evaluation mode and collects a copy
# of these weights from every layer. In the code, `model.blocks[0]` is the first layer; in
# the text and the figures layers and heads are counted from 1.
#
# The model reads its answer at the last real token (chapter 4), so the attention *row of
# that position* is the one that matters most. `readout_attention` picks it out at chapter 4's
# `readout_positions(mask)`, exactly the position the model reads.

# %% tags=["export"]
def forward_with_attention(model: Transformer, ids: np.ndarray,
                           mask: np.ndarray | None = None,
                           attn_mask: dict | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Run the model in evaluation mode and keep every layer's attention weights.

    Parameters
    ----------
    ids : int array, shape (B, T), token ids
    mask : bool array, shape (B, T), True for real tokens (default: ``ids != PAD_ID``)
    attn_mask : optional, passed on to ``Transformer.forward`` (attention edges cut)

    Returns
    -------
    logits : array, shape (B, V)
    attention : list of arrays, shape (B, H, T, T), one per layer (copies)
    """
    with model.evaluating():
        logits = model(ids, mask, attn_mask)                          # (B, V)
    return logits, [block.attention.attn_weights.copy() for block in model.blocks]


def readout_attention(attention: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Where the read-out position looks, in every layer.

    Parameters
    ----------
    attention : list of L arrays, shape (B, H, T, T), from ``forward_with_attention``
    mask : bool array, shape (B, T)

    Returns
    -------
    array, shape (L, B, H, T): row ``readout_positions(mask)`` of each attention matrix
    """
    last = readout_positions(mask)                                    # (B,)
    rows = np.arange(len(last))
    return np.stack([a[rows, :, last, :] for a in attention])         # (L, B, H, T)


# %% [markdown]
# One forward pass over all 5,000 inputs gives everything this chapter measures: the
# predictions, the probabilities, and the attention of both layers.

# %%
batch = create_batch(everything)
logits, attention = forward_with_attention(model, batch.ids, batch.mask)
probs = softmax(logits)                                     # (5000, 20)
predicted = logits.argmax(axis=1)                           # (5000,) token ids
readout = readout_attention(attention, batch.mask)          # (2, 5000, 4, 7)
ops = np.array([ex.op for ex in everything])                # (5000,)
args = np.array([ex.args for ex in everything])             # (5000, 3)

print("logits", logits.shape, " attention per layer", attention[0].shape,
      " readout", readout.shape)
assert len(attention) == 2 and attention[1].shape == (5000, 4, 7, 7)
# every row is a distribution
assert np.allclose(attention[0].sum(axis=-1), 1, atol=1e-5)
assert (readout_positions(batch.mask) == 6).all()           # [EOS] is token 6 of 7
assert np.array_equal(readout[1], attention[1][:, :, 6, :])

# %% [markdown]
# ## Accuracy per operation
#
# A single accuracy can hide an operation that fails. `accuracy_per_operation` splits it up.
# We report it for each of the three splits and for all 5,000 inputs. The test split is the
# honest test: training never saw those inputs, and they did not choose the epoch we keep
# (the validation split did).

# %% tags=["export"]
def accuracy_per_operation(examples: Sequence[Example],
                           predicted_ids: np.ndarray) -> dict:
    """Fraction of correct answers per operation present in the B ``examples``, in the
    order of ``OPERATIONS``, plus ``"all"``; ``predicted_ids`` is (B,)."""
    predicted_ids = np.asarray(predicted_ids)
    if predicted_ids.shape != (len(examples),):
        raise ValueError(f"expected one prediction per example ({len(examples)}), "
                         f"got shape {predicted_ids.shape}")
    correct = predicted_ids == np.array([ex.target for ex in examples])
    ops = np.array([ex.op for ex in examples])
    result = {op: float(correct[ops == op].mean())
              for op in OPERATIONS if (ops == op).any()}
    result["all"] = float(correct.mean())
    return result


# %%
# input -> row of the big batch
index = {(ex.op, ex.args): i for i, ex in enumerate(everything)}
sets = {"training split": train, "validation split": val, "test split": test,
        "all 5,000": everything}
results = {}
print(f"{'':16} {'inputs':>6}  " + "  ".join(f"{op:>6}" for op in (*OPERATIONS, "all")))
for name, subset in sets.items():
    rows = [index[(ex.op, ex.args)] for ex in subset]
    results[name] = accuracy_per_operation(subset, predicted[rows])
    print(f"{name:16} {len(subset):6,}  "
          + "  ".join(f"{a:6.1%}" for a in results[name].values()))

assert all(acc == 1.0 for r in results.values() for acc in r.values())
assert evaluate(model, test)["accuracy"] == 1.0

# %% [markdown]
# Every operation is solved on every input of every split, the 494 test inputs included.
# The confusion matrix shows the same thing in a form that would show *how* a
# model fails: row $i$, column $j$ counts the inputs whose true answer is $i$ and whose
# predicted answer is $j$. A perfect model fills only the diagonal. An extra column counts
# predictions that are not digits at all (the output layer scores all 20 tokens, so the
# model could in principle answer `(`).

# %% tags=["export"]
def confusion_matrix(true_ids: np.ndarray, predicted_ids: np.ndarray,
                     classes: Sequence[int] = tuple(_DIGIT_IDS)) -> np.ndarray:
    """Counts of (true answer, predicted answer) pairs of (B,) token ids: a (C, C + 1)
    int array over the C ``classes`` (default the digits), row = true, column =
    predicted; the last column counts predictions outside ``classes``."""
    true_ids, predicted_ids = np.asarray(true_ids), np.asarray(predicted_ids)
    lookup = {int(c): i for i, c in enumerate(classes)}
    C = len(classes)
    rows = np.array([lookup.get(int(t), -1) for t in true_ids])
    if (rows < 0).any():
        raise ValueError(f"true id {true_ids[rows < 0][0]} is not one of the classes "
                         f"{list(classes)}")
    cols = np.array([lookup.get(int(p), C) for p in predicted_ids])
    return np.bincount(rows * (C + 1) + cols, minlength=C * (C + 1)).reshape(C, C + 1)


# %% tags=["export", "hide-input"]
def plot_heatmap(values: np.ndarray, row_labels: Sequence[str],
                 col_labels: Sequence[str], ax: "plt.Axes | None" = None,
                 title: str | None = None, xlabel: str = "", ylabel: str = "",
                 cmap: str = "viridis",
                 vmin: float | None = None, vmax: float | None = None,
                 colorbar_label: str | None = None, fmt: str | None = None,
                 hide_below: float | None = None, fontsize: int = 8) -> "plt.Axes":
    """A labelled heatmap of an (R, C) array: the building block of every matrix
    figure in this chapter. ``fmt`` (e.g. ``"{:.2f}"``) writes each value into its
    cell, except values below ``hide_below``; ``colorbar_label`` adds a colour bar.
    Draws on ``ax`` (default: a new figure) and returns it; the image is
    ``ax.images[0]``."""
    plt = _pyplot()
    values = np.asarray(values)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values {values.shape} do not match {len(row_labels)} row "
                         f"labels and {len(col_labels)} column labels")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * len(col_labels) + 2.5,
                                      0.4 * len(row_labels) + 1.8),
                             constrained_layout=True)
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=fontsize + 2)
    if fmt is not None:
        for (i, j), v in np.ndenumerate(values):
            if hide_below is not None and v < hide_below:
                continue
            r, g, b, _ = im.cmap(im.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5   # text must contrast
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    fontsize=fontsize - 1, color="white" if dark else "black")
    if colorbar_label is not None:
        ax.figure.colorbar(im, ax=ax, shrink=0.85, label=colorbar_label)
    return ax


def plot_confusion(matrix: np.ndarray, labels: Sequence[str] = tuple("0123456789"),
                   ax: "plt.Axes | None" = None, title: str = "Confusion matrix",
                   extra_label: str = "other", vmax: float | None = None,
                   colorbar: bool = True) -> "plt.Axes":
    """Heatmap of a ``confusion_matrix``, counts written in the non-empty cells; panels
    that share ``vmax`` need one colour bar only (``colorbar=False``). Returns the Axes.
    """
    columns = [*labels, extra_label][:matrix.shape[1]]
    return plot_heatmap(matrix, labels, columns, ax=ax, title=title,
                        xlabel="predicted answer", ylabel="true answer", cmap="Blues",
                        vmin=0, vmax=vmax,
                        colorbar_label="inputs" if colorbar else None, fmt="{:d}",
                        hide_below=1, fontsize=9)


# %% tags=["full-width"]
matrices = {op: confusion_matrix(batch.targets[ops == op], predicted[ops == op])
            for op in OPERATIONS}
most = max(m.max() for m in matrices.values())          # one colour scale for all five
fig, axes = plt.subplots(1, 5, figsize=(17, 4), constrained_layout=True)
for ax, op in zip(axes, OPERATIONS):
    plot_confusion(matrices[op], ax=ax, title=f"{op}: all 1,000 inputs", vmax=most,
                   colorbar=op == OPERATIONS[-1])
fig.suptitle("Predicted vs true answer, per operation (the diagonal is correct)")
plt.show()

for op, m in matrices.items():
    assert m.sum() == 1000 and np.trace(m) == 1000 and m[:, -1].sum() == 0, op
# only Max(0,0,0) has answer 0
assert matrices["Max"][0, 0] == 1 and matrices["Max"][9, 9] == 271
assert all((matrices[op].sum(axis=1) == 100).all()
           for op in ("First", "Second", "Last"))

# %% [markdown]
# The diagonals differ because the answers do (chapter 1): `First`, `Second` and `Last`
# answer each digit 100 times, while `Max` answers 9 on 271 inputs and 0 on just one,
# `Max(0, 0, 0)`. Nothing lies off the diagonal. For a matrix that does, see the
# four-argument inputs at the end of the chapter.
#
# ## `predict`: asking the model
#
# `predict` wraps the pipeline for people: text in, answer out. It takes one text or a list
# of texts, and with `return_probs=True` also the probability the model gives its answer.
# Input goes through `encode`, so bad input raises the tokenizer's `ValueError`, which names
# the offending token and its position; in a list, the message also says which text was bad.
# `strict=False` skips the grammar check, for the experiments with malformed input at the end.

# %% tags=["export"]
def predict(model: Transformer, text: str | Sequence[str], return_probs: bool = False,
            strict: bool = True) -> str | tuple[str, float] | list:
    """Answer puzzles: ``predict(model, "Max(5, 3, 9)")`` returns ``"9"``.

    ``text`` is one puzzle or a list of them, as ``encode`` accepts them. Returns the
    answer, or (answer, its probability) with ``return_probs``; a list for a list.
    ``strict=False`` skips ``encode``'s grammar check. Bad input raises the tokenizer's
    ``ValueError`` (for a list, prefixed with the bad text's index).
    """
    single = isinstance(text, str)
    if not single and not isinstance(text, (list, tuple)):
        raise ValueError("predict expects a text or a list of texts, "
                         f"got {type(text).__name__}")
    texts = [text] if single else list(text)
    if not texts:
        return []
    sequences = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"item {i} is a {type(t).__name__}, not a text; "
                             "write a puzzle as text, e.g. 'Max(5, 3, 9)'")
        try:
            sequences.append(encode(t, strict=strict))
        except ValueError as error:
            if single:
                raise
            raise ValueError(f"text {i} ({t!r}): {error}") from None
    ids, mask = pad_sequences(sequences)                                # (B, T), (B, T)
    logits, _ = forward_with_attention(model, ids, mask)                # (B, V)
    probs = softmax(logits.astype(np.float64))                          # (B, V)
    best = logits.argmax(axis=-1)
    answers = [ID_TO_TOKEN[int(i)] for i in best]
    if return_probs:
        out = [(a, float(p[i])) for a, p, i in zip(answers, probs, best, strict=True)]
        return out[0] if single else out
    return answers[0] if single else answers


# %%
print(predict(model, "Max(5, 3, 9)"))
print(predict(model, ["First(5, 3, 9)", "Second(5, 3, 9)", "Last(5, 3, 9)",
                      "Min ( 5 3 9 )"]))
answer, p = predict(model, "Min(8, 8, 9)", return_probs=True)
print(f"Min(8, 8, 9) -> {answer} with probability {p:.3f}")

assert predict(model, "Max(5, 3, 9)") == "9"
assert predict(model, ["First(5, 3, 9)", "Second(5, 3, 9)", "Last(5, 3, 9)",
                       "Min ( 5 3 9 )"]) == ["5", "3", "9", "3"]
assert answer == "8" and 0.5 < p <= 1
assert predict(model, []) == []
# predict agrees with the batched forward pass (on every 97th of the 5,000 inputs)
sample = everything[::97]
assert predict(model, [ex.text for ex in sample]) == [ID_TO_TOKEN[int(i)]
                                                       for i in predicted[::97]]


# %% [markdown]
# The cell below (its code folded away) prints a few such messages for bad input; chapter
# 1's helper `show_error` asserts the type and the text of each error.

# %% tags=["hide-input"]
from transformer_lib.data import show_error

for bad, message in [
        ("max(5, 3, 9)", "unknown token 'max' at position 0"),
        ("Max(5, 12, 9)", "only single digits 0–9 are tokens"),
        ("Mean(1, 2, 3)", "unknown token 'Mean' at position 0"),
        ("Max(5; 3; 9)", "unknown token ';' at position 3"),
        ("Max()", "expected a digit 0–9 at position 2, got ')'"),
        ("Max(5, 3, 9", "expected ')' at position 7, got end of input"),
        ("Max(5, 3, 9) 4", "expected '[EOS]' or end of input at position 8")]:
    show_error(lambda bad=bad: predict(model, bad), ValueError, message)
show_error(lambda: predict(model, ["Max(1, 2, 3)", "Max(1, 2, 3"]), ValueError,
           "text 1 ('Max(1, 2, 3'): expected ')' at position 7, got end of input")
show_error(lambda: predict(model, 42), ValueError,
           "predict expects a text or a list of texts, got int")

# %% [markdown]
# ## Attention, one puzzle at a time
#
# Now the inside. `plot_attention` draws one attention matrix: row $t$ is query position
# $t$, column $s$ key position $s$, and the colour is the weight $\alpha_{ts}$ (each row sums
# to 1). `plot_attention_grid` draws a whole model: one row per layer, one panel per head,
# plus the mean over the heads, with the tokens on the axes. The read-out row, `[EOS]`, is
# framed in red, since it is the only row whose output reaches the answer directly.
#
# We take the same digits under every operation, `Op(4, 9, 1)`. The answers sit at
# different positions: `First` → 4 (argument 1), `Second` and `Max` → 9 (argument 2),
# `Last` and `Min` → 1 (argument 3). First the whole model on `First(4, 9, 1)`:

# %% tags=["export", "hide-input"]
def plot_attention(weights: np.ndarray, tokens: Sequence[str],
                   ax: "plt.Axes | None" = None, title: str | None = None,
                   row_labels: Sequence[str] | None = None, colorbar: bool = True,
                   highlight_row: int | None = None, xlabel: str = "key (attended to)",
                   ylabel: str = "query (attending from)",
                   fontsize: int = 9) -> "plt.Axes":
    """Heatmap of one (R, C) attention matrix (row r: query r's distribution over the
    C keys ``tokens``), colour scale 0..1; ``highlight_row`` is framed in red.
    Returns the Axes; its image is ``ax.images[0]``."""
    plt = _pyplot()
    row_labels = tokens if row_labels is None else row_labels
    ax = plot_heatmap(weights, row_labels, tokens, ax=ax, title=title, xlabel=xlabel,
                      ylabel=ylabel, vmin=0, vmax=1,
                      colorbar_label="attention weight" if colorbar else None,
                      fontsize=fontsize)
    if highlight_row is not None:
        ax.add_patch(plt.Rectangle((-0.5, highlight_row - 0.5), len(tokens), 1,
                                   fill=False, edgecolor="red", lw=2))
    return ax


def plot_attention_grid(weights: np.ndarray, tokens: Sequence[str], title: str = "",
                        row_labels: Sequence[str] | None = None,
                        highlight_row: int | None = None,
                        xlabel: str = "key (attended to)",
                        ylabel: str = "query") -> "plt.Figure":
    """Every head of every layer of (L, H, R, C) ``weights``, plus the mean over the
    heads: a Figure of L rows of H + 1 panels, one colour bar (arguments as in
    ``plot_attention``)."""
    plt = _pyplot()
    weights = np.asarray(weights)
    L, H = weights.shape[:2]
    fig, axes = plt.subplots(L, H + 1, figsize=(2.6 * (H + 1) + 1, 2.7 * L + 0.8),
                             constrained_layout=True, squeeze=False)
    for layer in range(L):
        panels = [*weights[layer], weights[layer].mean(axis=0)]
        names = [f"head {h + 1}" for h in range(H)] + ["mean of the heads"]
        for h, (w, name) in enumerate(zip(panels, names, strict=True)):
            ax = axes[layer, h]
            plot_attention(w, tokens, ax=ax, title=f"layer {layer + 1}, {name}",
                           row_labels=row_labels, colorbar=False,
                           highlight_row=highlight_row, fontsize=10,
                           xlabel=xlabel if layer == L - 1 else "",
                           ylabel=ylabel if h == 0 else "")
    fig.colorbar(axes[0, 0].images[0], ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


# %% tags=["full-width"]
def tokens_of(text: str) -> list[str]:
    """The model's input tokens, as labels:
    'Max(4, 9, 1)' -> ['Max', '(', '4', ..., '[EOS]']."""
    return detokenize(encode(text)).split()


text = "First(4, 9, 1)"
fig = plot_attention_grid(np.stack([a[index[("First", (4, 9, 1))]] for a in attention]),
                          tokens_of(text), highlight_row=6,
                          title=f"Attention of the trained model on {text} → answer "
                                f"{predict(model, text)}   (red: the [EOS] row, where "
                                "the answer is read)")
plt.show()

# %% [markdown]
# Each panel is a full attention matrix. In layer 1 the digits often look at the operation
# token (bright cells in the first column); we will see that this matters more than it
# seems. But only the red row, `[EOS]`, reaches the answer directly, so for all five
# operations the next figure shows just that row, for every head.

# %% tags=["full-width"]
head_names = [f"layer {l + 1}, head {h + 1}" for l in range(2) for h in range(4)]
fig, axes = plt.subplots(1, 5, figsize=(17, 3.9), constrained_layout=True, sharey=True)
for ax, op in zip(axes, OPERATIONS):
    text = f"{op}(4, 9, 1)"
    plot_attention(readout[:, index[(op, (4, 9, 1))]].reshape(8, 7), tokens_of(text),
                   ax=ax, row_labels=head_names, colorbar=False, fontsize=10,
                   title=f"{text} → {predict(model, text)}",
                   ylabel="the [EOS] row of" if op == "First" else "")
    ax.axhline(3.5, color="white", lw=2)                            # between the layers
fig.colorbar(axes[0].images[0], ax=axes, shrink=0.85, label="attention weight")
fig.suptitle("Where [EOS] attends, in every head, for the five operations on 4, 9, 1")
plt.show()

# %% [markdown]
# In **layer 2**, at least two heads send almost all of `[EOS]`'s attention to one
# argument: the 4 for `First`, the 9 for `Second`, the 1 for `Last`, exactly the digit the
# operation asks for; and for `Max` and `Min` the largest and the smallest digit, the 9 and
# the 1. In **layer 1**, `[EOS]` looks elsewhere: at the operation token (head 4 in all five
# puzzles, head 1 for `Max`), at itself, or at one particular digit.
#
# One head of layer 1 stands out: head 3 sends almost all of `[EOS]`'s attention to the 9 in
# every one of the five puzzles, whether or not the 9 is the answer. We come back to it.
#
# The checks, on these five puzzles (`readout[layer, example, head, key]`, indices from 0):

# %%
for op, answer_pos in [("First", 2), ("Second", 3), ("Last", 4), ("Max", 3),
                       ("Min", 4)]:
    i = index[(op, (4, 9, 1))]
    # layer 2, every head, the answer's position
    on_answer = readout[1, i, :, answer_pos]
    print(f"{op:6}  layer 2 heads with > 0.9 of [EOS]'s attention on the answer: "
          f"{[int(h) + 1 for h in np.flatnonzero(on_answer > 0.9)]}")
    assert (on_answer > 0.9).sum() >= 2
    assert readout[0, i, 2, 3] > 0.95          # layer 1, head 3: the 9
    assert readout[0, i, 3, 0] > 0.5           # layer 1, head 4: the operation token
print("layer 1, head 3, [EOS]'s attention on the 9:")
print([f"{op} {readout[0, index[(op, (4, 9, 1))], 2, 3]:.2f}" for op in OPERATIONS])
assert readout[0, index[("Max", (4, 9, 1))], 0, 0] > 0.9   # head 1: the Max token

# %% [markdown]
# ## What each head does: hypotheses, measured
#
# One puzzle could be a lucky case, and looking at heatmaps invites stories. A *head
# detector* turns a story into a number, measured over all inputs. Each hypothesis says
# where a head should attend on a given input; the score is the attention weight the
# read-out position actually puts there, averaged over the 1,000 inputs of one operation:
#
# $$\text{score}(\ell, h, \text{hypothesis}) = \frac{1}{N}\sum_{n=1}^{N} \sum_{s \in S_n} \alpha^{(\ell, h)}_{n,\,t_n,\,s}$$
#
# where $t_n$ is the read-out position of input $n$ and $S_n$ the positions the hypothesis
# names for it: argument 1, 2 or 3; *the largest digit* (every argument that holds the
# maximum, so a tie counts all copies); *the smallest digit*; *the operation token*. A score
# of 1 means the head attends exactly where the hypothesis says, every time.
#
# For comparison, `chance` is the score of a head that spreads its attention evenly over the
# arguments without choosing: 1/3 for each argument, and for *the largest digit* the mean
# share of arguments that hold the maximum, 0.385 (ties make it more than 1/3).

# %% tags=["export"]
class HeadScores(NamedTuple):
    """Scores of every head against every hypothesis, per operation (see
    ``head_scores``)."""

    scores: np.ndarray          # (L, H, O, K)
    chance: np.ndarray          # (O, K): attention spread evenly over the arguments
    operations: tuple           # O operation names
    hypotheses: tuple           # K hypothesis names


def head_scores(readout: np.ndarray, examples: Sequence[Example]) -> HeadScores:
    """Score each head's read-out attention (L, B, H, T), from ``readout_attention``,
    against the hypotheses ``argument 1`` .. ``argument n``, ``largest digit``,
    ``smallest digit`` and ``operation token``. The B ``examples`` must all have n
    arguments (``Op ( a_1 ... a_n ) [EOS]``: argument k at position k + 1)."""
    n = len(examples[0].args)
    if any(len(ex.args) != n for ex in examples):
        raise ValueError("head_scores needs examples with the same number of arguments "
                         "(their positions must line up)")
    if readout.shape[1] != len(examples):
        raise ValueError(f"readout holds {readout.shape[1]} examples, "
                         f"got {len(examples)}")
    args = np.array([ex.args for ex in examples])                      # (B, n)
    is_max = (args == args.max(axis=1, keepdims=True)).astype(float)    # (B, n)
    is_min = (args == args.min(axis=1, keepdims=True)).astype(float)
    on_args = readout[..., 2:2 + n]                                     # (L, B, H, n)
    per_input = [on_args[..., k] for k in range(n)] + [
        np.einsum("lbhn,bn->lbh", on_args, is_max),
        np.einsum("lbhn,bn->lbh", on_args, is_min),
        readout[..., 0]]
    per_input = np.stack(per_input, axis=-1)                            # (L, B, H, K)
    uniform = [np.full(len(examples), 1 / n)] * n + [
        is_max.sum(1) / n, is_min.sum(1) / n, np.zeros(len(examples))]
    uniform = np.stack(uniform, axis=-1)                                # (B, K)
    ops = np.array([ex.op for ex in examples])
    present = tuple(op for op in OPERATIONS if (ops == op).any())
    scores = np.stack([per_input[:, ops == op].mean(axis=1) for op in present], axis=2)
    chance = np.stack([uniform[ops == op].mean(axis=0) for op in present])
    hypotheses = tuple(f"argument {k + 1}" for k in range(n)) + (
        "largest digit", "smallest digit", "operation token")
    return HeadScores(scores, chance, present, hypotheses)


# %% tags=["export", "hide-input"]
def plot_head_scores(hs: HeadScores, title: str = "") -> "plt.Figure":
    """One panel per operation: heads (rows) x hypotheses (columns), scores written
    in. Returns the Figure."""
    plt = _pyplot()
    L, H, n_ops, K = hs.scores.shape
    fig, axes = plt.subplots(1, n_ops, figsize=(3.1 * n_ops + 1, 0.42 * L * H + 2.4),
                             constrained_layout=True, sharey=True)
    axes = np.atleast_1d(axes)
    heads = [f"layer {layer + 1} head {h + 1}" for layer in range(L) for h in range(H)]
    for o, ax in enumerate(axes):
        plot_heatmap(hs.scores[:, :, o, :].reshape(L * H, K), heads, hs.hypotheses,
                     ax=ax, title=hs.operations[o], xlabel="[EOS] attends to ...",
                     ylabel="head" if o == 0 else "", cmap="magma", vmin=0, vmax=1,
                     fmt="{:.2f}")
        ax.axhline(H - 0.5, color="white", lw=2)                    # between the layers
    fig.colorbar(axes[0].images[0], ax=axes, shrink=0.8,
                 label="mean attention where the hypothesis says")
    if title:
        fig.suptitle(title)
    return fig


# %% tags=["full-width"]
# "the head does this": at least 90% of its read-out attention, on average
THRESHOLD = 0.9
hs = head_scores(readout, everything)
fig = plot_head_scores(hs, title="Head detector: the share of [EOS]'s attention that "
                                 "lands where each hypothesis says, per operation, "
                                 "all 5,000 inputs")
plt.show()

# %% [markdown]
# The figure holds every score. What it implies is shorter: for each head, the hypotheses it
# passes at the threshold of 0.9, and for which operations. These *roles* are computed, not
# read off by eye, and the circuit diagram at the end of the next section is drawn from them.

# %%
K = len(hs.hypotheses)
roles = {(l, h): [(op, hs.hypotheses[k]) for o, op in enumerate(hs.operations)
                  for k in range(K) if hs.scores[l, h, o, k] >= THRESHOLD]
         for l in range(2) for h in range(4)}
for (l, h), passed in roles.items():
    found = "; ".join(f"{op}: {name}" for op, name in passed) or "(none)"
    print(textwrap.fill(f"layer {l + 1} head {h + 1}: {found}", width=88,
                        subsequent_indent="    "))
print("chance (args/largest/smallest):", hs.chance[0, :5].round(3))
# 1/3 per argument; 0.385 for the largest (and the smallest) digit, ties counted
assert np.allclose(hs.chance[:, :5], [1 / 3, 1 / 3, 1 / 3, 0.385, 0.385])
assert not roles[(0, 1)] and not roles[(0, 2)]    # layer 1, heads 2 and 3: no role here

# %% [markdown]
# What the scores say, each claim checked below:
#
# - **Positional heads in layer 2.** Heads 1, 2 and 3 of layer 2 pass for all three of
#   `First`, `Second` and `Last`: each puts more than 0.9 of `[EOS]`'s attention on the
#   argument the operation names. Head 4 does so for `First` and `Last`, and puts 0.83 on
#   argument 2 for `Second`. For `Max` and `Min` these heads spread their average over the
#   three arguments (0.15 to 0.4 each): the largest or smallest digit sits at a different
#   position every time, and only the content columns show whether each input finds it.
# - **No head of layer 1 selects an argument**: its best positional score for `First`,
#   `Second` and `Last` is 0.32, below the 1/3 of chance.
# - **Min** uses layer 2 as a *smallest digit* detector: three heads score between 0.85 and
#   0.95 (heads 1 and 2, two of the positional heads, and head 4), and head 3 scores 0.73,
#   although every layer-2 head's average on each argument is only 0.28 to 0.38.
# - **Max** has no single clean *largest digit* head: the best layer-2 score, 0.78 (head 1,
#   with head 2 close behind), is well above chance but below 0.9. No single hypothesis on
#   this list captures `Max`.
# - **Layer 1, head 1 is a `Max` detector**: it looks at the operation token when the token
#   is `Max` (0.98) and less than half as much for the other operations (0.45 for `Last`, at
#   most 0.11 for the other three, where it mostly looks at `[EOS]` itself). In layer 1 the
#   query of `[EOS]` is the same for every input (its own embedding plus its position; it
#   has seen nothing yet), so the difference must come from the keys: the `Max` token's key
#   matches this head's query, the other operation tokens' keys do not.
# - **Layer 1, head 4 reads the operation token, except `Second`**: more than half of
#   `[EOS]`'s attention for `First`, `Last`, `Max` and `Min`, only 0.35 for `Second`, and no
#   head of layer 1 puts half of it on the `Second` token. In layer 2 only head 3 reads the
#   operation token: 0.46 of `[EOS]`'s attention on the `Max` token.

# %%
S = hs.scores   # (layer, head, operation, hypothesis)
hyp = {name: k for k, name in enumerate(hs.hypotheses)}
op_index = {op: o for o, op in enumerate(hs.operations)}
positional = [h for h in range(4)
              if all(S[1, h, op_index[op], hyp[arg]] >= THRESHOLD
                     for op, arg in [("First", "argument 1"), ("Second", "argument 2"),
                                     ("Last", "argument 3")])]
print("positional heads of layer 2:", [f"head {h + 1}" for h in positional])
assert positional == [0, 1, 2]
assert (S[1, 3, [0, 2], [0, 2]] > 0.9).all() and 0.8 < S[1, 3, 1, 1] < 0.85  # head 4
for op in ("Max", "Min"):
    on_args = S[1, positional, op_index[op], :3]
    assert (0.15 < on_args).all() and (on_args < 0.4).all(), op    # spread out
layer1_positional = S[0, :, :3, :3].max()   # First, Second, Last; arguments 1-3
print(f"best positional score in layer 1: {layer1_positional:.2f}")
assert layer1_positional < 1 / 3, "no layer-1 head selects an argument"
o_min, o_max = op_index["Min"], op_index["Max"]
smallest = S[1, :, o_min, hyp["smallest digit"]]            # every head of layer 2
print(f"layer-2 heads on the smallest digit for Min: {smallest.round(2)}")
assert ((0.85 < smallest) & (smallest < 0.95)).sum() == 3
assert [h for h in range(4) if smallest[h] > 0.85] == [0, 1, 3]
assert 0.7 < smallest[2] < 0.75
min_average = S[1, :, o_min, :3]                           # every head of layer 2
assert 0.28 < min_average.min() and min_average.max() < 0.38   # quoted in the lessons
largest = S[1, :, o_max, hyp["largest digit"]]
best_max = largest.max()
print(f"best layer-2 'largest digit' score for Max: {best_max:.2f}, head "
      f"{largest.argmax() + 1} (chance {hs.chance[o_max, hyp['largest digit']]:.3f})")
assert hs.chance[o_max, hyp["largest digit"]] + 0.25 < best_max < THRESHOLD
assert largest.argmax() == 0 and np.sort(largest)[-2] == largest[1] > 0.75
to_op = S[0, :, :, hyp["operation token"]]                  # (H, O): layer 1
max_detector = int(to_op[:, o_max].argmax())
others = np.delete(to_op[max_detector], o_max)
print(f"layer 1, head {max_detector + 1} -> operation token:")
pprint(dict(zip(OPERATIONS, to_op[max_detector].round(2).tolist())), width=88,
       sort_dicts=False)
assert max_detector == 0 and to_op[0, o_max] > 0.9
assert others.max() < to_op[0, o_max] / 2 and np.sort(others)[-2] < 0.12
on_itself = [readout[0, ops == op, 0, 6].mean() for op in ("First", "Second", "Min")]
assert min(on_itself) > 0.5                                 # ... at [EOS] (position 6)
reading = {op: [h + 1 for h in range(4) if to_op[h, op_index[op]] > 0.5]
           for op in OPERATIONS}
print("layer 1, heads with more than half of [EOS]'s attention on the operation token:")
pprint(reading, width=88, sort_dicts=False)
assert all(4 in reading[op] for op in OPERATIONS if op != "Second")
assert reading["Second"] == [] and 0.3 < to_op[3, op_index["Second"]] < 0.4
to_op2 = S[1, :, :, hyp["operation token"]]                  # (H, O): layer 2
assert to_op2.argmax() == 2 * 5 + o_max and 0.45 < to_op2.max() < 0.5
assert np.sort(to_op2, axis=None)[-2] < 0.1                # no other layer-2 reading

# %% [markdown]
# ## How `First`, `Second` and `Last` really work: cutting attention edges
#
# The scores say where attention goes; they do not say that the model *needs* it to go
# there. A story that fits the pictures: "layer 1 reads the operation into `[EOS]`, then
# layer 2 uses it to pick the right argument". To test a story we intervene: remove
# some attention edges, run the model, and watch what breaks.
#
# `forward_with_knockout` runs the model's own forward pass with one extra mask per layer
# (chapter 4's `attn_mask`): `blocked[l][b, t, s] = True` forbids query $t$ of input $b$ to
# attend to key $s$ in layer `l` (all heads); the softmax renormalises over the keys that
# remain. Everything else (the residual connections, the post-norm layer norms, the
# feed-forward networks, the read-out) is untouched. With nothing blocked it is the model,
# bit for bit, which we check first.

# %% tags=["export"]
def forward_with_knockout(model: Transformer, ids: np.ndarray,
                          mask: np.ndarray | None = None,
                          blocked: dict | None = None
                          ) -> tuple[np.ndarray, list[np.ndarray]]:
    """The model's forward pass (evaluation mode) with chosen attention edges removed.

    Parameters
    ----------
    ids : int array, shape (B, T), token ids
    mask : bool array, shape (B, T), True for real tokens
    blocked : {layer index (from 0): bool array broadcastable to (B, T, T)}
        True at ``[b, t, s]``: in that layer, query ``t`` of input ``b`` may not attend
        to key ``s`` (in every head). The softmax renormalises over the allowed keys.

    Returns
    -------
    logits : array, shape (B, V)
    attention : list of arrays, shape (B, H, T, T), the weights actually used, one per
        layer

    Raises
    ------
    ValueError
        For a layer index the model does not have, or a real query left with no key
        at all.
    """
    ids = np.asarray(ids)
    mask = ids != PAD_ID if mask is None else np.asarray(mask, dtype=bool)
    blocked = {} if blocked is None else blocked
    unknown = sorted(set(blocked) - set(range(len(model.blocks))))
    if unknown:
        raise ValueError(f"blocked names layer {unknown[0]}, but the model has layers "
                         f"0..{len(model.blocks) - 1}")
    B, T = ids.shape
    attn_mask = {}
    for layer, cut in blocked.items():
        allowed = mask[:, None, :] & ~np.broadcast_to(np.asarray(cut, dtype=bool),
                                                      (B, T, T))       # (B, T, T)
        stranded = ~allowed.any(axis=-1) & mask                         # (B, T)
        if stranded.any():
            b, t = np.argwhere(stranded)[0]
            raise ValueError(f"layer {layer}: query {t} of input {b} "
                             "may attend to no key at all")
        attn_mask[layer] = allowed[:, None]                   # (B, 1, T, T): every head
    return forward_with_attention(model, ids, mask, attn_mask)


# %%
plain_logits, plain_attention = forward_with_knockout(model, batch.ids, batch.mask)
assert np.array_equal(plain_logits, logits)
assert all(np.array_equal(p, a) for p, a in zip(plain_attention, attention))
print("nothing blocked: the model's own logits and attention, bit for bit")
show_error(lambda: forward_with_knockout(model, batch.ids, batch.mask,
                                         {2: np.zeros((7, 7), bool)}),
           ValueError, "blocked names layer 2, but the model has layers 0..1")

# %% [markdown]
# Five experiments, each on all 5,000 inputs. The masks are $(T, T)$ arrays with rows =
# queries and columns = keys (positions: 0 operation, 1 `(`, 2–4 arguments, 5 `)`, 6 `[EOS]`);
# the first one differs per input, so it is $(B, T, T)$. The heatmap after the code gives
# the accuracy of each experiment (rows) on each operation (columns), the intact model on
# top.
#
# | | experiment | what it tests |
# |---|---|---|
# | A | layer 2: `[EOS]` may not attend to the argument(s) holding the answer | is the answer *copied* from there? |
# | B | layer 1: `[EOS]` may not attend to the operation token | does `[EOS]` need to read the operation itself? |
# | C | layer 1: `[EOS]` may attend only to itself | does `[EOS]` need layer 1 at all? |
# | D | layer 1: the arguments may not attend to the operation token | do the arguments carry the operation? |
# | E | layer 1: the arguments may not attend to each other | does layer 2 read digits that were mixed in layer 1? |

# %%
FSL = ("First", "Second", "Last")


def answer_positions(examples) -> np.ndarray:
    """(B, 7) bool: the argument position(s) an operation takes its answer from."""
    out = np.zeros((len(examples), 7), dtype=bool)
    for b, ex in enumerate(examples):
        a = np.array(ex.args)
        if ex.op in FSL:                          # one position, even if digits repeat
            out[b, 2:5] = np.arange(3) == FSL.index(ex.op)
        else:                                     # every copy of the largest/smallest
            out[b, 2:5] = a == (a.max() if ex.op == "Max" else a.min())
    return out


def edges(queries, keys) -> np.ndarray:
    """(7, 7) mask blocking every (query, key) pair of the given positions."""
    m = np.zeros((7, 7), dtype=bool)
    m[np.ix_(queries, keys)] = True
    return m


EOS, OP, ARGS = 6, 0, [2, 3, 4]
block_answer = np.zeros((len(everything), 7, 7), dtype=bool)
block_answer[:, EOS, :] = answer_positions(everything)
experiments = {
    "A: layer 2, [EOS] -/-> answer": {1: block_answer},
    "B: layer 1, [EOS] -/-> operation": {0: edges([EOS], [OP])},
    "C: layer 1, [EOS] -> itself only": {0: edges([EOS], [0, 1, 2, 3, 4, 5])},
    "D: layer 1, arguments -/-> operation": {0: edges(ARGS, [OP])},
    "E: layer 1, arguments -/-> arguments": {0: edges(ARGS, ARGS)},
}
knockout = {}
for name, blocked in experiments.items():
    out, _ = forward_with_knockout(model, batch.ids, batch.mask, blocked)
    knockout[name[0]] = accuracy_per_operation(everything, out.argmax(axis=1))
# (6, 5): the intact model, then A..E
knockout_accuracy = np.array([[results["all 5,000"][op] for op in OPERATIONS]]
                             + [[knockout[name[0]][op] for op in OPERATIONS]
                                for name in experiments])
ax = plot_heatmap(knockout_accuracy, ["none (the trained model)", *experiments],
                  OPERATIONS,
                  title="Accuracy on all 5,000 inputs with attention edges cut",
                  xlabel="operation", ylabel="experiment", cmap="viridis", vmin=0,
                  vmax=1, fmt="{:.1%}", fontsize=10, colorbar_label="accuracy")
ax.set_xticks(range(len(OPERATIONS)), OPERATIONS, rotation=0)
ax.axhline(0.5, color="white", lw=3)
ax.figure.set_size_inches(9, 3.8)
plt.show()

# %% [markdown]
# The story "layer 1 reads the operation into `[EOS]`, layer 2 uses it" is **wrong** for
# `First`, `Second` and `Last`, and the experiments say what happens instead:
#
# - **A**: without its edge to the answer's position in layer 2, `[EOS]` answers `First`,
#   `Second` and `Last` correctly at most 22% of the time (`Second` and `Last` near the 10%
#   of guessing, `First` 22%). The answer is copied from that position in layer 2. The same
#   holds for `Max` (26%) and even more for `Min` (2%: blocked from the smallest digit, the
#   model nearly always answers another digit).
# - **B** and **C**: stopping `[EOS]` from reading the operation in layer 1, or from reading
#   anything at all, leaves `First`, `Second` and `Last` (almost) untouched: 100% under B,
#   at least 99% under C. After C, `[EOS]`'s vector entering layer 2 is *the same for every
#   input*, so its layer-2 query is the same too. The choice of argument cannot come from
#   the query: it must come from the keys.
# - **D**: the keys get the operation in layer 1. When the arguments cannot see the
#   operation token, `First` and `Second` collapse to about the 10% of guessing. In layer 1
#   the arguments spend much of their attention on the operation token (measured below: for
#   every operation above the 1/7 of an even spread over the 7 tokens); in layer 2 each
#   argument's key then says, roughly, "I am argument 1 of a `First` puzzle", and the fixed
#   query of `[EOS]` matches the key that fits. (`Last` survives D at over 90%, so looking
#   at the last argument is close to the model's default when it lacks the operation.) D
#   leaves `Max` almost untouched (99%) and costs `Min` some ground (87%).
# - **E**: stopping the arguments from attending to each other in layer 1 leaves `First`,
#   `Second` and `Last` at 100%. So what layer 2 copies from argument $k$ is argument $k$'s
#   own digit, carried there by the **residual path**: `x = norm1(x + attention(x))` keeps
#   the token's embedding in the stream, whatever the attention adds.
#
# `Max` behaves differently: it *does* need `[EOS]`'s layer-1 reading. Under B it falls to
# about 49%, under C to 22%, in line with the `Max` detector of layer 1. `Min` is odd: it
# falls to 79% under B, yet stays at 99% under C. An `[EOS]` that reads the digits but not
# the operation does worse for `Min` than one that reads nothing at all. The checks:

# %%
# the answer is copied in layer 2
assert all(knockout["A"][op] < 0.25 for op in FSL)
assert 0.2 < knockout["A"]["Max"] < 0.3 and knockout["A"]["Min"] < 0.05
# [EOS] need not read the operation...
assert all(knockout["B"][op] == 1.0 for op in FSL)
# ...nor anything in layer 1
assert all(knockout["C"][op] >= 0.99 for op in FSL)
# the arguments carry it
assert knockout["D"]["First"] < 0.15 and knockout["D"]["Second"] < 0.15
assert 0.9 < knockout["D"]["Last"] < 0.95
assert knockout["D"]["Max"] > 0.99 and 0.85 < knockout["D"]["Min"] < 0.9
# digits travel on the residual path
assert all(knockout["E"][op] == 1.0 for op in FSL)
assert all(acc > 0.99 for acc in knockout["E"].values())
# Max needs [EOS] in layer 1; Min needs it not to read the digits without the operation
assert 0.45 < knockout["B"]["Max"] < 0.55 and 0.2 < knockout["C"]["Max"] < 0.25
assert 0.75 < knockout["B"]["Min"] < 0.8 and knockout["C"]["Min"] > 0.98
args_to_op = {op: float(attention[0][ops == op][:, :, 2:5, 0].mean())
              for op in OPERATIONS}
print("layer 1, arguments -> operation token (mean over heads and arguments):")
pprint({op: round(share, 2) for op, share in args_to_op.items()}, width=88,
       sort_dicts=False)
# above an even spread
assert all(share > 1 / 7 + 0.05 for share in args_to_op.values())

# %% [markdown]
# ### What `[EOS]` looks for in layer 1
#
# As noted above, in layer 1 the query of `[EOS]` is a constant: it is computed from
# `[EOS]`'s embedding and its position, and nothing else. The keys of layer 1 depend only on
# each token and its position. So each head of layer 1 has a *fixed preference* over the
# tokens, and we can read it straight off the weights: the score
# $q_{[EOS]} \cdot k_{\text{token}} / \sqrt{d_k}$ before the softmax. The figure puts the digits
# at the position of argument 2 (at the other two positions the scores differ by less than
# 0.5, checked below), the operations at position 0, and the brackets and `[EOS]` at their
# own positions 1, 5 and 6.

# %% tags=["full-width"]
att1 = model.blocks[0].attention
E_all, pe = model.embedding.W.data, model.pos_encoding.pe   # (V, D), (max_len, D)
H, d_k = att1.num_heads, att1.d_k
# (D,): the same for every input
q = (E_all[EOS_ID] + pe[EOS]) @ att1.W_q.W.data + att1.W_q.b.data


def layer1_scores(tokens, position) -> np.ndarray:
    """(H, n) pre-softmax score of [EOS]'s layer-1 query on each token placed at
    position."""
    # (n, D)
    k = (E_all[[TOKEN_TO_ID[t] for t in tokens]] + pe[position]) @ att1.W_k.W.data
    return np.einsum("nhd,hd->hn", k.reshape(len(tokens), H, d_k),
                     q.reshape(H, d_k)) / np.sqrt(d_k)


digits = [str(d) for d in range(10)]
FIXED = [("(", 1), (")", 5), ("[EOS]", 6)]          # tokens that never move
# (H, 18): digits, operations, brackets and [EOS]
pref = np.concatenate([layer1_scores(digits, 3), layer1_scores(OPERATIONS, 0)]
                      + [layer1_scores([t], pos) for t, pos in FIXED], axis=1)
columns = digits + list(OPERATIONS) + [t for t, _ in FIXED]
ax = plot_heatmap(pref, [f"head {h + 1}" for h in range(H)], columns,
                  title="Layer 1: what the query of [EOS] matches "
                        "(score before the softmax)",
                  xlabel="token (digits at argument 2's position, "
                         "operations at position 0, the others at their own)",
                  ylabel="layer 1", cmap="coolwarm", vmin=-10, vmax=10, fmt="{:.0f}",
                  colorbar_label="score $q \\cdot k / \\sqrt{d_k}$")
ax.figure.set_size_inches(11, 3.2)
plt.show()

# %% [markdown]
# Each head is a detector for a few tokens. Head 1's favourite token is the `Max` token: it
# is the `Max` detector found above (its second favourite among the operations is
# `Last`, hence the 0.45 there). Head 4 scores `Min`, `Last` and `First` above every digit
# but not `Second`: it is the operation reader found above. Head 3 looks for a 9: its score
# for the 9 beats every other token's by more than 5, so a softmax over its scores attends
# to a 9 whenever there is one. On every input that holds a 9 it puts at least 0.95 of its
# attention there, whatever the operation; without a 9, its attention goes mostly to `)`,
# its second favourite token, which every puzzle has.
#
# For `Max`, a 9 is the answer in 27% of the inputs. This is as far as we trace `Max` here:
# it needs both layer 2's copy (experiment A leaves it at 26%) and `[EOS]`'s reading in
# layer 1 (B: 49%), and the rest of its computation is spread over both layers and their
# feed-forward networks.

# %%
spread = np.ptp(np.stack([layer1_scores(digits, p) for p in ARGS]), axis=0).max()
max_head = int(pref[:, 10 + OPERATIONS.index("Max")].argmax())
nine_head = int(pref[:, 9].argmax())
nine_gap = pref[nine_head, 9] - np.sort(pref[nine_head, :10])[-2]
print(f"the Max-token head: head {max_head + 1};  the 9 head: head {nine_head + 1} "
      f"(9 beats the next digit by {nine_gap:.1f});")
print(f"    position changes a score by at most {spread:.2f}")
assert spread < 0.5   # position barely matters
assert (pref[max_head].argmax() == 10 + OPERATIONS.index("Max")
        and max_head == max_detector == 0)
second_op = np.argsort(pref[0, 10:15])[-2]
assert OPERATIONS[second_op] == "Last"
op_pref = dict(zip(OPERATIONS, pref[3, 10:15]))
assert all(op_pref[op] > pref[3, :10].max() for op in ("First", "Last", "Min"))
assert op_pref["Second"] < pref[3, :10].max()
assert set(np.argsort(pref[1])[-2:]) == {7, 5}        # head 2: the digits 7 and 5
assert nine_head == 2 and pref[2, :10].argmax() == 9 and nine_gap > 5
assert pref[2, 9] - np.sort(pref[2])[-2] > 5                          # every token
assert columns[int(np.argsort(pref[2])[-2])] == ")"
has_nine = (args == 9).any(axis=1)                                     # (5000,)
on_nine = (readout[0, :, nine_head, 2:5] * (args == 9)).sum(axis=1)    # (5000,)
print("the 9 head's attention on the 9(s), inputs that hold a 9, per operation:")
pprint({op: f"mean {on_nine[has_nine & (ops == op)].mean():.2f}, "
            f"min {on_nine[has_nine & (ops == op)].min():.2f}" for op in OPERATIONS},
       width=88, sort_dicts=False)
assert all(on_nine[has_nine & (ops == op)].min() >= 0.95 for op in OPERATIONS)
on_close = readout[0, ~has_nine, nine_head, 5]                        # no 9: ')'
print(f"without a 9: mean {on_close.mean():.2f} on ')'")
assert on_close.mean() > 0.7
assert matrices["Max"][9, 9] == 271                                   # 27% of Max

# %% [markdown]
# ### The circuit, as measured
#
# The diagram puts the findings together. Its head numbers are not typed in: the cell below
# takes them from the roles and shares measured above, and checks every kind of edge against
# the knock-out that cuts it. Solid edges are needed for `First` and `Second` (the green ones)
# or for every operation (the black ones); the dashed ones, `[EOS]`'s own reading in layer
# 1, only `Max` needs (knock-out C), though cutting just the operation edge (B) also costs
# `Min`. The drawing's code is folded.

# %%
# the head numbers of every label, from the measurements
named = {"First": "argument 1", "Second": "argument 2", "Last": "argument 3"}
copy_all = [h for h in range(4)
            if all((op, arg) in roles[(1, h)] for op, arg in named.items())]
copy_some = {h: [op for op, arg in named.items() if (op, arg) in roles[(1, h)]]
             for h in range(4) if h not in copy_all}
(partial_head,) = [h for h, some in copy_some.items() if some]
min_heads = [h for h in range(4) if smallest[h] > 0.85]
op_reader = [h for h in range(4) if h != max_detector
             and all(h + 1 in reading[op] for op in OPERATIONS if op != "Second")]
assert copy_all == positional and copy_some == {3: ["First", "Last"]}
assert min_heads == [0, 1, 3] and op_reader == [3] and nine_head == 2
# every kind of edge against its knock-out
assert all(knockout["A"][op] < 0.3 for op in OPERATIONS)              # layer-2 copy
assert knockout["D"]["First"] < 0.15 and knockout["D"]["Second"] < 0.15  # args read op
assert all(knockout["B"][op] == 1 and knockout["C"][op] >= 0.99 for op in FSL)
assert knockout["C"]["Max"] < 0.25 and knockout["C"]["Min"] > 0.98    # Max only
assert all(acc > 0.99 for acc in knockout["E"].values())              # residual path


def numbers(hs_list) -> str:
    return ", ".join(str(h + 1) for h in hs_list)


print(f"layer 2: copy heads {numbers(copy_all)} (and {partial_head + 1} for "
      f"{' and '.join(copy_some[partial_head])}), Min heads {numbers(min_heads)}")
print(f"layer 1: Max detector {max_detector + 1}, operation reader {op_reader[0] + 1}, "
      f"9 detector {nine_head + 1}")
print("every kind of edge holds against the knock-out that cuts it")

# %% tags=["hide-input"]
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch


def arrow(start, end, color, rad=0.0, style="-", lw=2.0):
    ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={rad}",
                                 arrowstyle="-|>", mutation_scale=14, color=color,
                                 lw=lw, ls=style, shrinkA=12, shrinkB=12))


fig, ax = plt.subplots(figsize=(13, 5.6), constrained_layout=True)
labels = ["Op", "(", "$a_1$", "$a_2$", "$a_3$", ")", "[EOS]"]
levels = ["input\n(token + position)", "after layer 1", "after layer 2"]
for y, level in enumerate(levels):
    ax.text(-0.8, y, level, ha="right", va="center", fontsize=10)
    for x, label in enumerate(labels):
        ax.text(x, y, label, ha="center", va="center", fontsize=11, zorder=3,
                bbox=dict(boxstyle="round", fc="lightyellow" if x == EOS else "white",
                          ec="grey"))
        if y < 2:
            arrow((x, y), (x, y + 1), "lightgrey", lw=3)              # residual path
for k in ARGS:
    arrow((OP, 0), (k, 1), "tab:green")                               # layer 1
    arrow((k, 0), (EOS, 1), "tab:orange", style="--", lw=1.2)
    arrow((k, 1), (EOS, 2), "black", lw=2.5)                          # layer 2
arrow((OP, 0), (EOS, 1), "tab:orange", rad=0.08, style="--", lw=1.5)
arrow((EOS, 2), (EOS, 2.6), "black", lw=2.5)
ax.text(EOS, 2.65, "answer (output layer)", ha="center", va="bottom", fontsize=11)
ax.text(7.0, 1.55,
        f"layer 2, [EOS]: heads {numbers(copy_all)} (head {partial_head + 1} for "
        f"{' and '.join(copy_some[partial_head])})\n"
        "copy the argument the operation names; its key\n"
        "carries the operation, [EOS]'s query need not\n"
        f"(knock-out C). Heads {numbers(min_heads)}: the smallest\n"
        "digit, for Min. Max: no single head (at best "
        f"{best_max:.2f}).", va="center", fontsize=9.5)
ax.text(7.0, 0.5,
        f"layer 1, [EOS]: head {max_detector + 1} reads the Max token,\n"
        f"head {op_reader[0] + 1} every operation token but Second,\n"
        f"head {nine_head + 1} a 9 wherever it stands. Only Max\n"
        "needs this (knock-out C); cutting only the\n"
        "operation edge (B) also misleads Min.", va="center", fontsize=9.5)
ax.text(-0.3, 0.5, "layer 1: the arguments\nread the operation", ha="right",
        va="center", fontsize=9.5, color="tab:green")
edge_kinds = [
    ("black", 2.5, "-", "the answer is copied to [EOS] (cut: A)"),
    ("tab:green", 2, "-", "arguments read the operation (cut: D)"),
    ("tab:orange", 1.5, "--", "[EOS] reads in layer 1, needed by Max only (cut: C)"),
    ("lightgrey", 3, "-", "residual path: each digit stays at its position (E)")]
ax.legend(handles=[Line2D([], [], color=c, lw=lw, ls=ls, label=label)
                   for c, lw, ls, label in edge_kinds], loc="lower center",
          bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=9.5, frameon=False)
ax.set(xlim=(-2.3, 11.2), ylim=(-0.3, 2.9))
ax.axis("off")
ax.set_title("The circuit the measurements found in the reference model", fontsize=12)
plt.show()

# %% [markdown]
# ## Does the model know that 3 < 7?
#
# To answer `Max` and `Min` a model must compare digits. Tokens start as unrelated random
# vectors: nothing says that the embedding of `7` is "more" than that of `3`. Has training
# put the digits in order?
#
# A picture of ten 64-dimensional vectors needs a projection. *Principal component analysis*
# (PCA) finds the directions in which the points spread most: centre the points,
# $\tilde X = X - \bar X$, take the singular value decomposition $\tilde X = U S V^\top$, and
# project on the first two rows of $V^\top$. The share of the variance a direction explains
# is $s_i^2 / \sum_j s_j^2$.
#
# To measure order we use the *rank correlation* (Spearman's $\rho$): replace the values
# by their ranks and take the ordinary correlation of the ranks. $\rho = \pm 1$ means the first
# component sorts the digits exactly in order (the sign of a principal component is
# arbitrary, so we look at $|\rho|$); for ten points in random order $|\rho|$ is rarely above
# 0.8.

# %% tags=["export"]
def principal_components(X: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Project the N rows of X (N, D) on their first k principal components: the
    (N, k) coordinates of the centred points, and the (k,) shares of the variance."""
    Xc = np.asarray(X, dtype=np.float64)
    Xc = Xc - Xc.mean(axis=0)                                          # (N, D)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    # a singular vector's sign is arbitrary, and LAPACK builds differ: fix it so
    # that the largest component of each direction is positive, on every machine
    Vt = Vt * np.sign(Vt[np.arange(len(Vt)), np.abs(Vt).argmax(axis=1)])[:, None]
    return Xc @ Vt[:k].T, (s ** 2 / (s ** 2).sum())[:k]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1, ties sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties
    averaged)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("need two sequences of the same length >= 2, "
                         f"got {len(x)} and {len(y)}")
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


# %% tags=["export", "hide-input"]
def plot_embedding_2d(coords: np.ndarray, labels: Sequence[str],
                      values: np.ndarray | None = None, ax: "plt.Axes | None" = None,
                      title: str | None = None, explained: np.ndarray | None = None,
                      colorbar_label: str = "digit value") -> "plt.Axes":
    """Scatter 2-D points, each written with its label and coloured by ``values``.
    Returns the Axes."""
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4), constrained_layout=True)
    values = np.arange(len(coords)) if values is None else values
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=values, cmap="viridis", s=170)
    for (x, y), label, v in zip(coords, labels, values, strict=True):
        r, g, b, _ = sc.cmap(sc.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5   # text must contrast
        ax.annotate(label, (x, y), ha="center", va="center", fontsize=8, weight="bold",
                    color="white" if dark else "black")
    pc = ["principal component 1", "principal component 2"]
    if explained is not None:
        pc = [f"{name} ({share:.0%} of the variance)"
              for name, share in zip(pc, explained, strict=False)]
    ax.set(xlabel=pc[0], ylabel=pc[1])
    if title:
        ax.set_title(title, fontsize=10)
    ax.figure.colorbar(sc, ax=ax, label=colorbar_label)
    return ax


# %% [markdown]
# We look at three sets of ten vectors, one per digit:
#
# 1. the trained embeddings, `model.embedding.W` (the rows of the digits);
# 2. what training *added* to them: the trained embeddings minus the initial ones. The
#    initial model is `Transformer(**model.config)` with the same seed. Tokens that never
#    occur in the training inputs prove that it is the right starting point: the rows of
#    `[PAD]` (no padding: all training inputs have 7 tokens) and `,` (`encode` drops commas)
#    are still exactly as initialised;
# 3. the vectors the digits have become after layer 1, at the argument positions, averaged
#    over all inputs and all three positions (each digit occurs equally often at each
#    position, so the position averages out).

# %% tags=["full-width"]
model.eval()                                    # direct calls below: no caches
E = model.embedding.W.data.astype(np.float64)   # (V, D)
E_init = Transformer(**model.config).embedding.W.data.astype(np.float64)
for unused in ("[PAD]", ","):
    assert np.array_equal(E[TOKEN_TO_ID[unused]], E_init[TOKEN_TO_ID[unused]])
digit_ids = [TOKEN_TO_ID[d] for d in digits]
moved = (np.linalg.norm(E[digit_ids] - E_init[digit_ids])
         / np.linalg.norm(E_init[digit_ids]))

# (5000, 7, D)
h1 = model.blocks[0](model.pos_encoding(model.embedding(batch.ids)), batch.mask)
# (10, D)
after_layer1 = np.stack([h1[:, 2:5][args == d].mean(axis=0) for d in range(10)])

views = {"trained embeddings": E[digit_ids],
         "learned change (trained − initial)": E[digit_ids] - E_init[digit_ids],
         "after layer 1 (argument positions)": after_layer1}
fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
rho = {}
for ax, (name, X) in zip(axes, views.items()):
    coords, explained = principal_components(X)
    rho[name] = rank_correlation(coords[:, 0], np.arange(10))
    plot_embedding_2d(coords, digits, ax=ax, explained=explained,
                      title=f"{name}\nrank correlation of component 1 with the digit: "
                            f"ρ = {rho[name]:+.2f}")
fig.suptitle("The ten digits projected on their first two principal components")
plt.show()
print(f"training moved the digit embeddings by {moved:.1%} of their length")

# %% [markdown]
# The left panel shows no order: the digits lie scattered, and $|\rho|$ is small. That
# does not mean the model has not learned anything. The embeddings start as random vectors
# of length about 8 and training moved them by only about 3.5%, so the random starting
# point dominates every direction of large variance. The middle panel removes the starting
# point, and it shows no order either: the first component of what training *added* does
# not sort the digits ($|\rho| = 0.15$, which about two thirds of random orders match or
# beat, counted below). Whatever the embeddings know about order, it is not along their
# main directions. After layer 1 (right), the order *is* the main direction of the digit
# vectors ($|\rho| \geq 0.9$): the direction that explains more variance than any other
# sorts the digits almost exactly. The digits' order is not visible in what the model looks
# up; layer 1 brings it out.
#
# How unusual is each $|\rho|$ for a random order? We shuffle ten digits 100,000 times and
# count.

# %%
rng = np.random.default_rng(0)
# (100000, 10) random orders
perms = rng.permuted(np.tile(np.arange(10), (100_000, 1)), axis=1)
rho_random = 1 - 6 * ((perms - np.arange(10)) ** 2).sum(axis=1) / (10 * (10 ** 2 - 1))
# rho takes discrete values (sums of squared rank differences); the 1e-9 keeps a tie
# with a random order a tie, whatever the last bits of the SVD
share_random = {name: np.mean(np.abs(rho_random) >= abs(r) - 1e-9)
                for name, r in rho.items()}
pprint({name: round(r, 2) for name, r in rho.items()}, width=88, sort_dicts=False)
print("share of random orders with |ρ| at least as large:")
pprint({name: f"{share:.4f}" for name, share in share_random.items()}, width=88,
       sort_dicts=False)
print(f"share of random orders with |ρ| >= 0.8: "
      f"{np.mean(np.abs(rho_random) >= 0.8):.4f}")

assert abs(rho["trained embeddings"]) < 0.24
assert abs(rho["learned change (trained − initial)"]) < 0.2
assert 0.6 < share_random["learned change (trained − initial)"] < 0.7   # "two thirds"
assert abs(rho["after layer 1 (argument positions)"]) >= 0.9
assert share_random["after layer 1 (argument positions)"] < 0.001
assert 0.03 < moved < 0.04                                        # "about 3.5%"
assert 7 < np.linalg.norm(E_init[digit_ids], axis=1).mean() < 9   # "length about 8"
assert np.mean(np.abs(rho_random) >= 0.8) < 0.01                  # "rarely above 0.8"
# the measure itself
assert np.isclose(rank_correlation(np.arange(10), np.arange(10)[::-1]), -1)

# %% [markdown]
# ## Testing the model
#
# ### The held-out test set, and the inputs that look hard
#
# The test split was answered perfectly (above). A test set drawn at random can still miss
# the inputs where a model is most likely to stumble, so we name them and check them one group
# at a time: all digits equal, ties for the largest or smallest digit, the extreme digits 0
# and 9 together, and `Max` and `Min` with the answer at each of the three positions. For
# each group the table shows how many of its inputs were training inputs, the accuracy, and
# the smallest *confidence margin*:
#
# $$\text{margin} = p(\text{correct answer}) - \max_{v \neq \text{correct}} p(v),$$
#
# positive exactly when the answer is right, and close to 1 when the model is sure.

# %% tags=["export"]
def confidence_margins(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """p(target) minus the largest probability of any other token: (B,), in -1..1.

    Positive exactly when the prediction is right; near 1 when the model is sure.
    """
    probs, targets = np.asarray(probs), np.asarray(targets)
    rows = np.arange(len(targets))
    p_target = probs[rows, targets]
    others = probs.copy()
    others[rows, targets] = -np.inf
    return p_target - others.max(axis=1)


# %%
margins = confidence_margins(probs, batch.targets)                       # (5000,)
train_inputs = {(ex.op, ex.args) for ex in train}
in_train = np.array([(ex.op, ex.args) in train_inputs for ex in everything])   # (5000,)


def unique_at(op: str, k: int):
    """Inputs of op whose answer occurs once, at argument k (0-based)."""
    def test(ex):
        target = max(ex.args) if op == "Max" else min(ex.args)
        return ex.op == op and ex.args.count(target) == 1 and ex.args[k] == target
    return test


edge_cases = {
    "all digits equal": lambda ex: len(set(ex.args)) == 1,
    "Max, tie for the largest":
        lambda ex: ex.op == "Max" and ex.args.count(max(ex.args)) == 2,
    "Min, tie for the smallest":
        lambda ex: ex.op == "Min" and ex.args.count(min(ex.args)) == 2,
    "a 0 and a 9 together": lambda ex: 0 in ex.args and 9 in ex.args,
    **{f"{op}, answer only at argument {k + 1}": unique_at(op, k)
       for op in ("Max", "Min") for k in range(3)},
}
print(f"{'group':32} {'inputs':>6} {'in train':>8} {'accuracy':>9} {'min margin':>10}  "
      "least sure input")
for name, test_fn in edge_cases.items():
    rows = np.array([i for i, ex in enumerate(everything) if test_fn(ex)])
    acc = np.mean(predicted[rows] == batch.targets[rows])
    worst = rows[margins[rows].argmin()]
    print(f"{name:32} {len(rows):6} {in_train[rows].sum():8} {acc:9.1%} "
          f"{margins[worst]:10.3f}  {everything[worst].text}")
    assert len(rows) >= 50 and acc == 1.0 and margins[rows].min() > 0.95, name
    assert 0.78 < in_train[rows].mean() < 0.89, name

# %% [markdown]
# Every group is solved, with a wide margin (above 0.95) everywhere. The third column also
# shows the stratified split at work: 79% to 88% of each group is training data, the rest
# is held out. There are no errors to list, so we list the next best thing: the ten inputs, out
# of all 5,000, on which the model is least sure.

# %%
least_sure = np.argsort(margins)[:10]
assert np.sort(margins)[10] - np.sort(margins)[9] > 1e-6    # the ten are well separated
answer_share = {op: np.bincount([ex.answer for ex in everything if ex.op == op],
                                minlength=10) / 1000
                for op in OPERATIONS}
print(f"{'input':18} {'answer':>6} {'p(answer)':>9} {'margin':>7} {'runner-up':>9} "
      f"{'answer share':>12}")
for i in least_sure:
    ex = everything[i]
    runner_up = np.argsort(probs[i])[-2]
    print(f"{ex.text:18} {ex.answer:6} {probs[i, ex.target]:9.3f} {margins[i]:7.3f} "
          f"{ID_TO_TOKEN[int(runner_up)]:>9} {answer_share[ex.op][ex.answer]:12.1%}")
rare = [everything[i].op in ("Max", "Min")
        and answer_share[everything[i].op][everything[i].answer] < 0.05
        for i in least_sure]
runner_up_in_puzzle = [int(ID_TO_TOKEN[int(np.argsort(probs[i])[-2])])
                       in everything[i].args for i in least_sure]
p_answer = probs[np.arange(len(everything)), batch.targets]
print(f"the runner-up is a digit of the puzzle in {sum(runner_up_in_puzzle)} "
      "of the 10; the answer is rare")
print(f"    (under 5% of its operation's answers) in {sum(rare)}, "
      f"among them the {rare.index(False)} least sure")
print(f"smallest p(answer) over all 5,000 inputs: {p_answer.min():.3f}")
assert sum(runner_up_in_puzzle) == 8
assert rare[:3] == [True, True, True] and sum(rare) == 4
assert sum(everything[i].op in ("Max", "Min") for i in least_sure) == 8
assert (margins > 0).all() and p_answer.min() > 0.98

# %% [markdown]
# The model is sure everywhere: even on its least sure input it gives the right answer a
# probability of 0.985. Among the ten, two patterns show. Eight are `Max` or `Min` puzzles,
# and the three least sure have rare answers, answers that occur in less than 5% of their
# operation's inputs (the last column; chapter 1 showed these skewed answer distributions):
# `Min` answers 9 only on `Min(9, 9, 9)`, and 8 on 7 of its 1,000 inputs. And in eight of
# the ten the runner-up is another digit of the same puzzle, often the second largest (for
# `Max`) or second smallest (for `Min`): the model hesitates between the digits in front of
# it, not among all ten.

# %% [markdown]
# ### Outside the training distribution
#
# The model was trained on puzzles with exactly three arguments, always well formed. What does
# it do with anything else? Input outside the language (`Mean(1, 2, 3)`, `Max()`, a
# missing bracket) never reaches it: `encode` refuses it, as shown under `predict` above.
# But the grammar allows one or more digits, so `Max(1, 2, 3, 4)` is a valid puzzle, only
# longer than anything in training; and `strict=False` lets malformed input through. Here is
# what the model answers:

# %%
for text in ["Max(1, 8, 3, 4)", "Min(6, 2, 7, 5)", "First(4, 5, 6, 7)",
             "Second(4, 5, 6, 7)", "Last(4, 5, 6, 7)", "Last(4, 5, 6, 2)",
             "Max(1, 2)", "Last(1, 2)"]:
    answer, p = predict(model, text, return_probs=True)
    print(f"{text:20} -> {answer}  (p = {p:.2f})")
for text in ["Max ( 5 3 9", "Max 5 3 9 )", "Max 5 3 9", "First 5 3 9 )", "5 3 9"]:
    answer, p = predict(model, text, return_probs=True, strict=False)
    print(f"{text:20} -> {answer}  (p = {p:.2f}) strict=False; the model sees "
          f"{detokenize(encode(text, strict=False))!r}")

# %% [markdown]
# Single answers are anecdotes; accuracies over many inputs are evidence. Two experiments:
# 2,000 random puzzles with **four arguments**, and the test split with **one bracket
# removed** (`encode(..., strict=False)`).

# %%
four = generate_dataset(2000, seed=6, num_args=4)
four_batch = create_batch(four)
four_logits, four_attention = forward_with_attention(model, four_batch.ids,
                                                     four_batch.mask)
four_acc = accuracy_per_operation(four, four_logits.argmax(axis=1))

broken = {}
for name, drop in [("no ')'", ")"), ("no '('", "(")]:
    ids, mask = pad_sequences([encode(ex.text.replace(drop, ""), strict=False)
                               for ex in test])
    out, _ = forward_with_attention(model, ids, mask)
    broken[name] = accuracy_per_operation(test, out.argmax(axis=1))

print(f"{'':22}" + "".join(f"{op:>8}" for op in (*OPERATIONS, "all")))
print(f"{'four arguments':22}" + "".join(f"{a:8.1%}" for a in four_acc.values()))
for name, acc in broken.items():
    print(f"{'test split, ' + name:22}" + "".join(f"{a:8.1%}" for a in acc.values()))

# %% [markdown]
# The results separate the operations cleanly:
#
# - **`Max`, `Min`, `First` and `Second` generalise to four arguments** (at least 99.7%), and
#   `Last` does not (67%). The model did not learn what "last" means in general: it finds
#   the last of two or three arguments (exercise 1), but with a fourth one its attention
#   splits between arguments 3 and 4 (below).
# - **A missing `)` does no harm** (100% on every operation): `[EOS]` moves one position
#   left, the arguments stay where they were.
# - **A missing `(` breaks `First` and `Second`** (23% and 15%), **but not `Max` and `Min`**
#   (100%): every argument moves one position left, and the positional keys of layer 2 now
#   point at the wrong digits, while the largest and smallest digits are the same wherever
#   they stand. `Last` survives it (95%): this model's `Last` lookup is less tied to
#   absolute positions than its `First` and `Second` lookups (exercise 1 finds the same with
#   two arguments), though not enough to handle a fourth argument.
#
# Where does `[EOS]` look in a four-argument `Last` puzzle? The figure shows one the model
# gets wrong.

# %% tags=["full-width"]
last4 = [i for i, ex in enumerate(four) if ex.op == "Last"]
wrong = [i for i in last4 if four_logits[i].argmax() != four[i].target]
i = wrong[0]
text = four[i].text
fig = plot_attention_grid(np.stack([a[i] for a in four_attention]), tokens_of(text),
                          highlight_row=7,
                          title=f"{text} → the model answers "
                                f"{ID_TO_TOKEN[int(four_logits[i].argmax())]}, "
                                f"the right answer is {four[i].answer}")
plt.show()

# (n, H, T), layer 2
last4_readout = readout_attention(four_attention, four_batch.mask)[1, last4]
share_arg3 = last4_readout[:, positional, 4].mean()   # the positional heads
share_arg4 = last4_readout[:, positional, 5].mean()
pred4 = four_logits[last4].argmax(axis=1)
# (n, 4) token ids
arg = np.array([[TOKEN_TO_ID[str(a)] for a in four[j].args] for j in last4])
copies_3_or_4 = np.mean((pred4 == arg[:, 2]) | (pred4 == arg[:, 3]))
print(f"layer 2, positional heads of [EOS]: {share_arg3:.2f} on argument 3, "
      f"{share_arg4:.2f} on argument 4")
print(f"the answer is argument 3 or argument 4 in {copies_3_or_4:.1%} of the "
      f"{len(last4)} puzzles")

# %% [markdown]
# Averaged over the four-argument `Last` puzzles, the positional heads of `[EOS]` split
# their attention between argument 3 (the old "last" position) and argument 4 (the position
# that `)` held in training), leaning to argument 4 (0.56 against 0.43); in any one puzzle,
# like the one in the figure, most of the weight can sit on one of them. The answer is
# always one of those two digits. The four-argument confusion matrix of `Last` shows what
# such a failure looks like: the diagonal still holds the largest entry in every row,
# because two times out of three the model copies the right digit, and the rest is spread
# over the row.

# %%
last4_matrix = confusion_matrix(four_batch.targets[last4], pred4)
ax = plot_confusion(last4_matrix,
                    title=f"Last with four arguments: {len(last4)} random puzzles")
ax.figure.set_size_inches(5.5, 4.6)
plt.show()

assert all(four_acc[op] >= 0.997 for op in ("First", "Second", "Max", "Min"))
assert 0.65 < four_acc["Last"] < 0.7
assert 0.4 < share_arg3 < share_arg4 < 0.6 and share_arg3 + share_arg4 > 0.95
assert copies_3_or_4 == 1.0
assert ((last4_matrix.argmax(axis=1) == np.arange(10)).all()
        and last4_matrix[:, -1].sum() == 0)
assert all(acc == 1.0 for acc in broken["no ')'"].values())
assert broken["no '('"]["First"] < 0.25 and broken["no '('"]["Second"] < 0.2
assert 0.9 < broken["no '('"]["Last"] < 0.97
assert broken["no '('"]["Max"] == 1.0 and broken["no '('"]["Min"] == 1.0

# %% [markdown]
# ## What the model learned
#
# In plain words, with the evidence for each sentence:
#
# 1. **It solves the whole task.** Every one of the 5,000 puzzles is answered correctly,
#    the 494 held-out test inputs included (accuracy table, confusion matrices), and the
#    right answer always gets a probability above 0.98.
# 2. **Where it is least sure, it hesitates between the digits of the puzzle.** Its three
#    least confident inputs have rare answers (`Min(9, 9, 9)`, `Min(8, 9, 9)`,
#    `Max(3, 2, 2)`), and on eight of the ten least confident the runner-up is another digit
#    of the same puzzle (the list of least-sure inputs).
# 3. **`First`, `Second` and `Last` are a two-step lookup** (the circuit diagram). In
#    layer 1 the arguments read the operation token (knock-out D), so that in layer 2 each
#    argument's key announces its position and the operation. `[EOS]`'s query need not
#    depend on the input (C); layer 2's positional heads 1, 2 and 3 copy the digit of the
#    key that fits (A), which stayed at its position on the residual path (E).
# 4. **Its lookups are tied to positions, `Last` only partly.** With the `(` removed,
#    `First` and `Second` fail (23% and 15%); `Last` holds at 95% there and at 99% with two
#    arguments, but fails with four (67%), splitting its attention between arguments 3 and
#    4. `Max` and `Min` do not care where the digits stand (out-of-distribution tables, the
#    four-argument attention figure, exercise 1).
# 5. **`Min` is a content lookup in layer 2**: heads 1, 2 and 4 put 0.87 to 0.92 of
#    `[EOS]`'s attention on the smallest digit, and without that edge `Min` fails (2% under
#    A). It needs nothing from `[EOS]`'s reading in layer 1 (99% under C), but reading the
#    digits without the operation misleads it (79% under B).
# 6. **`Max` needs more than a copy.** It breaks when `[EOS]` cannot read in layer 1, where
#    fixed-query heads look for the `Max` token (head 1) and for a 9 (head 3) (B and C: 49%
#    and 22%), and when it cannot copy in layer 2 (A: 26%); no single head is a clean
#    "largest digit" detector (at best 0.78). We have located `Max`, not fully explained it.
# 7. **The digits' order appears after layer 1.** Neither the digit embeddings nor the change
#    training made to them show the order along their main direction ($|\rho| \leq 0.24$),
#    but after layer 1 the digit order *is* the main direction of the digit vectors (the PCA
#    figure, $|\rho| \geq 0.9$).
#
# These findings describe this trained model. A model trained from another seed can divide
# the work differently, which is why the code above finds the heads by measuring them
# rather than by their numbers.
#
# Two lessons reach beyond this toy. Average attention maps can mislead: the `Min` average
# of every layer-2 head spreads over the three arguments (0.28 to 0.38 each), yet input by
# input three of these heads put 0.87 to 0.92 of their attention on the smallest digit; and
# the `First(4, 9, 1)` picture (layer 1, head 4 reading the operation token at `[EOS]`)
# suggested the wrong story about where the operation is read. And attention says where
# information *could* flow; interventions such as the knock-outs say where it *must*.
#
# ## Summary
#
# - `plot_training_curves`, `accuracy_per_operation`, `confusion_matrix` and `plot_confusion`
#   measure a model; the reference model is perfect on the test split and on all 5,000 inputs.
# - `predict(model, "Max(5, 3, 9)")` returns `"9"`; it takes lists, returns probabilities on
#   request, and passes on the tokenizer's clear errors.
# - `forward_with_attention` and `readout_attention` expose the attention of every layer;
#   `plot_attention` and `plot_attention_grid` draw it with the tokens on the axes.
# - `head_scores` measures hypotheses about heads; `forward_with_knockout` tests them causally.
# - `principal_components` and `rank_correlation` show that the digits' order is not along
#   the main directions of the embeddings, but after layer 1 it is the main direction of
#   the digit vectors.
# - `confidence_margins` finds the inputs a perfect model is least sure about; the
#   out-of-distribution tests show where its rules stop being the task's rules.
#
# Chapter 7 turns from one trained model to experiments: it changes the architecture and the
# training, and measures what each part is for.
#
# ## Exercises
#
# **1.** The model fails `Last` on four arguments. Does it fail on *two* arguments as well?
# Evaluate it on all 500 two-argument puzzles, and find where `[EOS]` attends in layer 2
# (in the positional heads) for `Last`.

# %% tags=["hide-cell"]
two = all_examples(num_args=2)
two_batch = create_batch(two)
two_logits, two_attention = forward_with_attention(model, two_batch.ids, two_batch.mask)
two_acc = accuracy_per_operation(two, two_logits.argmax(axis=1))
pprint({op: f"{acc:.0%}" for op, acc in two_acc.items()}, width=88, sort_dicts=False)
is_last = np.array([ex.op == "Last" for ex in two])
where = (readout_attention(two_attention, two_batch.mask)[1, is_last][:, positional]
         .mean(axis=(0, 1)))
# (T,) = 6 positions: Op ( a b ) [EOS]
print("layer 2, positional heads, Last:")
pprint({name: round(float(w), 2) for name, w in zip(
            ["operation", "(", "argument 1", "argument 2", ")", "[EOS]"], where)},
       width=88, sort_dicts=False)
assert two_acc["Last"] == 0.99 and all(two_acc[op] == 1.0
                                       for op in ("First", "Second", "Max", "Min"))
assert where[3] > where[5] > 0.2 > where[4]   # the real last argument, [EOS], then ')'
assert 0.65 < where[3] < 0.7 and where[5] < 0.3 and where[4] < 0.05
assert where[:3].sum() < 0.1

# %% [markdown]
# Hardly: `Last` is right on 99 of its 100 two-argument puzzles. In the positional heads,
# `[EOS]` gives the largest share of its attention (0.68) to the real last argument
# (argument 2, position 3), then 0.25 to itself at position 5, where `)` stood in training,
# and almost nothing to `)` at position 4, where the last argument stood in training. So
# with one argument fewer, this model's `Last` finds the last argument; with one more it
# does not (67%, above). The other operations are perfect: `First` and `Second` keep their
# positions, `Max` and `Min` do not depend on positions at all.
#
# **2.** When the smallest digit occurs twice, as in `Min(3, 7, 3)`, how do the positional
# heads of layer 2 share their attention between the two copies? Measure it over all `Min`
# puzzles with exactly two copies of the minimum.

# %% tags=["hide-cell"]
tied = [i for i, ex in enumerate(everything)
        if ex.op == "Min" and ex.args.count(min(ex.args)) == 2]
shares = []
for i in tied:
    first, second = [2 + k for k, a in enumerate(everything[i].args)
                     if a == min(everything[i].args)]
    shares.append([readout[1, i, positional, first].mean(),
                   readout[1, i, positional, second].mean()])
shares = np.array(shares)                                                   # (135, 2)
print(f"{len(tied)} puzzles: earlier copy {shares[:, 0].mean():.2f}, "
      f"later copy {shares[:, 1].mean():.2f}, "
      f"both together {shares.sum(axis=1).mean():.2f}")
assert 0.4 < shares[:, 1].mean() < shares[:, 0].mean() < 0.5
assert shares.sum(axis=1).mean() > 0.9

# %% [markdown]
# The heads split their attention about evenly between the two copies (0.47 for the earlier
# one, 0.45 for the later one, on average), and together the copies receive almost all of
# it. Both copies carry the same digit, so the split does not change what is copied.
#
# **3.** Heads can be redundant. *Ablate* a head by setting its rows of $W_o$ (rows
# $h\,d_k$ to $(h+1)\,d_k$: its share of the concatenated heads) to zero, measure the
# accuracy per operation on 1,000 random inputs, and restore the weights. How much does each single head
# of layer 2 matter? What happens without the two strongest positional heads together?

# %% tags=["hide-cell"]
sample_rows = np.random.default_rng(0).choice(len(everything), size=1000, replace=False)
sample = [everything[i] for i in sample_rows]
sample_batch = create_batch(sample)


def ablated_accuracy(heads) -> dict:
    """Accuracy per operation with the given (layer, head) outputs zeroed; weights
    restored."""
    saved = []
    for layer, head in heads:
        W_o = model.blocks[layer].attention.W_o.W.data
        rows = slice(head * d_k, (head + 1) * d_k)
        saved.append((W_o, rows, W_o[rows].copy()))
        W_o[rows] = 0
    try:
        out, _ = forward_with_attention(model, sample_batch.ids, sample_batch.mask)
    finally:
        for W_o, rows, original in saved:
            W_o[rows] = original
    return accuracy_per_operation(sample, out.argmax(axis=1))


ablations = {f"layer 2 head {h + 1}": ablated_accuracy([(1, h)]) for h in range(4)}
# First/Second/Last on their argument
strongest = sorted(positional, key=lambda h: -np.trace(S[1, h, :3, :3]))[:2]
ablations["two positional heads"] = ablated_accuracy([(1, h) for h in strongest])
print(f"{'':21}" + "".join(f"{op:>8}" for op in ablations["layer 2 head 1"]))
for name, acc in ablations.items():
    print(f"{name:21}" + "".join(f"{a:8.1%}" for a in acc.values()))
# restored
assert ablated_accuracy([]) == accuracy_per_operation(sample, predicted[sample_rows])
print("the two strongest positional heads:", [f"head {h + 1}" for h in strongest])
singles = [ablations[f"layer 2 head {h + 1}"]["all"] for h in range(4)]
assert strongest == [0, 1]
# no single head is indispensable; the strongest positional head costs nothing
assert min(singles) > 0.985
assert all(a == 1.0 for a in ablations["layer 2 head 1"].values())
assert all(0.985 < singles[h] < 0.995 for h in (1, 2, 3))
# the largest loss from one head: Max without head 3
worst = min((acc, h, op) for h in range(4)
            for op, acc in ablations[f"layer 2 head {h + 1}"].items())
assert worst[1:] == (2, "Max") and 0.94 < worst[0] < 0.95
# both strongest positional heads: worse than any single head, Max worst of all
both = ablations["two positional heads"]
assert both["all"] < min(singles)
assert both["First"] > 0.99 and all(0.92 < both[op] < 0.94 for op in ("Second", "Last"))
assert 0.82 < both["Max"] < 0.83 and both["Max"] == min(both.values())

# %% [markdown]
# No single head is indispensable: without any one head of layer 2 the model stays at about
# 99% overall. Removing head 1, the strongest positional head, costs nothing at all (100%
# on every operation); removing head 2, 3 or 4 costs about 1% overall each, in different
# operations. The largest loss from removing any one head is `Max` without head 3 (95%),
# the head that, for `Max`, puts almost half of `[EOS]`'s attention on the operation token
# (the head-score figure).
#
# Removing the two strongest positional heads, 1 and 2, together hurts more than removing
# any single head: `Second` and `Last` drop to about 93%, while `First` barely moves. `Max`
# loses most (83%): heads 1 and 2 are also its best *largest digit* heads (0.78 and 0.77).
# Yet the remaining heads 3 (the weakest positional head) and 4 (positional for `First` and
# `Last` only, see the head-score figure) keep most of the task alive. Redundancy is one
# more reason why looking at one head at a time can mislead.
