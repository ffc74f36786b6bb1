"""Parity with PyTorch: the book's NumPy layers compute what PyTorch's compute.

In float64, each layer's forward output, the gradient of its input and the gradient of
every parameter (for a seeded random upstream gradient G: the scalar is sum(output * G))
must agree with PyTorch's modules and autograd to a relative error of at most 1e-12; so
must the whole reference model's logits, loss and the gradient of each of its
parameters, compared by name. PyTorch runs its own modules (nn.Linear, nn.LayerNorm,
nn.MultiheadAttention, nn.TransformerEncoderLayer with norm_first=False, relu, dropout
0) on the NumPy weights through ``torch.func.functional_call``: every PyTorch parameter
is computed from leaf tensors that carry the NumPy names, so autograd gives each NumPy
parameter its gradient directly, and ``strict=True`` makes sure that no PyTorch
parameter keeps its own random initialisation. The last test shows that the comparison
can fail: deliberately wrong variants (a weight not transposed, the padding mask not
inverted, ...) do not match.

PyTorch is optional, never a requirement of the book: without it these tests are
skipped, unless REQUIRE_TORCH=1 (.ci/run sets it), which turns the skip into a failure.
Install the CPU build into the venv: ``.venv/bin/pip install torch==2.13.0+cpu``.
"""

import os

import numpy as np
import pytest

from transformer_lib.attention import MultiHeadAttention
from transformer_lib.data import create_batch, generate_dataset
from transformer_lib.layers import LayerNorm, Linear, Module, PositionalEncoding
from transformer_lib.training import REFERENCE_CONFIG, CrossEntropyLoss
from transformer_lib.transformer import Transformer, TransformerBlock

INSTALL = ".venv/bin/pip install torch==2.13.0+cpu"
if os.environ.get("REQUIRE_TORCH") == "1":
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"REQUIRE_TORCH=1 but PyTorch is not importable ({error}); "
                          f"install the CPU build: {INSTALL}") from error
else:
    torch = pytest.importorskip(
        "torch", reason=f"PyTorch is optional (never a requirement of the book) and "
                        f"not installed; to run the parity tests: {INSTALL}")

from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

TOL = 1e-12            # relative error allowed between NumPy and PyTorch, in float64
F64 = torch.float64


def rel_error(ours, theirs) -> float:
    """max|a - b| / max(max|a|, max|b|); inf if either holds nan or inf."""
    a = np.asarray(ours, dtype=np.float64)
    b = (theirs.detach().numpy() if isinstance(theirs, torch.Tensor)
         else np.asarray(theirs, dtype=np.float64))
    assert a.shape == b.shape, f"shapes differ: {a.shape} and {b.shape}"
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    return float(np.abs(a - b).max() / scale) if scale > 0 else 0.0


def assert_close(what: str, ours, theirs) -> None:
    err = rel_error(ours, theirs)
    assert err <= TOL, (f"{what}: NumPy and PyTorch differ, "
                        f"relative error {err:.2e} > {TOL}")


def randomize(module: Module, seed: int) -> Module:
    """Give biases and LayerNorm scales and shifts random values (they start at 0 and 1,
    where a bias or gamma wired to the wrong place would go unnoticed)."""
    rng = np.random.default_rng(seed)
    for name, p in module.named_parameters():
        if name.endswith((".b", ".beta")) or name in ("b", "beta"):
            p.data = rng.normal(0.0, 0.5, p.shape)
        elif name.endswith("gamma"):
            p.data = 1.0 + rng.normal(0.0, 0.5, p.shape)
        p.grad = np.zeros_like(p.data)
    return module


def padded(B: int, T: int, lengths: list[int]) -> np.ndarray:
    """A (B, T) mask in the book's convention: True for real tokens, right-padded."""
    return np.arange(T) < np.array(lengths)[:, None]


# NumPy parameter names -> PyTorch module parameter names and values -------------------
# PyTorch's Linear computes x @ weight.T, so its weight is the transposed NumPy W.

def linear_state(p: dict, np_prefix: str, t_prefix: str) -> dict:
    return {t_prefix + "weight": p[np_prefix + "W"].T,
            t_prefix + "bias": p[np_prefix + "b"]}


def layernorm_state(p: dict, np_prefix: str, t_prefix: str) -> dict:
    return {t_prefix + "weight": p[np_prefix + "gamma"],
            t_prefix + "bias": p[np_prefix + "beta"]}


def attention_state(p: dict, np_prefix: str, t_prefix: str) -> dict:
    """nn.MultiheadAttention packs the three projections into in_proj_weight (3D, D),
    rows [W_q^T; W_k^T; W_v^T], and in_proj_bias (3D,); the book's W_k has no bias, so
    its part is zeros."""
    W_q, W_k, W_v = (p[f"{np_prefix}{n}.W"] for n in ("W_q", "W_k", "W_v"))
    b_q, b_v = p[np_prefix + "W_q.b"], p[np_prefix + "W_v.b"]
    return {t_prefix + "in_proj_weight": torch.cat([W_q, W_k, W_v], dim=1).T,
            t_prefix + "in_proj_bias": torch.cat([b_q, torch.zeros_like(b_q), b_v]),
            **linear_state(p, np_prefix + "W_o.", t_prefix + "out_proj.")}


def block_state(p: dict, np_prefix: str, t_prefix: str) -> dict:
    """TransformerBlock -> nn.TransformerEncoderLayer (post-norm)."""
    return {**attention_state(p, np_prefix + "attention.", t_prefix + "self_attn."),
            **linear_state(p, np_prefix + "ffn.linear1.", t_prefix + "linear1."),
            **linear_state(p, np_prefix + "ffn.linear2.", t_prefix + "linear2."),
            **layernorm_state(p, np_prefix + "norm1.", t_prefix + "norm1."),
            **layernorm_state(p, np_prefix + "norm2.", t_prefix + "norm2.")}


def model_state(p: dict, num_layers: int) -> dict:
    state = {"embedding.weight": p["embedding.W"],
             **linear_state(p, "output.", "output.")}
    for i in range(num_layers):
        state.update(block_state(p, f"blocks.{i}.", f"layers.{i}."))
    return state


class TorchSelfAttention(nn.Module):
    """nn.MultiheadAttention as self-attention; returns (output, per-head weights)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True,
                                               dtype=F64)

    def forward(self, x, key_padding_mask=None):
        return self.self_attn(x, x, x, key_padding_mask=key_padding_mask,
                              need_weights=True, average_attn_weights=False)


def encoder_layer(d_model: int, num_heads: int, d_ff: int) -> nn.Module:
    """The book's post-norm block in PyTorch."""
    return nn.TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=0.0,
                                      activation="relu", layer_norm_eps=1e-5,
                                      batch_first=True, norm_first=False, dtype=F64)


class TorchTransformer(nn.Module):
    """The book's Transformer in PyTorch: embedding plus positional table, post-norm
    encoder layers, the hidden state at the last real token ([EOS]), output layer."""

    def __init__(self, vocab_size, d_model, num_heads, num_layers, d_ff, pe):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, dtype=F64)
        self.register_buffer("pe", torch.as_tensor(pe))
        self.layers = nn.ModuleList(encoder_layer(d_model, num_heads, d_ff)
                                    for _ in range(num_layers))
        self.output = nn.Linear(d_model, vocab_size, dtype=F64)

    def forward(self, ids, mask):
        B, T = ids.shape
        x = self.embedding(ids) + self.pe[:T]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)     # PyTorch: True = padding
        last = (torch.arange(T) * mask).argmax(dim=1)    # index of the last real token
        return self.output(x[torch.arange(B), last])


def torch_run(module: nn.Module, to_state, named_params, args: tuple, kwargs=None,
              state_extra=None):
    """Run ``module`` with parameters built by ``to_state`` from leaf tensors that carry
    the NumPy names. Returns (output, leaves); float inputs in args require grad."""
    leaves = {n: torch.tensor(p.data, dtype=F64, requires_grad=True)
              for n, p in named_params}
    state = {**to_state(leaves), **(state_extra or {})}
    module.train()    # dropout 0; training mode keeps PyTorch off its fused fast path
    out = functional_call(module, state, args, kwargs or {}, strict=True)
    return out, leaves


def numpy_run(module: Module, x, G, **kwargs):
    """Forward, then backward of G: (output, dL/dx, {name: dL/dparameter})."""
    module.train()
    module.zero_grad()
    y = module(x, **kwargs)
    dx = module.backward(G)
    return y, dx, {n: p.grad.copy() for n, p in module.named_parameters()}


def compare_grads(what: str, np_grads: dict, leaves: dict) -> None:
    assert set(np_grads) == set(leaves)
    for name, grad in np_grads.items():
        assert leaves[name].grad is not None, f"{what}: PyTorch never used {name}"
        assert_close(f"{what}: gradient of {name}", grad, leaves[name].grad)


def layer_case(module, x, G, torch_module, to_state, mask=None, torch_mask_arg=None):
    """Run NumPy and PyTorch on the same input and upstream gradient; compare the
    outputs, the input gradients and every parameter gradient. ``mask`` is the book's
    (True for real tokens); PyTorch gets its inverse as ``torch_mask_arg``."""
    kind = type(module).__name__
    y, dx, grads = numpy_run(module, x, G, **({} if mask is None else {"mask": mask}))
    xt = torch.tensor(x, requires_grad=True)
    t_kwargs = None if mask is None else {torch_mask_arg: torch.from_numpy(~mask)}
    out, leaves = torch_run(torch_module, to_state, module.named_parameters(), (xt,),
                            t_kwargs)
    yt = out[0] if isinstance(out, tuple) else out
    yt.backward(torch.from_numpy(G))
    assert_close(f"{kind} forward", y, yt)
    assert_close(f"{kind} input gradient", dx, xt.grad)
    compare_grads(kind, grads, leaves)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, like NumPy in the test suite (conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_linear():
    rng = np.random.default_rng(1)
    lin = randomize(Linear(5, 7, rng, dtype=np.float64), seed=2)
    x, G = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 7))
    layer_case(lin, x, G, nn.Linear(5, 7, dtype=F64),
               lambda p: linear_state(p, "", ""))


def test_layernorm():
    rng = np.random.default_rng(3)
    norm = randomize(LayerNorm(8, dtype=np.float64), seed=4)
    x = rng.normal(2.0, 3.0, size=(2, 3, 8))       # rows far from mean 0, variance 1
    G = rng.normal(size=x.shape)
    layer_case(norm, x, G, nn.LayerNorm(8, eps=1e-5, dtype=F64),
               lambda p: layernorm_state(p, "", ""))


def test_multi_head_attention_with_padding_mask():
    rng = np.random.default_rng(5)
    B, T, D, H = 3, 6, 16, 4
    mha = randomize(MultiHeadAttention(D, H, rng, dtype=np.float64), seed=6)
    x, G = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
    mask = padded(B, T, [6, 4, 2])
    _, weights = layer_case(mha, x, G, TorchSelfAttention(D, H),
                            lambda p: attention_state(p, "", "self_attn."), mask=mask,
                            torch_mask_arg="key_padding_mask")
    assert_close("MultiHeadAttention weights", mha.attn_weights, weights)
    assert (mha.attn_weights[~np.broadcast_to(mask[:, None, None, :], weights.shape)]
            == 0).all(), "padding keys must get exactly zero weight"


def test_post_norm_block_matches_transformer_encoder_layer():
    rng = np.random.default_rng(7)
    B, T, D, H, d_ff = 3, 7, 16, 4, 32
    block = randomize(TransformerBlock(D, H, d_ff, rng, dtype=np.float64), seed=8)
    x, G = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
    layer_case(block, x, G, encoder_layer(D, H, d_ff),
               lambda p: block_state(p, "", ""), mask=padded(B, T, [7, 5, 3]),
               torch_mask_arg="src_key_padding_mask")


def test_positional_encoding_matches_the_sinusoid_formula():
    """The table itself, built in float64, against the formula computed by PyTorch (the
    whole-model test below copies the model's own table, a constant, into PyTorch)."""
    d_model, max_len = 64, 64
    pos = torch.arange(max_len, dtype=F64)[:, None]
    angle = pos / 10000.0 ** (torch.arange(0, d_model, 2, dtype=F64) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=F64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)
    assert_close("positional encoding", PositionalEncoding(d_model, max_len,
                                                           dtype=np.float64).pe, pe)


def reference_case():
    """The reference model in float64 (biases and LayerNorms randomised) and a batch of
    puzzles with 2, 3 and 4 arguments, so that the shorter ones are padded."""
    model = randomize(Transformer(**REFERENCE_CONFIG, seed=0).to(np.float64), seed=9)
    examples = [ex for n in (2, 3, 4) for ex in generate_dataset(8, seed=n, num_args=n)]
    batch = create_batch(examples)
    assert (~batch.mask).any() and batch.mask.all(axis=1).any()   # padded and full rows
    return model, batch


def torch_model_run(model: Transformer, batch, state_fn=None):
    cfg = model.config
    tmodel = TorchTransformer(cfg["vocab_size"], cfg["d_model"], cfg["num_heads"],
                              cfg["num_layers"], cfg["d_ff"], model.pos_encoding.pe)
    ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
    state_fn = state_fn or (lambda p: model_state(p, cfg["num_layers"]))
    pe = {"pe": torch.from_numpy(model.pos_encoding.pe)}    # a constant table, a buffer
    logits, leaves = torch_run(tmodel, state_fn, model.named_parameters(), (ids, mask),
                               state_extra=pe)
    logits.retain_grad()
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(batch.targets))
    loss.backward()
    return logits, loss, leaves


def numpy_model_run(model: Transformer, batch, backward_times: int = 1):
    model.train()
    model.zero_grad()
    loss_fn = CrossEntropyLoss()
    logits = model(batch.ids, batch.mask)
    loss = loss_fn(logits, batch.targets)
    grad_logits = loss_fn.backward()
    for _ in range(backward_times):
        model(batch.ids, batch.mask)
        model.backward(grad_logits)
    grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    return logits, loss, grad_logits, grads


def test_reference_model_logits_loss_and_every_parameter_gradient():
    model, batch = reference_case()
    logits, loss, grad_logits, grads = numpy_model_run(model, batch)
    t_logits, t_loss, leaves = torch_model_run(model, batch)
    assert_close("logits", logits, t_logits)
    assert_close("loss", loss, t_loss)
    assert_close("gradient of the logits", grad_logits, t_logits.grad)
    # every parameter: the embedding, 15 per block (7 in attention: W_k has no bias,
    # 4 in the FFN, 2 per LayerNorm), the output's W and b
    assert len(grads) == 1 + 15 * REFERENCE_CONFIG["num_layers"] + 2
    compare_grads("Transformer", grads, leaves)


# The comparison has teeth: each of these mistakes must make it fail. -----------------

def _wrong_linear():
    rng = np.random.default_rng(10)
    lin = randomize(Linear(6, 6, rng, dtype=np.float64), seed=11)
    x = rng.normal(size=(4, 6))
    out, _ = torch_run(nn.Linear(6, 6, dtype=F64),
                       lambda p: {"weight": p["W"], "bias": p["b"]},   # W, not W.T
                       lin.named_parameters(), (torch.from_numpy(x),))
    return lin(x), out


def _block_case(to_state=None, invert_mask=True):
    rng = np.random.default_rng(12)
    B, T, D, H, d_ff = 3, 6, 16, 4, 32
    block = randomize(TransformerBlock(D, H, d_ff, rng, dtype=np.float64), seed=13)
    x, mask = rng.normal(size=(B, T, D)), padded(B, T, [6, 4, 2])
    kpm = torch.from_numpy(~mask if invert_mask else mask)
    out, _ = torch_run(encoder_layer(D, H, d_ff),
                       to_state or (lambda p: block_state(p, "", "")),
                       block.named_parameters(), (torch.from_numpy(x),),
                       {"src_key_padding_mask": kpm})
    return block(x, mask), out


def _untransposed_in_proj(p):
    state = block_state(p, "", "")
    W = [p[f"attention.{n}.W"] for n in ("W_q", "W_k", "W_v")]
    state["self_attn.in_proj_weight"] = torch.cat(W, dim=0)      # rows W_q, not W_q^T
    return state


def _accumulated_gradients():
    model, batch = reference_case()
    grads = numpy_model_run(model, batch, backward_times=2)[3]    # no zero_grad between
    _, _, leaves = torch_model_run(model, batch)
    name = "blocks.0.attention.W_q.W"
    return grads[name], leaves[name].grad


def _nudged_weight():
    model, batch = reference_case()
    logits = numpy_model_run(model, batch)[0]
    model.blocks[0].attention.W_q.W.data[3, 5] *= 1 + 1e-9    # one weight, by 1e-9
    return logits, torch_model_run(model, batch)[0]


WRONG_VARIANTS = {
    "Linear weight not transposed": _wrong_linear,
    "in_proj_weight packed without transposing": lambda: _block_case(
        to_state=_untransposed_in_proj),
    "key_padding_mask not inverted": lambda: _block_case(invert_mask=False),
    "gradients accumulated over two backward passes": _accumulated_gradients,
    "one weight changed by a factor 1 + 1e-9": _nudged_weight,
}


@pytest.mark.parametrize("variant", WRONG_VARIANTS)
def test_a_wrong_variant_does_not_match(variant):
    ours, theirs = WRONG_VARIANTS[variant]()
    err = rel_error(ours, theirs)
    assert err > TOL, f"{variant}: should not match PyTorch, relative error is {err}"
