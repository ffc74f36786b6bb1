# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Evaluation and visualisation
#
# DRAFT skeleton: export cells only.

# %% tags=["export"]
import numpy as np
from transformer_lib.data import ID_TO_TOKEN, encode, pad_sequences
from transformer_lib.transformer import Transformer


def predict(model: Transformer, text, return_probs: bool = False):
    """Answer for one input text (or a list of texts): "Max(5, 3, 9)" -> "9"."""
    texts = [text] if isinstance(text, str) else list(text)
    ids, mask = pad_sequences([encode(t) for t in texts])
    was_training = model.training
    model.eval()
    logits = model(ids, mask)                                    # (B, V)
    model.train(was_training)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    answers = [ID_TO_TOKEN[int(i)] for i in logits.argmax(axis=-1)]
    if return_probs:
        out = list(zip(answers, probs.max(axis=-1).tolist()))
        return out[0] if isinstance(text, str) else out
    return answers[0] if isinstance(text, str) else answers
