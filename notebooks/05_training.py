# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Training
#
# DRAFT skeleton: export cells only.

# %% tags=["export"]
import json, os, sys, tempfile, time, zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence
import numpy as np
from transformer_lib.layers import Module, Parameter, row_max, row_sum
from transformer_lib.transformer import Transformer
from transformer_lib.data import Batch, Example, create_batch, generate_dataset, split_dataset, all_examples

# %% tags=["export"]
class CrossEntropyLoss:
    """Mean of -log softmax(logits)[target] over the batch."""

    def forward(self, logits: np.ndarray, targets: np.ndarray) -> float:
        logits, targets = np.asarray(logits), np.asarray(targets)
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"expected logits (B, V) and targets (B,), got {logits.shape} and {targets.shape}")
        V = logits.shape[1]
        if targets.size and (targets.min() < 0 or targets.max() >= V):
            bad = targets[(targets < 0) | (targets >= V)][0]
            raise ValueError(f"target {bad} is outside the {V} classes")
        B = len(targets)
        shifted = logits - logits.max(axis=-1, keepdims=True)          # largest logit is 0
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))   # (B, V)
        self._cache = (log_probs, targets)
        return float(-log_probs[np.arange(B), targets].mean())

    __call__ = forward

    def backward(self) -> np.ndarray:
        log_probs, targets = self._cache
        grad = np.exp(log_probs)                                        # softmax
        grad[np.arange(len(targets)), targets] -= 1.0                   # - one_hot
        return grad / len(targets)                                      # (B, V)

# %% tags=["export"]
def flatten_parameters(params: Sequence[Parameter]) -> tuple[np.ndarray, np.ndarray]:
    """Move every parameter's data and grad into one flat buffer each; parameters become views.

    An optimiser then updates ~100k numbers with a handful of large NumPy operations instead of
    a handful per parameter array."""
    params = list(params)
    dtype = params[0].data.dtype
    total = sum(p.data.size for p in params)
    data, grad = np.empty(total, dtype), np.empty(total, dtype)
    offset = 0
    for p in params:
        n, shape = p.data.size, p.data.shape
        data[offset:offset + n] = p.data.ravel()
        grad[offset:offset + n] = p.grad.ravel()
        p.data = data[offset:offset + n].reshape(shape)
        p.grad = grad[offset:offset + n].reshape(shape)
        offset += n
    return data, grad

# %% tags=["export"]
class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        self.data, self.grad = flatten_parameters(self.params)
        self.lr = lr

    def zero_grad(self):
        self.grad.fill(0)

# %% tags=["export"]
class SGD(Optimizer):
    """p -= lr * v, with v = momentum * v + grad."""

    def __init__(self, params, lr=0.1, momentum=0.0):
        super().__init__(params, lr)
        self.momentum = momentum
        self.velocity = np.zeros_like(self.data)

    def step(self):
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += self.grad
            self.data -= self.lr * self.velocity
        else:
            self.data -= self.lr * self.grad

# %% tags=["export"]
class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) with bias correction and optional decoupled weight decay (AdamW)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.m = np.zeros_like(self.data)          # first moment
        self.v = np.zeros_like(self.data)          # second moment
        self._tmp = np.empty_like(self.data)
        self.t = 0

    def step(self):
        b1, b2 = self.betas
        self.t += 1
        g, m, v, tmp = self.grad, self.m, self.v, self._tmp
        m *= b1; np.multiply(g, 1 - b1, out=tmp); m += tmp           # m = b1 m + (1 - b1) g
        v *= b2; np.multiply(g, g, out=tmp); tmp *= 1 - b2; v += tmp  # v = b2 v + (1 - b2) g^2
        if self.weight_decay:
            self.data *= 1 - self.lr * self.weight_decay
        # p -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)
        np.sqrt(v, out=tmp); tmp *= 1 / np.sqrt(1 - b2 ** self.t); tmp += self.eps
        np.divide(m, tmp, out=tmp); tmp *= self.lr / (1 - b1 ** self.t)
        self.data -= tmp

# %% tags=["export"]
def clip_grad_norm(grad: np.ndarray, max_norm: float) -> float:
    """Scale the flat gradient in place so its L2 norm is at most max_norm; return the norm before."""
    norm = float(np.sqrt(grad @ grad))
    if norm > max_norm:
        grad *= max_norm / (norm + 1e-12)
    return norm

# %% tags=["export"]
def warmup_cosine(step: int, total_steps: int, warmup: int, peak_lr: float) -> float:
    """Linear warm-up to peak_lr over `warmup` steps, then cosine decay to 0 at total_steps."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

# %% tags=["export"]
def _as_batch(data) -> Batch:
    return data if isinstance(data, Batch) else create_batch(list(data))

# %% tags=["export"]
def evaluate(model: Transformer, data, batch_size: int = 2048) -> dict:
    """Loss and accuracy on data (a Batch or a list of Examples), in eval mode (no caches)."""
    data = _as_batch(data)
    was_training = model.training
    model.eval()
    loss_fn, losses, correct = CrossEntropyLoss(), 0.0, 0
    for i in range(0, len(data.ids), batch_size):
        logits = model(data.ids[i:i + batch_size], data.mask[i:i + batch_size])
        t = data.targets[i:i + batch_size]
        losses += loss_fn(logits, t) * len(t)
        correct += int((logits.argmax(axis=-1) == t).sum())
    model.train(was_training)
    n = len(data.ids)
    return {"loss": losses / n, "accuracy": correct / n}

# %% tags=["export"]
def train_one_epoch(model, loss_fn, optimizer, data: Batch, batch_size: int, rng: np.random.Generator,
                    lr_at=None, step: int = 0, clip: float | None = 1.0) -> list[float]:
    """One pass over data in shuffled mini-batches; returns the loss of every step."""
    losses = []
    order = rng.permutation(len(data.ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if lr_at is not None:
            optimizer.lr = lr_at(step)
        optimizer.zero_grad()
        logits = model(data.ids[idx], data.mask[idx])                 # (B, V)
        losses.append(loss_fn(logits, data.targets[idx]))
        model.backward(loss_fn.backward())
        if clip:
            clip_grad_norm(optimizer.grad, clip)
        optimizer.step()
        step += 1
    return losses


# %% tags=["export"]
@dataclass
class History:
    step_loss: list = field(default_factory=list)
    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0

# %% tags=["export"]
def fit(model, train, val, *, epochs=10, batch_size=32, lr=3e-3, warmup=50, clip=1.0,
        weight_decay=0.0, seed=0, optimizer="adam", progress=True, stop_at_accuracy=None) -> History:
    """Train, keep the best parameters by validation accuracy, restore them at the end."""
    train, val = _as_batch(train), _as_batch(val)
    rng = np.random.default_rng(seed)
    opt = Adam(model.parameters(), lr=lr, weight_decay=weight_decay) if optimizer == "adam" else SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = CrossEntropyLoss()
    steps_per_epoch = -(-len(train.ids) // batch_size)
    total = epochs * steps_per_epoch
    hist, best, best_key = History(), None, None
    model.train()
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = train_one_epoch(model, loss_fn, opt, train, batch_size, rng,
                                 lambda s: warmup_cosine(s, total, warmup, lr), (epoch - 1) * steps_per_epoch, clip)
        ev = evaluate(model, val)
        hist.step_loss += losses; hist.epoch.append(epoch); hist.train_loss.append(float(np.mean(losses)))
        hist.val_loss.append(ev["loss"]); hist.val_accuracy.append(ev["accuracy"])
        key = (ev["accuracy"], -ev["loss"])
        if best_key is None or key > best_key:
            best_key, best, hist.best_epoch = key, opt.data.copy(), epoch
        if progress:
            print(f"epoch {epoch:3d}  train loss {hist.train_loss[-1]:.4f}  val loss {ev['loss']:.4f}  "
                  f"val acc {ev['accuracy']:.2%}  {time.perf_counter() - t0:5.1f}s", flush=True)
        if stop_at_accuracy is not None and ev["accuracy"] >= stop_at_accuracy:
            break
    opt.data[...] = best
    hist.seconds = time.perf_counter() - t0
    return hist

# %% tags=["export"]
def save_model(model: Transformer, path, **metadata) -> Path:
    """Write config, metadata and every parameter to an .npz, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"param/{name}": p.data for name, p in model.named_parameters()}
    arrays["config"] = np.array(json.dumps(model.config))
    arrays["metadata"] = np.array(json.dumps(metadata, default=float))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

# %% tags=["export"]
def load_model(path) -> Transformer:
    """Rebuild a Transformer from save_model's .npz (allow_pickle=False); .metadata holds the metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz model file (it is not a zip archive; truncated or corrupt?)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        config = json.loads(str(arrays.pop("config")))
        metadata = json.loads(str(arrays.pop("metadata")))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a model file written by save_model: {e}") from None
    model = Transformer(**config)
    expected = dict(model.named_parameters())
    stored = {k.removeprefix("param/"): v for k, v in arrays.items()}
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise ValueError(f"{path}: parameters do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, p in expected.items():
        if stored[name].shape != p.data.shape:
            raise ValueError(f"{path}: {name} has shape {stored[name].shape}, the config needs {p.data.shape}")
        p.data[...] = stored[name]
    model.metadata = metadata
    return model

# %% tags=["export"]
import transformer_lib

ARTIFACTS = Path(transformer_lib.__file__).resolve().parent.parent / "artifacts"
REFERENCE_PATH = ARTIFACTS / "reference_model.npz"
REFERENCE_CONFIG = dict(vocab_size=20, d_model=64, num_heads=4, num_layers=2, d_ff=256, readout="eos")


def default_splits(seed: int = 0):
    """The book's data: 10,000 random examples, de-duplicated and split 80/10/10 without leakage."""
    return split_dataset(generate_dataset(10_000, seed=seed), seed=seed)


def train_reference_model(seed: int = 0, epochs: int = 8, progress: bool = True):
    """Train the reference model on the training split only; returns (model, history)."""
    train, val, _ = default_splits()
    model = Transformer(**REFERENCE_CONFIG, seed=seed)
    history = fit(model, train, val, epochs=epochs, seed=seed, progress=progress)
    return model, history


def load_or_train_reference(path=REFERENCE_PATH, seed: int = 0, progress: bool = False) -> Transformer:
    """Load the saved reference model, or train it (deterministically) and save it if the file is missing."""
    path = Path(path)
    if path.exists():
        return load_model(path)
    model, history = train_reference_model(seed=seed, progress=progress)
    save_model(model, path, seed=seed, history=asdict(history))
    model.metadata = {"seed": seed, "history": asdict(history)}
    return model
