"""Command line for transformer_lib (hand-written; not generated from a notebook).

    python -m transformer_lib train [--seed N] [--epochs N] [--out PATH]
    python -m transformer_lib predict "Max(5, 3, 9)" ["Min(4, 2, 7)" ...] [--model PATH]
    python -m transformer_lib generate "Max(57, 3, 99)" ["Max(First(2 8) Second(5 1))" ...]
                                       [--model PATH]
    python -m transformer_lib train-decoder [--task numbers|nested|scratchpad] [--seed N]
                                            [--out PATH]

predict uses the book's reference model shipped with the package unless --model names
another; train saves to artifacts/ (see README). The shipped file is written by
    OPENBLAS_NUM_THREADS=1 python -m transformer_lib train --out transformer_lib/reference_model.npz
and chapter 8's decoders by
    OPENBLAS_NUM_THREADS=1 python -m transformer_lib train-decoder --task T \
        --out transformer_lib/decoder_T.npz          # T = numbers, nested, scratchpad

Errors (bad input, a missing or unreadable model file) print one line on stderr and exit with
status 2, without a traceback.
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from transformer_lib.data import all_examples
from transformer_lib.decoder import (
    DECODER_TASKS,
    generate,
    load_decoder,
    parse_puzzle,
    shipped_decoder_path,
    train_decoder_task,
)
from transformer_lib.evaluation import predict
from transformer_lib.training import (
    REFERENCE_EPOCHS,
    REFERENCE_PATH,
    SHIPPED_PATH,
    default_splits,
    evaluate,
    load_model,
    machine,
    save_model,
    train_reference_model,
)

PROG = "python -m transformer_lib"


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # instead of argparse's usage text + exit
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Train the book's transformer, or ask a trained one.",
                     epilog=f'examples:\n  {PROG} train\n  {PROG} predict "Max(5, 3, 9)"',
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command",
                                     metavar="{train,predict,generate,train-decoder}",
                                     parser_class=_Parser)
    commands.required = True

    train = commands.add_parser(
        "train", help="train the reference model and save it",
        description="Train the reference model (d_model 64, 4 heads, 2 layers, d_ff 256) on the "
                    "training split, print its test accuracy, and save it.")
    train.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    train.add_argument("--epochs", type=_int_at_least(1), default=REFERENCE_EPOCHS,
                       help=f"number of epochs (default {REFERENCE_EPOCHS})")
    train.add_argument("--out", type=Path, default=None,
                       help=f"where to save the model (default {REFERENCE_PATH} for seed 0 and "
                            f"{REFERENCE_EPOCHS} epochs, the book's reference; otherwise "
                            "model_seed<N>_epochs<E>.npz beside it)")

    pred = commands.add_parser(
        "predict", help="print a trained model's answer to each puzzle",
        description='Print the answer to each puzzle, one per line: "Max(5, 3, 9)" -> 9.')
    pred.add_argument("puzzles", nargs="+", metavar="PUZZLE",
                      help='a puzzle such as "Max(5, 3, 9)"')
    pred.add_argument("--model", type=Path, default=SHIPPED_PATH,
                      help="a model file written by train (default: the book's reference "
                           f"model, shipped with the package, {SHIPPED_PATH})")

    gen = commands.add_parser(
        "generate", help="print a decoder's written answer to each puzzle (chapter 8)",
        description='Print the generated answer to each puzzle, one per line: '
                    '"Max(57, 3, 99)" -> 9 9 as "99"; "Max(First(2 8) Second(5 1))" -> '
                    'the scratchpad and the answer, "2 1 → 2".')
    gen.add_argument("puzzles", nargs="+", metavar="PUZZLE",
                     help='a puzzle on numbers 0-99 such as "Max(57, 3, 99)", or a nested '
                          'one such as "Max(First(2 8) Second(5 1))"')
    gen.add_argument("--model", type=Path, default=None,
                     help="a decoder file written by train-decoder (default: the book's "
                          "decoder for the puzzle's kind, shipped with the package)")

    dec = commands.add_parser(
        "train-decoder", help="train one of chapter 8's decoders and save it",
        description="Train a decoder (d_model 64, 4 heads, 2 layers, d_ff 256) with "
                    "chapter 8's recipe, print its held-out exact match, and save it.")
    dec.add_argument("--task", choices=DECODER_TASKS, default="numbers",
                     help="numbers 0-99, nested puzzles, or nested with a scratchpad "
                          "(default numbers)")
    dec.add_argument("--seed", type=_int_at_least(0), default=0,
                     help="random seed (default 0)")
    dec.add_argument("--out", type=Path, default=None,
                     help=f"where to save (default {REFERENCE_PATH.parent}/"
                          "decoder_<task>_seed<N>.npz)")
    return parser


def _trained_on(puzzle) -> bool:
    """Is the puzzle of the shape the shipped decoders were trained on?"""
    if isinstance(puzzle.args[0], int):
        return len(puzzle.args) == 3
    return 2 <= len(puzzle.args) <= 3 and all(2 <= len(d) <= 3 for _, d in puzzle.args)


def _generate(args) -> None:
    puzzles = []
    for text in args.puzzles:                   # check every puzzle before printing anything
        try:
            puzzles.append(parse_puzzle(text))
        except ValueError as error:
            raise UsageError(f"cannot read {text!r}: {error}") from None
    lines = []
    for text, puzzle in zip(args.puzzles, puzzles, strict=True):
        task = "numbers" if isinstance(puzzle.args[0], int) else "scratchpad"
        if args.model is None and not _trained_on(puzzle):
            raise UsageError(f"cannot answer {text!r}: the book's decoders were trained on "
                             "three numbers 0-99, or on two or three inner puzzles of 2-3 "
                             "digits; pass --model for another decoder")
        path = args.model if args.model is not None else shipped_decoder_path(task)
        try:
            model = load_decoder(path)
        except FileNotFoundError:
            raise UsageError(f"no decoder file at {path}; train one with: "
                             f"{PROG} train-decoder --task {task} --out {path}") from None
        written = generate(model, [puzzle.prompt]).tokens[0]
        if written[-1:] == ["[EOS]"]:
            written = written[:-1]
        # digits of one number are written together: 9 9 -> 99
        lines.append(" ".join(written) if task != "numbers" else "".join(written))
    print("\n".join(lines))


def _train_decoder(args) -> None:
    print(f"training a decoder on the {args.task} task (seed {args.seed})", flush=True)
    model, record = train_decoder_task(args.task, args.seed, progress=True)
    out = args.out if args.out is not None else (
        REFERENCE_PATH.parent / f"decoder_{args.task}_seed{args.seed}.npz")
    record.pop("step_loss")
    path = save_model(model, out, **record, trained_on=machine())
    print(f"trained in {record['seconds']:.1f} s; saved {path}")


def default_out(seed: int, epochs: int) -> Path:
    """Where train saves by default: the reference file only for the reference run (seed 0,
    REFERENCE_EPOCHS), so that another run never replaces chapter 5's reference run."""
    if (seed, epochs) == (0, REFERENCE_EPOCHS):
        return REFERENCE_PATH
    return REFERENCE_PATH.with_name(f"model_seed{seed}_epochs{epochs}.npz")


def _train(args) -> None:
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs > 1 else "")
    reference = (args.seed, args.epochs) == (0, REFERENCE_EPOCHS)
    what = "the book's reference model" if reference else "a model of the reference shape"
    print(f"training {what} (seed {args.seed}, {epochs})", flush=True)
    model, history = train_reference_model(seed=args.seed, epochs=args.epochs, progress=True)
    _, _, test = default_splits()
    test_accuracy = evaluate(model, test)["accuracy"]
    all_accuracy = evaluate(model, all_examples())["accuracy"]
    print(f"test accuracy {test_accuracy:.2%}, all 5,000 inputs {all_accuracy:.2%}, "
          f"trained in {history.seconds:.1f} s")
    out = args.out if args.out is not None else default_out(args.seed, args.epochs)
    path = save_model(model, out, seed=args.seed, epochs=args.epochs, history=asdict(history),
                      trained_on=machine())
    print(f"saved {path}")
    if path.resolve() != SHIPPED_PATH.resolve():          # predict's default is the book's
        print(f'ask it with: {PROG} predict "Max(5, 3, 9)" --model {path}')


def _predict(args) -> None:
    try:
        model = load_model(args.model)
    except FileNotFoundError:
        if args.model.resolve() == SHIPPED_PATH.resolve():
            raise UsageError(f"the book's model is missing from the package ({SHIPPED_PATH}); "
                             "restore it (git checkout transformer_lib/reference_model.npz) "
                             "or reinstall, or pass --model PATH") from None
        out = "" if args.model == REFERENCE_PATH else f" --out {args.model}"
        raise UsageError(f"no model file at {args.model}; train one first with: "
                         f"{PROG} train{out}") from None
    answers = []
    for puzzle in args.puzzles:                 # check every puzzle before printing anything
        try:
            answers.append(predict(model, puzzle))
        except ValueError as error:
            raise UsageError(f"cannot read {puzzle!r}: {error}") from None
    print("\n".join(answers))


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input or model file)."""
    try:
        args = _parser().parse_args(argv)
        {"train": _train, "predict": _predict, "generate": _generate,
         "train-decoder": _train_decoder}[args.command](args)
    except (UsageError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
