# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. Experiments and analysis
#
# Chapter 5 trained one model with one recipe and one seed, and it reached 100%. That is one
# data point. This chapter asks the questions a single run cannot answer: how much of that
# result is luck, which settings matter, and which parts of the transformer are doing the work.
# Then it goes where the original project stopped: longer inputs, and numbers up to 99.
#
# **In this chapter**
#
# - a small experiment runner (config in, metrics out) that the rest of the chapter uses and
#   that you can use for your own experiments;
# - how much results vary between seeds; then the learning rate, three seeds per value;
# - model size: how small the model can get, and what it costs;
# - ablations: no positional encoding, no residual connections, no LayerNorm, one head, and
#   the read-out, each with a prediction written down *before* the result;
# - two harder variants: inputs longer than any seen in training, and numbers 0–99;
# - a summary table of everything measured, and what to take away.
#
# Every number in the prose below is computed in this notebook and checked by an `assert`,
# except the figures quoted from the original project (its six-point spread between runs
# and its 83.7% on numbers 0–99), what the first version of this book measured (in "The
# last 0.1%"), and the ranges measured across machines, which say so. To
# keep the whole book testable in a few minutes the experiments are small (mostly three
# seeds, at most eight epochs). Every experiment function takes arguments to run a bigger
# version; the text says which.
#
# One warning before any result. Training amplifies differences in the last bit of a
# floating-point sum: a different matrix kernel (a newer or older CPU), a different SIMD
# level or number of threads rounds a few sums differently, and after a thousand steps the
# same seed gives a different model. The experiments below were run on several such
# machines (six kernel and SIMD combinations of one CPU, from AVX-512 down to SSE4.2, with
# one and two threads). What this notebook prints and asserts is what held on all of them,
# at the precision it held: counts such as "3 of 3 seeds reached 100%", bounds, and
# orderings. The figures show every run's own numbers as they came out on the machine that
# ran the notebook (their code is folded away in the book; click to show it); yours may
# differ in the last digits, or by an input or two.

# %% [markdown]
# ## A runner: config in, metrics out
#
# An experiment is one training run, fully described by an `ExperimentConfig`: the shape of
# the model, the ablation switches of chapter 4 (`positional`, `residual`, `layer_norm`,
# `readout`), the training recipe of chapter 5 and a seed. The defaults are the book's
# reference model. `config.but(lr=1e-3)` makes a variant; a misspelt field is an error, not a
# silently ignored keyword.

# %% tags=["export"]
import dataclasses
import functools
import textwrap
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from transformer_lib.data import (ID_TO_TOKEN, OPERATIONS, TOKEN_TO_ID, Batch, Example,
                                  all_examples, create_batch, generate_dataset,
                                  split_dataset)
from transformer_lib.evaluation import accuracy_per_operation
from transformer_lib.layers import Linear
from transformer_lib.training import (CrossEntropyLoss, default_splits, evaluate,
                                      train_steps)
from transformer_lib.transformer import Transformer


# %% tags=["export"]
@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one training run: model shape, ablation switches,
    recipe, seed.

    The defaults are the book's reference model and training recipe (chapters 4 and 5).
    ``seed`` sets both the initial weights and the order of the mini-batches; the data
    split is the same for every run (``default_splits(0)``), so seeds differ only in
    training.
    """

    # model (chapter 4)
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 256
    readout: str = "eos"
    positional: bool = True
    residual: bool = True
    layer_norm: bool = True
    # training (chapter 5)
    lr: float = 2e-3
    batch_size: int = 32
    epochs: int = 8
    warmup: int = 50
    clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("d_model", "num_heads", "num_layers", "d_ff", "batch_size",
                     "epochs"):
            value = getattr(self, name)
            is_int = (isinstance(value, (int, np.integer))
                      and not isinstance(value, bool))
            if not is_int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads="
                             f"{self.num_heads} (d_k = d_model / num_heads)")

    def but(self, **changes) -> "ExperimentConfig":
        """A copy with some fields changed: ``config.but(lr=1e-3, seed=2)``."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; "
                             "the fields are:\n" + textwrap.fill(", ".join(names), 80))
        return dataclasses.replace(self, **changes)

    def model(self) -> Transformer:
        """A fresh, untrained Transformer with this config's shape and seed."""
        return Transformer(
            d_model=self.d_model, num_heads=self.num_heads, num_layers=self.num_layers,
            d_ff=self.d_ff, readout=self.readout, positional=self.positional,
            residual=self.residual, layer_norm=self.layer_norm, seed=self.seed)



# %% [markdown]
# What the runner measures is what the questions need. A model is judged on **all 5,000
# possible inputs** (chapter 1's `all_examples()`), so there is no sampling noise, and per
# operation, because the operations fail in different ways. The held-out accuracy counts only
# the inputs the model never trained on. "Steps to 100%" is when every one of the 5,000 inputs
# is first answered correctly. It is checked at the end of each epoch, but only once the
# validation accuracy (502 inputs, cheap) is 100%, and the inputs that were wrong at the
# previous check are tried first: if one of them is still wrong, the model need not be run
# on all 5,000.
#
# `predictions` and `accuracy_by` are small tools for looking at a trained model: its answers,
# and its accuracy per group of examples (per operation, per length, ...).

# %% tags=["export"]
def predictions(model, batch: Batch, chunk: int = 4096) -> np.ndarray:
    """The model's answer (argmax of the logits) for every row of a batch, in eval mode.

    Returns an int array of shape (B,) for a single read-out, or (B, K) if the model
    returns K logit rows per example (the two-digit model below, K = 2).
    """
    with model.evaluating():
        out = [model(batch.ids[i:i + chunk], batch.mask[i:i + chunk]).argmax(axis=-1)
               for i in range(0, len(batch.ids), chunk)]
    return np.concatenate(out)


def accuracy_by(model, examples: Sequence[Example],
                key: Callable[[Example], Hashable] = lambda ex: ex.op) -> dict:
    """Accuracy per group of examples: per operation by default, or any
    ``key(example)``.

    Groups appear in the order they first occur in ``examples``.
    """
    if len(examples) == 0:
        raise ValueError("accuracy_by needs at least one example")
    batch = create_batch(list(examples))
    correct = predictions(model, batch) == batch.targets          # (N,)
    groups: dict = {}
    for ex, ok in zip(examples, correct, strict=True):
        groups.setdefault(key(ex), []).append(ok)
    return {k: float(np.mean(v)) for k, v in groups.items()}


# %% tags=["export"]
@dataclass
class ExperimentResult:
    """What one run measured. Accuracies are fractions in [0, 1].

    ``accuracy`` and ``accuracy_by_op`` are on the evaluation inputs (by default all
    5,000 possible inputs) at the end of training; ``heldout_accuracy`` on those of them
    that are not in the training set. ``steps_to_100``, ``epochs_to_100`` and
    ``seconds_to_100`` are taken at the first epoch end at which every evaluation input
    was right (``None`` if that never happened). ``curve`` has one entry per epoch:
    step, train loss, validation accuracy.
    """

    config: ExperimentConfig
    num_parameters: int
    accuracy: float
    accuracy_by_op: dict
    heldout_accuracy: float
    steps: int
    steps_to_100: int | None
    epochs_to_100: int | None
    seconds: float
    seconds_to_100: float | None
    wrong: list = field(default_factory=list)
    curve: list = field(default_factory=list)
    model: Transformer | None = field(default=None, repr=False)

    @property
    def reached_100(self) -> bool:
        return self.steps_to_100 is not None


@functools.cache
def _standard_data() -> tuple[list[Example], list[Example], list[Example]]:
    """The book's train and validation split, and all 5,000 inputs (made once, shared).
    """
    train, val, _ = default_splits(0)
    return train, val, all_examples()


@functools.cache
def _batch_of(examples: tuple[Example, ...]) -> Batch:
    return create_batch(list(examples))


def run_experiment(config: ExperimentConfig = ExperimentConfig(), *,
                   data: tuple | None = None,
                   evaluate_on: Sequence[Example] | None = None,
                   stop_at_100: bool = True,
                   progress: bool = False) -> ExperimentResult:
    """Train one model from scratch and measure it: config in, metrics out.

    ``data``: (train, val) lists of Examples (default: the book's split); then
    ``evaluate_on``, the inputs to judge the model on, is required (default: all
    5,000 inputs). ``stop_at_100``: stop at the first epoch end at which every
    evaluation input is right. ``progress``: print one line per epoch. The result
    includes the trained model (``.model``) and the wrong inputs (``.wrong``).

    The recipe is chapter 5's, as in ``fit`` (``train_steps``: Adam, warm-up then
    cosine decay over ``config.epochs``, gradient clipping), except that the model is
    measured as it is when training stops rather than at its best validation epoch.
    """
    if data is None:
        train, val, default_eval = _standard_data()
    else:
        (train, val), default_eval = data, None
    evaluate_on = default_eval if evaluate_on is None else list(evaluate_on)
    if evaluate_on is None:
        raise ValueError("with your own data=(train, val), also pass evaluate_on= "
                         "(the examples to judge the model on)")
    train_batch, val_batch = _batch_of(tuple(train)), _batch_of(tuple(val))
    eval_batch = _batch_of(tuple(evaluate_on))

    model = config.model()
    suspects = None             # inputs found wrong by the last full check

    def all_right() -> bool:
        """Is every evaluation input answered correctly? The inputs that were wrong at
        the last full check are tried first; if one is still wrong, the full check is
        skipped."""
        nonlocal suspects
        if suspects is not None:
            rows = Batch(eval_batch.ids[suspects], eval_batch.mask[suspects],
                         eval_batch.targets[suspects])
            if (predictions(model, rows) != rows.targets).any():
                return False
        suspects = np.flatnonzero(predictions(model, eval_batch) != eval_batch.targets)
        return len(suspects) == 0

    first_100, curve = None, []

    def after_epoch(epoch, losses) -> bool:         # losses: every step so far
        nonlocal first_100
        step, previous = len(losses), curve[-1]["step"] if curve else 0
        epoch_loss = float(np.mean(losses[previous:]))
        val_accuracy = evaluate(model, val_batch)["accuracy"]
        curve.append({"epoch": epoch, "step": step, "train_loss": epoch_loss,
                      "val_accuracy": val_accuracy})
        if progress:
            print(f"epoch {epoch}  step {step:4d}  train loss {epoch_loss:.4f}  "
                  f"val acc {val_accuracy:.2%}", flush=True)
        if first_100 is None and val_accuracy == 1.0 and all_right():
            first_100 = (step, epoch, time.perf_counter() - start)
            return stop_at_100                      # True: stop here
        return False

    start = time.perf_counter()
    step = len(train_steps(model, CrossEntropyLoss(), train_batch, epochs=config.epochs,
                           batch_size=config.batch_size, lr=config.lr,
                           warmup=config.warmup, clip=config.clip, seed=config.seed,
                           on_epoch=after_epoch))
    seconds = time.perf_counter() - start

    predicted = predictions(model, eval_batch)                         # (N,)
    correct = predicted == eval_batch.targets                          # (N,)
    by_op = accuracy_per_operation(evaluate_on, predicted)             # chapter 6
    del by_op["all"]
    seen = {(ex.op, ex.args) for ex in train}
    unseen = np.array([(ex.op, ex.args) not in seen for ex in evaluate_on])
    step_100, epoch_100, seconds_100 = first_100 or (None, None, None)
    return ExperimentResult(
        config=config, num_parameters=model.num_parameters(),
        accuracy=float(correct.mean()),
        accuracy_by_op=by_op,
        heldout_accuracy=(float(correct[unseen].mean()) if unseen.any()
                          else float("nan")),
        steps=step, steps_to_100=step_100, epochs_to_100=epoch_100, seconds=seconds,
        seconds_to_100=seconds_100,
        wrong=[ex for ex, ok in zip(evaluate_on, correct, strict=True) if not ok],
        curve=curve, model=model)


# %% [markdown]
# One run of the reference config, printing its progress:

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from transformer_lib.data import OPERATIONS, all_examples, create_batch
from transformer_lib.experiments import (ExperimentConfig, accuracy_by, predictions,
                                         run_experiment)
from transformer_lib.transformer import parameters_by_formula   # chapter 4
from transformer_lib.training import default_splits

notebook_start = time.perf_counter()

# %%
# NBVAL_IGNORE_OUTPUT
reference = run_experiment(ExperimentConfig(), progress=True)
print(f"trained in {reference.seconds:.1f} s; "
      f"100% after {reference.seconds_to_100:.1f} s")

# %% [markdown]
# The progress lines (loss and validation accuracy per epoch) and the wall-clock time are
# not compared when the book is tested: their digits depend on the machine. What holds on
# every machine:

# %%
print(f"{reference.num_parameters:,} parameters; accuracy on all 5,000 inputs "
      f"{reference.accuracy:.0%} (held-out only: {reference.heldout_accuracy:.0%});\n"
      "on every machine measured, 100% by the end of epoch 7 at the latest "
      "(step 882 of 1,008)")
assert reference.accuracy == reference.heldout_accuracy == 1.0
assert reference.num_parameters == 102_420
assert reference.curve[0]["step"] == 126                # 4,004 inputs in batches of 32
assert reference.epochs_to_100 <= 7                   # measured: 5 or 6

# %% [markdown]
# Bad configs are refused with a message that says what is wrong:

# %%
from transformer_lib.data import show_error  # chapter 1: assert an error and print it

show_error(lambda: ExperimentConfig().but(learning_rate=1e-3),
           ValueError, "unknown config field(s) learning_rate")
show_error(lambda: ExperimentConfig(d_model=64, num_heads=3),
           ValueError, "d_model=64 is not divisible by num_heads=3")
show_error(lambda: ExperimentConfig(epochs=0),
           ValueError, "epochs must be a positive integer, got 0")

# %% [markdown]
# ## How much does one run tell you? Seeds
#
# The seed decides the initial weights and the order of the mini-batches, nothing else.
# The original project's two runs of "the same" model differed by six points, so before
# comparing any settings we need to know how much the seed alone moves the result.
# `run_grid` runs named variants of a config for several seeds; a `cache` dictionary lets later
# sections reuse runs that were already made (a config is its own key).

# %% tags=["export"]
def run_grid(base: ExperimentConfig, variants: dict[str, dict],
             seeds: Sequence[int] = (0, 1, 2), cache: dict | None = None,
             **kwargs) -> dict[str, list[ExperimentResult]]:
    """Run every named variant of ``base`` once per seed: {name: [result per seed]}.

    ``variants``: {name: config changes}, e.g. ``{"lr 1e-3": {"lr": 1e-3}, "ref": {}}``.
    ``cache``: {config: result}; results found there are reused, new ones are added.
    ``kwargs`` go to ``run_experiment`` (not ``data``: the cache assumes the book's
    data).
    """
    if "data" in kwargs and cache is not None:
        raise ValueError("run_grid: the cache assumes the book's data; "
                         "do not pass both data= and cache=")
    grid = {}
    for name, changes in variants.items():
        runs = []
        for seed in seeds:
            config = base.but(**changes, seed=seed)
            if cache is not None and config in cache:
                result = cache[config]
            else:
                result = run_experiment(config, **kwargs)
                if cache is not None:
                    cache[config] = result
            runs.append(result)
        grid[name] = runs
    return grid


def summarize(runs: Sequence[ExperimentResult]) -> dict:
    """Mean, min and max accuracy over seeds, per operation too; how many runs reached
    100%."""
    accuracy = [r.accuracy for r in runs]
    reached = [r for r in runs if r.reached_100]
    return {
        "runs": len(runs),
        "parameters": runs[0].num_parameters,
        "accuracy_mean": float(np.mean(accuracy)),
        "accuracy_min": float(np.min(accuracy)),
        "accuracy_max": float(np.max(accuracy)),
        "by_op_mean": {op: float(np.mean([r.accuracy_by_op[op] for r in runs]))
                       for op in runs[0].accuracy_by_op},
        "by_op_min": {op: float(np.min([r.accuracy_by_op[op] for r in runs]))
                      for op in runs[0].accuracy_by_op},
        "reached_100": len(reached),
        "steps_to_100_mean": (float(np.mean([r.steps_to_100 for r in reached]))
                              if reached else None),
        "steps_mean": float(np.mean([r.steps for r in runs])),
        "seconds_mean": float(np.mean([r.seconds for r in runs])),
    }


# %% [markdown]
# The three seeds of the reference config (seed 0 is the run above, taken from the cache).
# `print_grid` prints, per variant, a bound that every seed's accuracy on all 5,000 inputs
# meets (at least 99.9%, that is at most five inputs wrong; at least 99% or 95%; or below
# 95%), at a precision that held on every machine the chapter was run on. Whether a run
# reaches *exactly* 100% can hinge on one input, and that can differ between machines, so
# the text counts it only where the count held everywhere. Each seed's own numbers are in
# the figures.

# %%
from transformer_lib.experiments import run_grid, summarize

SEEDS = (0, 1, 2)                       # more seeds: SEEDS = range(10)
REFERENCE = ExperimentConfig()
cache = {REFERENCE: reference}          # every run of this chapter, by config


def accuracy_bound(runs) -> str:
    """A bound that every run's accuracy meets: '≥ 99.9%', '≥ 99%', '≥ 95%' or '< 95%'.
    """
    lowest = min(r.accuracy for r in runs)
    for level in (0.999, 0.99, 0.95):
        if lowest >= level:
            return f"≥ {100 * level:g}%"
    return "< 95%" if max(r.accuracy for r in runs) < 0.95 else "mixed"


def print_grid(grid: dict) -> None:
    """One line per variant: parameters, seeds, the accuracy bound of every seed."""
    print(f"{'variant':<24}{'params':>8}  {'seeds':>5}  every seed's accuracy")
    for name, runs in grid.items():
        s = summarize(runs)
        print(f"{name:<24}{s['parameters']:>8,}  {s['runs']:>5}  "
              f"{accuracy_bound(runs)}")


seed_grid = run_grid(REFERENCE, {"reference": {}}, SEEDS, cache)
print_grid(seed_grid)
reference_runs = seed_grid["reference"]
print("every seed is right on all 5,000 inputs within the 8 epochs:",
      all(r.reached_100 and not r.wrong for r in reference_runs))
assert all(r.reached_100 and not r.wrong for r in reference_runs)


# %% tags=["hide-input"]
def plot_grid(grid: dict, title: str, epochs: int = 8) -> None:
    """Left: accuracy on all inputs, one dot per seed. Right: epochs until 100%."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6))
    names = list(grid)
    for i, name in enumerate(names):
        runs = grid[name]
        jitter = np.linspace(-0.12, 0.12, len(runs))
        left.scatter(i + jitter, [100 * r.accuracy for r in runs], color="tab:blue",
                     zorder=3)
        left.hlines(100 * np.mean([r.accuracy for r in runs]), i - 0.25, i + 0.25,
                    color="k")
        done = [(j, r.epochs_to_100) for j, r in zip(jitter, runs) if r.reached_100]
        never = [j for j, r in zip(jitter, runs) if not r.reached_100]
        right.scatter([i + j for j, _ in done], [e for _, e in done], color="tab:green",
                      zorder=3)
        right.scatter([i + j for j in never], [epochs + 1] * len(never), marker="x",
                      color="tab:red", zorder=3)
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.grid(axis="y", alpha=0.3)
    left.set_ylabel("accuracy on all 5,000 inputs (%)")
    left.set_title("final accuracy (dot = seed, bar = mean)")
    right.set_ylabel("epochs until 100%")
    right.set_yticks(range(1, epochs + 2), [*map(str, range(1, epochs + 1)), "never"])
    right.set_title(f"when every input is right (x = not within {epochs} epochs)")
    fig.suptitle(title)
    fig.tight_layout()
    plt.show()


plot_grid(seed_grid, "The reference config, three seeds (this machine's runs)")

# %% [markdown]
# With the eight-epoch budget every seed of the reference ends right on all 5,000 inputs.
# *When* it first gets there differs: on the machines measured, between the end of epoch 4
# and of epoch 7, and not only from seed to seed: the same seed can need an epoch more or
# less on another machine, because its model is not bit-for-bit the same (the figure shows
# this machine's runs). A difference of an epoch or two in "steps to
# 100%" is therefore noise, not a finding.
#
# It was not always this clean: in the first version of this book (another split and
# recipe) the seed decided whether a run reached exactly 100% at all; "The last 0.1%"
# below says why.
#
# The seed spread gives the yardstick for everything below: the reference reaches 100% with
# all three seeds. A variant that also does cannot be ranked against it by that count, and
# a variant that misses by an input or two with one seed has not been shown to be worse.
#
# ## Hyperparameters: the learning rate
#
# The reference recipe uses a peak learning rate of $2 \cdot 10^{-3}$ and batches of 32
# (chapter 5). We try a learning rate half as large and one five times larger, each for
# three seeds, with everything else fixed, including the eight-epoch budget and the 50-step
# warm-up. The batch size is yours to try: pass more variants to `run_grid`, e.g.
# `{"batch 128": {"batch_size": 128}}` (four times fewer steps per epoch; on the machines
# measured, each of its seeds ended at 100% or one input short, which of the two depending
# on the machine).

# %%
hyper_grid = run_grid(REFERENCE, {
    "lr 1e-3": {"lr": 1e-3},
    "lr 2e-3 (reference)": {},
    "lr 1e-2": {"lr": 1e-2},
}, SEEDS, cache)
print_grid(hyper_grid)



# %%
plot_grid(hyper_grid, "Peak learning rate, three seeds each (this machine's runs)")

# %% [markdown]
# Two things stand out.
#
# - **Too large a learning rate breaks the positional operations.** At $10^{-2}$ every seed
#   ends far below 100%, and the damage is in `First`, `Second` and `Last`: in every seed at
#   least one of them stays below 60%, while `Max` and `Min` stay above 95% on average.
#   Remember this pattern: it will come back in the ablations.
# - **$10^{-3}$ is as good as the reference.** Half the learning rate, and every seed still
#   reaches 100% within the same budget, like the reference's seeds. The reference learning
#   rate is not on a knife's edge, at least not on the small side.

# %%
hs = {name: summarize(runs) for name, runs in hyper_grid.items()}
POSITIONAL = ("First", "Second", "Last")
weakest = [min(r.accuracy_by_op[op] for op in POSITIONAL)
           for r in hyper_grid["lr 1e-2"]]
print(f"lr 1e-2: weakest positional operation below 60% in "
      f"{sum(w < 0.6 for w in weakest)} of 3 seeds;\n"
      "        Max and Min on average above 95%: "
      f"{min(hs['lr 1e-2']['by_op_mean'][op] for op in ('Max', 'Min')) > 0.95}")
assert hs["lr 1e-2"]["accuracy_max"] < 0.95                      # all three seeds fail
assert max(weakest) < 0.6
assert min(hs["lr 1e-2"]["by_op_mean"][op] for op in ("Max", "Min")) > 0.95
print("lr 1e-3: every seed reached 100%:", hs["lr 1e-3"]["reached_100"] == len(SEEDS))
for name in ("lr 1e-3", "lr 2e-3 (reference)"):
    assert hs[name]["reached_100"] == len(SEEDS), name

# %% [markdown]
# ## Model size: how small can it get?
#
# The reference model has 102,420 parameters. We shrink it along each axis: one layer instead
# of two, and narrower models ($d_\text{model}$ = 32, 16, 8, with
# $d_\text{ff} = 4\,d_\text{model}$ as in the reference, and two heads instead of four when
# $d_\text{model} \le 16$). The number of heads is an ablation of its own below.
#
# First, where the parameters are. Per block, attention has $4 d^2 + 3d$ ($W_q$, $W_k$, $W_v$,
# $W_o$; the key projection has no bias), the feed-forward network $2 d\, d_\text{ff} +
# d_\text{ff} + d$ and the two LayerNorms $4d$; around the blocks sit the embedding ($V d$) and
# the output layer ($d V + V$), with $V = 20$. The formula matches the models exactly:

# %%
SIZES = {
    "d 64, 2 layers (ref.)": {},
    "d 64, 1 layer": {"num_layers": 1},
    "d 32, 2 layers": {"d_model": 32, "d_ff": 128},
    "d 16, 2 layers": {"d_model": 16, "d_ff": 64, "num_heads": 2},
    "d 8, 2 layers": {"d_model": 8, "d_ff": 32, "num_heads": 2},
}
for name, changes in SIZES.items():
    config = REFERENCE.but(**changes)
    n = config.model().num_parameters()
    assert n == parameters_by_formula(20, config.d_model, config.num_layers,
                                      config.d_ff), name
    print(f"{name:<22} {n:>8,} parameters")

# %% [markdown]
# Prediction, before running: narrower models should still work down to some width, since
# the task is tiny; but one layer should fail at `First`, `Second` and `Last`. With the
# `[EOS]` read-out, the answer is assembled at the `[EOS]` position. In a one-layer model its
# single attention step uses a query computed from the `[EOS]` token alone, which is the same
# for every operation: it cannot look up "the second digit" only when the operation is
# `Second`. Two layers can: after the first, the other positions have mixed in the
# operation (chapter 6 found that the arguments' keys carry it), so the second can look up
# the position that operation needs. (`Max` and `Min` need no position, so they should survive.)

# %%
size_grid = run_grid(REFERENCE, SIZES, SEEDS, cache)
print_grid(size_grid)

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
for name, runs in size_grid.items():
    s = summarize(runs)
    ms_per_step = 1000 * s["seconds_mean"] / s["steps_mean"]
    print(f"{name:<22} {s['parameters']:>8,} parameters {s['steps_mean']:5.0f} steps "
          f"{s['seconds_mean']:5.1f} s per run {ms_per_step:5.1f} ms per step")

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(7, 4))
for name, runs in size_grid.items():
    marker = "s" if runs[0].config.num_layers == 1 else "o"
    ax.scatter([r.num_parameters for r in runs], [100 * r.accuracy for r in runs],
               marker=marker, label=name, zorder=3)
ax.set_xscale("log")
ax.set_xlabel("parameters (log scale)")
ax.set_ylabel("accuracy on all 5,000 inputs (%)")
ax.set_title("Model size: one marker per seed (square = one layer)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The prediction holds. One layer is not enough, at least at the reference width of 64:
# `First`, `Second` and `Last` stay below 50% with every seed while `Max` and `Min` are
# above 99%. Width matters much less: a $d_\text{model} = 32$ model, with a quarter of the
# reference's parameters, reaches 100% with every seed, as the reference does; a
# $d_\text{model} = 16$ model with 7,188 parameters, 14 times fewer than the reference,
# still gets more than 98% of all inputs right with every seed, but no seed of it reaches
# 100% in eight epochs. At $d_\text{model} = 8$ (2,068 parameters) training no longer works
# within eight epochs: every seed stays below 60%.
#
# The timing cell between the table and the plot prints the cost per run and per step on
# the machine that ran this notebook. To search further, give the small models more
# epochs, e.g. `run_grid(REFERENCE.but(epochs=16), SIZES, range(10))`.

# %%
ss = {name: summarize(runs) for name, runs in size_grid.items()}
one_layer = size_grid["d 64, 1 layer"]
print("one layer: First/Second/Last below 50% in every seed:",
      max(r.accuracy_by_op[op] for r in one_layer for op in POSITIONAL) < 0.5,
      "; Max/Min above 99%:",
      min(r.accuracy_by_op[op] for r in one_layer for op in ("Max", "Min")) > 0.99)
d16 = ss["d 16, 2 layers"]
print("d 32: every seed reached 100%:", ss["d 32, 2 layers"]["reached_100"] == 3)
print("d 16: no seed reached 100%, every seed above 98%:",
      d16["reached_100"] == 0 and d16["accuracy_min"] > 0.98)
assert max(r.accuracy_by_op[op] for r in one_layer for op in POSITIONAL) < 0.5
assert min(r.accuracy_by_op[op] for r in one_layer for op in ("Max", "Min")) > 0.99
assert ss["d 16, 2 layers"]["parameters"] == 7_188
assert (ss["d 64, 2 layers (ref.)"]["parameters"]
        / ss["d 16, 2 layers"]["parameters"] > 14)
reference_size = ss["d 64, 2 layers (ref.)"]["parameters"]
assert ss["d 32, 2 layers"]["parameters"] < reference_size / 3.8      # a quarter
assert ss["d 64, 2 layers (ref.)"]["reached_100"] == 3
assert ss["d 32, 2 layers"]["reached_100"] == 3
assert ss["d 16, 2 layers"]["accuracy_min"] > 0.98
assert ss["d 16, 2 layers"]["reached_100"] == 0
assert ss["d 8, 2 layers"]["accuracy_max"] < 0.6

# %% [markdown]
# ## Ablations: what each part is for
#
# An ablation removes one part and measures what breaks. Each subsection writes down the
# prediction first, then runs three seeds (two for the last four, to keep the chapter
# quick), then checks the prediction against the numbers.
#
# ### No positional encoding
#
# **Prediction.** Without positional encodings the model receives a *bag* of tokens.
# Attention is permutation-equivariant: permute the input vectors and the outputs are
# permuted the same way, because every score depends only on the two vectors involved. The
# feed-forward network and LayerNorm act on each position separately. So the `[EOS]` vector,
# and hence the answer, cannot depend on the order of the digits. `Max ( 5 3 9 )` and
# `Max ( 9 5 3 )` should look identical to the model (fine for `Max` and `Min`), but so do
# `First ( 5 3 9 )` and `First ( 9 5 3 )`, which have different answers.
#
# How well can an order-blind model do on `First`? Its best guess is the most common digit of
# the input, which is right with probability (number of copies)/3. Averaged over all 1,000
# digit triples this ceiling is
#
# $$\frac{\mathbb{E}[\text{copies of the most common digit}]}{3}
#   = \frac{0.72 \cdot 1 + 0.27 \cdot 2 + 0.01 \cdot 3}{3} = 43\%,$$
#
# since 72% of triples have three different digits, 27% exactly one pair and 1% are triples.
# So: `First`, `Second` and `Last` should end at or below 43% (above the 10% of random
# guessing), and `Max` and `Min` near 100%. Since the ceiling is a bound that no amount of
# training can beat, this ablation gets four epochs instead of eight.

# %%
import itertools
from collections import Counter

triples = list(itertools.product(range(10), repeat=3))
ceiling = np.mean([Counter(t).most_common(1)[0][1] / 3 for t in triples])
print("best possible accuracy of an order-blind model on First/Second/Last: "
      f"{ceiling:.2%}")
assert abs(ceiling - (0.72 * 1 + 0.27 * 2 + 0.01 * 3) / 3) < 1e-12

NO_POSITIONS = {"positional": False, "epochs": 4}
ablation_grid = run_grid(REFERENCE,
                         {"reference": {}, "no positional encoding": NO_POSITIONS},
                         SEEDS, cache)
print_grid(ablation_grid)

# %% [markdown]
# The trained models obey the argument exactly: reordering the digits of any input does not
# change the logits (up to float32 rounding). It is enough to check a swap of the first two
# digits and a rotation of all three, since every order of three digits is a combination of
# those two. The models come within two points of the ceiling, and cannot beat it.

# %%
no_pos = ablation_grid["no positional encoding"]
exhaustive = all_examples()
batch = create_batch(exhaustive)
for run in no_pos:
    run.model.eval()
    logits = run.model(batch.ids, batch.mask)                         # (5000, V)
    # a swap and a rotation generate all six orders of three digits
    for perm in ([1, 0, 2], [1, 2, 0]):
        ids = batch.ids.copy()
        ids[:, 2:5] = batch.ids[:, 2:5][:, perm]             # reorder the three digits
        assert np.allclose(run.model(ids, batch.mask), logits, atol=1e-4)
    for op in POSITIONAL:
        assert ceiling - 0.02 < run.accuracy_by_op[op] <= ceiling + 1e-12, (
            op, run.accuracy_by_op[op])
    assert min(run.accuracy_by_op["Max"], run.accuracy_by_op["Min"]) > 0.99
print("permuting the digits never changes the logits;\nin every seed First, Second and "
      f"Last are within 2 points below the ceiling of {ceiling:.0%},\n"
      "Max and Min above 99%")

# %% [markdown]
# ### No residual connections
#
# **Prediction.** Residual connections ($x + \text{sublayer}(x)$) give the gradient a direct
# path around every sub-layer, which matters when there are many sub-layers to get through.
# Our model has only two blocks, so the path without them is short. Prediction: at this depth
# the model still learns the task, at most a little less reliably. (We test the depth
# argument itself further below.)

# %%
MILD_SEEDS = (0, 1)                     # more seeds: SEEDS
ablation_grid |= run_grid(REFERENCE, {"no residual": {"residual": False}}, MILD_SEEDS,
                          cache)
print_grid({k: ablation_grid[k] for k in ("reference", "no residual")})

# %% [markdown]
# ### No LayerNorm
#
# **Prediction.** The model is post-norm (`x = norm1(x + attention(x))`, chapter 4), so
# without LayerNorm nothing keeps the size of the residual stream in check as it passes
# through the blocks. With two blocks, gradient clipping and warm-up, that should not matter
# much either: prediction, still close to 100%.

# %%
ablation_grid |= run_grid(REFERENCE, {"no LayerNorm": {"layer_norm": False}},
                          MILD_SEEDS, cache)
print_grid({k: ablation_grid[k] for k in ("reference", "no LayerNorm")})

# %% [markdown]
# ### One head instead of four
#
# **Prediction.** With one head of $d_k = 64$ instead of four of $d_k = 16$ each layer can
# attend to only one mixture of positions. The task needs one lookup per operation (one
# position, or the largest or smallest digit), and two layers give two attention steps, so one
# head per layer should be enough, though possibly less reliably. Prediction: close to 100%.

# %%
ablation_grid |= run_grid(REFERENCE, {"one head": {"num_heads": 1}}, MILD_SEEDS, cache)
print_grid({k: ablation_grid[k] for k in ("reference", "one head")})

# %% [markdown]
# ### Read-out: mean over positions instead of `[EOS]`
#
# **Prediction.** The reference reads the answer from the `[EOS]` position. The mean read-out
# averages all positions instead. The answer then has to be written into the average, which
# the last attention layer can do by copying it into many positions. Averaging does not lose
# the order, since the positional encodings were added before the blocks. Prediction: works
# about as well.

# %%
ablation_grid |= run_grid(REFERENCE, {"mean read-out": {"readout": "mean"}},
                          MILD_SEEDS, cache)
print_grid({k: ablation_grid[k] for k in ("reference", "mean read-out")})

# %% [markdown]
# ### All ablations side by side

# %% tags=["hide-input"]
def plot_by_operation(grid: dict, title: str) -> None:
    """Top: accuracy per operation and variant, one dot per seed on a bar at the mean.
    Bottom: the same as wrong inputs per operation (of 1,000), where a spread of one
    input is visible."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6.4), sharex=True)
    width = 0.8 / len(grid)
    for k, (name, runs) in enumerate(grid.items()):
        acc = np.array([[r.accuracy_by_op[op] for op in OPERATIONS]
                        for r in runs])                              # (seeds, ops)
        x = np.arange(len(OPERATIONS)) + (k - (len(grid) - 1) / 2) * width
        bars = top.bar(x, 100 * acc.mean(axis=0), width, label=name, alpha=0.8)
        colour = bars.patches[0].get_facecolor()
        jitter = np.linspace(-0.25, 0.25, len(runs)) * width
        for j, row in zip(jitter, acc):
            top.scatter(x + j, 100 * row, s=8, color="k", zorder=3)
            bottom.scatter(x + j, np.round(1000 * (1 - row)), s=18, color=colour,
                           edgecolor="k", linewidth=0.5, zorder=3)
    top.axhline(100 * ceiling, color="gray", ls="--", lw=1,
                label="order-blind ceiling (43%)")
    top.axhline(10, color="gray", ls=":", lw=1, label="random guess (10%)")
    top.set_ylabel("accuracy on all inputs (%)")
    top.set_ylim(0, 105)
    top.set_title(title)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_ylim(-0.3, 1000)
    bottom.set_yticks([0, 1, 2, 5, 10, 100, 1000], ["0", "1", "2", "5", "10", "100",
                                                     "1,000"])
    bottom.set_ylabel("wrong inputs of 1,000\n(one dot per seed)")
    bottom.set_xticks(range(len(OPERATIONS)), OPERATIONS)
    for ax in (top, bottom):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plt.show()


plot_by_operation(ablation_grid, "Ablations: accuracy per operation (bar: mean over "
                                 "the seeds, dot: one seed; this machine's runs)")

# %% [markdown]
# Only one ablation breaks the model, and it breaks exactly what was predicted: without
# positional encodings `First`, `Second` and `Last` fall to the order-blind ceiling while
# `Max` and `Min` are untouched (the lower panel counts wrong inputs, so that a single
# miss would show). The other four cost nothing that two seeds each can see at this size:
# every one of their eight runs gets at least 99.9% of the inputs right, and all of them but
# at most two reach exactly 100% (on the machines measured: eight, seven or six of eight; a
# run that falls short misses one or two inputs). That cannot tell these four from the
# reference; the place where two of them matter is depth, next.

# %%
ab = {name: summarize(runs) for name, runs in ablation_grid.items()}
mild = [r for name in ("no residual", "no LayerNorm", "one head", "mean read-out")
        for r in ablation_grid[name]]
reached = sum(r.reached_100 for r in mild)
print(f"the four mild ablations, {len(mild)} runs: every run's accuracy "
      f"{accuracy_bound(mild)};\nall but at most two reached 100%: "
      f"{reached >= len(mild) - 2}")
assert min(r.accuracy for r in mild) >= 0.999             # nothing breaks at depth 2
assert reached >= len(mild) - 2
assert ab["reference"]["reached_100"] == len(SEEDS)

# %% [markdown]
# ### Depth: where residual connections and LayerNorm earn their keep
#
# The argument for residual connections and LayerNorm is about depth, and two blocks are
# hardly deep. **Prediction:** in a six-block model the same two ablations should hurt badly,
# because the gradient has to pass through twelve sub-layers (without residuals) or the
# activations can grow or shrink from block to block (without LayerNorm). To keep it cheap we
# use $d_\text{model} = 32$, $d_\text{ff} = 64$, four epochs and two seeds (pass `SEEDS` for
# three); the complete six-block model is there to show that this budget is enough when
# both parts are present.

# %%
DEEP = REFERENCE.but(d_model=32, d_ff=64, num_layers=6, epochs=4)
deep_grid = run_grid(DEEP, {"6 blocks": {},
                            "6 blocks, no residual": {"residual": False},
                            "6 blocks, no LayerNorm": {"layer_norm": False}},
                     (0, 1), cache)
print_grid(deep_grid)
ds = {name: summarize(runs) for name, runs in deep_grid.items()}
assert ds["6 blocks"]["accuracy_min"] >= 0.99
worst_complete = ds["6 blocks"]["accuracy_min"]
assert ds["6 blocks, no residual"]["accuracy_max"] < worst_complete - 0.15
assert ds["6 blocks, no LayerNorm"]["accuracy_max"] < worst_complete - 0.10

# %% [markdown]
# The complete six-block model gets at least 99% with both seeds in four epochs. Without
# residual connections both seeds end more than 15 points below its worst seed, without
# LayerNorm more than 10 points. (How far below moves with the machine: on the machines
# measured, 32 to 49 points without residuals, 12 to 20 without LayerNorm.) Residual
# connections and LayerNorm are what make depth trainable; a two-block model hardly needs
# them.

# %% [markdown]
# ## The last 0.1%: which inputs do near-perfect models get wrong?
#
# In the first version of this book many runs of this chapter ended between 99.9% and 100%,
# the reference's seeds among them, and their wrong answers piled up on a handful of rare
# inputs, above all `Max ( 0 0 1 )`, `Max ( 1 0 0 )` and `Max ( 0 1 0 )`. Only 7 of the
# 1,000 `Max` inputs have the answer 1, and that book's training split (a random split of
# 10,000 random draws, chapter 1) held just one of them, `Max ( 1 1 0 )`: whether a model
# generalised to the other six depended on the seed. That is about data, so it can be
# checked without training: how many training examples each (operation, answer) pair gets
# under the old random split and under chapter 1's stratified split, which this book now
# trains on.

# %%
from transformer_lib.data import generate_dataset, split_dataset

train_inputs = {(ex.op, ex.args) for ex in default_splits(0)[0]}
old_train, _, _ = split_dataset(generate_dataset(10_000, seed=0), seed=0)
exists = Counter((ex.op, ex.answer) for ex in exhaustive)
in_old = Counter((ex.op, ex.answer) for ex in old_train)
in_new = Counter((ex.op, ex.answer) for ex in default_splits(0)[0])
rarest = sorted(pair for pair, n in exists.items() if n < 20)
print(f"{'pair':10}{'inputs':>7}{'old random split':>18}{'stratified split':>18}")
for op, answer in rarest:
    print(f"{op} = {answer:<4}{exists[op, answer]:>7}{in_old[op, answer]:>18}"
          f"{in_new[op, answer]:>18}")
share_old = min(in_old[p] / n for p, n in exists.items())
share_new = min(in_new[p] / n for p, n in exists.items())
print(f"smallest share of a pair's inputs in training: old {share_old:.0%}, "
      f"stratified {share_new:.0%}\n(all inputs: {len(old_train) / 5000:.0%} and "
      f"{len(train_inputs) / 5000:.0%})")
assert len(rarest) == 6 and sum(exists[p] for p in rarest) == 54
assert in_old["Max", 1] == 1 and in_new["Max", 1] == 6 and exists["Max", 1] == 7
assert len(old_train) == 3_450 and len(train_inputs) == 4_004
assert share_old < 0.15 < 0.75 < share_new

# %% [markdown]
# Under the old split, `Max` = 1 had one training example of seven, 14%, while the split as
# a whole held 69% of all inputs. The stratified split gives every pair its 80% share,
# rounded (six of seven for `Max` = 1, 15 of 19 for `Max` = 2), so no pair with several
# inputs is left with a single training example. That is why the reference now reaches 100%
# with every seed above: in the README's seed table (`benchmarks/recipes.py`), the
# stratified split reaches 100% for almost every seed with either peak learning rate, the
# old $3 \cdot 10^{-3}$ or chapter 5's $2 \cdot 10^{-3}$, while the old random split does
# for 8 of 20.
#
# With the new split, which runs of this chapter still miss inputs, and which inputs? The
# runs at 98% or more that still miss some inputs are mostly those of the models that are
# too small for the budget or deep and short of epochs (the 16-wide model, and the 32-wide
# six-block one, which at four epochs gets at least 99% but not always 100%). Their wrong
# answers are no longer piled on rare pairs, and most of them are on inputs the model
# *trained on*:

# %%
near_perfect = [r for r in cache.values() if 0.98 <= r.accuracy < 1.0]
wrong = [ex for r in near_perfect for ex in r.wrong]
seen = sum((ex.op, ex.args) in train_inputs for ex in wrong) / len(wrong)
rare = sum((ex.op, ex.answer) in rarest for ex in wrong) / len(wrong)
print("of the wrong answers of the runs at 98% or more but below 100%,\n"
      f"  more than half are on training inputs: {seen > 0.5}\n"
      f"  fewer than a quarter on the 54 inputs of the six rarest pairs: {rare < 0.25}")
assert seen > 0.5 and rare < 0.25
assert {(16, 2), (32, 6)} <= {(r.config.d_model, r.config.num_layers)
                              for r in near_perfect}
wide = [r for r in cache.values() if (r.config.d_model, r.config.num_layers) == (64, 2)
        and r.config.lr <= 2e-3 and r.config.positional]
print(f"two-layer, 64-wide runs with lr at most 2e-3 and positional encodings: "
      f"{len(wide)}\n  all at 99.9% or more: {min(r.accuracy for r in wide) >= 0.999}\n"
      "  all but at most two at 100%: "
      f"{sum(r.reached_100 for r in wide) >= len(wide) - 2}")
assert min(r.accuracy for r in wide) >= 0.999
assert sum(r.reached_100 for r in wide) >= len(wide) - 2

# %% [markdown]
# A model that gets inputs wrong that it was trained on is underfitting: it has not the
# capacity or the training to fit everything, which is a statement about the model, not
# about a corner of the data it never saw. The two-layer, 64-wide runs of this chapter with
# positional encodings and a learning rate of at most $2 \cdot 10^{-3}$, ablated or not,
# all get at least 99.9% right, and all of them but at most two reach 100% (on the
# machines measured, 12 to 14 of the 14; the others ended one or two inputs short). So with a
# stratified split, "exactly 100% on all inputs" is a fair test of the model; with the old
# split, it was partly a test of a few unseen corner cases. Either way it can hinge on a
# single input, which is why this chapter reports the accuracy itself alongside it.

# %% [markdown]
# ## Harder variant 1: longer inputs than in training
#
# Does the model learn the *operations*, or the operations at the lengths it has seen? We
# train on 2 to 5 arguments and then test on 6, 7 and 8 arguments, lengths the model has
# never seen. The data are 2,500 random draws of each length, de-duplicated and split without
# leaks into train, validation and test as in chapter 1. Draws repeat: two arguments allow
# only 500 distinct inputs, so the in-distribution test set (739 inputs) holds just 48 with
# two arguments. `length_experiment` does this; `seeds` and the number of examples
# are arguments.
#
# **Prediction.** It depends on how each operation finds its answer.
# `First` and `Second` sit at fixed positions (2 and 3), whatever the length: they should
# carry over. `Max` and `Min` are found by content, by comparing digits: they should carry
# over too, perhaps slightly worse with more digits to compare. `Last` is the hard one: its
# position moves with the length, and with 6 to 8 arguments it lands on absolute positions
# that were never the last digit in training. Prediction: `Last` fails on longer inputs.

# %% tags=["export"]
def length_experiment(config: ExperimentConfig = ExperimentConfig(),
                      train_lengths: Sequence[int] = (2, 3, 4, 5),
                      test_lengths: Sequence[int] = (6, 7, 8),
                      per_length: int = 2_500, per_test_length: int = 1_000,
                      seeds: Sequence[int] = (0,)) -> list[dict]:
    """Train on inputs with ``train_lengths`` arguments, test on longer ones.

    Returns one dict per seed: ``result`` (the ExperimentResult on the in-distribution
    test split) and ``accuracy``: {(num_args, op): accuracy} over all lengths, plus the
    examples.
    """
    examples = []
    for k in train_lengths:
        examples += generate_dataset(per_length, seed=100 + k, num_args=k)
    train, val, test = split_dataset(examples, seed=0)
    longer = []
    for k in test_lengths:
        longer += generate_dataset(per_test_length, seed=200 + k, num_args=k)
    out = []
    for seed in seeds:
        result = run_experiment(config.but(seed=seed), data=(train, val),
                                evaluate_on=test)
        accuracy = accuracy_by(result.model, test + longer,
                               key=lambda ex: (len(ex.args), ex.op))
        out.append({"result": result, "accuracy": accuracy, "test": test,
                    "longer": longer})
    return out


# %%
from transformer_lib.experiments import length_experiment

length_runs = length_experiment(seeds=(0,))  # bigger: seeds=range(5), per_length=10_000
lengths = range(2, 9)
for run in length_runs:
    r = run["result"]
    print(f"seed {r.config.seed}: in-distribution test accuracy at least 99.5%: "
          f"{r.accuracy >= 0.995} ({len(run['test'])} inputs, 2-5 arguments)")
test_lengths = Counter(len(ex.args) for ex in length_runs[0]["test"])
test_groups = Counter((len(ex.args), ex.op) for ex in length_runs[0]["test"])
two_args = [test_groups[(2, op)] for op in OPERATIONS]
print("in-distribution test inputs per length:\n ",
      ", ".join(f"{k} arguments {test_lengths[k]}" for k in sorted(test_lengths)),
      f"\n  (with 2 arguments, {min(two_args)} to {max(two_args)} per operation)")
table = np.array([[[run["accuracy"][(k, op)] for k in lengths] for op in OPERATIONS]
                  for run in length_runs])                       # (seeds, ops, lengths)

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(7, 3.4))
image = ax.imshow(100 * table.mean(axis=0), cmap="viridis", vmin=0, vmax=100,
                  aspect="auto")
for i in range(len(OPERATIONS)):
    for j in range(len(lengths)):
        value = 100 * table[:, i, j].mean()
        ax.text(j, i, f"{value:.0f}", ha="center", va="center",
                color="white" if value < 60 else "black", fontsize=9)
ax.axvline(3.5, color="red", lw=2)
ax.set_xticks(range(len(lengths)), lengths)
ax.set_yticks(range(len(OPERATIONS)), OPERATIONS)
ax.set_xlabel("number of arguments (trained on 2-5, left of the red line)")
ax.set_title(f"Accuracy (%) by length ({len(length_runs)} seed)")
fig.colorbar(image, ax=ax, label="accuracy (%)")
fig.tight_layout()
plt.show()

# %% [markdown]
# On the lengths it trained on, the model is near-perfect: at least 99.5% of the
# in-distribution test inputs, and at least 95% for every operation and length (with two
# arguments, a check on only 9 to 12 test inputs per operation). `First`, `Max` and `Min`
# generalise to lengths the model has never seen, at 95% or more. `Last` collapses, as
# predicted: below 30% at 7 and 8 arguments, not far from the 10% of random guessing.
#
# The surprise is `Second`, which the prediction got wrong. Its position is fixed, and at 6
# arguments it still holds (90% or more), but from 7 arguments on it drops, and at 8 it is
# below 70% (by how much differs a lot between machines; the heatmap shows this machine's
# run). Something else moves with the length:
# the read-out position. `[EOS]` sits at position $k + 3$ for $k$ arguments, so at 6 to 8
# arguments the model reads its answer from positions it never read from in training.
# `First`, `Max` and `Min` survive that; `Second`, apparently, only one step beyond.
# What does the model answer for `Last` on the longest inputs? Rarely the real last
# argument:

# %%
OP = {op: i for i, op in enumerate(OPERATIONS)}
assert table[:, :, :4].min() >= 0.95              # every seed, every op, lengths 2-5
assert all(r["result"].accuracy >= 0.995 for r in length_runs)
assert len(length_runs[0]["test"]) == 739 and test_lengths[2] == 48
assert (min(two_args), max(two_args)) == (9, 12)
assert all(len({(ex.op, ex.args) for ex in run["test"]}) == len(run["test"])
           for run in length_runs)                # the test inputs are distinct
for op in ("First", "Max", "Min"):
    assert table[:, OP[op], 4:].min() >= 0.95, op
assert table[:, OP["Second"], 4].min() >= 0.9                  # 6 arguments
assert table[:, OP["Second"], 6].max() < 0.7                   # 8 arguments
assert table[:, OP["Last"], 5:].max() < 0.3

for run in length_runs:
    last_long = [ex for ex in run["longer"] if ex.op == "Last" and len(ex.args) >= 7]
    # id -> digit
    answers = predictions(run["result"].model, create_batch(last_long)) - 2
    is_last = np.mean([a == ex.args[-1] for a, ex in zip(answers, last_long)])
    print(f"seed {run['result'].config.seed}: Last with 7-8 arguments answers the "
          f"real last argument\nless than 30% of the time: {is_last < 0.3}")
    assert is_last < 0.3

# %% [markdown]
# The model did not learn "the digit before `)`"; with absolute positional encodings,
# tying each operation to the positions seen in training is the cheaper solution, and the
# training data never told it otherwise. The fixes are known, and left as experiments:
# train on more lengths, or use relative positions (the score depends on the distance
# between two tokens rather than on where they are) so that "the token just before `)`"
# means the same at every length.
#
# ## Harder variant 2: numbers from 0 to 99
#
# The original project tried numbers 0–99 and reached 83.7%. Our vocabulary has 20 tokens
# and only ten digits, so a number such as 57 has to be written as two tokens, and the
# answer has to be produced as two tokens as well. Both are design choices:
#
# - **Input.** Every number is written as exactly two digits, with a leading zero:
#   `Max(57, 3, 99)` becomes `Max ( 5 7 0 3 9 9 ) [EOS]`. Fixed width means the tens digit of
#   number $i$ (counting from 0) is always at position $2 + 2i$, so the positional encodings tell the
#   model which digit is which without separators (the commas are dropped, as in chapter 1).
#   The sequence has $2k + 4$ tokens for $k$ numbers.
# - **Output.** Two output heads read the same `[EOS]` vector: one predicts the tens digit of
#   the answer, the other the units digit, each a softmax over the vocabulary. The loss is the
#   mean of the two cross-entropies, and an answer counts as right only if both digits are.
#   The alternative, generating the answer one token at a time and feeding the first digit
#   back in, needs a decoder and a generation loop; two heads keep the model a classifier, at
#   the cost of predicting the two digits independently given the input. Since the answer is
#   a deterministic function of the input, a model that gets both digits right loses nothing
#   by this. A model that errs, though, can combine the tens digit of one number with the
#   units digit of another, an answer that is none of the numbers (an example at the end of
#   this section).
#
# `TwoDigitTransformer` is the chapter 4 transformer with its output layer replaced by one
# that produces both heads' logits at once, $W_\text{out} \in \mathbb{R}^{d \times 2V}$. Its
# forward reshapes the $(B, 2V)$ logits into $(B, 2, V)$; its backward reshapes the gradient
# back to $(B, 2V)$ and hands it to chapter 4's backward, which checks it against the output
# layer's width, $2V$ here, and does the rest. `TwoTokenLoss` does the same reshaping around
# chapter 5's cross-entropy, treating the $B$ examples as $2B$ one-token predictions.

# %% tags=["export"]
class TwoDigitTransformer(Transformer):
    """The transformer with two output heads: the answer's tens digit and its units
    digit.

    Takes the same arguments as ``Transformer``. Both heads read the final vector at the
    read-out position; together they are one Linear layer of shape
    (d_model, 2 * vocab_size).

    forward: ids (B, T) [, mask (B, T)] -> logits (B, 2, V);
    row 0 = tens, row 1 = units.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        c = self.config
        dtype = self.embedding.W.data.dtype
        rng = np.random.default_rng(c["seed"] + 1)
        # (D, 2V)
        self.output = Linear(c["d_model"], 2 * c["vocab_size"], rng, dtype=dtype)

    def forward(self, ids, mask=None):
        logits = super().forward(ids, mask)                   # (B, 2V)
        return logits.reshape(len(logits), 2, -1)             # (B, 2, V)

    def backward(self, grad_logits):
        """Chapter 4's backward, for logits (B, 2, V); returns None like it."""
        grad_logits = np.asarray(grad_logits)                 # (B, 2, V)
        if grad_logits.ndim != 3 or grad_logits.shape[1] != 2:
            raise ValueError("grad_logits must have shape (B, 2, V), "
                             f"got {grad_logits.shape}")
        return super().backward(grad_logits.reshape(len(grad_logits), -1))   # (B, 2V)


class TwoTokenLoss(CrossEntropyLoss):
    """Cross-entropy averaged over K answer tokens: logits (B, K, V), targets (B, K)."""

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> float:
        logits, targets = np.asarray(logits), np.asarray(targets)
        if logits.ndim != 3 or targets.shape != logits.shape[:2]:
            raise ValueError(f"expected logits (B, K, V) and targets (B, K), "
                             f"got {logits.shape} and {targets.shape}")
        self._shape = logits.shape
        return super().forward(logits.reshape(-1, logits.shape[-1]),
                               targets.reshape(-1))

    __call__ = forward

    def backward(self) -> np.ndarray:
        return super().backward().reshape(self._shape)      # (B, K, V)


# %% [markdown]
# The data: `two_digit_data` encodes given operations and numbers, `generate_two_digit` draws
# them. There are $5 \cdot 100^3 = 5$ million inputs, far too many to enumerate, so the test
# set is a random sample of inputs that are *not* in the training set.

# %% tags=["export"]
_DIGIT_IDS = np.array([TOKEN_TO_ID[str(d)] for d in range(10)])
_ANSWER = {"First": lambda n: n[:, 0], "Second": lambda n: n[:, 1],
           "Last": lambda n: n[:, -1], "Max": lambda n: n.max(axis=1),
           "Min": lambda n: n.min(axis=1)}
TWO_DIGIT_OP_WEIGHTS = (0.1, 0.1, 0.1, 0.35, 0.35)


class TwoDigitData(NamedTuple):
    """Puzzles on numbers 0-99: ops (N,) str, numbers (N, k) int, answers (N,) int,
    batch with ids (N, 2k + 4) and targets (N, 2) = token ids of the answer's two
    digits."""

    ops: np.ndarray
    numbers: np.ndarray
    answers: np.ndarray
    batch: Batch

    def text(self, i: int) -> str:
        """Example i as the model reads it, e.g. ``Max ( 5 7 0 3 9 9 ) [EOS]``."""
        return " ".join(ID_TO_TOKEN[int(t)] for t in self.batch.ids[i])


def two_digit_data(ops: Sequence[str], numbers) -> TwoDigitData:
    """Encode puzzles on numbers 0-99, each number as two digit tokens (leading zero).
    """
    ops, numbers = np.asarray(ops), np.asarray(numbers)
    if numbers.ndim != 2 or len(numbers) != len(ops) or numbers.shape[1] < 2:
        raise ValueError(f"expected numbers of shape (N, k >= 2) for N = {len(ops)} "
                         f"operations, got {numbers.shape}")
    if (not np.issubdtype(numbers.dtype, np.integer) or numbers.min() < 0
            or numbers.max() > 99):
        raise ValueError("numbers must be integers 0-99, got values from "
                         f"{numbers.min()} to {numbers.max()}")
    unknown = sorted(set(ops.tolist()) - set(OPERATIONS))
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; "
                         f"expected one of {', '.join(OPERATIONS)}")
    n, k = numbers.shape
    # Op ( t u t u ... ) [EOS]
    ids = np.empty((n, 2 * k + 4), dtype=np.int64)
    ids[:, 0] = [TOKEN_TO_ID[op] for op in ops]
    ids[:, 1] = TOKEN_TO_ID["("]
    ids[:, 2:2 + 2 * k:2] = _DIGIT_IDS[numbers // 10]              # tens digits
    ids[:, 3:3 + 2 * k:2] = _DIGIT_IDS[numbers % 10]               # units digits
    ids[:, -2], ids[:, -1] = TOKEN_TO_ID[")"], TOKEN_TO_ID["[EOS]"]
    answers = np.empty(n, dtype=np.int64)
    for op, answer in _ANSWER.items():
        answers[ops == op] = answer(numbers[ops == op])
    tens, units = _DIGIT_IDS[answers // 10], _DIGIT_IDS[answers % 10]
    targets = np.stack([tens, units], axis=1)                      # (N, 2)
    return TwoDigitData(ops, numbers, answers,
                        Batch(ids, np.ones(ids.shape, bool), targets))


def generate_two_digit(n: int, seed: int, num_args: int = 3, op_weights=None,
                       exclude: set | None = None) -> TwoDigitData:
    """Draw n distinct random puzzles on numbers 0-99, none of them in ``exclude``.

    ``op_weights``: probabilities of the five operations (default uniform).
    ``exclude``: a set of (op, numbers tuple) keys, e.g. ``two_digit_keys(train)``.
    """
    rng = np.random.default_rng(seed)
    exclude = set() if exclude is None else exclude
    ops, numbers, keys = [], [], set()
    while len(ops) < n:
        draw_ops = rng.choice(len(OPERATIONS), size=2 * n, p=op_weights)
        draw_numbers = rng.integers(0, 100, size=(2 * n, num_args))
        for o, nums in zip(draw_ops, draw_numbers, strict=True):
            key = (OPERATIONS[o], tuple(nums.tolist()))
            if key not in keys and key not in exclude:
                keys.add(key)
                ops.append(key[0])
                numbers.append(nums)
                if len(ops) == n:
                    break
    return two_digit_data(ops, np.array(numbers))


def two_digit_keys(data: TwoDigitData) -> set:
    """The set of (op, numbers tuple) of a data set, to exclude it from another."""
    return {(op, tuple(nums))
            for op, nums in zip(data.ops.tolist(), data.numbers.tolist(),
                                strict=True)}


# %% [markdown]
# `two_digit_experiment` trains and tests it. One more choice, about the training data:
# `First`, `Second` and `Last` are learned early, while `Max` and `Min` need many more
# examples, since comparing two-digit numbers means combining the tens and units of each
# number before comparing. So the training set draws `Max` and `Min` 35% of the time each and
# the others 10% each (`op_weights`); the test set uses all five equally. The learning curve
# below shows whether the rarer operations still come out right.

# %% tags=["export"]
@dataclass
class TwoDigitResult:
    """Held-out accuracy (both digits right), overall and per operation; curve per
    epoch."""

    heldout_accuracy: float
    heldout_by_op: dict
    curve: list
    num_parameters: int
    steps: int
    seconds: float
    model: TwoDigitTransformer = field(repr=False)
    test: TwoDigitData = field(repr=False)


def two_digit_experiment(n_train: int = 50_000, epochs: int = 3, batch_size: int = 64,
                         lr: float = 3e-3, warmup: int = 50, n_test: int = 5_000,
                         op_weights=TWO_DIGIT_OP_WEIGHTS, seed: int = 0,
                         progress: bool = False, **model_kwargs) -> TwoDigitResult:
    """Train a TwoDigitTransformer on ``n_train`` random puzzles on numbers 0-99.

    The test set is ``n_test`` puzzles with uniformly drawn operations that are not in
    the training set; it is evaluated after every epoch. ``model_kwargs`` go to the
    model (default: the reference shape). ``seed`` sets the weights and batch order; the
    data are fixed.
    """
    train = generate_two_digit(n_train, seed=1, op_weights=op_weights)
    test = generate_two_digit(n_test, seed=2, exclude=two_digit_keys(train))
    model = TwoDigitTransformer(seed=seed, **model_kwargs)
    curve = []

    def after_epoch(epoch, losses):          # losses: every step so far
        # (N,)
        correct = (predictions(model, test.batch) == test.batch.targets).all(axis=1)
        by_op = {op: float(correct[test.ops == op].mean()) for op in OPERATIONS}
        previous = curve[-1]["step"] if curve else 0
        epoch_loss = float(np.mean(losses[previous:]))
        curve.append({"epoch": epoch, "step": len(losses), "train_loss": epoch_loss,
                      "heldout_accuracy": float(correct.mean()),
                      "heldout_by_op": by_op})
        if progress:
            print(f"epoch {epoch}  step {len(losses)}  train loss {epoch_loss:.4f}  "
                  f"held-out accuracy {correct.mean():.2%}", flush=True)

    start = time.perf_counter()
    train_steps(model, TwoTokenLoss(), train.batch, epochs=epochs,
                batch_size=batch_size, lr=lr, warmup=warmup, clip=1.0, seed=seed,
                on_epoch=after_epoch)
    last = curve[-1]
    return TwoDigitResult(last["heldout_accuracy"], last["heldout_by_op"], curve,
                          model.num_parameters(), last["step"],
                          time.perf_counter() - start, model, test)


# %% [markdown]
# Before training, the gradient check: a small float64 model, a random upstream gradient on
# the $(B, 2, V)$ logits, every parameter compared with central differences. The loss gets its
# own check against the numerical derivative with respect to the logits.

# %%
from transformer_lib.experiments import (TwoDigitTransformer, TwoTokenLoss,
                                         generate_two_digit, two_digit_data,
                                         two_digit_experiment)
from transformer_lib.layers import gradient_check, numerical_gradient, relative_error

sample = two_digit_data(["Max", "First", "Min"],
                        [[57, 3, 99], [12, 40, 8], [65, 61, 7]])
for i in range(3):
    print(f"{sample.text(i):34} answer {sample.answers[i]:2d}  "
          f"targets {sample.batch.targets[i]}")
assert (sample.text(0) == "Max ( 5 7 0 3 9 9 ) [EOS]"
        and sample.answers.tolist() == [99, 12, 7])

small = TwoDigitTransformer(d_model=8, num_heads=2, num_layers=2, d_ff=16, seed=0)
small.to(np.float64)
errors = gradient_check(small, sample.batch.ids, sample.batch.mask)
print(f"largest relative error over {len(errors)} parameter arrays below 1e-8: "
      f"{max(errors.values()) < 1e-8}")
assert max(errors.values()) < 1e-8

logits = np.random.default_rng(0).normal(size=(3, 2, 20))
loss_fn = TwoTokenLoss()
loss_fn(logits, sample.batch.targets)
numeric = numerical_gradient(lambda: loss_fn.forward(logits, sample.batch.targets),
                             logits)
loss_fn(logits, sample.batch.targets)
loss_error = relative_error(loss_fn.backward(), numeric)
print(f"TwoTokenLoss backward: relative error below 1e-8: {loss_error < 1e-8}")
assert loss_error < 1e-8

show_error(lambda: two_digit_data(["Max"], [[5, 100, 7]]),
           ValueError, "numbers must be integers 0-99")
show_error(lambda: small.backward(np.zeros((3, 20))),
           ValueError, "grad_logits must have shape (B, 2, V)")
show_error(lambda: loss_fn(logits, sample.batch.targets[:, 0]),
           ValueError, "expected logits (B, K, V) and targets (B, K)")

# %% [markdown]
# Now the real model, the reference shape with two output heads, trained on 50,000 puzzles
# for three epochs (2,346 steps of 64, peak learning rate $3 \cdot 10^{-3}$: this experiment
# has its own recipe, not chapter 5's) and tested on 5,000 held-out puzzles. This is the
# chapter's longest single training run: more steps than any run above, and it processes
# more than three times as many examples (steps times batch size) as the largest of them.
# For a spread over seeds, call `two_digit_experiment(seed=s)` for a few values of `s`; for
# more data, raise `n_train`.

# %%
# NBVAL_IGNORE_OUTPUT
two_digit = two_digit_experiment(progress=True)      # progress digits vary by machine

# %%
print("held-out accuracy at least 99% (the original project: 83.7%): "
      f"{two_digit.heldout_accuracy >= 0.99}\nevery operation at least 98%: "
      f"{min(two_digit.heldout_by_op.values()) >= 0.98}")
assert two_digit.heldout_accuracy >= 0.99
assert min(two_digit.heldout_by_op.values()) >= 0.98
first_epoch = two_digit.curve[0]["heldout_by_op"]
assert min(first_epoch[op] for op in ("First", "Second", "Last")) >= 0.97
assert max(first_epoch["Max"], first_epoch["Min"]) < 0.99
earlier_runs = [*cache.values(), *(run["result"] for run in length_runs)]
assert two_digit.steps == 2_346 > max(r.steps for r in earlier_runs)
examples_seen = [r.steps * r.config.batch_size for r in earlier_runs]
assert 64 * two_digit.steps > 3 * max(examples_seen)                   # batches of 64

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{two_digit.num_parameters:,} parameters, {two_digit.steps} steps "
      f"in {two_digit.seconds:.1f} s")

# %% tags=["hide-input"]
# one panel per operation: three of the five lines lie on top of each other at 100%
fig, axes = plt.subplots(1, 5, figsize=(12, 2.8), sharey=True)
steps = [c["step"] for c in two_digit.curve]
for ax, op, colour in zip(axes, OPERATIONS, plt.rcParams["axes.prop_cycle"].by_key()
                          ["color"]):
    values = [100 * c["heldout_by_op"][op] for c in two_digit.curve]
    ax.plot(steps, values, marker="o", color=colour)
    for x, y in zip(steps, values):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=7)
    ax.axhline(83.7, color="gray", ls="--", lw=1)
    ax.set_title(op)
    ax.set_xticks(steps)
    ax.margins(x=0.15)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
axes[0].text(steps[0], 85, "original project (83.7%)", color="gray", fontsize=7)
axes[0].set_ylabel("held-out accuracy (%)")
axes[0].set_ylim(top=104)
fig.suptitle("Numbers 0-99: held-out accuracy per operation after each epoch "
             "(this machine's run)")
fig.tight_layout()
plt.show()

# %% [markdown]
# The model answers more than 99% of held-out puzzles correctly, both digits, against the
# original 83.7%. The positional operations are above 97% after the first epoch, although
# they are drawn only 10% of the time each; `Max` and `Min` need the rest of the training.
# (The learning curve shows this machine's run; the first epoch's `Max` and `Min` differ by
# several points between machines, the final accuracies by a few wrong answers.) Where do
# the remaining errors sit? All on `Max` and `Min`, and more often when the numbers being
# compared are close:

# %%
test = two_digit.test
pred = predictions(two_digit.model, test.batch)                          # (N, 2)
wrong = ~(pred == test.batch.targets).all(axis=1)
compare = np.isin(test.ops, ["Max", "Min"])
ordered = np.sort(test.numbers, axis=1)
gap = np.where(test.ops == "Max",
               ordered[:, -1] - ordered[:, -2],   # best minus runner-up
               ordered[:, 1] - ordered[:, 0])
close = compare & (gap <= 2)
rate_close, rate_other = wrong[close].mean(), wrong[compare & ~close].mean()
answered = 10 * (pred[:, 0] - 2) + (pred[:, 1] - 2)                     # (N,)
mixed = wrong & ~(test.numbers == answered[:, None]).any(axis=1)  # none of the numbers
print("Max/Min puzzles whose two best candidates differ by at most 2: "
      f"{close.sum()} of {compare.sum()}")
print(f"every wrong answer is on Max or Min: {wrong.sum() == (wrong & compare).sum()}\n"
      "close puzzles go wrong more than 5 times as often as the others: "
      f"{rate_close > 5 * rate_other}\n"
      f"some wrong answers are none of the puzzle's numbers: {mixed.any()}")
assert wrong.sum() == (wrong & compare).sum() > 0
assert rate_close > 5 * rate_other and mixed.any()
assert close.sum() == 158 and compare.sum() == 1_965

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.axis("off")
lines = [f"{test.text(i):30} answer {test.answers[i]:2d}, model {answered[i]:2d}"
         + ("   (none of the numbers)" if mixed[i] else "")
         for i in np.flatnonzero(wrong)[:10]]
ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=8, va="top")
ax.set_title(f"This machine's run: {wrong.sum()} wrong answers of {len(wrong):,}, "
             f"{(wrong & close).sum()} on close puzzles, {mixed.sum()} none of the "
             "numbers (first 10 shown)", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# A close call is many times as likely to go wrong as another `Max` or `Min` puzzle (more
# than five times on every machine measured). Close calls are only 8% of them (158 of
# 1,965), yet they account for a large share of the wrong answers (the figure's title
# counts them for the run shown; the share differs from machine to machine). Some wrong
# answers are none of the puzzle's numbers, which the two independent heads make possible
# (see above): an answer of 23 to `Max ( 1 3 2 0 1 7 )` would take the tens digit of 20 and
# the units digit of 13. The figure lists this machine's wrong answers.

# %% [markdown]
# ## Findings
#
# Everything measured in this chapter, in one table (eight epochs unless noted; accuracy
# on all 5,000 inputs, or where noted on held-out inputs or longer ones).
# Like the rest of the chapter it gives what held on every machine measured: a bound on
# every seed's accuracy.

# %%
from IPython.display import HTML

rows = []


def add_rows(section, grid):
    for name, runs in grid.items():
        s = summarize(runs)
        rows.append([section, name, f"{s['parameters']:,}", f"{s['runs']}",
                     accuracy_bound(runs)])


add_rows("seeds", seed_grid)
add_rows("hyperparameters",
         {k: v for k, v in hyper_grid.items() if "reference" not in k})
add_rows("size", {k: v for k, v in size_grid.items() if "ref." not in k})
add_rows("ablation", {k + (" (4 epochs)" if v[0].config.epochs == 4 else ""): v
                      for k, v in ablation_grid.items() if k != "reference"})
add_rows("depth (4 epochs, 2 seeds)", deep_grid)
rows.append(["length (1 seed)", "train on 2–5 arguments, test on 6–8",
             f"{length_runs[0]['result'].num_parameters:,}",
             "1", "First, Max, Min ≥ 95%; Second < 70% at 8, Last < 30% at 7–8"])
rows.append(["numbers 0–99 (1 seed, 3 epochs)", "two output heads",
             f"{two_digit.num_parameters:,}", "1", "≥ 99% (held-out)"])
header = ["experiment", "variant", "parameters", "seeds", "accuracy, every seed"]
HTML("<table>\n<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>\n"
     + "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                 for row in rows)
     + "\n</table>")

# %% [markdown]
# What to take away:
#
# 1. **Look at the spread before the mean.** With chapter 1's stratified split and chapter
#    5's recipe every seed of the reference reaches exactly 100% in eight epochs, but when
#    it gets there moves by epochs between seeds, and even between machines for the same
#    seed. Single runs cannot rank settings by such differences.
# 2. **Positional encodings are the one part this task cannot do without**, and the failure
#    is exactly predictable: an order-blind model is capped at 43% on `First`, `Second` and
#    `Last`, and `Max` and `Min` do not care.
# 3. **Depth beats width here.** Two layers are needed (one attention step to read the
#    operation, one to fetch the answer); a 16-wide two-layer model with 7% of the
#    reference's parameters still gets more than 98% right, a 64-wide one-layer model does
#    not get past 50% on the positional operations.
# 4. **Residual connections and LayerNorm are about depth.** At two blocks removing them costs
#    nothing two seeds can see; at six blocks, removing either one leaves the model more
#    than 10 points short in the same four-epoch budget (without residuals, more than 15).
# 5. **The last 0.1% was about data.** In the first version of this book, with the old
#    random split, near-perfect runs failed mostly on a few rare inputs that the training
#    split did not contain; the stratified
#    split gives every (operation, answer) pair its share, and the misses that remain are
#    mostly underfitting by small models or deep ones short of epochs, on inputs they
#    trained on.
# 6. **Absolute positions do not extrapolate.** `First`, `Max` and `Min` work on longer
#    inputs; `Last` does not, and even `Second` fails at 8 arguments.
# 7. **Numbers 0–99 are learnable with 20 tokens**: two digit tokens per number and two
#    output heads reach more than 99% on held-out puzzles.

# %% tags=["hide-input"]
# NBVAL_IGNORE_OUTPUT
total = time.perf_counter() - notebook_start
trained = (sum(r.seconds for r in cache.values())
           + sum(r["result"].seconds for r in length_runs) + two_digit.seconds)
print(f"{len(cache)} runs in the cache; this notebook ran for {total:.0f} s "
      f"({time.process_time():.0f} s of CPU time),\n{trained:.0f} s of it training:")
counted = set()
for name, grid in [("seeds", seed_grid), ("hyperparameters", hyper_grid),
                   ("sizes", size_grid), ("ablations", ablation_grid),
                   ("depth", deep_grid)]:
    new = [r for runs in grid.values() for r in runs if id(r) not in counted]
    counted |= {id(r) for r in new}
    print(f"  {name:16} {sum(r.seconds for r in new):5.1f} s  ({len(new)} runs)")
print(f"  {'length':16} {sum(r['result'].seconds for r in length_runs):5.1f} s")
print(f"  {'numbers 0-99':16} {two_digit.seconds:5.1f} s")

# %% [markdown]
# ## Summary
#
# - `ExperimentConfig` + `run_experiment` turn a config into measurements: accuracy per
#   operation on all 5,000 inputs, held-out accuracy, steps and seconds to 100%, parameter
#   count. `run_grid` runs variants for several seeds and reuses runs through a cache.
# - `length_experiment` trains on some lengths and tests on others;
#   `TwoDigitTransformer`, `TwoTokenLoss` and `two_digit_experiment` extend the task to
#   numbers 0–99 with two digit tokens per number and two output heads.
# - What the experiments found is the list under "Findings" above: above all, look at the
#   spread over seeds (and machines) before comparing settings, and test each claim with an
#   ablation whose outcome you predicted.
#
# ## Exercises
#
# **1.** An order-blind model (no positional encoding) is capped at 43% on `First` with three
# arguments. What is the cap with four arguments? Compute it by enumeration and check it
# against $\mathbb{E}[\text{copies of the most common digit}]/4$ computed another way.

# %% tags=["hide-cell"]
# Solution: enumerate all 10**4 quadruples; the best order-blind guess is a most
# common digit.
quads = np.array(list(itertools.product(range(10), repeat=4)))            # (10000, 4)
counts = np.stack([(quads == d).sum(axis=1) for d in range(10)], axis=1)  # (10000, 10)
cap4 = counts.max(axis=1).mean() / 4
# another way: count the quadruples by pattern (all distinct, pairs, triple, four alike)
p = {1: 10 * 9 * 8 * 7, 2: 6 * 10 * 9 * 8 + 3 * 10 * 9, 3: 4 * 10 * 9, 4: 10}
assert sum(p.values()) == 10**4
assert abs(cap4 - sum(m * n for m, n in p.items()) / 10**4 / 4) < 1e-12
print(f"cap with four arguments: {cap4:.2%} (three arguments: {ceiling:.2%})")
assert cap4 < ceiling

# %% [markdown]
# **2.** The order-blind models cannot know which digit is first, but they can still guess
# well. Check that on `First`, `Second` and `Last` they almost always (more than 99% of the
# time) answer one of the input's
# digits, and measure how often they answer the repeated digit when the input has exactly one
# pair (the best order-blind guess).

# %% tags=["hide-cell"]
# Solution: predictions of the no-positional-encoding runs on the positional operations.
positional_ops = [ex for ex in exhaustive if ex.op in ("First", "Second", "Last")]
pairs = np.array([sorted(Counter(ex.args).values()) == [1, 2] for ex in positional_ops])
mode = np.array([Counter(ex.args).most_common(1)[0][0] for ex in positional_ops])
for run in no_pos:
    answers = predictions(run.model, create_batch(positional_ops)) - 2
    in_args = np.mean([a in ex.args for a, ex in zip(answers, positional_ops)])
    picks_pair = np.mean(answers[pairs] == mode[pairs])
    print(f"seed {run.config.seed}: one of the input's digits more than 99% of the "
          f"time: {in_args > 0.99}\n        the repeated digit of a pair more than "
          f"half the time: {picks_pair > 0.5}")
    assert in_args > 0.99 and picks_pair > 0.5

# %% [markdown]
# **3.** With numbers 0–99 and three arguments, how many distinct inputs are there, and what
# fraction of them did the two-digit model train on? Is it plausible that it memorised the
# test set?

# %% tags=["hide-cell"]
# Solution: 5 operations x 100**3 number triples; the training set is 50,000
# distinct puzzles.
space = 5 * 100**3
fraction = 50_000 / space
print(f"{space:,} inputs; the model trained on {fraction:.1%} of them,\n"
      "and the test puzzles were drawn from the other 99%:\n"
      "it has to generalise, memorising cannot help")
assert space == 5_000_000 and fraction == 0.01
