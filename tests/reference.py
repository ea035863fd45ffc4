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


def nudged_weights(model, scale=0.05, seed=0):
    """`model`'s weights moved by seeded noise, as the learner publishes them: each parameter once, a tied
    output layer under its embedding's name only (as save_pretrained writes it)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: param.detach() + scale * torch.randn(param.shape, generator=generator)
        for name, param in model.named_parameters()  # remove_duplicate: a tied weight once
    } | {name: buf.detach().clone() for name, buf in model.named_buffers() if name in model.state_dict()}


def trained_lora_student(spec="tiny:student", rank=4, seed=0):
    """`spec` with LoRA adapters as the learner trains it, moved off their start (see `nudge_adapters`)."""
    from gkd_async.config.model_data import LoraSection
    from gkd_async.models.loading import load_model
    from gkd_async.models.lora import add_lora

    model = add_lora(load_model(spec), LoraSection(rank=rank, alpha=2.0 * rank), seed)
    nudge_adapters(model, seed)
    return model.eval()


def nudge_adapters(model, seed, scale=0.3):
    """Seeded noise on every LoRA parameter: B starts at 0, so a fresh adapter changes nothing, proves nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def published_lora_weights(model):
    """What the learner publishes for a LoRA student: the merged plain weights, a tied weight once."""
    from gkd_async.models.lora import lora_scalings, merge_lora
    from gkd_async.train.checkpoint import iter_full_tensors

    return dict(merge_lora(iter_full_tensors(model), lora_scalings(model)))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_divergence(log_p, log_q, loss_type, beta):
    """Full-vocabulary divergences in float64 numpy: the independent reference."""
    p, q = np.exp(log_p), np.exp(log_q)
    if loss_type == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if loss_type == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - np.log(m))).sum(-1) + (1 - beta) * (q * (log_q - np.log(m))).sum(-1)
