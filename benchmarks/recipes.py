"""Which training recipe reaches 100% on all 5,000 inputs for every seed, on every machine?

    python benchmarks/recipes.py          # the book's recipe, seeds 0-19, two machines
    python benchmarks/recipes.py --recipes book,random-8 --seeds 0-4 --envs native-1t,nehalem-1t
    python benchmarks/recipes.py --list   # the recipes

Trains the reference architecture once per (recipe, seed) on the training split only, and
prints a markdown table per recipe: per seed, the accuracy of the returned model on all
5,000 possible inputs, the inputs it gets wrong, and the training seconds; then how many
seeds reached 100%. With --envs, each environment of tools/numenv.py (OpenBLAS kernel,
NumPy SIMD level, threads) runs in its own process, with at most one BLAS thread per core at
once, and the table has one column per environment. A script that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                       # this checkout's transformer_lib
sys.path.insert(0, str(ROOT / "tools"))

import numenv  # noqa: E402
from portability import Cores  # noqa: E402


def oversample(train, minimum):
    """Repeat the examples of each (operation, answer) pair until it has `minimum`."""
    by_pair = {}
    for ex in train:
        by_pair.setdefault((ex.op, ex.target), []).append(ex)
    out = list(train)
    for exs in by_pair.values():
        k = 0
        while len(exs) + k < minimum:
            out.append(exs[k % len(exs)])
            k += 1
    return out


RANDOM = "random"        # the book's split before this benchmark: 10,000 draws, de-duplicated,
                         # shuffled and cut 80/10/10 (3,450 training inputs)
STRATIFIED_DRAWS = "stratified draws"       # the same draws, cut per (operation, answer)
BOOK = "book"            # default_splits(): all 5,000 inputs, cut per (operation, answer)


def recipes():
    """name -> the split, epochs, optional oversampling and fit's keyword arguments.

    Every recipe is Adam with warm-up over 50 steps, cosine decay, clipping at 1 and
    batch 32 (fit's defaults) unless it says otherwise. "book" is chapter 5's recipe.
    """
    old = dict(split=RANDOM, lr=3e-3)
    strat = dict(split=BOOK, lr=3e-3)
    return {
        "random-8": dict(old, epochs=8),                      # the book until this sweep
        "random-16": dict(old, epochs=16),
        "random-16-over32": dict(old, epochs=16, oversample=32),
        "random-16-over64": dict(old, epochs=16, oversample=64),
        "stratdraws-16": dict(old, split=STRATIFIED_DRAWS, epochs=16),
        "strat-8": dict(strat, epochs=8),
        "strat-12": dict(strat, epochs=12),
        "strat-16": dict(strat, epochs=16),
        "strat-8-wd": dict(strat, epochs=8, weight_decay=0.05),
        "book": book_recipe(),                                   # chapter 5's recipe
    }


def book_recipe():
    """Chapter 5's recipe, read from the library so that it cannot drift from the book."""
    import inspect

    from transformer_lib.training import REFERENCE_EPOCHS, fit
    lr = inspect.signature(fit).parameters["lr"].default
    return dict(split=BOOK, lr=lr, epochs=REFERENCE_EPOCHS)


def splits(name):
    from transformer_lib.data import generate_dataset, split_dataset
    from transformer_lib.training import default_splits
    if name == BOOK:
        return default_splits()
    draws = generate_dataset(10_000, seed=0)
    return split_dataset(draws, seed=0, stratify=name == STRATIFIED_DRAWS)


def run_one(recipe: str, seed: int) -> dict:
    from transformer_lib.data import all_examples, create_batch
    from transformer_lib.training import REFERENCE_CONFIG, fit
    from transformer_lib.transformer import Transformer
    spec = dict(recipes()[recipe])
    split, epochs = spec.pop("split"), spec.pop("epochs")
    minimum = spec.pop("oversample", 0)
    train, val, _ = splits(split)
    if minimum:
        train = oversample(train, minimum)
    model = Transformer(**REFERENCE_CONFIG, seed=seed)
    hist = fit(model, train, val, epochs=epochs, seed=seed, progress=False, **spec)
    everything = all_examples()
    batch = create_batch(everything)
    model.eval()
    pred = model(batch.ids, batch.mask).argmax(-1)
    wrong = [everything[i].text for i in (pred != batch.targets).nonzero()[0]]
    return dict(recipe=recipe, seed=seed, accuracy=1 - len(wrong) / len(everything),
                wrong=wrong, seconds=hist.seconds)


def child(recipe_names, seeds):
    for r in recipe_names:
        for s in seeds:
            print(json.dumps(run_one(r, s)), flush=True)


def int_list(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="book", help=f"comma-separated, of {list(recipes())}")
    p.add_argument("--seeds", type=int_list, default=int_list("0-19"))
    p.add_argument("--envs", default="native-1t,haswell-1t",
                   help=f"comma-separated, of {list(numenv.environments())}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="BLAS threads at once (default: the number of cores)")
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.list:
        for name, spec in recipes().items():
            print(f"{name:18} {spec}")
        return None
    names = a.recipes.split(",")
    for r in names:
        if r not in recipes():
            p.error(f"unknown recipe {r!r}")
    if a.child:
        return child(names, a.seeds)
    envs = a.envs.split(",")
    for e in envs:
        print(f"{e}: {numenv.describe(numenv.env_for(e))}")

    cores = Cores(a.jobs)

    def run_env(e):
        threads = int(numenv.environments()[e].get("OPENBLAS_NUM_THREADS", "1"))
        return cores.run(threads, lambda: run_env_now(e))

    def run_env_now(e):
        cmd = [sys.executable, __file__, "--child", "--recipes", a.recipes,
               "--seeds", ",".join(map(str, a.seeds))]
        out = subprocess.run(cmd, env=numenv.env_for(e), capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{e} failed:\n{out.stderr}")
        return e, [json.loads(line) for line in out.stdout.splitlines()]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(envs)) as pool:
        results = dict(pool.map(run_env, envs))
    for r in names:
        print(f"\nrecipe {r}: {recipes()[r]}\n")
        print("| seed | " + " | ".join(envs) + " |")
        print("|---:|" + "---|" * len(envs))
        for s in a.seeds:
            cells = []
            for e in envs:
                x = next(x for x in results[e] if x["recipe"] == r and x["seed"] == s)
                cell = f"{x['accuracy']:.2%} ({x['seconds']:.1f} s)"
                if x["wrong"]:
                    cell += " " + ", ".join(f"`{w}`" for w in x["wrong"][:3])
                    cell += " …" if len(x["wrong"]) > 3 else ""
                cells.append(cell)
            print(f"| {s} | " + " | ".join(cells) + " |")
        for e in envs:
            xs = [x for x in results[e] if x["recipe"] == r]
            n = sum(x["accuracy"] == 1 for x in xs)
            secs = [x["seconds"] for x in xs]
            misses = Counter(w for x in xs for w in x["wrong"])
            print(f"\n{e}: {n} of {len(xs)} seeds at 100% on all 5,000 inputs; training "
                  f"{min(secs):.1f}-{max(secs):.1f} s; most missed: "
                  + (", ".join(f"{w} ({k})" for w, k in misses.most_common(4)) or "none"))
    print(f"\n(wall time {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
