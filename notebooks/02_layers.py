# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Layers
#
# DRAFT skeleton: export cells only. Prose, derivations and checks to be written.

# %% tags=["export"]
from typing import Iterator
import numpy as np

DEFAULT_DTYPE = np.float32

# %% tags=["export"]
def row_max(x: np.ndarray) -> np.ndarray:
    """max over the last axis, keepdims. For short last axes (attention over T <= 10 keys)
    NumPy's x.max(-1) is slow; T elementwise np.maximum calls are several times faster."""
    m = x[..., 0].copy()
    for j in range(1, x.shape[-1]):
        np.maximum(m, x[..., j], out=m)
    return m[..., None]

# %% tags=["export"]
def row_sum(x: np.ndarray) -> np.ndarray:
    """sum over the last axis, keepdims, as a matmul with a column of ones (fast for any length)."""
    return x @ np.ones((x.shape[-1], 1), dtype=x.dtype)

# %% tags=["export"]
class Parameter:
    """A trainable array and its gradient (same shape and dtype)."""

    def __init__(self, data: np.ndarray):
        self.data = np.asarray(data)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"

# %% tags=["export"]
class Module:
    """Base class: forward caches what backward needs; backward accumulates into .grad."""

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _children(self) -> Iterator[tuple[str, object]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, (Parameter, Module)):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name, child in self._children():
            if isinstance(child, Parameter):
                yield prefix + name, child
            else:
                yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator["Module"]:
        yield self
        for _, child in self._children():
            if isinstance(child, Module):
                yield from child.modules()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0)

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def to(self, dtype) -> "Module":
        """Cast every parameter (and float buffer) to dtype; grads are reset."""
        for m in self.modules():
            for name, value in vars(m).items():
                if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
                    setattr(m, name, value.astype(dtype))
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        return self

    def _check_cache(self, cache):
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward pass in training mode "
                               "(eval() keeps no cache; call .train() and forward first)")
        return cache

# %% tags=["export"]
class Linear(Module):
    """y = x @ W + b, W of shape (in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, rng: np.random.Generator | None = None,
                 bias: bool = True, dtype=DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        limit = np.sqrt(6.0 / (in_features + out_features))  # Xavier/Glorot uniform
        self.W = Parameter(rng.uniform(-limit, limit, (in_features, out_features)).astype(dtype))
        self.b = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.training:
            self._x = x
        # one 2-D matmul over all positions (a 3-D @ 2-D matmul would loop over the batch)
        y = (x.reshape(-1, x.shape[-1]) @ self.W.data).reshape(*x.shape[:-1], -1)   # (..., out)
        if self.b is not None:
            y += self.b.data
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        x = self._check_cache(self._x)
        x2 = x.reshape(-1, x.shape[-1])                            # (N, in)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])              # (N, out)
        self.W.grad += x2.T @ g2
        if self.b is not None:
            self.b.grad += g2.sum(axis=0)
        return (g2 @ self.W.data.T).reshape(x.shape)               # (..., in)

# %% tags=["export"]
class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int, rng=None, dtype=DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        self.W = Parameter(rng.normal(0.0, 1.0, (num_embeddings, dim)).astype(dtype))
        self._ids = None

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if self.training:
            self._ids = ids
        return self.W.data[ids]                                    # (B, T, D)

    def backward(self, grad_out: np.ndarray) -> None:
        ids = self._check_cache(self._ids)
        V, D = self.W.data.shape
        one_hot = (ids.reshape(-1, 1) == np.arange(V)).astype(grad_out.dtype)     # (B*T, V)
        self.W.grad += one_hot.T @ grad_out.reshape(-1, D)   # rows of repeated tokens add up
        return None

# %% tags=["export"]
class PositionalEncoding(Module):
    def __init__(self, d_model: int, max_len: int = 64, dtype=DEFAULT_DTYPE):
        pos = np.arange(max_len)[:, None]
        i = np.arange(0, d_model, 2)[None, :]
        angle = pos / (10000.0 ** (i / d_model))
        pe = np.zeros((max_len, d_model))
        pe[:, 0::2] = np.sin(angle)
        pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
        self.pe = pe.astype(dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        T = x.shape[-2]
        if T > self.pe.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_len {self.pe.shape[0]}")
        return x + self.pe[:T]

    def backward(self, grad_out):
        return grad_out

# %% tags=["export"]
class LayerNorm(Module):
    def __init__(self, d: int, eps: float = 1e-5, dtype=DEFAULT_DTYPE):
        self.gamma = Parameter(np.ones(d, dtype=dtype))
        self.beta = Parameter(np.zeros(d, dtype=dtype))
        self.eps = eps
        self._cache = None

    def forward(self, x):
        D = x.shape[-1]
        mu = row_sum(x) / D                                      # (..., 1)
        xc = x - mu
        var = row_sum(xc * xc) / D                               # biased variance
        rstd = 1.0 / np.sqrt(var + self.eps)
        xhat = xc * rstd                                         # (..., D)
        if self.training:
            self._cache = (xhat, rstd)
        return xhat * self.gamma.data + self.beta.data

    def backward(self, grad_out):
        xhat, rstd = self._check_cache(self._cache)
        D = xhat.shape[-1]
        g2 = grad_out.reshape(-1, D)
        self.gamma.grad += (g2 * xhat.reshape(-1, D)).sum(axis=0)
        self.beta.grad += g2.sum(axis=0)
        dxhat = grad_out * self.gamma.data
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        return rstd * (dxhat - row_sum(dxhat) / D - xhat * (row_sum(dxhat * xhat) / D))

# %% tags=["export"]
class ReLU(Module):
    def __init__(self):
        self._mask = None

    def forward(self, x):
        mask = x > 0
        if self.training:
            self._mask = mask
        return x * mask

    def backward(self, grad_out):
        return grad_out * self._check_cache(self._mask)

# %% tags=["export"]
class Softmax(Module):
    def __init__(self):
        self._y = None

    def forward(self, x):
        e = np.exp(x - row_max(x))          # subtracting the row max keeps exp finite
        y = e / row_sum(e)
        if self.training:
            self._y = y
        return y

    def backward(self, grad_out):
        y = self._check_cache(self._y)
        return y * (grad_out - row_sum(grad_out * y))

# %% tags=["export"]
def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||): 0 for a perfect match, ~1 for unrelated arrays."""
    denom = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return float(np.linalg.norm(analytic - numeric) / denom) if denom > 0 else 0.0


def numerical_gradient(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to x (changed in place, then restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps; plus = f()
        x[i] = old - eps; minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def gradient_check(module: Module, *inputs, seed: int = 0, eps: float = 1e-6, **kwargs) -> dict[str, float]:
    """Relative error of module.backward against central differences, for every float input and parameter.

    The module must be float64 (`module.to(np.float64)`). The scalar checked is sum(forward(*inputs) * G)
    with a random upstream gradient G, so backward(G) must match d(scalar)/d(everything)."""
    for name, p in module.named_parameters():
        if p.data.dtype != np.float64:
            raise ValueError(f"gradient_check needs float64; {name} is {p.data.dtype} (call module.to(np.float64))")
    module.train()
    out = module(*inputs, **kwargs)
    G = np.random.default_rng(seed).normal(size=out.shape)
    f = lambda: float((module(*inputs, **kwargs) * G).sum())
    module.zero_grad()
    module(*inputs, **kwargs)
    grad_in = module.backward(G)
    errors = {}
    if grad_in is not None and isinstance(inputs[0], np.ndarray) and np.issubdtype(inputs[0].dtype, np.floating):
        errors["input"] = relative_error(grad_in, numerical_gradient(f, inputs[0], eps))
    for name, p in module.named_parameters():
        errors[name] = relative_error(p.grad, numerical_gradient(f, p.data, eps))
    return errors
