# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. The data pipeline
#
# This book builds a transformer in plain NumPy and trains it on a toy language of small
# puzzles:
#
# | input | answer | why |
# |---|---|---|
# | `First ( 5 3 9 )` | `5` | the first argument |
# | `Second ( 5 3 9 )` | `3` | the second argument |
# | `Last ( 5 3 9 )` | `9` | the last argument |
# | `Max ( 5 3 9 )` | `9` | the largest argument |
# | `Min ( 5 3 9 )` | `3` | the smallest argument |
#
# The task is small enough to train in seconds on a laptop, yet the model has to learn what
# attention is for: to answer `Second` it must look at one particular position; to answer `Max`
# it must compare every argument.
#
# This chapter turns puzzles into numbers a model can eat: a vocabulary, a tokenizer, a
# random generator of examples, an honest train/validation/test split, and padded batches.
# Cells marked `export` become the module `transformer_lib.data`, which later chapters import.
#
# **In this chapter** you will
#
# - define the 20-token vocabulary and turn text into token ids and back (`tokenize`,
#   `detokenize`), with errors that say exactly what is wrong and where;
# - fix the model's canonical input (`encode`): `Max(5, 3, 9)` becomes `Max ( 5 3 9 ) [EOS]`;
# - generate random puzzles and see why only 5,000 distinct inputs exist;
# - measure how a naive split leaks test inputs into training, split without leaking, and
#   give every rare answer its share of the training set (a stratified split);
# - pad sequences of different lengths into a batch with a mask that marks the real tokens.

# %% [markdown]
# ## The vocabulary
#
# Every token the model will ever see is one of 20 strings: two special tokens, ten digits,
# five operations and three punctuation marks. `[PAD]` fills the empty places in a batch of
# sequences of different lengths; `[EOS]` ("end of sequence") marks where the input ends,
# and it is where the model will later read out its answer.
# A token's *id* is its index in `VOCAB`.

# %% tags=["export"]
import itertools
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

OPERATIONS = ("First", "Second", "Last", "Max", "Min")
VOCAB = ["[PAD]", "[EOS]", *(str(d) for d in range(10)), *OPERATIONS, "(", ")", ","]
VOCAB_SIZE = len(VOCAB)
TOKEN_TO_ID = {token: i for i, token in enumerate(VOCAB)}
ID_TO_TOKEN = dict(enumerate(VOCAB))
PAD_ID = TOKEN_TO_ID["[PAD]"]
EOS_ID = TOKEN_TO_ID["[EOS]"]

# %%
assert VOCAB_SIZE == 20 and len(set(VOCAB)) == 20
assert (PAD_ID, EOS_ID) == (0, 1)
assert all(ID_TO_TOKEN[TOKEN_TO_ID[t]] == t for t in VOCAB)

print("  ".join(f"{'id':>2} {'token':<7}" for _ in range(4)))
for row in range(5):
    print("  ".join(f"{i:>2} {VOCAB[i]:<7}" for i in range(row, VOCAB_SIZE, 5)))


# %% [markdown]
# ## From text to ids and back
#
# People write the same puzzle in many ways: `Max(5, 3, 9)`, `Max ( 5 3 9 )`, or as a list of
# tokens. `tokenize` accepts all of them and returns one id per token, keeping every token
# literally, commas included. It is strict about what a token is: `max` is not `Max`, and `12`
# is not a token at all (the language only has single digits). When it refuses, the error
# names the offending piece and where it is, both as a token position and, for text, as a
# character offset.

# %% tags=["export"]
# one piece of text: a bracketed word, a word, a number, or any other single character
_PIECE = re.compile(r"\[[^\]\s]*\]?|[A-Za-z]+|[0-9]+|\S")


def _unknown_token(piece: object, where: str) -> ValueError:
    """Build the error for a piece that is not in VOCAB, with a hint when one helps."""
    if not isinstance(piece, str):
        return ValueError(f"expected a token string at {where}, got {piece!r} "
                          f"({type(piece).__name__}); to turn ids into text, "
                          "use detokenize")
    if piece.isdigit():
        return ValueError(f"unknown token {piece!r} at {where}: "
                          "only single digits 0–9 are tokens")
    near = [t for t in VOCAB if t.lower() == piece.lower()]
    hint = f" — did you mean {near[0]!r}?" if near else ""
    return ValueError(f"unknown token {piece!r} at {where}{hint}")


def tokenize(text_or_tokens: str | Sequence[str]) -> list[int]:
    """Turn a puzzle into token ids, one per token, commas kept.

    Parameters
    ----------
    text_or_tokens : str or sequence of str
        Text such as ``"Max(5, 3, 9)"`` or ``"Max ( 5 3 9 )"`` (spaces optional),
        or a list of tokens such as ``["Max", "(", "5", ")"]``.

    Returns
    -------
    list of int
        The token ids, length = number of tokens.

    Raises
    ------
    ValueError
        On empty input, or on a piece that is not in ``VOCAB`` (the message names it,
        its token position and, for text, its character offset).
    """
    if isinstance(text_or_tokens, str):
        pieces = [(m.group(), m.start()) for m in _PIECE.finditer(text_or_tokens)]
    else:
        pieces = [(token, None) for token in text_or_tokens]
    if not pieces:
        raise ValueError("empty input: there is nothing to tokenize")
    ids = []
    for position, (piece, offset) in enumerate(pieces):
        if not isinstance(piece, str) or piece not in TOKEN_TO_ID:
            where = f"position {position}"
            if offset is not None:
                where += f" (character {offset})"
            raise _unknown_token(piece, where)
        ids.append(TOKEN_TO_ID[piece])
    return ids


# %%
for text in ["Max(5, 3, 9)", "Max ( 5 , 3 , 9 )", "Max ( 5 3 9 )"]:
    print(f"{text!r:22} -> {tokenize(text)}")

as_list = ["Max", "(", "5", ",", "3", ",", "9", ")"]
assert tokenize("Max(5, 3, 9)") == tokenize("Max ( 5 , 3 , 9 )") == tokenize(as_list)
assert tokenize("Max ( 5 3 9 )") == [TOKEN_TO_ID[t] for t in "Max ( 5 3 9 )".split()]


# %% [markdown]
# `detokenize` goes the other way and joins the tokens with single spaces. It drops `[PAD]` by
# default, because padding is not part of what anyone wrote. The round trip
# `tokenize(detokenize(ids)) == ids` is what makes the printed form trustworthy: what you
# read is exactly what the model got.

# %% tags=["export"]
def _check_id(token_id: object, where: str) -> int:
    """Return token_id as an int, or raise ValueError if it is not a valid id."""
    is_int = isinstance(token_id, (int, np.integer))
    if not is_int or isinstance(token_id, (bool, np.bool_)):
        raise ValueError(f"token id {token_id!r} at {where} is not an integer")
    if not 0 <= token_id < VOCAB_SIZE:
        raise ValueError(f"token id {token_id} at {where} is out of range "
                         f"0–{VOCAB_SIZE - 1}")
    return int(token_id)


def detokenize(ids: Sequence[int] | np.ndarray, skip_pad: bool = True) -> str:
    """Turn token ids back into text, tokens joined by single spaces.

    Parameters
    ----------
    ids : sequence of int or 1-D array, shape (T,)
        Token ids.
    skip_pad : bool
        Leave out ``[PAD]`` tokens (default).

    Returns
    -------
    str
        For example ``"Max ( 5 3 9 ) [EOS]"``.

    Raises
    ------
    ValueError
        If an id is not an integer in ``0..VOCAB_SIZE-1`` (the message names it and
        its position).
    """
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise ValueError("detokenize expects a 1-D sequence of ids, "
                         f"got shape {ids.shape}; "
                         "detokenize one row at a time")
    checked = [_check_id(token_id, f"position {p}") for p, token_id in enumerate(ids)]
    return " ".join(ID_TO_TOKEN[i] for i in checked if not (skip_pad and i == PAD_ID))


# %%
print(detokenize(tokenize("Max(5, 3, 9)")))
print(detokenize([TOKEN_TO_ID["Min"], 17, 4, 5, 18, EOS_ID, PAD_ID, PAD_ID]))

all_ids = list(range(VOCAB_SIZE))
samples = [all_ids, all_ids[::-1], tokenize("Second(0,9)"),
           tokenize("Last(1,2,3) [EOS]")]
for ids in samples:
    assert tokenize(detokenize(ids, skip_pad=False)) == ids
assert detokenize(np.array([12, 17, 3, 18])) == "First ( 1 )"


# %% [markdown]
# ### When the input is wrong
#
# A tokenizer that guesses hides mistakes, so ours refuses and says why. The helper below runs
# a call, checks that it raises the expected error whose message contains the expected words,
# and prints the message. Every chapter uses it to show (and test) its error messages, so it is
# exported with the data module.

# %% tags=["export"]
def show_error(call: Callable[[], object], error_type: type[Exception],
               expected_words: str, hide: str | None = None) -> None:
    """Run ``call()``; assert it raises ``error_type`` with ``expected_words`` in its
    message.

    Prints the message, so the book shows the error a reader would see, wrapped to
    the book's 88-column code column (continuation lines indented); fails
    (AssertionError) if nothing is raised or the message is different. ``hide``
    replaces a varying part of the message (e.g. a temporary path) with ``<tmp>``.
    """
    import textwrap

    try:
        call()
    except error_type as error:
        message = str(error) if hide is None else str(error).replace(hide, "<tmp>")
        assert expected_words in message, f"unexpected message: {message}"
        shown = f"{type(error).__name__}: {message}"
        print("\n".join(textwrap.fill(line, width=88, subsequent_indent="    ",
                                      break_long_words=False, break_on_hyphens=False)
                        for line in shown.splitlines()))
    else:
        raise AssertionError(
            f"expected {error_type.__name__} mentioning {expected_words!r}")


# %%
show_error(lambda: tokenize("max(5, 3, 9)"), ValueError,
           "unknown token 'max' at position 0 (character 0) — did you mean 'Max'?")
show_error(lambda: tokenize("Max(5, 12, 9)"), ValueError,
           "unknown token '12' at position 4 (character 7): only single digits 0–9")
show_error(lambda: tokenize("   "), ValueError, "empty input")
show_error(lambda: detokenize([15, 17, 5, 20]),
           ValueError, "token id 20 at position 3 is out of range 0–19")


# %% [markdown]
# ## The model's input: `encode`
#
# The model needs one canonical form of each puzzle, so `encode` drops the commas (they carry
# no information once the digits are separate tokens) and ends the sequence with exactly one
# `[EOS]`. With `strict=True` (the default) it also checks the grammar
# `Operation ( digit digit ... )`, and says what it expected where. Later chapters feed the
# model malformed input on purpose; `strict=False` skips the grammar check for that.

# %% tags=["export"]
_DIGITS = set("0123456789")


def _check_grammar(tokens: list[str]) -> None:
    """Raise ValueError unless tokens read ``Op ( d [,] d ... ) [[EOS]]``."""
    def at(pos: int) -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def fail(pos: int, expected: str) -> None:
        got = "end of input" if at(pos) is None else repr(at(pos))
        raise ValueError(f"expected {expected} at position {pos}, got {got}")

    if at(0) not in OPERATIONS:
        fail(0, "an operation (" + ", ".join(OPERATIONS) + ")")
    if at(1) != "(":
        fail(1, "'('")
    pos = 2
    while True:  # one or more digits, optionally separated by commas, then ')'
        if at(pos) not in _DIGITS:
            fail(pos, "a digit 0–9")
        pos += 1
        if at(pos) == ",":
            pos += 1
        elif at(pos) == ")":
            break
        elif at(pos) is None:
            fail(pos, "')'")
        elif at(pos) not in _DIGITS:
            fail(pos, "a digit, ',' or ')'")
    pos += 1  # past ')'
    if at(pos) == "[EOS]":
        pos += 1
    if at(pos) is not None:
        after_eos = tokens[pos - 1] == "[EOS]"
        fail(pos, "end of input" if after_eos else "'[EOS]' or end of input")


def encode(text_or_tokens: str | Sequence[str], strict: bool = True) -> list[int]:
    """Encode a puzzle as the model's input: commas dropped, ending in one ``[EOS]``.

    Parameters
    ----------
    text_or_tokens : str or sequence of str
        Anything ``tokenize`` accepts, e.g. ``"Max(5, 3, 9)"``.
    strict : bool
        Check the grammar ``Op ( d d ... )`` (optionally already ending in ``[EOS]``).

    Returns
    -------
    list of int
        Token ids, shape (num_args + 4,) for a well-formed puzzle,
        e.g. the ids of ``Max ( 5 3 9 ) [EOS]``.

    Raises
    ------
    ValueError
        From ``tokenize``, or (strict only) saying which token was expected where.
    """
    ids = tokenize(text_or_tokens)
    if strict:
        _check_grammar([ID_TO_TOKEN[i] for i in ids])
    ids = [i for i in ids if i != TOKEN_TO_ID[","]]
    if not ids or ids[-1] != EOS_ID:
        ids.append(EOS_ID)
    return ids


# %%
for text in ["Max(5, 3, 9)", "Max ( 5 3 9 )", "Max ( 5 3 9 ) [EOS]", "Second(7,1)"]:
    print(f"{text!r:24} -> {encode(text)}  = {detokenize(encode(text))}")

assert (encode("Max(5, 3, 9)") == encode("Max ( 5 3 9 )")
        == encode("Max ( 5 3 9 ) [EOS]"))
assert detokenize(encode("Max(5, 3, 9)")) == "Max ( 5 3 9 ) [EOS]"
assert len(encode("Max(5, 3, 9)")) == 3 + 4  # 3 digits, operation, (, ) and [EOS]

show_error(lambda: encode("Max ( 5 3 9"), ValueError,
           "expected ')' at position 5, got end of input")
show_error(lambda: encode("Max ( )"), ValueError,
           "expected a digit 0–9 at position 2, got ')'")
show_error(lambda: encode("( 5 3 ) Max"), ValueError,
           "expected an operation (First, Second, Last, Max, Min) "
           "at position 0, got '('")

print(detokenize(encode("Max ( 5 3 9", strict=False)), " <- strict=False")
assert encode(") Max 5 (", strict=False)[-1] == EOS_ID


# %% [markdown]
# ## Generating examples
#
# An `Example` holds the operation, its digits and the answer; it can print itself as text,
# encode itself, and give the id of its answer (the model's *target*). The answer is always
# one digit, so the target is always one of the ten digit tokens, though the model will score
# all 20 tokens.
#
# `generate_example` draws an operation and the digits from a NumPy random `Generator` you
# pass in, so every random step in this book is reproducible: the same seed gives the same
# data.

# %% tags=["export"]
_APPLY = {
    "First": lambda args: args[0],
    "Second": lambda args: args[1],
    "Last": lambda args: args[-1],
    "Max": max,
    "Min": min,
}


class Example(NamedTuple):
    """One puzzle: an operation, its digit arguments and the correct answer."""

    op: str
    args: tuple[int, ...]
    answer: int

    @property
    def text(self) -> str:
        """The puzzle as text, e.g. ``"Max ( 5 3 9 )"``."""
        return f"{self.op} ( {' '.join(map(str, self.args))} )"

    @property
    def ids(self) -> list[int]:
        """The model's input, ``encode(self.text)``: shape (len(args) + 4,)."""
        return encode(self.text)

    @property
    def target(self) -> int:
        """The token id of the answer."""
        return TOKEN_TO_ID[str(self.answer)]


def apply_operation(op: str, args: Sequence[int]) -> int:
    """Compute the answer of ``op`` on the digits ``args``.

    Raises
    ------
    ValueError
        For an unknown operation, no arguments, an argument that is not a digit 0–9, or
        ``Second`` with fewer than two arguments.
    """
    if op not in _APPLY:
        raise ValueError(f"unknown operation {op!r}; "
                         f"expected one of {', '.join(OPERATIONS)}")
    if len(args) == 0:
        raise ValueError(f"{op} needs at least one argument, got none")
    for position, a in enumerate(args):
        is_int = (isinstance(a, (int, np.integer))
                  and not isinstance(a, (bool, np.bool_)))
        if not is_int or not 0 <= a <= 9:
            raise ValueError(f"argument {a!r} at position {position} "
                             "is not a digit 0–9")
    if op == "Second" and len(args) < 2:
        raise ValueError(f"Second needs at least two arguments, got {len(args)}")
    return int(_APPLY[op](args))


def _check_generation(num_args: int, operations: Sequence[str]) -> None:
    """Validate the arguments shared by the generators."""
    is_int = isinstance(num_args, (int, np.integer)) and not isinstance(num_args, bool)
    if not is_int or num_args < 1:
        raise ValueError(f"num_args must be a positive integer, got {num_args!r}")
    if len(operations) == 0:
        raise ValueError("operations must name at least one operation, got none")
    for op in operations:
        if op not in _APPLY:
            raise ValueError(f"unknown operation {op!r}; "
                             f"expected one of {', '.join(OPERATIONS)}")
    if "Second" in operations and num_args < 2:
        raise ValueError("Second needs at least two arguments, "
                         f"got num_args={num_args}")


def generate_example(rng: np.random.Generator, num_args: int = 3,
                     operations: Sequence[str] = OPERATIONS) -> Example:
    """Draw one random puzzle: a uniform operation and ``num_args`` uniform digits 0–9.

    Parameters
    ----------
    rng : numpy.random.Generator
        The source of randomness, e.g. ``np.random.default_rng(0)``.
    num_args : int
        Number of digits in the puzzle (default 3).
    operations : sequence of str
        The operations to draw from (default all five).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator such as "
                         f"np.random.default_rng(0), got {type(rng).__name__}")
    _check_generation(num_args, operations)
    op = operations[rng.integers(len(operations))]
    args = tuple(int(a) for a in rng.integers(0, 10, size=num_args))
    return Example(op, args, apply_operation(op, args))


def generate_dataset(n: int = 10_000, seed: int = 0, num_args: int = 3,
                     operations: Sequence[str] = OPERATIONS) -> list[Example]:
    """Draw ``n`` random puzzles (repeats possible), the same ones for the same seed.

    Raises
    ------
    ValueError
        If ``n`` is negative or not an integer, or on bad ``num_args`` / ``operations``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    _check_generation(num_args, operations)
    rng = np.random.default_rng(seed)
    return [generate_example(rng, num_args, operations) for _ in range(n)]


def all_examples(num_args: int = 3,
                 operations: Sequence[str] = OPERATIONS) -> list[Example]:
    """Every distinct puzzle, in a fixed order (operation, then digits in counting
    order).

    With the defaults this is 5 operations x 10**3 digit triples = 5,000 examples.
    """
    _check_generation(num_args, operations)
    return [Example(op, args, apply_operation(op, args))
            for op in operations
            for args in itertools.product(range(10), repeat=num_args)]


# %%
rng = np.random.default_rng(seed=0)
for _ in range(5):
    ex = generate_example(rng)
    print(f"{ex.text:22} -> {ex.answer}    ids {ex.ids}  target id {ex.target}")
    assert ex.ids == encode(ex.text) and ID_TO_TOKEN[ex.target] == str(ex.answer)

assert generate_dataset(100, seed=1) == generate_dataset(100, seed=1)
assert generate_dataset(100, seed=1) != generate_dataset(100, seed=2)
assert generate_dataset(0) == []
assert apply_operation("Second", (5, 3, 9)) == apply_operation("Min", (5, 3, 9)) == 3
# over all 5,000 inputs, every target is a digit token, and every digit occurs
assert ({ex.target for ex in all_examples()}
        == {TOKEN_TO_ID[str(d)] for d in range(10)})

show_error(lambda: generate_dataset(-5), ValueError,
           "n must be a non-negative integer, got -5")
show_error(lambda: generate_example(np.random.default_rng(0),
                                    operations=("Max", "Mean")),
           ValueError,
           "unknown operation 'Mean'; expected one of First, Second, Last, Max, Min")

# %% [markdown]
# ## What the answers look like
#
# The operations are not equally hard to guess. `First`, `Second` and `Last` copy one uniform
# digit, so every answer is equally likely. The maximum of three digits is usually large and
# the minimum usually small: `Max` answers 9 whenever any of the three digits is 9, which
# happens in 1 − 0.9³ = 27.1% of inputs. The figure counts the answers over all 5,000
# distinct inputs.

# %%
import matplotlib.pyplot as plt

exhaustive = all_examples()
fig, axes = plt.subplots(1, len(OPERATIONS), figsize=(12, 3), sharey=True)
for ax, op in zip(axes, OPERATIONS):
    answers = [ex.answer for ex in exhaustive if ex.op == op]
    ax.bar(range(10), np.bincount(answers, minlength=10) / len(answers),
           color="tab:blue")
    ax.set_title(op)
    ax.set_xticks(range(10))
    ax.set_xlabel("answer")
axes[0].set_ylabel("fraction of inputs")
fig.suptitle("How often each answer occurs, per operation (all 1,000 inputs of each)")
fig.tight_layout()
plt.show()

# %% [markdown]
# This matters later. A model that ignores the digits entirely and always answers the most
# common answer for each operation (9 for `Max`, 0 for `Min`, anything for the rest) is right
# on about one input in six, not one in ten. Accuracy has to beat that number before we can
# claim the model reads its input.

# %%
majority_right = 0
for op in OPERATIONS:
    counts = np.bincount([ex.answer for ex in exhaustive if ex.op == op], minlength=10)
    majority_right += counts.max()
    share = counts.max() / counts.sum()
    print(f"{op:7} most common answer {counts.argmax()}: {share:.1%} of its inputs")
baseline = majority_right / len(exhaustive)
print(f"digit-blind baseline accuracy: {baseline:.1%}")
assert abs(baseline - (3 * 0.1 + 2 * (1 - 0.9**3)) / 5) < 1e-12

# %% [markdown]
# ## Splitting without leaking
#
# The usual recipe is to generate 10,000 examples and cut them 80/10/10 into training,
# validation and test sets. Here that recipe quietly fails. With five operations and three
# digits there are only 5 × 10³ = 5,000 distinct inputs, so 10,000 random draws repeat
# themselves a lot:

# %%
dataset = generate_dataset(10_000, seed=0)
distinct = {(ex.op, ex.args) for ex in dataset}
# each input is missed by all 10,000 draws with probability (1 - 1/5000)^10000
expected = 5000 * (1 - (1 - 1 / 5000) ** 10_000)
print(f"{len(dataset):,} random examples contain {len(distinct):,} distinct inputs")
print(f"    (expected about {expected:,.0f} of the 5,000 possible)")
assert len(all_examples()) == 5000 and 4200 < len(distinct) < 4450

# %% [markdown]
# Now cut those 10,000 examples naively, the first 80% for training and the last 10% for
# testing, and ask how many test inputs the model has already seen during training:

# %%
naive_train, naive_test = dataset[:8000], dataset[9000:]
train_inputs = {(ex.op, ex.args) for ex in naive_train}
leaked = np.mean([(ex.op, ex.args) in train_inputs for ex in naive_test])
print(f"naive split: {leaked:.1%} of the test examples also appear in the training set")
assert 0.75 < leaked < 0.85  # about four in five

# %% [markdown]
# About four in five "unseen" test examples were in the training set. A model that merely
# memorised its training data would score well on such a test, and we would learn nothing about
# whether it generalises.
#
# `split_dataset` fixes this by splitting *inputs*, not examples: it removes duplicates first,
# shuffles the distinct inputs with a seed, and only then cuts them by the fractions. No
# validation or test input can then appear in training. The price is honesty about size: the
# splits hold distinct inputs, so 10,000 draws give about 4,300 of them, not 10,000.

# %% tags=["export"]
def split_dataset(examples: Sequence[Example],
                  fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0, stratify: bool = False,
                  ) -> tuple[list[Example], list[Example], list[Example]]:
    """Split examples into train, validation and test sets that share no input.

    Duplicates (same operation and digits) are removed first, keeping the first
    occurrence; the distinct examples are shuffled with ``seed`` and cut by
    ``fractions``. With ``stratify=True`` each (operation, answer) group is cut by the
    fractions on its own (rounded per group), and the three parts are shuffled again.

    Parameters
    ----------
    examples : sequence of Example
    fractions : (train, val, test)
        Non-negative, summing to 1.
    seed : int
        Seed of the shuffle.
    stratify : bool
        Give every (operation, answer) pair its share of each split.

    Returns
    -------
    (train, val, test) : three lists of distinct Examples

    Raises
    ------
    ValueError
        If ``fractions`` are not three non-negative numbers summing to 1.
    """
    fractions = tuple(fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError("fractions must be three non-negative numbers "
                         "(train, val, test) summing to 1, "
                         f"got {fractions} (sum {sum(fractions):g})")
    unique: dict[tuple[str, tuple[int, ...]], Example] = {}
    for ex in examples:
        unique.setdefault((ex.op, ex.args), ex)
    distinct = list(unique.values())
    rng = np.random.default_rng(seed)
    if stratify:
        groups: dict[tuple[str, int], list[Example]] = {}
        for ex in distinct:
            groups.setdefault((ex.op, ex.answer), []).append(ex)
        parts = [split_dataset(groups[key], fractions, rng.integers(2**32))
                 for key in sorted(groups)]                     # one split per group
        return tuple(_shuffled([ex for part in parts for ex in part[k]], rng)
                     for k in range(3))
    shuffled = _shuffled(distinct, rng)
    n_train = round(fractions[0] * len(distinct))
    n_val = min(round(fractions[1] * len(distinct)), len(distinct) - n_train)
    n_seen = n_train + n_val
    return shuffled[:n_train], shuffled[n_train:n_seen], shuffled[n_seen:]


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


# %%
train, val, test = split_dataset(dataset, seed=0)
print(f"train {len(train):,}   val {len(val):,}   test {len(test):,}   "
      "(distinct inputs)")

inputs = [{(ex.op, ex.args) for ex in part} for part in (train, val, test)]
assert sum(map(len, inputs)) == len(train) + len(val) + len(test) == len(distinct)
train_in, val_in, test_in = inputs
assert not train_in & val_in and not train_in & test_in and not val_in & test_in
assert split_dataset(dataset, seed=0) == (train, val, test)

show_error(lambda: split_dataset(dataset, fractions=(0.8, 0.1, 0.2)),
           ValueError, "summing to 1, got (0.8, 0.1, 0.2) (sum 1.1)")

# %% [markdown]
# Since there are only 5,000 inputs, we can also skip sampling altogether: `all_examples()` is
# the exhaustive set. Splitting it gives 4,000 / 500 / 500 inputs, and evaluating a model on
# all 5,000 (reporting the training inputs separately from the held-out ones) measures its
# accuracy exactly, with no sampling noise. Chapter 6 uses it that way.

# %%
train_all, val_all, test_all = split_dataset(all_examples(), seed=0)
print(f"exhaustive split: train {len(train_all):,}   val {len(val_all):,}   "
      f"test {len(test_all):,}")
assert (len(train_all), len(val_all), len(test_all)) == (4000, 500, 500)

# %% [markdown]
# ### Rare answers: a stratified split
#
# A split by input is honest, but a random one can still starve an answer of examples. `Max`
# is 0 only for `Max ( 0 0 0 )`, and 1 for just seven inputs (the digits 0 and 1, at least one
# 1); `Min` is 9 or 8 just as rarely. How many of these inputs does the random split of the
# 10,000 draws put into training?

# %%
from collections import Counter


def pair_counts(examples):
    """How many examples each (operation, answer) pair has."""
    return Counter((ex.op, ex.answer) for ex in examples)


rare = [("Max", 0), ("Max", 1), ("Min", 8), ("Min", 9)]
exists, in_random_train = pair_counts(exhaustive), pair_counts(train)
for pair in rare:
    print(f"{pair[0]} = {pair[1]}: {in_random_train[pair]} of its {exists[pair]} "
          "input(s) in the random training split")
assert [exists[p] for p in rare] == [1, 7, 7, 1]
assert in_random_train[("Max", 1)] == 1           # a single example of "Max is 1"

# %% [markdown]
# For `Max` = 1: one. A model can hardly learn from a single example that `Max` of some 0s
# and 1s is 1 wherever the 1 stands. A *stratified* split fixes this: it cuts every
# (operation, answer) group by 80/10/10 on its own, so each pair gets its share of the
# training set (rounded: one of one, six of seven). Splitting all 5,000 inputs that way
# leaves no input outside the three splits, and it is the split the rest of the book trains
# on.

# %%
train_s, val_s, test_s = split_dataset(all_examples(), seed=0, stratify=True)
print(f"stratified split: train {len(train_s):,}   val {len(val_s):,}   "
      f"test {len(test_s):,}")
trained = pair_counts(train_s)
for pair in rare:
    print(f"{pair[0]} = {pair[1]}: {trained[pair]} of its {exists[pair]} input(s) "
          "in training")
parts = [{(ex.op, ex.args) for ex in part} for part in (train_s, val_s, test_s)]
assert sum(map(len, parts)) == 5000 and not (parts[0] & parts[1] or parts[0] & parts[2]
                                             or parts[1] & parts[2])
assert all(trained[pair] == round(0.8 * n) for pair, n in exists.items())
validated = pair_counts(val_s)              # and the validation share, after rounding
assert all(validated[pair] == min(round(0.1 * n), n - round(0.8 * n))
           for pair, n in exists.items())
assert (len(train_s), len(val_s), len(test_s)) == (4004, 502, 494)
assert split_dataset(all_examples(), seed=0, stratify=True) == (train_s, val_s, test_s)

# %% [markdown]
# ## Batches and padding
#
# A model processes many sequences at once as one 2-D array, but sequences differ in length:
# `Max ( 5 3 9 ) [EOS]` has 7 tokens, `Min ( 1 2 ) [EOS]` has 6. `create_batch` pads every
# sequence on the right with `[PAD]` up to the longest one in the batch, and returns a *mask*
# that is `True` for real tokens and `False` for padding. Attention will use the mask so that
# no token ever looks at padding. The targets are the ids of the answers, one per sequence.
#
# `pad_sequences` does the same for sequences you already have as ids, for example from
# `encode(text, strict=False)`. Later chapters use it for puzzles typed in as text and for
# malformed ones, which no `Example` can describe.

# %% tags=["export"]
class Batch(NamedTuple):
    """A padded batch of B sequences of length T.

    ids : int64 array, shape (B, T), token ids, ``PAD_ID`` after each sequence's end.
    mask : bool array, shape (B, T), True for real tokens, False for padding.
    targets : int64 array, shape (B,), token id of each answer.
    """

    ids: np.ndarray
    mask: np.ndarray
    targets: np.ndarray


def pad_sequences(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id sequences with ``PAD_ID`` to the longest one.

    Parameters
    ----------
    seqs : sequence of B non-empty id sequences

    Returns
    -------
    ids : int64 array, shape (B, T), T = the longest length
    mask : bool array, shape (B, T), True for real tokens

    Raises
    ------
    ValueError
        If there are no sequences, a sequence is empty, or an id is invalid.
    """
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty list of sequences")
    for row, seq in enumerate(seqs):
        if len(seq) == 0:
            raise ValueError(f"sequence {row} is empty")
        for p, token_id in enumerate(seq):
            _check_id(token_id, f"position {p} of sequence {row}")
    ids = np.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=np.int64)  # (B, T)
    mask = np.zeros(ids.shape, dtype=bool)                                   # (B, T)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = True
    return ids, mask


def create_batch(examples: Sequence[Example]) -> Batch:
    """Encode and pad examples into one ``Batch`` (ids and mask (B, T), targets (B,)).
    """
    if len(examples) == 0:
        raise ValueError("cannot make a batch from no examples")
    ids, mask = pad_sequences([ex.ids for ex in examples])              # (B, T), (B, T)
    targets = np.array([ex.target for ex in examples], dtype=np.int64)  # (B,)
    return Batch(ids, mask, targets)


# %%
rng = np.random.default_rng(seed=1)
mixed = [generate_example(rng, num_args=k) for k in (3, 2, 5, 4)]  # different lengths
batch = create_batch(mixed)
for ex, row, m in zip(mixed, batch.ids, batch.mask):
    print(f"{ex.text:22} ids {row}  mask {m.astype(int)}")
print("targets", batch.targets, "=", [ID_TO_TOKEN[t] for t in batch.targets])

B, T = len(mixed), max(len(ex.ids) for ex in mixed)
assert batch.ids.shape == batch.mask.shape == (B, T) == (4, 9)
assert batch.targets.shape == (B,)
assert batch.ids.dtype == batch.targets.dtype == np.int64 and batch.mask.dtype == bool

# Padding never changes which tokens are real:
assert (batch.mask.sum(axis=1) == [len(ex.ids) for ex in mixed]).all()
assert (batch.ids[~batch.mask] == PAD_ID).all()
for ex, row, m in zip(mixed, batch.ids, batch.mask):
    assert row[m].tolist() == ex.ids and detokenize(row) == detokenize(ex.ids)

# %%
long_ids = encode("Max(1, 2, 3, 4, 5, 6, 7, 8)")
ids, mask = pad_sequences([encode("Min(4, 2)"), long_ids])
print(ids, mask.sum(axis=1), sep="\n")
assert ids.shape == (2, 12) and mask.sum(axis=1).tolist() == [6, 12]

show_error(lambda: pad_sequences([]), ValueError,
           "cannot pad an empty list of sequences")

# %% [markdown]
# ## What we built
#
# Everything in the `export` cells above is now the module `transformer_lib.data`, so the next
# chapters can start with `from transformer_lib.data import create_batch, split_dataset`:

# %%
import textwrap

import transformer_lib.data

print(textwrap.fill(", ".join(transformer_lib.data.__all__), width=88))

# %% [markdown]
# Chapter 2 builds the layers the model is made of, each with its forward and backward pass
# written by hand.

# %% [markdown]
# ## Summary
#
# - The vocabulary has 20 tokens: `[PAD]`, `[EOS]`, ten digits, five operations and `( ) ,`.
#   `tokenize` and `detokenize` round-trip exactly; bad input raises a `ValueError` that names
#   the piece and its position.
# - The model always sees the canonical form from `encode`: commas dropped, one `[EOS]` at the
#   end, where chapter 4 will read the answer.
# - With three digits and five operations there are only 5,000 distinct inputs, so random
#   examples repeat; `split_dataset` de-duplicates before splitting, and no validation or test
#   input ever reaches training. `all_examples()` gives the whole language for evaluation.
# - A random split can leave a rare answer with a single training example (here `Max` = 1).
#   `stratify=True` cuts each (operation, answer) group 80/10/10 on its own; the book trains
#   on that split of all 5,000 inputs (4,004 / 502 / 494).
# - `create_batch` pads on the right to the longest sequence and returns ids `(B, T)`, a mask
#   `(B, T)` that is `True` for real tokens, and the answer ids `(B,)`.
#
# ## Exercises
#
# 1. How many distinct inputs does the language have with four arguments, and what fraction of
#    them would 10,000 random examples cover? Compute both, then check with `generate_dataset`.
# 2. `Max` answers skew high. What is the exact probability that `Max` of three random digits
#    is 9? Derive it, then check it against `all_examples()`.
# 3. Write `batches(examples, batch_size, rng)` that yields shuffled `Batch`es covering every
#    example exactly once per epoch.

# %% tags=["hide-cell"]
# Solution 1: 5 operations x 10**4 digit strings; the expected number of distinct inputs
# among n draws from N equally likely ones is N * (1 - (1 - 1/N)**n).
N4 = len(OPERATIONS) * 10**4
expected = N4 * (1 - (1 - 1 / N4) ** 10_000)
seen = len({(ex.op, ex.args) for ex in generate_dataset(10_000, seed=0, num_args=4)})
print(f"{N4:,} inputs; expected distinct {expected:,.0f} ({expected / N4:.1%}), "
      f"measured {seen:,}")
assert N4 == 50_000 and abs(seen - expected) < 100

# %% tags=["hide-cell"]
# Solution 2: Max is 9 unless all three digits are below 9: 1 - 0.9**3 = 0.271.
p_nine = 1 - 0.9**3
counted = sum(ex.answer == 9 for ex in all_examples() if ex.op == "Max") / 1000
print(f"P(Max = 9) = {p_nine:.3f}; counted over all inputs: {counted:.3f}")
assert abs(p_nine - counted) < 1e-12

# %% tags=["hide-cell"]
# Solution 3: shuffle indices once per epoch, then slice.
def batches(examples, batch_size, rng):
    order = rng.permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield create_batch([examples[i] for i in order[start:start + batch_size]])


small = generate_dataset(100, seed=3)
got = [b for b in batches(small, 32, np.random.default_rng(0))]
assert [len(b.targets) for b in got] == [32, 32, 32, 4]
assert (sorted(t for b in got for t in b.targets.tolist())
        == sorted(ex.target for ex in small))
print("batch sizes", [len(b.targets) for b in got])
