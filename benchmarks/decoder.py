"""Chapter 8's decoder: its recipe over seeds, the classifier beside it, and the KV cache.

    python benchmarks/decoder.py train [--tasks numbers,nested,scratchpad] [--seeds 0,1,2]
                                      [--classifier] [--save-shipped]
    python benchmarks/decoder.py cache [--lengths 16,32,64,128,256,512] [--batch 1]

`train` trains a Decoder with DECODER_RECIPE per (task, seed) and prints a markdown table:
held-out exact match of the generated answers (2,000 puzzles, none in training), after each
epoch and at the end, and the training seconds (evaluation excluded). --classifier adds
chapter 7's two-head classifier (TwoDigitTransformer) trained on the same 50,000 puzzles of
numbers 0-99 with the same recipe. --save-shipped writes each task's seed-0 model to
transformer_lib/decoder_<task>.npz (the book's copies; the same as
`python -m transformer_lib train-decoder --task <task> --out ...`).

`cache` prints tokens per second of greedy generation with and without the KV cache, and the
ratio, for each total length (prompt of 1 token), on one untrained Decoder of the reference
shape: the weights do not change the arithmetic's cost. A script that prints figures, not a
test; run it with OPENBLAS_NUM_THREADS=1 on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                       # this checkout's transformer_lib

from transformer_lib.decoder import (  # noqa: E402
    DECODER_RECIPE,
    DECODER_TASKS,
    classifier_batch,
    classifier_exact_match,
    decoder_task_data,
    generation_speed,
    shipped_decoder_path,
    train_decoder_task,
)
from transformer_lib.experiments import TwoDigitTransformer, TwoTokenLoss  # noqa: E402
from transformer_lib.training import machine, save_model, train_steps  # noqa: E402


def classifier_run(seed: int) -> dict:
    """Chapter 7's classifier on the decoder's numbers data, with the decoder's recipe."""
    train, test = decoder_task_data("numbers")
    recipe = {k: v for k, v in DECODER_RECIPE.items() if k != "n_train"}
    model, curve, seconds = TwoDigitTransformer(seed=seed), [], [0.0]
    start = [time.perf_counter()]

    def after_epoch(epoch, losses):
        seconds[0] += time.perf_counter() - start[0]
        curve.append(float(classifier_exact_match(model.eval(), test).mean()))
        model.train()
        start[0] = time.perf_counter()

    train_steps(model, TwoTokenLoss(), classifier_batch(train), seed=seed,
                on_epoch=after_epoch, **recipe)
    return {"exact_match": curve, "seconds": seconds[0]}


def train_table(tasks, seeds, classifier: bool, save: bool) -> None:
    print(f"machine: {machine()}")
    print(f"recipe: {DECODER_RECIPE}\n")
    print("| model | task | seed | held-out exact match by epoch | final | seconds |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        finals = []
        for seed in seeds:
            model, record = train_decoder_task(task, seed)
            curve = record["exact_match"]
            finals.append(curve[-1])
            print(f"| decoder | {task} | {seed} | "
                  f"{' '.join(f'{c:.2%}' for c in curve)} | {curve[-1]:.2%} | "
                  f"{record['seconds']:.1f} |", flush=True)
            if save and seed == 0:
                record.pop("step_loss")
                path = save_model(model, shipped_decoder_path(task), **record,
                                  trained_on=machine())
                print(f"|  | saved {path.relative_to(ROOT)} | | | | |", flush=True)
        print(f"| decoder | {task} | all | worst {min(finals):.2%} | "
              f"{sum(f >= 0.995 for f in finals)}/{len(finals)} at >= 99.5% | |",
              flush=True)
    if classifier:
        for seed in seeds:
            run = classifier_run(seed)
            curve = run["exact_match"]
            print(f"| classifier (ch. 7) | numbers | {seed} | "
                  f"{' '.join(f'{c:.2%}' for c in curve)} | {curve[-1]:.2%} | "
                  f"{run['seconds']:.1f} |", flush=True)


def cache_table(lengths, batch: int) -> None:
    print(f"machine: {machine()}\n")
    print("| tokens written | without cache (tokens/s) | with cache (tokens/s) | ratio |")
    print("|---|---|---|---|")
    for row in generation_speed(lengths, batch=batch):
        print(f"| {row['length']} | {row['uncached']:,.0f} | {row['cached']:,.0f} | "
              f"{row['cached'] / row['uncached']:.1f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("--tasks", default=",".join(DECODER_TASKS))
    train.add_argument("--seeds", default="0,1,2")
    train.add_argument("--classifier", action="store_true")
    train.add_argument("--save-shipped", action="store_true")
    cache = commands.add_parser("cache")
    cache.add_argument("--lengths", default="16,32,64,128,256,512")
    cache.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    if args.command == "train":
        tasks = [t for t in args.tasks.split(",") if t]
        seeds = [int(s) for s in args.seeds.split(",")]
        train_table(tasks, seeds, args.classifier, args.save_shipped)
    else:
        cache_table([int(n) for n in args.lengths.split(",")], args.batch)


if __name__ == "__main__":
    main()
