# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 4. The transformer
#
# DRAFT skeleton: export cells only.

# %% tags=["export"]
import numpy as np
from transformer_lib.data import PAD_ID
from transformer_lib.layers import Module, Linear, Embedding, PositionalEncoding, LayerNorm, ReLU, DEFAULT_DTYPE
from transformer_lib.attention import MultiHeadAttention

READOUTS = ("eos", "mean")

# %% tags=["export"]
class FeedForward(Module):
    def __init__(self, d_model, d_ff, rng=None, dtype=DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        self.linear1 = Linear(d_model, d_ff, rng, dtype=dtype)
        self.relu = ReLU()
        self.linear2 = Linear(d_ff, d_model, rng, dtype=dtype)

    def forward(self, x):
        return self.linear2(self.relu(self.linear1(x)))

    def backward(self, grad_out):
        return self.linear1.backward(self.relu.backward(self.linear2.backward(grad_out)))

# %% tags=["export"]
class TransformerBlock(Module):
    """Post-norm: x = norm1(x + attention(x)); x = norm2(x + ffn(x)).

    residual=False and layer_norm=False exist for the ablations of chapter 7."""

    def __init__(self, d_model, num_heads, d_ff, rng=None, residual=True, layer_norm=True, dtype=DEFAULT_DTYPE):
        rng = np.random.default_rng(0) if rng is None else rng
        self.residual, self.layer_norm = residual, layer_norm
        self.attention = MultiHeadAttention(d_model, num_heads, rng, dtype=dtype)
        self.norm1 = LayerNorm(d_model, dtype=dtype) if layer_norm else None
        self.ffn = FeedForward(d_model, d_ff, rng, dtype=dtype)
        self.norm2 = LayerNorm(d_model, dtype=dtype) if layer_norm else None

    def forward(self, x, mask=None):
        a = self.attention(x, mask)
        x = x + a if self.residual else a
        if self.norm1 is not None:
            x = self.norm1(x)
        f = self.ffn(x)
        x = x + f if self.residual else f
        return self.norm2(x) if self.norm2 is not None else x

    def backward(self, grad_out):
        g = self.norm2.backward(grad_out) if self.norm2 is not None else grad_out
        g_ffn = self.ffn.backward(g)
        g = g + g_ffn if self.residual else g_ffn      # residual: gradient also flows around the FFN
        if self.norm1 is not None:
            g = self.norm1.backward(g)
        g_att = self.attention.backward(g)
        return g + g_att if self.residual else g_att     # ... and around attention


# %% tags=["export"]
class Transformer(Module):
    def __init__(self, vocab_size=20, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                 max_len=64, readout="eos", positional=True, residual=True, layer_norm=True,
                 seed=0, dtype=DEFAULT_DTYPE):
        if readout not in READOUTS:
            raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
        self.config = dict(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
                           num_layers=num_layers, d_ff=d_ff, max_len=max_len, readout=readout,
                           positional=positional, residual=residual, layer_norm=layer_norm, seed=seed)
        rng = np.random.default_rng(seed)
        self.embedding = Embedding(vocab_size, d_model, rng, dtype=dtype)
        self.pos_encoding = PositionalEncoding(d_model, max_len, dtype=dtype) if positional else None
        self.blocks = [TransformerBlock(d_model, num_heads, d_ff, rng, residual, layer_norm, dtype=dtype)
                       for _ in range(num_layers)]
        self.output = Linear(d_model, vocab_size, rng, dtype=dtype)
        self.readout = readout
        self._cache = None

    def forward(self, ids, mask=None):
        ids = np.asarray(ids)
        if mask is None:
            mask = ids != PAD_ID
        x = self.embedding(ids)                                 # (B, T, D)
        if self.pos_encoding is not None:
            x = self.pos_encoding(x)
        for block in self.blocks:
            x = block(x, mask)                                   # (B, T, D)
        B, T, D = x.shape
        if self.readout == "eos":                               # the last real token ([EOS])
            last = mask.sum(axis=1) - 1                         # (B,)
            pooled = x[np.arange(B), last]                      # (B, D)
            cache = (x.shape, last)
        else:                                                   # mean over real tokens
            w = (mask / mask.sum(axis=1, keepdims=True)).astype(x.dtype)   # (B, T)
            pooled = np.einsum("btd,bt->bd", x, w)
            cache = (x.shape, w)
        if self.training:
            self._cache = cache
        return self.output(pooled)                              # (B, V)

    def backward(self, grad_logits):
        shape, r = self._check_cache(self._cache)
        g_pooled = self.output.backward(grad_logits)           # (B, D)
        if self.readout == "eos":
            g = np.zeros(shape, dtype=g_pooled.dtype)
            g[np.arange(shape[0]), r] = g_pooled
        else:
            g = r[:, :, None] * g_pooled[:, None, :]
        for block in reversed(self.blocks):
            g = block.backward(g)
        self.embedding.backward(g)          # positional encoding is a constant: its gradient passes through
