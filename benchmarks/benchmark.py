"""Training speed of the reference model, printed as markdown tables (a script, not a test).

    python benchmarks/benchmark.py                       # everything below
    OPENBLAS_NUM_THREADS=1 python benchmarks/benchmark.py
    OPENBLAS_NUM_THREADS=1 python benchmarks/benchmark.py --clock cpu   # CPU time, one thread

Measures, for the reference model (d_model 64, 4 heads, 2 layers, d_ff 256, post-norm):

1. the median time of one training step (forward, loss, backward, clipping, Adam) at batch 32
   and 256, in float32 and float64; if PyTorch is importable, the same model and step in
   PyTorch on the CPU, measured in alternating rounds with NumPy so that both see the same
   machine load, and the ratio NumPy / PyTorch; then how a NumPy step at batch 32 in float32
   divides into forward, loss, backward, and clipping plus Adam;
2. why Adam keeps its scalars Python floats: float32 array * NumPy float64 scalar vs * float.

How many seeds of the book's recipe reach 100% on all 5,000 inputs, and on which machines, is
measured by benchmarks/recipes.py. PyTorch is optional and never a requirement of the
project. Timings on a shared machine are noisy: the script prints the load average before
and after.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's transformer_lib

from transformer_lib.data import create_batch  # noqa: E402
from transformer_lib.training import (  # noqa: E402
    REFERENCE_CONFIG,
    Adam,
    CrossEntropyLoss,
    clip_grad_norm,
    default_splits,
    train_step,
)
from transformer_lib.transformer import Transformer  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

# wall-clock time by default; --clock cpu times the calling thread's CPU time instead, which
# other jobs on a shared machine disturb far less (valid only with one thread each)
clock = time.perf_counter



# ---------------------------------------------------------------- one training step, NumPy
def numpy_stepper(dtype, batch):
    model = Transformer(**REFERENCE_CONFIG, seed=0, dtype=dtype)
    opt, loss_fn = Adam(model.parameters(), lr=2e-3), CrossEntropyLoss()
    model.train()

    def step():                          # chapter 5's one training step, as training runs it
        train_step(model, loss_fn, opt, batch.ids, batch.mask, batch.targets, clip=1.0)
    return step


# ---------------------------------------------------------------- the same step, PyTorch
def torch_stepper(dtype, batch):
    nn = torch.nn
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]

    class TorchTransformer(nn.Module):
        """Embedding + sinusoidal positions, 2 post-norm encoder layers, read out at [EOS]."""

        def __init__(self, vocab_size=20, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                     max_len=64):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, d_model)
            pos = torch.arange(max_len)[:, None]
            angle = pos / 10000.0 ** (torch.arange(0, d_model, 2)[None, :] / d_model)
            pe = torch.zeros(max_len, d_model)
            pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
            self.register_buffer("pe", pe)
            layer = nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=0.0,
                                               activation="relu", batch_first=True,
                                               norm_first=False)                      # post-norm
            self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
            self.output = nn.Linear(d_model, vocab_size)

        def forward(self, ids, mask):
            x = self.embedding(ids) + self.pe[:ids.shape[1]]
            x = self.encoder(x, src_key_padding_mask=~mask)
            last = mask.sum(dim=1) - 1
            return self.output(x[torch.arange(ids.shape[0]), last])

    torch.manual_seed(0)
    model = TorchTransformer().to(torch_dtype).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
    targets = torch.from_numpy(batch.targets)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids, mask), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, n_params


def median_step_ms(steppers, steps, rounds=5, warmup=5):
    """Median milliseconds per call of each stepper, timed call by call in alternating rounds."""
    for step in steppers:
        for _ in range(warmup):
            step()
    times = [[] for _ in steppers]
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for step, t in zip(steppers, times, strict=True):
            for _ in range(per_round):
                t0 = clock()
                step()
                t.append(clock() - t0)
    return [1000 * statistics.median(t) for t in times]


def step_table(train):
    rng = np.random.default_rng(0)
    rows = []
    print("| dtype | batch | NumPy ms/step | PyTorch ms/step | NumPy / PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (np.float32, np.float64):
        for size, steps in ((32, 100), (256, 30)):
            batch = create_batch([train[i] for i in rng.choice(len(train), size, replace=False)])
            steppers = [numpy_stepper(dtype, batch)]
            if torch is not None:
                torch_step, n_params = torch_stepper(dtype, batch)
                steppers.append(torch_step)
            ms = median_step_ms(steppers, steps)
            if torch is not None:
                ratio = ms[0] / ms[1]
                print(f"| {dtype.__name__} | {size} | {ms[0]:.2f} | {ms[1]:.2f} | {ratio:.2f} |",
                      flush=True)
            else:
                print(f"| {dtype.__name__} | {size} | {ms[0]:.2f} | (no PyTorch) | |", flush=True)
            rows.append((dtype.__name__, size, ms))
    if torch is not None:
        print(f"\nPyTorch model: {n_params:,} parameters (NumPy: 102,420; PyTorch's attention also "
              "has a key bias)")
    return rows


def phase_table(train, steps=300):
    """Where a NumPy step's time goes: median ms of forward, loss, backward, clip + Adam.

    The moves of chapter 5's `train_step`, written out here only to put a clock between
    them; `numpy_stepper` times `train_step` itself."""
    rng = np.random.default_rng(0)
    batch = create_batch([train[i] for i in rng.choice(len(train), 32, replace=False)])
    model = Transformer(**REFERENCE_CONFIG, seed=0)
    opt, loss_fn = Adam(model.parameters(), lr=2e-3), CrossEntropyLoss()
    model.train()
    times = {"forward": [], "loss (forward and backward)": [], "backward": [],
             "clipping, Adam, zeroing the gradients": []}
    opt.zero_grad()
    for i in range(steps + 10):
        t0 = clock()
        logits = model(batch.ids, batch.mask)
        t1 = clock()
        loss_fn(logits, batch.targets)
        grad = loss_fn.backward()
        t2 = clock()
        model.backward(grad)
        t3 = clock()
        clip_grad_norm(opt.grad, 1.0)
        opt.step()
        opt.zero_grad()                                      # for the next step
        t4 = clock()
        if i >= 10:                                          # the first steps warm up
            for key, a, b in zip(times, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                times[key].append(b - a)
    print("\nOne NumPy step, float32, batch 32, by phase (median ms):\n")
    print("| phase | ms |\n|---|---:|")
    for key, t in times.items():
        print(f"| {key} | {1000 * statistics.median(t):.2f} |")


# ---------------------------------------------------------------- time to 100% on all inputs
# ---------------------------------------------------------------- the scalar-type detail
def scalar_promotion():
    a = np.ones(102_420, dtype=np.float32)
    ms = median_step_ms([lambda: a.__imul__(np.float64(1.0)), lambda: a.__imul__(1.0)], 400)
    print(f"\nfloat32 array of 102,420 numbers *= NumPy float64 scalar: {1000 * ms[0]:.0f} µs; "
          f"*= Python float: {1000 * ms[1]:.0f} µs ({ms[0] / ms[1]:.0f} times faster)")


def main():
    global clock
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by the wall clock (default) or by this thread's "
                             "CPU time (needs OPENBLAS_NUM_THREADS=1)")
    args = parser.parse_args()

    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    if args.clock == "cpu":
        if threads != "1":
            parser.error("--clock cpu counts only this thread: set OPENBLAS_NUM_THREADS=1")
        clock = time.thread_time
    if torch is not None and threads != "default":
        torch.set_num_threads(int(threads))                    # same thread count for both
    print(f"NumPy {np.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"OPENBLAS_NUM_THREADS={threads}" +
          (f", PyTorch {torch.__version__} with {torch.get_num_threads()} threads" if torch else
           ", PyTorch not installed"))
    print(f"clock: {args.clock}")
    print("load average at start: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + "\n")

    train, _, _ = default_splits()
    step_table(train)
    phase_table(train)
    scalar_promotion()
    print("\nload average at end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
