# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Attention
#
# DRAFT skeleton: export cells only.

# %% tags=["export"]
import numpy as np
from transformer_lib.layers import Module, Linear, DEFAULT_DTYPE, row_max, row_sum

NEG_INF = -1e9

# %% tags=["export"]
def _key_mask(mask: np.ndarray, ndim: int) -> np.ndarray:
    """(B, T) -> (B, 1, ..., 1, T) so it broadcasts over the query axis (and heads)."""
    return mask.reshape(mask.shape[0], *([1] * (ndim - 2)), mask.shape[-1])

# %% tags=["export"]
def scaled_dot_product_attention(Q, K, V, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V.  Q, K, V: (..., T, d_k); mask (B, T) True for real keys."""
    d_k = Q.shape[-1]
    scores = Q @ K.swapaxes(-1, -2) / np.sqrt(d_k).astype(Q.dtype)   # (..., T, T)
    if mask is not None:
        scores = np.where(_key_mask(mask, scores.ndim), scores, NEG_INF)
    scores -= row_max(scores)
    weights = np.exp(scores)
    weights /= row_sum(weights)                                         # rows sum to 1
    return weights @ V, weights                                         # (..., T, d_k), (..., T, T)

# %% tags=["export"]
def scaled_dot_product_attention_backward(grad_out, Q, K, V, weights):
    """Gradients of scaled_dot_product_attention for Q, K, V."""
    d_k = Q.shape[-1]
    dV = weights.swapaxes(-1, -2) @ grad_out                            # (..., T, d_k)
    dW = grad_out @ V.swapaxes(-1, -2)                                  # (..., T, T)
    dS = weights * (dW - row_sum(dW * weights))    # softmax backward
    dS /= np.sqrt(d_k).astype(dS.dtype)
    dQ = dS @ K
    dK = dS.swapaxes(-1, -2) @ Q
    return dQ, dK, dV

# %% tags=["export"]
class MultiHeadAttention(Module):
    def __init__(self, d_model: int, num_heads: int, rng=None, dtype=DEFAULT_DTYPE):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        rng = np.random.default_rng(0) if rng is None else rng
        self.d_model, self.num_heads, self.d_k = d_model, num_heads, d_model // num_heads
        self.W_q = Linear(d_model, d_model, rng, dtype=dtype)
        self.W_k = Linear(d_model, d_model, rng, bias=False, dtype=dtype)  # a key bias gets no gradient (softmax is shift-invariant)
        self.W_v = Linear(d_model, d_model, rng, dtype=dtype)
        self.W_o = Linear(d_model, d_model, rng, dtype=dtype)
        self.attn_weights = None          # (B, H, T, T) of the last forward, for visualisation
        self._cache = None

    def forward(self, x, mask=None):
        B, T, D = x.shape
        H, d_k = self.num_heads, self.d_k
        # Q, K and V in one matmul: [W_q | W_k | W_v] is (D, 3D)
        W = np.concatenate([self.W_q.W.data, self.W_k.W.data, self.W_v.W.data], axis=1)
        b = np.concatenate([self.W_q.b.data, np.zeros_like(self.W_q.b.data), self.W_v.b.data])
        qkv = (x.reshape(B * T, D) @ W + b).reshape(B, T, 3, H, d_k).transpose(2, 0, 3, 1, 4)   # (3, B, H, T, d_k)
        Q, K, V = qkv
        heads, weights = scaled_dot_product_attention(Q, K, V, mask)         # (B, H, T, d_k)
        concat = heads.transpose(0, 2, 1, 3).reshape(B, T, D)                 # (B, T, D)
        self.attn_weights = weights
        if self.training:
            self._cache = (x, Q, K, V, weights)
        return self.W_o(concat)

    def backward(self, grad_out):
        x, Q, K, V, weights = self._check_cache(self._cache)
        B, T, D = x.shape
        H, d_k = self.num_heads, self.d_k
        d_concat = self.W_o.backward(grad_out)                                # (B, T, D)
        d_heads = d_concat.reshape(B, T, H, d_k).transpose(0, 2, 1, 3)         # (B, H, T, d_k)
        dQ, dK, dV = scaled_dot_product_attention_backward(d_heads, Q, K, V, weights)
        d_qkv = np.stack([dQ, dK, dV]).transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * D)
        x2 = x.reshape(B * T, D)
        dW = x2.T @ d_qkv                                                     # (D, 3D)
        db = d_qkv.sum(axis=0)
        for i, lin in enumerate((self.W_q, self.W_k, self.W_v)):
            lin.W.grad += dW[:, i * D:(i + 1) * D]
            if lin.b is not None:
                lin.b.grad += db[i * D:(i + 1) * D]
        W = np.concatenate([self.W_q.W.data, self.W_k.W.data, self.W_v.W.data], axis=1)
        return (d_qkv @ W.T).reshape(B, T, D)
