"""Independent references the engine tests compare against: one unpadded transformers forward pass, numpy."""

import numpy as np
import torch


def full_logprobs(model, prompt, response, temperature=1.0):
    """log softmax over the vocabulary for each response token, from one unpadded forward pass (float64)."""
    seq = torch.tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return torch.log_softmax(rows / temperature, dim=-1).numpy()


def nucleus_logprob(row_logprobs, token, top_p):
    """log-prob of `token` under the distribution renormalised over the smallest top-p nucleus."""
    probs = np.exp(row_logprobs - row_logprobs.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    kept = order[mass_before < top_p]
    assert token in kept, "sampled a token outside the nucleus"
    return np.log(probs[token] / probs[kept].sum())
