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
# A transformer is a stack of a few small functions: matrix products, table look-ups, a
# normalisation, two nonlinearities. NumPy has no automatic differentiation, so each needs two
# halves written by hand: a *forward* pass that computes the output, and a *backward* pass that
# turns the gradient of the loss with respect to the output into gradients with respect to the
# input and the parameters. A wrong backward pass does not crash; the model just trains badly.
# So every backward pass here is derived, written down, and checked numerically.
#
# **In this chapter:** the *module protocol* (parameters, caches, accumulating gradients); a
# *gradient checker* and proof that it catches real bugs; and the six layers the model is built
# from (`Linear`, `Embedding`, `PositionalEncoding`, `LayerNorm`, `ReLU`, `Softmax`), each with
# its math, its code and its proof. Cells marked `export` become `transformer_lib.layers`. The
# engineering behind a few of them is measured in the appendix
# [Engineering notes](A1_engineering.ipynb).

# %% tags=["export"]
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

DEFAULT_DTYPE = np.float32

# %% [markdown]
# ## The module protocol
#
# Training needs the gradient of the loss $L$ with respect to every parameter. The chain rule
# computes it one layer at a time, from the top of the network down. Suppose a layer computes
# $y = f(x; \theta)$ and the layer above hands it $G = \partial L / \partial y$, an array of the
# same shape as $y$. Flattening $x$, $y$ and $\theta$ into vectors, the layer can compute
#
# $$
# \frac{\partial L}{\partial x} = \left(\frac{\partial y}{\partial x}\right)^{\!\top} G,
# \qquad
# \frac{\partial L}{\partial \theta} = \left(\frac{\partial y}{\partial \theta}\right)^{\!\top} G .
# $$
#
# It passes the first gradient down to the layer below and keeps the second. So every layer
# is a pair of functions, `forward(x) -> y` and `backward(G) -> dL/dx`, and the forward pass
# *caches* what the backward pass needs (`Linear` its input $x$, `Softmax` its output $y$).
# Three rules make this work.
#
# 1. **The forward pass caches only in training mode.** In `eval()` mode nothing calls
#    backward, so nothing is kept, and calling backward raises a `RuntimeError` that says so.
# 2. **The backward pass adds to `.grad`; it never overwrites it** (as in PyTorch). A parameter
#    used in two places gets the *sum* of the two contributions, which is what the chain rule
#    says for a shared variable. The price: call `zero_grad()` before each new backward pass.
# 3. **Parameters are found, not registered.** Any attribute that is a `Parameter` or a `Module`,
#    or a list of them, is a child. `named_parameters()` builds dotted names from the attribute
#    names (`blocks.0.attention.W_q.W`, as in PyTorch), so an error message or a checkpoint can
#    say exactly which array it means.
#
# A `Parameter` is just an array and its gradient:

# %% tags=["export"]
class Parameter:
    """A trainable array and the gradient of the loss with respect to it.

    Parameters
    ----------
    data : np.ndarray
        The initial values, any shape.

    Attributes
    ----------
    data : np.ndarray
        The values.
    grad : np.ndarray
        Same shape and dtype as ``data``; starts at zero. Backward passes *add* into it
        and ``Module.zero_grad`` clears it.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.data = np.asarray(data)
        self.grad = np.zeros_like(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``data`` (and of ``grad``)."""
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"

# %% [markdown]
# `Module` is the base class of every layer and, in chapter 4, of the whole model. It finds its
# children among its attributes (`_children`); everything else (`named_parameters`,
# `zero_grad`, `train`, `eval`, `to`) walks that tree. `_check_cache` is the guard every
# backward pass with a cache calls first. Parameters are float32 by default; gradient checks
# need float64, so `to(np.float64)` casts every parameter and float buffer. It *replaces* the
# arrays, so call it before creating an optimiser (chapter 5's optimisers make the parameters
# views of one flat buffer).

# %% tags=["export"]
class Module:
    """Base class of every layer and model.

    A subclass defines ``forward(x, ...)``, which returns the output and, in training
    mode, caches what ``backward`` needs, and ``backward(grad_out)``, which receives
    dL/d(output) (same shape as the output), returns dL/d(input) and *adds*
    dL/d(parameter) into each parameter's ``.grad``. Parameters and sub-modules are
    found among the attributes, also inside lists and tuples, so ``named_parameters``
    yields dotted names such as ``blocks.0.attention.W_q.W``. Calling the module calls
    ``forward``.
    """

    training: bool = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError(f"{type(self).__name__} must define backward")

    def _children(self) -> Iterator[tuple[str, "Parameter | Module"]]:
        """(attribute name, child) for every Parameter or Module attribute,
        lists included."""
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, (Parameter, Module)):
                        yield f"{name}.{i}", item

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Yield ``(dotted_name, parameter)`` for every parameter, depth first.

        Parameters
        ----------
        prefix : str
            Prepended to every name (used by the recursion).

        Returns
        -------
        iterator of (str, Parameter)
            Names such as ``"W"``, ``"norm1.gamma"`` or ``"blocks.0.attention.W_q.W"``.
        """
        for name, child in self._children():
            if isinstance(child, Parameter):
                yield prefix + name, child
            else:
                yield from child.named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        """Every parameter of this module and its sub-modules,
        in ``named_parameters`` order."""
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        """How many trainable numbers the module holds: the sizes of its parameters."""
        return sum(p.data.size for p in self.parameters())

    def modules(self) -> Iterator["Module"]:
        """This module and every sub-module, depth first."""
        yield self
        for _, child in self._children():
            if isinstance(child, Module):
                yield from child.modules()

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to zero, in place."""
        for p in self.parameters():
            p.grad.fill(0)

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (eval mode if ``mode`` is False) here and in every
        sub-module."""
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> "Module":
        """Switch to eval mode: forward passes cache nothing
        and backward raises RuntimeError."""
        return self.train(False)

    @contextmanager
    def evaluating(self) -> Iterator["Module"]:
        """``with model.evaluating():`` runs the block in eval mode, then restores the
        previous mode, also when the block raises."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def to(self, dtype: npt.DTypeLike) -> "Module":
        """Cast every parameter and float buffer to a floating ``dtype``;
        reset gradients to zero.

        Parameters
        ----------
        dtype : numpy float dtype
            For example ``np.float64`` for gradient checking.

        Returns
        -------
        Module
            ``self``, so that ``model = Transformer().to(np.float64)`` works.
        """
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise ValueError(
                f"to() needs a floating dtype such as np.float64, got {dtype}")
        for m in self.modules():
            for name, value in list(vars(m).items()):
                if (isinstance(value, np.ndarray)
                        and np.issubdtype(value.dtype, np.floating)):
                    setattr(m, name, value.astype(dtype))
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        return self

    def _check_cache(self, cache):
        """Return ``cache``; raise RuntimeError in eval mode
        or before any forward pass."""
        name = type(self).__name__
        if not self.training:
            raise RuntimeError(
                f"{name}.backward called in eval mode: eval() forward passes keep "
                "no cache. Call .train(), run forward, then backward.")
        if cache is None:
            raise RuntimeError(
                f"{name}.backward called before any forward pass in training mode: "
                "run forward first.")
        return cache

# %% [markdown]
# ## Linear
#
# `Linear` is the workhorse of the model. Every projection in attention, both halves of the
# feed-forward network and the output layer are `Linear` layers.
#
# **Forward.** The input has shape `(..., in_features)`, usually `(B, T, d_model)`. Every
# position is transformed the same way, so we flatten the leading axes into one axis of
# $N = B \cdot T$ rows, $X \in \mathbb{R}^{N \times \text{in}}$, and compute
#
# $$
# Y = X W + b, \qquad Y_{nj} = \sum_i X_{ni} W_{ij} + b_j ,
# $$
#
# with $W \in \mathbb{R}^{\text{in} \times \text{out}}$ and $b \in \mathbb{R}^{\text{out}}$
# added to every row.
#
# **Backward.** We receive $G_{nj} = \partial L / \partial Y_{nj}$. The weight $W_{ij}$ appears
# in $Y_{nj}$ for *every* row $n$, each time multiplied by $X_{ni}$, so its gradient sums over
# the rows. $b_j$ appears in every $Y_{nj}$ with coefficient 1. $X_{ni}$ appears in $Y_{nj}$
# for every $j$, multiplied by $W_{ij}$:
#
# $$
# \frac{\partial L}{\partial W_{ij}} = \sum_n X_{ni} G_{nj}, \qquad
# \frac{\partial L}{\partial b_j} = \sum_n G_{nj}, \qquad
# \frac{\partial L}{\partial X_{ni}} = \sum_j G_{nj} W_{ij},
# $$
#
# or, as matrices,
#
# $$
# \frac{\partial L}{\partial W} = X^\top G \;(\text{in} \times \text{out}), \qquad
# \frac{\partial L}{\partial b} = \mathbf{1}^\top G \;(\text{out}), \qquad
# \frac{\partial L}{\partial X} = G W^\top \;(N \times \text{in}).
# $$
#
# Each gradient has the shape of its variable, which is a quick sanity check on any
# derivation. The backward pass needs $X$ (for $\partial L/\partial W$), so that is what the
# forward pass caches. It keeps a reference, not a copy, so do not modify an input in place
# between forward and backward.
#
# **Initialisation.** If the inputs are independent with mean 0 and variance $v$, each output
# has variance $\text{in} \cdot \operatorname{Var}(W) \cdot v$. Going backward, each input
# gradient has variance $\text{out} \cdot \operatorname{Var}(W) \cdot \operatorname{Var}(G)$.
# Keeping the forward signal at its size asks for $\operatorname{Var}(W) = 1/\text{in}$, and
# keeping the backward signal asks for $1/\text{out}$. Xavier (Glorot) initialisation takes the
# compromise $\operatorname{Var}(W) = 2/(\text{in} + \text{out})$. It draws
# $W \sim U(-a, a)$ with $a = \sqrt{6/(\text{in}+\text{out})}$, because a uniform distribution on
# $(-a, a)$ has variance $a^2/3$. The bias starts at zero.
#
# The code flattens `(B, T, in)` to `(B·T, in)` (a free view), so forward and backward are each
# one matrix product over all positions (the appendix, "One matrix product over all positions",
# measures why). The forward pass also checks the last dimension, the commonest wiring mistake.

# %% tags=["export"]
class Linear(Module):
    """Affine map of the last axis: ``y = x @ W + b``.

    One exception to "every layer runs its own forward and backward": multi-head
    attention (chapter 3) reads the weights of its ``W_q``, ``W_k``, ``W_v`` layers
    into one fused matmul and writes their gradients itself, so a change to
    ``forward`` or ``backward`` here does not reach those three.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input's and the output's last axis.
    rng : np.random.Generator, optional
        Source of the initial weights; ``np.random.default_rng(0)`` if omitted.
    bias : bool
        Whether to add the bias ``b`` (default True).
    dtype : numpy float dtype
        Dtype of the parameters (default float32).

    Attributes
    ----------
    W : Parameter, shape (in_features, out_features)
        Xavier/Glorot uniform: U(-a, a) with a = sqrt(6 / (in_features + out_features)).
    b : Parameter of shape (out_features,), or None
        Zeros at first; None when ``bias=False``.
    """

    def __init__(self, in_features: int, out_features: int,
                 rng: np.random.Generator | None = None, bias: bool = True,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"Linear needs positive sizes, got in_features={in_features}, "
                f"out_features={out_features}")
        rng = np.random.default_rng(0) if rng is None else rng
        limit = np.sqrt(6.0 / (in_features + out_features))  # Xavier/Glorot uniform
        self.W = Parameter(
            rng.uniform(-limit, limit, (in_features, out_features)).astype(dtype))
        self.b = Parameter(np.zeros(out_features, dtype=dtype)) if bias else None
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply the layer.

        Parameters
        ----------
        x : array, shape (..., in_features)

        Returns
        -------
        array, shape (..., out_features)
        """
        in_features = self.W.data.shape[0]
        if x.shape[-1:] != (in_features,):
            got = x.shape[-1] if x.ndim else "a scalar"
            raise ValueError(
                f"Linear expected input with last dimension {in_features}, got {got} "
                f"(input shape {x.shape})")
        if self.training:
            self._x = x
        # one 2-D matmul over all B*T positions
        # (a 3-D @ 2-D matmul is a stack of B products)
        # (..., out)
        y = (x.reshape(-1, in_features) @ self.W.data).reshape(*x.shape[:-1], -1)
        if self.b is not None:
            y += self.b.data
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Add dL/dW and dL/db into ``W.grad`` and ``b.grad``; return dL/dx.

        Parameters
        ----------
        grad_out : array, shape (..., out_features)
            dL/dy for the output of the last training-mode forward pass.

        Returns
        -------
        array, shape (..., in_features)
            dL/dx.
        """
        x = self._check_cache(self._x)
        in_features, out_features = self.W.data.shape
        expected = (*x.shape[:-1], out_features)
        if grad_out.shape != expected:
            raise ValueError(f"Linear.backward expected grad_out of shape {expected} "
                             f"(the output's shape), got {grad_out.shape}")
        x2 = x.reshape(-1, in_features)                # (N, in), N = B*T
        g2 = grad_out.reshape(-1, out_features)        # (N, out)
        self.W.grad += x2.T @ g2                       # (in, out): sums over all N rows
        if self.b is not None:
            self.b.grad += g2.sum(axis=0)              # (out,)
        return (g2 @ self.W.data.T).reshape(x.shape)   # (..., in)

# %% [markdown]
# **Proof.** Shapes; the forward pass against its definition written with `einsum`; the
# initialisation statistics: a 256 → 512 layer should have weight variance $2/768$, stay within
# $a$, and give unit-variance inputs outputs of variance $256 \cdot 2/768 = 2/3$ (within a few
# percent: the sampling error is near 0.5%). Last, a wrong input size, through the helper
# `show_error` (chapter 1), which asserts that a call raises the expected error with the
# expected words and prints the message.

# %%
from transformer_lib.data import show_error

rng = np.random.default_rng(0)
layer = Linear(4, 3, rng)
x = rng.normal(size=(2, 5, 4)).astype(np.float32)                   # (B, T, in)
y = layer(x)                                                        # (B, T, out)
print("x", x.shape, "-> y", y.shape, y.dtype, "| W", layer.W.shape, "b", layer.b.shape)
assert y.shape == (2, 5, 3) and y.dtype == np.float32
assert layer.W.shape == (4, 3) and layer.b.shape == (3,)
assert np.allclose(y, np.einsum("bti,ij->btj", x, layer.W.data) + layer.b.data,
                   atol=1e-6)

grad_x = layer.backward(rng.normal(size=y.shape).astype(np.float32))
assert grad_x.shape == x.shape and layer.W.grad.shape == (4, 3) == layer.W.shape
assert layer.b.grad.shape == (3,)

big = Linear(256, 512, np.random.default_rng(1))
limit = np.sqrt(6 / (256 + 512))
W_var, expected_var = big.W.data.var(), 2 / (256 + 512)
out_var = big(
    np.random.default_rng(2).normal(size=(1000, 256)).astype(np.float32)).var()
print(f"Var(W) = {W_var:.6f} (Xavier: {expected_var:.6f}),  "
      f"max |W| = {np.abs(big.W.data).max():.4f} <= a = {limit:.4f}")
print(f"Var(y) = {out_var:.3f} for unit-variance inputs "
      f"(in * Var(W) = {256 * expected_var:.3f})")
assert abs(W_var / expected_var - 1) < 0.02 and np.abs(big.W.data).max() <= limit
assert abs(out_var / (256 * expected_var) - 1) < 0.03
assert np.all(big.b.data == 0)

show_error(lambda: Linear(64, 16)(np.zeros((2, 5, 32), dtype=np.float32)), ValueError,
           "Linear expected input with last dimension 64, got 32")

# %% [markdown]
# ## Checking gradients numerically
#
# A derivation can be wrong, and so can its code: a missing transpose, a sum where a mean
# belongs, axes mixed up. The definition of the derivative gives an independent check. For a
# scalar function $f$ and a small step $\varepsilon$, *central differences*
#
# $$
# \frac{\partial f}{\partial x_i} \approx \frac{f(x + \varepsilon e_i) - f(x - \varepsilon e_i)}{2\varepsilon}
# $$
#
# are accurate to $O(\varepsilon^2)$: the $\varepsilon^2$ terms of the two Taylor expansions
# cancel (a one-sided difference is only $O(\varepsilon)$). Each entry costs two forward
# passes, so we check *small* layers. Four choices make the check trustworthy.
#
# - **float64.** Rounding adds an error of about $u/\varepsilon$, where the machine precision
#   $u$ is $10^{-16}$ in float64 but $6 \cdot 10^{-8}$ in float32. In float32 no $\varepsilon$
#   gets near our threshold, so the checker refuses float32.
# - **A scalar loss with a random upstream gradient.** We check the scalar
#   $f = \sum_k y_k G_k$ with a fixed random $G$. Its gradient with respect to $y$ is exactly
#   $G$, so `backward(G)` must return $\partial f / \partial x$. The obvious choice
#   $f = \sum_k y_k$ ($G$ = all ones) is a trap: every position gets the same upstream
#   gradient, so a backward pass that mixes up positions still passes (shown below).
# - **A relative error.** Gradients can be of any size, so we compare them with a scale-free
#   number:
#
#   $$
#   \text{error}(a, n) = \frac{\lVert a - n \rVert}{\lVert a \rVert + \lVert n \rVert},
#   $$
#
#   which is 0 for a perfect match, about 0.7 for unrelated random arrays of the same size, at
#   most 1 (for opposite arrays), and $10^{-8}$ or smaller for a correct float64 backward pass.
#   We require $\le 10^{-6}$.
# - **Every input and every parameter, separately.** The checker returns one error per array, so
#   a failure points at the array whose gradient is wrong.

# %% tags=["export"]
def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """Scale-free distance between two gradients: ||a - n|| / (||a|| + ||n||).

    Parameters
    ----------
    analytic, numeric : np.ndarray, same shape
        The gradient from backward and the one from central differences.

    Returns
    -------
    float
        0 for a perfect match, about 0.7 for unrelated random arrays, at most 1;
        0 if both are zero.
    """
    denom = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return float(np.linalg.norm(analytic - numeric) / denom) if denom > 0 else 0.0


def numerical_gradient(f: Callable[[], float], x: np.ndarray,
                       eps: float = 1e-6) -> np.ndarray:
    """Gradient of the scalar ``f()`` with respect to ``x`` by central differences.

    Parameters
    ----------
    f : callable with no arguments, returning float
        Reads ``x`` (for example through a module that holds it as a parameter).
    x : np.ndarray, float64
        Changed in place entry by entry, then restored exactly.
    eps : float
        Step size; 1e-6 suits float64.

    Returns
    -------
    np.ndarray, same shape as x
        (f(x + eps e_i) - f(x - eps e_i)) / (2 eps) for every entry i.
    """
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad

# %% [markdown]
# `gradient_check` puts these together for any module: with $G$ from a seeded generator, it
# checks the first input (if it is a float array; token ids are not) and every parameter, and
# passes keyword arguments (an attention `mask`, say) on to `forward`.

# %% tags=["export"]
def gradient_check(module: Module, *inputs, seed: int = 0, eps: float = 1e-6,
                   **kwargs) -> dict[str, float]:
    """Compare ``module.backward`` with central differences:
    the first input and every parameter.

    The scalar checked is ``sum(module(*inputs, **kwargs) * G)`` with a random upstream
    gradient ``G ~ N(0, 1)`` (seeded), so ``module.backward(G)`` must equal its
    gradient.

    Parameters
    ----------
    module : Module
        In float64 (``module.to(np.float64)``); switched to training mode.
    *inputs : np.ndarray
        Passed to ``forward``. The first one is checked if it is a float array (it must
        then be float64); integer inputs such as token ids are not differentiable.
    seed : int
        Seed of the upstream gradient G.
    eps : float
        Step of the central differences.
    **kwargs
        Passed to ``forward`` (for example ``mask``).

    Returns
    -------
    dict of str to float
        ``{"input": error, "<parameter name>": error, ...}``: relative errors, 1e-8 or
        smaller when backward is right.
    """
    for name, p in module.named_parameters():
        if p.data.dtype != np.float64:
            raise ValueError(f"gradient_check needs float64; {name} is {p.data.dtype} "
                             "(call module.to(np.float64))")
    x = inputs[0] if inputs else None
    check_input = isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)
    if check_input and x.dtype != np.float64:
        raise ValueError(
            f"gradient_check needs float64 inputs; the first input is {x.dtype} "
            "(use x.astype(np.float64))")
    module.train()
    out = module(*inputs, **kwargs)
    G = np.random.default_rng(seed).normal(size=out.shape)  # random upstream gradient

    def f() -> float:                              # the scalar L = sum(G * output)
        return float((module(*inputs, **kwargs) * G).sum())

    module.zero_grad()
    module(*inputs, **kwargs)
    grad_in = module.backward(G)
    errors = {}
    if check_input and grad_in is not None:
        errors["input"] = relative_error(grad_in, numerical_gradient(f, x, eps))
    for name, p in module.named_parameters():
        errors[name] = relative_error(p.grad, numerical_gradient(f, p.data, eps))
    return errors

# %% [markdown]
# A small helper (not exported) prints the errors and asserts the threshold. The error of a
# correct backward pass is rounding noise whose digits change from one machine to the next, so
# it is printed as the bound it stays below, `< 1e-08`; only a wrong gradient, whose error the
# mathematics fixes, is printed with its digits. Anything in between fails. `errors_by_layer`
# collects every check for the figure at the end. (The helper is folded in the book.) Then the
# `Linear` layer, in float64, with a 3-D input so that the sum over all $B \cdot T$ rows is
# exercised.

# %% tags=["hide-input"]
TOLERANCE = 1e-6        # gradient_check passes at or below this
ROUNDING_BOUND = 1e-8   # a correct float64 backward pass stays below this


def shown(error: float) -> str:
    """A relative error as this book prints it: above TOLERANCE (a wrong gradient) with
    the two digits the mathematics determines; below ROUNDING_BOUND (a right one) as
    that bound, because its digits are rounding noise that differs between machines."""
    if error > TOLERANCE:
        return f"{error:.1e}"
    assert error < ROUNDING_BOUND, f"error {error:.1e}: neither right nor wrong"
    return f"< {ROUNDING_BOUND:.0e}"


errors_by_layer: dict[str, dict[str, float]] = {}


def report(layer_name: str, errors: dict[str, float]) -> None:
    """Print one row per checked array, assert each error <= TOLERANCE,
    and remember them."""
    for name, error in errors.items():
        print(f"  {layer_name:22} {name:8} {shown(error)}")
    assert errors and all(e <= TOLERANCE for e in errors.values()), \
        f"{layer_name}: {errors}"
    errors_by_layer[layer_name] = errors


# %%
rng = np.random.default_rng(0)
linear = Linear(4, 3, rng).to(np.float64)
linear.b.data[:] = rng.normal(size=3)  # a non-zero bias, so forward uses it
x = rng.normal(size=(2, 3, 4))         # (B, T, in), float64
report("Linear", gradient_check(linear, x))
report("Linear(bias=False)",
       gradient_check(Linear(4, 3, rng, bias=False).to(np.float64), x))

# %% [markdown]
# ### Can the check fail?
#
# A test that cannot fail proves nothing. Two realistic bugs, each a small subclass of `Linear`:
# `MixedAxesLinear` flattens the upstream gradient time-major (`swapaxes(0, 1)`) where the
# cached input is batch-major, so every row of $X$ meets the gradient of another position;
# `MeanBiasLinear` takes the mean of the rows for the bias gradient instead of the sum.

# %%
class MixedAxesLinear(Linear):
    def backward(self, grad_out):
        x = self._check_cache(self._x)
        x2 = x.reshape(-1, x.shape[-1])
        # BUG: (T, B) order
        g2 = grad_out.swapaxes(0, 1).reshape(-1, grad_out.shape[-1])
        self.W.grad += x2.T @ g2
        self.b.grad += g2.sum(axis=0)
        return (g2 @ self.W.data.T).reshape(x.shape)


class MeanBiasLinear(Linear):
    def backward(self, grad_out):
        x = self._check_cache(self._x)
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        self.W.grad += x2.T @ g2
        # BUG: mean, not sum
        self.b.grad += g2.mean(axis=0)
        return (g2 @ self.W.data.T).reshape(x.shape)


mixed, mean_bias = (
    gradient_check(buggy(4, 3, np.random.default_rng(0)).to(np.float64), x)
    for buggy in (MixedAxesLinear, MeanBiasLinear))
for name, errors in [("MixedAxesLinear", mixed), ("MeanBiasLinear", mean_bias)]:
    print(f"{name:16}", "  ".join(f"{k}: {shown(v)}" for k, v in errors.items()))
assert mixed["input"] > 0.1 and mixed["W"] > 0.1              # caught, by a wide margin
assert mixed["b"] < TOLERANCE  # a sum over rows ignores their order
assert (mean_bias["b"] > 0.1 and mean_bias["input"] < TOLERANCE
        and mean_bias["W"] < TOLERANCE)

# %% [markdown]
# Both bugs are caught, and the per-array errors point at the culprits: the mixed-up axes
# corrupt the input and weight gradients (the bias gradient, a sum over rows in any order, is
# still right); the mean only breaks `b`. Now the trap: with the "obvious" scalar
# $f = \sum y$ (an upstream gradient of all ones), every position receives the same gradient,
# so pairing rows with the wrong positions changes nothing, and `MixedAxesLinear` passes:

# %%
def check_with_sum(module: Module, x: np.ndarray) -> dict[str, float]:
    """The flawed check: f = sum(module(x)), i.e. an upstream gradient of all ones."""
    module.train().zero_grad()
    grad_in = module.backward(np.ones_like(module(x)))
    f = lambda: float(module(x).sum())
    errors = {"input": relative_error(grad_in, numerical_gradient(f, x))}
    errors.update({name: relative_error(p.grad, numerical_gradient(f, p.data))
                   for name, p in module.named_parameters()})
    return errors


hidden = check_with_sum(
    MixedAxesLinear(4, 3, np.random.default_rng(0)).to(np.float64), x)
print("MixedAxesLinear checked with G = ones:",
      "  ".join(f"{k}: {shown(v)}" for k, v in hidden.items()))
assert max(hidden.values()) < TOLERANCE        # the bug is invisible to a sum

# %% [markdown]
# Finally, float32. Two errors compete as $\varepsilon$ shrinks: truncation, falling like
# $\varepsilon^2$, and rounding, growing like $u/\varepsilon$. In float64 the error stays below
# $10^{-8}$ at the step $10^{-6}$; in float32 even the best step stays more than ten times
# above the threshold (the appendix, "Why the gradient check needs float64", plots the sweep
# and asserts both). So `gradient_check` refuses float32:

# %%
show_error(lambda: gradient_check(Linear(4, 3), x), ValueError,
           "gradient_check needs float64; W is float32")

# %% [markdown]
# ## The protocol in action
#
# Now the three rules of the module protocol, tested on a real layer. **Eval mode keeps no
# cache, so backward refuses**, as it does before any forward pass. `with model.evaluating():`
# runs a block in eval mode and then restores the previous mode, even after an error; the
# later chapters evaluate that way. **Gradients accumulate:** two forward/backward passes
# without `zero_grad()` leave twice the gradient in `.grad`; `zero_grad()` clears it.
# **Dotted names:** in the second cell, a module with a list of layers and a named head shows
# how `named_parameters` builds names from attributes and list positions; `to()` reaches them.

# %%
rng = np.random.default_rng(0)
layer = Linear(3, 2, rng).to(np.float64)
x, g = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))

layer.eval()
y_eval = layer(x)
assert layer._x is None and not layer.training          # nothing was cached
show_error(lambda: layer.backward(g), RuntimeError,
           "Linear.backward called in eval mode")
show_error(lambda: Linear(3, 2).backward(g), RuntimeError, "before any forward pass")
layer.train()
assert np.array_equal(layer(x), y_eval)  # the mode changes caching, not the result

try:
    with layer.evaluating():
        assert not layer.training
        raise KeyboardInterrupt              # an interrupted evaluation
except KeyboardInterrupt:
    pass
assert layer.training                        # back in training mode

layer.zero_grad()
layer(x)
layer.backward(g)
once_W, once_b = layer.W.grad.copy(), layer.b.grad.copy()
layer(x)
layer.backward(g)
assert np.allclose(layer.W.grad, 2 * once_W) and np.allclose(layer.b.grad, 2 * once_b)
assert np.allclose(once_W, x.T @ g)  # and one pass gives exactly X^T G
layer.zero_grad()
assert not layer.W.grad.any() and not layer.b.grad.any()
print("after two backward passes: W.grad = 2 x (one pass); after zero_grad: all zeros")


# %%
class TinyStack(Module):
    """Two Linear layers in a list and a bias-free head (for naming; no forward)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.hidden = [Linear(4, 8, rng), Linear(8, 8, rng)]
        self.head = Linear(8, 2, rng, bias=False)


stack = TinyStack()
for name, p in stack.named_parameters():
    print(f"{name:12} {str(p.shape):8} {p.data.dtype}")
assert [n for n, _ in stack.named_parameters()] == \
    ["hidden.0.W", "hidden.0.b", "hidden.1.W", "hidden.1.b", "head.W"]
assert stack.num_parameters() == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2

stack.to(np.float64)
assert all(p.data.dtype == np.float64 and p.grad.dtype == np.float64
           for p in stack.parameters())
assert len(list(stack.modules())) == 4  # the stack and its three Linear layers
show_error(lambda: stack.to(np.int32), ValueError, "to() needs a floating dtype")

# %% [markdown]
# ## Embedding
#
# The model reads token ids, integers between 0 and 19. An embedding turns each id into a
# learned vector: row `id` of a table $W \in \mathbb{R}^{V \times D}$.
#
# **Forward.** For ids of shape `(B, T)`, $y_{bt} = W_{\text{ids}_{bt}}$, so the output has shape
# `(B, T, D)`. This is `W[ids]` in NumPy.
#
# **Backward.** Row $v$ of $W$ is copied into every position holding token $v$, so its gradient
# is the sum of the upstream gradients at those positions:
#
# $$
# \frac{\partial L}{\partial W_v} = \sum_{(b,t)\,:\,\text{ids}_{bt} = v} G_{bt} .
# $$
#
# A token that occurs three times in a batch gets three contributions. The ids are not
# differentiable, so backward returns `None`.
#
# **The obvious scatter-add is wrong.** NumPy evaluates `W.grad[ids] += G` as
# `W.grad[ids] = W.grad[ids] + G`: when an id repeats, the *last* write wins and contributions
# are lost. `np.add.at(W.grad, ids, G)` is correct but slower (the appendix times both). We
# write the sum as a matrix product instead: with the one-hot matrix $O_{nv} = [\text{ids}_n = v]$
# of shape $(N, V)$, $\partial L / \partial W = O^\top G$, one BLAS call, cheap for $V = 20$.

# %% tags=["export"]
class Embedding(Module):
    """A learned table of token vectors: ``y[b, t] = W[ids[b, t]]``.

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size V; valid ids are 0 .. V-1.
    d_model : int
        Vector size D.
    rng : np.random.Generator, optional
        Source of the initial table; ``np.random.default_rng(0)`` if omitted.
    dtype : numpy float dtype
        Dtype of ``W`` (default float32).

    Attributes
    ----------
    W : Parameter, shape (num_embeddings, d_model)
        Initialised N(0, 1).
    """

    def __init__(self, num_embeddings: int, d_model: int,
                 rng: np.random.Generator | None = None,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE) -> None:
        rng = np.random.default_rng(0) if rng is None else rng
        W = rng.normal(0.0, 1.0, (num_embeddings, d_model))              # (V, D)
        self.W = Parameter(W.astype(dtype))
        self._ids = None

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Look up the vectors of ``ids``.

        Parameters
        ----------
        ids : np.ndarray of int, shape (B, T) (any shape works)

        Returns
        -------
        array, shape (B, T, D)
        """
        ids = np.asarray(ids)
        V = self.W.data.shape[0]
        if ids.dtype.kind not in "iu":
            raise ValueError(
                f"Embedding expects integer token ids, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            bad = ids[(ids < 0) | (ids >= V)][0]
            raise ValueError(f"Embedding got token id {bad}, outside its {V} rows "
                             f"(ids must be 0..{V - 1})")
        if self.training:
            self._ids = ids
        return self.W.data[ids]                                    # (B, T, D)

    def backward(self, grad_out: np.ndarray) -> None:
        """Add dL/dW into ``W.grad`` (repeated tokens add up).
        Ids have no gradient: returns None.

        Parameters
        ----------
        grad_out : array, shape (B, T, D)
        """
        ids = self._check_cache(self._ids)
        V, D = self.W.data.shape
        if grad_out.shape != (*ids.shape, D):
            raise ValueError(
                f"Embedding.backward expected grad_out of shape {(*ids.shape, D)}, "
                f"got {grad_out.shape}")
        # (B*T, V)
        one_hot = (ids.reshape(-1, 1) == np.arange(V)).astype(grad_out.dtype)
        # (V, D): repeated tokens add up
        self.W.grad += one_hot.T @ grad_out.reshape(-1, D)
        return None

# %% [markdown]
# **Proof.** Shapes, look-up, and the accumulation for repeated tokens, against `np.add.at`
# and next to the naive `grad[ids] += G`. The digit 5 occurs three times in the batch.

# %%
from transformer_lib.data import TOKEN_TO_ID, VOCAB_SIZE, encode

ids = np.array([encode("Max(5, 5, 9)"), encode("Min(5, 2, 2)")])  # (B, T) = (2, 7)
emb = Embedding(VOCAB_SIZE, 8, np.random.default_rng(0)).to(np.float64)
out = emb(ids)                                                    # (B, T, D)
print("ids", ids.shape, "-> embeddings", out.shape)
assert out.shape == (2, 7, 8) and np.array_equal(out[0, 2], emb.W.data[ids[0, 2]])

G_emb = np.random.default_rng(1).normal(size=out.shape)
emb.zero_grad()
assert emb.backward(G_emb) is None
reference = np.zeros_like(emb.W.data)
np.add.at(reference, ids, G_emb)  # scatter-add, unbuffered
naive = np.zeros_like(emb.W.data)
naive[ids] += G_emb               # buffered: last write wins
assert np.allclose(emb.W.grad, reference)

five = TOKEN_TO_ID["5"]
norm_of = lambda grad: f"{np.linalg.norm(grad[five]):.3f}"
print(f"token '5' occurs {np.sum(ids == five)} times; norm of its gradient row:")
print(f"  ours {norm_of(emb.W.grad)}, np.add.at {norm_of(reference)}, "
      f"naive {norm_of(naive)}")
assert np.allclose(emb.W.grad[five],
                   G_emb[ids == five].sum(axis=0))    # the sum of its 3 positions
assert not np.allclose(naive[five], reference[five])  # the naive version loses two
unused = np.setdiff1d(np.arange(VOCAB_SIZE), ids)
assert not emb.W.grad[unused].any()                   # unused tokens get exactly 0
report("Embedding", gradient_check(emb, ids))

# %% [markdown]
# Ids outside the table are the typical mistake: an id from another vocabulary, or `-1` as
# padding, for which NumPy would quietly read row `V - 1`. So the layer checks range and dtype
# (the calls are hidden in the book; the messages are shown).

# %% tags=["hide-input"]
show_error(lambda: emb(np.array([[3, 20, 1]])), ValueError,
           "token id 20, outside its 20 rows (ids must be 0..19)")
show_error(lambda: emb(np.array([[3, -1, 1]])), ValueError, "token id -1")
show_error(lambda: emb(np.array([[3.0, 1.0]])), ValueError,
           "Embedding expects integer token ids, got dtype float64")

# %% [markdown]
# ## Positional encoding
#
# Attention (chapter 3) treats its input as a *set*: permute the positions and the outputs are
# permuted the same way. But `Second ( 5 3 9 )` is about order, so each position must carry its
# index. The original transformer adds a fixed *sinusoidal* vector to each position's
# embedding. For position $p$ and dimension pairs $2i, 2i+1$:
#
# $$
# PE_{p,\,2i} = \sin\!\left(\frac{p}{10000^{2i/d}}\right), \qquad
# PE_{p,\,2i+1} = \cos\!\left(\frac{p}{10000^{2i/d}}\right).
# $$
#
# Each pair of dimensions is a clock hand turning at its own speed, from one radian per position
# ($i = 0$) down to almost nothing. Together the hands give every position a distinct pattern,
# all values lie in $[-1, 1]$, the scale of the embeddings, and nothing is learned.
#
# **Forward:** $y = x + PE_{0:T}$. **Backward:** the table is a constant, so
# $\partial L / \partial x = G$ and nothing is cached. The table is computed once for
# `max_len` positions; a longer sequence is an error, not a silent wrap-around.

# %% tags=["export"]
class PositionalEncoding(Module):
    """Add the fixed sinusoidal encodings of positions 0..T-1 (no parameters).

    Parameters
    ----------
    d_model : int
        Size of the last axis of the input.
    max_len : int
        Longest sequence supported (default 64).
    dtype : numpy float dtype
        Dtype of the table (default float32).

    Attributes
    ----------
    pe : array, shape (max_len, d_model)
        ``pe[p, 2i] = sin(p / 10000**(2i/d_model))``,
        ``pe[p, 2i+1] = cos(p / 10000**(2i/d_model))``.
    """

    def __init__(self, d_model: int, max_len: int = 64,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE) -> None:
        pos = np.arange(max_len)[:, None]                # (max_len, 1)
        i = np.arange(0, d_model, 2)[None, :]            # (1, ceil(d_model/2)): the 2i
        angle = pos / (10000.0 ** (i / d_model))         # (max_len, ceil(d_model/2))
        pe = np.zeros((max_len, d_model))
        pe[:, 0::2] = np.sin(angle)
        pe[:, 1::2] = np.cos(angle[:, : d_model // 2])
        self.pe = pe.astype(dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Add the encodings.

        Parameters
        ----------
        x : array, shape (B, T, d_model) (or (T, d_model))

        Returns
        -------
        np.ndarray, same shape as x
        """
        max_len, d_model = self.pe.shape
        if x.ndim < 2 or x.shape[-1] != d_model:
            raise ValueError(
                f"PositionalEncoding expected input of shape (..., T, {d_model}), "
                f"got {x.shape}")
        T = x.shape[-2]
        if T > max_len:
            raise ValueError(
                f"PositionalEncoding: sequence length {T} exceeds max_len {max_len} "
                "(create it with a larger max_len)")
        return x + self.pe[:T]                                     # (B, T, D) + (T, D)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """The table is constant: dL/dx = dL/dy, shape (B, T, d_model)."""
        return grad_out

# %% [markdown]
# The table for $d = 64$ and 64 positions (the plotting code is folded). The left columns
# (fast clocks) change from one position to the next; the right ones (slow clocks) barely move.
# Read across, each row is a distinct code.

# %% tags=["hide-input"]
import matplotlib.pyplot as plt

pos_enc = PositionalEncoding(64, max_len=64)
fig, ax = plt.subplots(figsize=(8, 5))
image = ax.imshow(pos_enc.pe, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
ax.set(xlabel="embedding dimension (even: sin, odd: cos)",
       ylabel="position in the sequence",
       title="Sinusoidal positional encoding, d_model = 64")
fig.colorbar(image, ax=ax, label="encoding value")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Proof.** The values are bounded by 1, the table matches the formula, and the closest pair
# of rows is still far apart. (All rows have length $\sqrt{d/2}$, since $\sin^2 + \cos^2 = 1$
# per pair: they differ in direction, not size.) The forward pass adds exactly the table, and
# the gradient passes through.

# %%
# pos_enc = PositionalEncoding(64, max_len=64): the table plotted above
pe = pos_enc.pe.astype(np.float64)                                   # (max_len, D)
# (max_len, max_len)
distances = np.linalg.norm(pe[:, None, :] - pe[None, :, :], axis=-1)
np.fill_diagonal(distances, np.inf)
p1, p2 = map(int, np.unravel_index(distances.argmin(), distances.shape))
print(f"values in [{pe.min():.4f}, {pe.max():.4f}]; every row has norm "
      f"{np.linalg.norm(pe[0]):.3f} = sqrt(64/2)")
print(f"closest pair of positions: ({p1}, {p2}), distance {distances.min():.3f}")
assert np.abs(pe).max() <= 1.0
assert np.allclose(np.linalg.norm(pe, axis=1), np.sqrt(32))  # sin^2 + cos^2 = 1
assert distances.min() > 0.5                                  # every position distinct
assert np.allclose(pe[5, 0::2], np.sin(5 / 10000 ** (np.arange(0, 64, 2) / 64)))

x = np.random.default_rng(0).normal(size=(2, 7, 64)).astype(np.float32)   # (B, T, D)
y = pos_enc(x)
assert y.shape == x.shape and np.allclose(y - x, pos_enc.pe[:7], atol=1e-6)
report("PositionalEncoding",
       gradient_check(PositionalEncoding(8, 16).to(np.float64),
                      np.random.default_rng(0).normal(size=(2, 5, 8))))
show_error(lambda: pos_enc(np.zeros((1, 65, 64))), ValueError,
           "sequence length 65 exceeds max_len 64")

# %% [markdown]
# ## Fast reductions over short rows
#
# LayerNorm and softmax need a sum or a maximum over the last axis, which here is short
# (softmax runs over at most about 10 keys). `row_max` takes `np.maximum` across the columns and
# `row_sum` multiplies by a column of ones; both return what `x.max(axis=-1, keepdims=True)`
# and `x.sum(axis=-1, keepdims=True)` return (the sum up to rounding), faster on short rows.
# The appendix ("Fast reductions over short rows") checks and measures them; attention
# (chapter 3) uses them too.

# %% tags=["export"]
def row_max(x: np.ndarray) -> np.ndarray:
    """Maximum over the last axis, keepdims: equal to ``x.max(axis=-1, keepdims=True)``.

    Uses one ``np.maximum`` per column, which beats NumPy's reduction when the last axis
    is short (softmax over T <= 10 keys); longer rows (chapter 8's generation) use the
    reduction. The maximum is exact either way.

    Parameters
    ----------
    x : array, shape (..., T), T >= 1

    Returns
    -------
    array, shape (..., 1)
    """
    if x.shape[-1] > 32:
        return x.max(axis=-1, keepdims=True)
    m = x[..., 0].copy()                                           # (...,)
    for j in range(1, x.shape[-1]):
        np.maximum(m, x[..., j], out=m)
    return m[..., None]


def row_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis, keepdims: equal to ``x.sum(axis=-1, keepdims=True)``
    up to rounding.

    Computed as a matrix product with a column of ones
    (one BLAS call, fast for any length).

    Parameters
    ----------
    x : array, shape (..., T)

    Returns
    -------
    array, shape (..., 1)
    """
    return x @ np.ones((x.shape[-1], 1), dtype=x.dtype)

# %% [markdown]
# ## Layer normalisation
#
# Deep stacks train badly when the size of the activations drifts from layer to layer. Layer
# normalisation rescales *each position's vector* to mean 0 and variance 1, then lets the model
# choose a scale $\gamma$ and shift $\beta$ per feature. Our model applies it after each residual
# addition (post-norm, as in the original transformer): `x = norm1(x + attention(x))`.
#
# **Forward**, for one row $x \in \mathbb{R}^D$:
#
# $$
# \mu = \frac{1}{D}\sum_j x_j, \qquad
# \sigma^2 = \frac{1}{D}\sum_j (x_j - \mu)^2, \qquad
# r = \frac{1}{\sqrt{\sigma^2 + \varepsilon}}, \qquad
# \hat{x}_j = (x_j - \mu)\, r, \qquad
# y_j = \gamma_j \hat{x}_j + \beta_j .
# $$
#
# The variance is the *biased* one (divide by $D$, not $D - 1$), as in the paper and in PyTorch.
# $\varepsilon = 10^{-5}$ keeps $r$ finite for a constant row. The forward pass caches $\hat{x}$
# and $r$, which is all the backward pass needs.
#
# **Backward.** The parameters are easy: $\gamma_j$ multiplies $\hat{x}_j$ in every row and
# $\beta_j$ is added to every row, so
#
# $$
# \frac{\partial L}{\partial \gamma_j} = \sum_{\text{rows}} G_j \hat{x}_j, \qquad
# \frac{\partial L}{\partial \beta_j} = \sum_{\text{rows}} G_j .
# $$
#
# For the input, write $g_j = \partial L / \partial \hat{x}_j = G_j \gamma_j$. Every $\hat{x}_j$
# depends on every $x_k$ through $\mu$ and $r$. We need three derivatives:
# $\partial \mu / \partial x_k = 1/D$;
# $\partial \sigma^2 / \partial x_k = \frac{2}{D}(x_k - \mu)$ (the term through $\mu$ vanishes
# because $\sum_j (x_j - \mu) = 0$); and so
# $\partial r / \partial x_k = -\tfrac{1}{2}(\sigma^2+\varepsilon)^{-3/2} \cdot \tfrac{2}{D}(x_k - \mu) = -\tfrac{r^2}{D}\hat{x}_k$.
# The product rule on $\hat{x}_j = (x_j - \mu)\,r$ gives
#
# $$
# \frac{\partial \hat{x}_j}{\partial x_k}
# = r\left(\delta_{jk} - \frac{1}{D}\right) + (x_j - \mu)\left(-\frac{r^2}{D}\hat{x}_k\right)
# = r\left(\delta_{jk} - \frac{1}{D} - \frac{\hat{x}_j \hat{x}_k}{D}\right).
# $$
#
# Summing over $j$ against $g_j$:
#
# $$
# \frac{\partial L}{\partial x_k} = r\left(g_k - \frac{1}{D}\sum_j g_j - \hat{x}_k \cdot \frac{1}{D}\sum_j g_j \hat{x}_j\right),
# $$
#
# that is, `rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`: two row means and a few
# elementwise operations, never a $D \times D$ matrix. The row sums use `row_sum`.

# %% tags=["export"]
class LayerNorm(Module):
    """Normalise each row (last axis) to mean 0 and variance 1, then scale and shift.

    ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with the biased variance
    (divide by D).

    Parameters
    ----------
    d_model : int
        Size D of the last axis.
    eps : float
        Added to the variance (default 1e-5).
    dtype : numpy float dtype
        Dtype of ``gamma`` and ``beta`` (default float32).

    Attributes
    ----------
    gamma : Parameter, shape (d_model,)
        Scale, initialised to ones.
    beta : Parameter, shape (d_model,)
        Shift, initialised to zeros.
    """

    def __init__(self, d_model: int, eps: float = 1e-5,
                 dtype: npt.DTypeLike = DEFAULT_DTYPE) -> None:
        self.gamma = Parameter(np.ones(d_model, dtype=dtype))
        self.beta = Parameter(np.zeros(d_model, dtype=dtype))
        self.eps = eps
        self._cache = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Normalise.

        Parameters
        ----------
        x : array, shape (..., d_model)

        Returns
        -------
        array, shape (..., d_model)
        """
        D = self.gamma.data.shape[0]
        if x.shape[-1:] != (D,):
            raise ValueError(f"LayerNorm expected input with last dimension {D}, "
                             f"got shape {x.shape}")
        mu = row_sum(x) / D                                   # (..., 1)
        xc = x - mu                                           # (..., D)
        var = row_sum(xc * xc) / D                            # (..., 1) biased variance
        rstd = 1.0 / np.sqrt(var + self.eps)                  # (..., 1)
        xhat = xc * rstd                                      # (..., D)
        if self.training:
            self._cache = (xhat, rstd)
        y = xhat * self.gamma.data                            # (..., D)
        y += self.beta.data                                   # in place: one copy fewer
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Add dL/dgamma and dL/dbeta into the parameters' ``.grad``; return dL/dx.

        Parameters
        ----------
        grad_out : array, shape (..., d_model)

        Returns
        -------
        array, shape (..., d_model)
        """
        xhat, rstd = self._check_cache(self._cache)
        if grad_out.shape != xhat.shape:
            raise ValueError(
                f"LayerNorm.backward expected grad_out of shape {xhat.shape}, "
                f"got {grad_out.shape}")
        D = xhat.shape[-1]
        g2 = grad_out.reshape(-1, D)                               # (N, D)
        self.gamma.grad += (g2 * xhat.reshape(-1, D)).sum(axis=0)  # (D,)
        self.beta.grad += g2.sum(axis=0)                           # (D,)
        dxhat = grad_out * self.gamma.data                         # (..., D)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), in place
        dx = dxhat - row_sum(dxhat) / D                            # (..., D)
        dx -= xhat * (row_sum(dxhat * xhat) / D)
        dx *= rstd
        return dx

# %% [markdown]
# **Proof.** Rows of very different offsets and scales come out with mean 0 and variance
# $\sigma^2/(\sigma^2 + \varepsilon)$, just below 1; the output matches the formula written with
# `np.mean` and `np.var` (biased by default), and float32 agrees with float64. Before the
# gradient check, $\gamma$ and $\beta$ get random values: at ones and zeros, a backward pass
# that forgot to multiply by $\gamma$ would pass.

# %%
rng = np.random.default_rng(0)
scale, offset = (rng.uniform(0.5, 20, size=(3, 5, 1)),
                 rng.uniform(-50, 50, size=(3, 5, 1)))
x = rng.normal(size=(3, 5, 16)) * scale + offset  # (B, T, D)
norm = LayerNorm(16).to(np.float64)
y = norm(x)                                       # (B, T, D)
mean_err, var_err = np.abs(y.mean(axis=-1)).max(), np.abs(y.var(axis=-1) - 1).max()
print(f"input rows: means in [{x.mean(-1).min():.1f}, {x.mean(-1).max():.1f}], "
      f"std in [{x.std(-1).min():.2f}, {x.std(-1).max():.2f}]")
print(f"output rows: max |mean| < 1e-12, max |var - 1| = {var_err:.1e}")
assert mean_err < 1e-12 and var_err < 1e-4
direct = ((x - x.mean(axis=-1, keepdims=True))
          / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-5))
assert np.allclose(y, direct, rtol=1e-12, atol=1e-12)
sigma2 = x.var(axis=-1)
assert np.allclose(y.var(axis=-1), sigma2 / (sigma2 + 1e-5), rtol=1e-12)
assert np.allclose(LayerNorm(16)(x.astype(np.float32)), y, atol=1e-5)  # float32 agrees

norm.gamma.data[:] = rng.normal(size=16)
norm.beta.data[:] = rng.normal(size=16)
assert np.allclose(norm(x), direct * norm.gamma.data + norm.beta.data)
report("LayerNorm", gradient_check(norm, rng.normal(size=(2, 3, 16))))
show_error(lambda: norm(np.zeros((2, 3, 8))), ValueError,
           "LayerNorm expected input with last dimension 16")

# %% [markdown]
# ## ReLU
#
# The feed-forward network needs a nonlinearity between its two `Linear` layers. Without one,
# the two would collapse into a single linear map. ReLU is the simplest:
#
# $$
# y = \max(0, x), \qquad \frac{\partial L}{\partial x} = G \odot [x > 0].
# $$
#
# The forward pass caches the boolean mask $[x > 0]$. At exactly $x = 0$ the derivative is
# undefined; we use 0, as PyTorch does.

# %% tags=["export"]
class ReLU(Module):
    """``y = max(0, x)`` elementwise; backward keeps the gradient only where x > 0."""

    def __init__(self) -> None:
        self._mask = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply ReLU.

        Parameters
        ----------
        x : np.ndarray, any shape

        Returns
        -------
        np.ndarray, same shape as x, negative entries replaced by 0
        """
        mask = x > 0
        if self.training:
            self._mask = mask
        return x * mask

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Mask the gradient.

        Parameters
        ----------
        grad_out : array, the output's shape

        Returns
        -------
        np.ndarray, same shape: dL/dx = grad_out * [x > 0]
        """
        return grad_out * self._check_cache(self._mask)

# %% [markdown]
# **Proof.** ReLU matches `np.maximum(x, 0)`; its gradient is the upstream gradient where
# $x > 0$ and exactly 0 elsewhere. The gradient check uses inputs at least 0.1 away from the
# kink: a central difference that straddles it measures neither side's slope.

# %%
rng = np.random.default_rng(0)
relu = ReLU()
x = rng.normal(size=(2, 3, 6))
y = relu(x)
assert np.array_equal(y, np.maximum(x, 0)) and (y >= 0).all()
g = rng.normal(size=x.shape)
dx = relu.backward(g)
assert np.array_equal(dx[x > 0], g[x > 0]) and not dx[x <= 0].any()
away_from_kink = np.sign(x) * (0.1 + np.abs(x))                        # |x| >= 0.1
report("ReLU", gradient_check(ReLU(), away_from_kink))

# %% [markdown]
# ## Softmax
#
# Attention turns a row of scores into weights that are positive and sum to 1:
#
# $$
# y_i = \frac{e^{x_i}}{\sum_j e^{x_j}} .
# $$
#
# **Stability.** `np.exp(1000)` overflows to `inf`, and `inf / inf` is `nan`; chapter 3 sets
# the scores of padding keys to a huge negative number, and large logits happen. Softmax does
# not change when a constant $c$ is added to every input (the factor $e^{c}$ cancels), so we
# subtract the row maximum first. Then no exponent is positive, so nothing overflows, and the
# largest term is exactly $e^0 = 1$, so the denominator is at least 1.
#
# **Backward.** Differentiate $y_i$ with respect to $x_k$. The numerator gives $y_i$ when
# $i = k$, and the denominator gives $-y_i y_k$:
#
# $$
# J_{ik} = \frac{\partial y_i}{\partial x_k} = y_i(\delta_{ik} - y_k), \qquad
# J = \operatorname{diag}(y) - y\,y^\top .
# $$
#
# The backward pass needs only the product $J^\top G$. $J$ is symmetric, and
#
# $$
# \frac{\partial L}{\partial x_k} = \sum_i G_i\, y_i(\delta_{ik} - y_k)
# = y_k \Big(G_k - \sum_i G_i y_i\Big),
# $$
#
# so `y * (G - row_sum(G * y))`. The forward pass caches $y$. This is a *vector-Jacobian
# product*: it costs $O(T)$ per row, while $J$ itself has $T^2$ entries.

# %% tags=["export"]
def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax along the last axis, computed stably (the row maximum is subtracted
    first): (..., T) -> (..., T), positive entries, every row sums to 1.

    The package's one softmax: the ``Softmax`` layer, attention (chapter 3) and the
    probabilities of chapters 6 and 8 call it."""
    e = x - row_max(x)                  # (..., T): exponents <= 0, so no overflow
    np.exp(e, out=e)                    # in place: one new array in all
    e /= row_sum(e)                     # the sum is >= 1 (the max term is e^0 = 1)
    return e


class Softmax(Module):
    """The ``softmax`` function as a layer: its forward keeps the output y, which is
    all its backward needs."""

    def __init__(self) -> None:
        self._y = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Apply softmax along the last axis.

        Parameters
        ----------
        x : array, shape (..., T)

        Returns
        -------
        array, shape (..., T)
            Positive entries; every row sums to 1.
        """
        y = softmax(x)
        if self.training:
            self._y = y
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """Vector-Jacobian product without building the Jacobian:
        dx = y * (g - sum(g * y)).

        Parameters
        ----------
        grad_out : array, shape (..., T)

        Returns
        -------
        array, shape (..., T)
        """
        y = self._check_cache(self._y)
        return y * (grad_out - row_sum(grad_out * y))

# %% [markdown]
# **Proof of stability.** Rows like $(10^4, -10^4, 0)$ break the textbook formula but not ours.
# Shifting a row by $10^4$ does not change ours either (in float32 even bit for bit, since
# float32 stores $10^4 \pm 1$ exactly). Every row sums to 1, also for large float32 scores.

# %%
softmax_layer = Softmax()
extreme = np.array([[1e4, -1e4, 0.0],
                    [1e4, 1e4 + 1.0, 1e4 - 1.0],
                    [-1e4, -1e4, -1e4],
                    [-1e9, 0.0, 1.0]])                                 # (rows, T)
with np.errstate(over="ignore", invalid="ignore"):
    textbook = np.exp(extreme) / np.exp(extreme).sum(axis=-1, keepdims=True)
ours = softmax_layer(extreme)
print("textbook formula:\n", textbook, "\nstable softmax:\n", np.round(ours, 4))
assert np.isnan(textbook).any()
assert np.isfinite(ours).all() and np.allclose(ours.sum(axis=-1), 1.0)
# a shift of 1e4 changes nothing, in float64 and in float32
assert np.allclose(ours[1], softmax_layer(np.array([0.0, 1.0, -1.0])))
shifted32 = softmax_layer(extreme[1].astype(np.float32))
unshifted32 = softmax_layer(np.array([0.0, 1.0, -1.0], dtype=np.float32))
assert shifted32.dtype == np.float32 and np.array_equal(shifted32, unshifted32)
assert np.allclose(ours[2], 1 / 3) and ours[0, 0] == 1.0

x32 = (np.random.default_rng(0).normal(size=(32, 4, 8, 8)) * 1e4).astype(np.float32)
y32 = softmax_layer(x32)
assert y32.dtype == np.float32 and np.isfinite(y32).all() and (y32 >= 0).all()
assert np.allclose(y32.sum(axis=-1), 1.0, atol=1e-6)

# %% [markdown]
# **Proof of the backward pass.** For one small row we build the full Jacobian
# $\operatorname{diag}(y) - y y^\top$, compare it with central differences of the forward pass,
# and check that `backward(G)` equals $J^\top G$; then the usual gradient check. Here the check
# with $G$ = all ones would be worthless: $\sum_i y_i = 1$ is constant, so its true gradient is
# zero, and a "backward pass" that returns zeros would pass.

# %%
row = np.array([2.0, -1.0, 0.5, 0.0])
y_row = softmax_layer(row)
J = np.diag(y_row) - np.outer(y_row, y_row)                                # (T, T)
J_numeric = np.stack([numerical_gradient(lambda i=i: float(softmax_layer(row)[i]), row)
                      for i in range(4)])
print("Jacobian diag(y) - y y^T:\n", np.round(J, 4))
assert relative_error(J, J_numeric) < TOLERANCE and np.allclose(J, J.T)

g_row = np.random.default_rng(0).normal(size=4)
softmax_layer(row)
assert np.allclose(softmax_layer.backward(g_row), J.T @ g_row)  # the VJP is J^T g
softmax_layer(row)
assert np.allclose(softmax_layer.backward(np.ones(4)), 0)  # why G = ones proves nothing
report("Softmax",
       gradient_check(Softmax(), np.random.default_rng(0).normal(size=(2, 3, 5))))

# %% [markdown]
# **Why we never build $J$.** For attention scores of shape `(B, H, T, T)` the Jacobians hold
# `B·H·T³` numbers: $T$ times the memory of the scores and $T$ times the work of the
# vector-Jacobian product. At our $T \le 10$ that merely wastes time; at thousands of tokens,
# one head of one example would need tens of gigabytes. The appendix ("The softmax Jacobian,
# materialised") builds them for a small tensor and counts the bytes.

# %% [markdown]
# ## Every layer, every parameter
#
# Every gradient check of this chapter (float64, random upstream gradient, $\varepsilon =
# 10^{-6}$): the worst error stays below the rounding bound. The figure (its code folded) shows
# the errors as this run measured them, digits that another machine reproduces only roughly.

# %%
worst = max(e for errors in errors_by_layer.values() for e in errors.values())
n_arrays = sum(len(errors) for errors in errors_by_layer.values())
print(f"{n_arrays} arrays in {len(errors_by_layer)} checks; worst error {shown(worst)} "
      f"(threshold {TOLERANCE:.0e})")
assert set(errors_by_layer) == {"Linear", "Linear(bias=False)", "Embedding",
                                "PositionalEncoding", "LayerNorm", "ReLU", "Softmax"}
assert worst <= TOLERANCE and worst < ROUNDING_BOUND

# %% tags=["hide-input"]
labels = [f"{layer_name} {name}" for layer_name, errors in errors_by_layer.items()
          for name in errors]
values = [e for errors in errors_by_layer.values() for e in errors.values()]
fig, ax = plt.subplots(figsize=(7, 4))
ax.barh(labels, values, color="tab:blue")
ax.axvline(ROUNDING_BOUND, color="black", ls="--", lw=1, label="bound $10^{-8}$")
ax.axvline(TOLERANCE, color="tab:red", lw=1, label="threshold $10^{-6}$")
ax.set(xscale="log", xlim=(1e-12, 1e-5),
       xlabel="relative error (rounding noise; its digits vary between machines)",
       title="The gradient checks of this chapter, as measured in this run")
ax.invert_yaxis()
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - A `Module`'s `forward` caches what `backward(G)` needs (in training mode only);
#   `backward` returns $\partial L/\partial x$ and *adds* $\partial L/\partial\theta$ into
#   `.grad` until `zero_grad()`. `named_parameters()` gives dotted names.
# - `Linear`: $\partial L/\partial W = X^\top G$, $\partial L/\partial b = \mathbf{1}^\top G$,
#   $\partial L/\partial X = G W^\top$; Xavier initialisation.
# - `Embedding`: a row's gradient sums over the positions holding its token, as a one-hot
#   matrix product (`grad[ids] += G` drops repeats). `PositionalEncoding` passes it through.
# - `LayerNorm`: $\partial L/\partial x = r\,(g - \bar{g} - \hat{x}\,\overline{g\hat{x}})$, no
#   $D \times D$ matrix. `ReLU` masks the gradient. `Softmax` subtracts the row maximum, and its
#   backward pass is the vector-Jacobian product $y \odot (G - \langle G, y\rangle)$.
# - `gradient_check` (float64, random upstream gradient) passes every layer below $10^{-8}$ and
#   catches mixed-up axes (which a plain sum misses) and a mean-for-sum bug.
#
# Chapter 3 builds attention from `Linear`, `softmax` and `row_sum`.

# %% [markdown]
# ## Exercises
#
# **Exercise 1 (GELU).** BERT and GPT-2 use GELU instead of ReLU, commonly approximated as
# $\operatorname{GELU}(x) = \tfrac{1}{2}x\left(1 + \tanh u\right)$,
# $u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)$. Derive its derivative, implement a `GELU` module,
# and gradient-check it. How far is the approximation from the exact $x\,\Phi(x)$ on $[-5, 5]$?

# %% tags=["hide-cell"]
import math


class GELU(Module):
    """tanh-approximate GELU, with t = tanh(u):
    d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""

    C = math.sqrt(2 / math.pi)

    def __init__(self) -> None:
        self._cache = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        t = np.tanh(self.C * (x + 0.044715 * x**3))
        if self.training:
            self._cache = (x, t)
        return 0.5 * x * (1 + t)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        x, t = self._check_cache(self._cache)
        du_dx = self.C * (1 + 3 * 0.044715 * x**2)
        return grad_out * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx)


gelu_errors = gradient_check(GELU(),
                             np.random.default_rng(0).normal(size=(2, 3, 6)) * 2)
print("GELU", {k: shown(v) for k, v in gelu_errors.items()})
assert gelu_errors["input"] <= TOLERANCE

grid = np.linspace(-5, 5, 10001)
exact_gelu = grid * 0.5 * (1 + np.vectorize(math.erf)(grid / math.sqrt(2)))
gap = np.abs(GELU()(grid) - exact_gelu).max()
print(f"max |tanh approximation - x Phi(x)| on [-5, 5]: {gap:.1e}")
assert gap < 1e-3

# %% [markdown]
# **Exercise 2 (LayerNorm without $\gamma$ and $\beta$).** Write a standalone function
# `layer_norm_backward(x, g, eps)` that returns $\partial L/\partial x$ for
# $y = (x - \mu)/\sqrt{\sigma^2 + \varepsilon}$ (the derivation above with $\gamma = 1$). Check
# it against central differences and `LayerNorm.backward`. Show that each row of the gradient
# sums to zero, and explain why. (Hint: what happens to $y$ if you add a number to every $x_j$?)

# %% tags=["hide-cell"]
def layer_norm_backward(x: np.ndarray, g: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """dL/dx of y = (x - mean) / sqrt(var + eps) over the last axis, given g = dL/dy.

    x, g and the result have shape (..., D)."""
    mu = x.mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)
    xhat = (x - mu) * r
    mean = lambda a: a.mean(axis=-1, keepdims=True)
    return r * (g - mean(g) - xhat * mean(g * xhat))


rng = np.random.default_rng(0)
x_ex, g_ex = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
plain_norm = lambda: ((x_ex - x_ex.mean(-1, keepdims=True))                  # y(x_ex)
                      / np.sqrt(x_ex.var(-1, keepdims=True) + 1e-5))
numeric = numerical_gradient(lambda: float((plain_norm() * g_ex).sum()), x_ex)
ours_ln = layer_norm_backward(x_ex, g_ex)
ln = LayerNorm(10).to(np.float64)
ln(x_ex)
assert relative_error(ours_ln, numeric) <= TOLERANCE
assert np.allclose(ours_ln, ln.backward(g_ex))
# y does not change when a constant is added to a row,
# so the gradient has no component along (1, ..., 1)
print("row sums of dL/dx:", np.round(ours_ln.sum(axis=-1), 12) + 0.0)
assert np.allclose(ours_ln.sum(axis=-1), 0, atol=1e-12)

# %% [markdown]
# **Exercise 3 (a container).** Write a `Sequential(Module)` that holds a list of layers,
# `forward` runs them in order, and `backward` runs their backward passes in reverse. Build
# `Linear(6, 12) → ReLU → Linear(12, 6) → LayerNorm(6)`, list its parameter names, and
# gradient-check the whole stack in float64. Why does the checker need no changes to handle a
# composite module?

# %% tags=["hide-cell"]
class Sequential(Module):
    """Apply layers in order;
    backward applies their backward passes in reverse order."""

    def __init__(self, *layers: Module) -> None:
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
        return grad_out


from pprint import pprint

rng = np.random.default_rng(0)
mlp = Sequential(Linear(6, 12, rng), ReLU(), Linear(12, 6, rng),
                 LayerNorm(6)).to(np.float64)
names = [name for name, _ in mlp.named_parameters()]
pprint(names, width=88, compact=True)
assert names == ["layers.0.W", "layers.0.b", "layers.2.W", "layers.2.b",
                 "layers.3.gamma", "layers.3.beta"]
mlp_errors = gradient_check(mlp, rng.normal(size=(2, 4, 6)))
pprint({k: shown(v) for k, v in mlp_errors.items()}, width=88, sort_dicts=False)
assert set(mlp_errors) == {"input", *names} and max(mlp_errors.values()) <= TOLERANCE
# The checker only uses the protocol (forward, backward, named_parameters),
# which Sequential inherits.
