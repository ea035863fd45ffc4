"""The teacher's hidden-state signal (gkd.teacher_signal=hidden): its last hidden states on the wire, and its output
layer on the learner, which turns them back into the teacher's logits over the whole vocabulary.

A teacher whose logits are its output layer applied to its last hidden state (after the final norm) can send that
state instead of the logits: H numbers per token instead of V. Tied embeddings are that too (the layer is the
input embedding). A logit transform after the layer (Gemma-2's soft-capping, Cohere's logit scale) is refused by
name: the learner would compute other logits than the teacher's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gkd_async.models.loading import ModelLoadError, load_model, meta_model, resolve_model_path

WIRE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16}  # numpy has no bfloat16: its bit patterns


def hidden_to_wire(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    """[R, H] hidden states as the scored record carries them: float32, or bfloat16 bit patterns as uint16."""
    if dtype == "bfloat16":
        return hidden.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return hidden.detach().float().cpu().numpy()


def hidden_from_wire(values: np.ndarray) -> torch.Tensor:
    """The float32 tensor a record's hidden states stand for (uint16: bfloat16 bit patterns)."""
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: a decoded record is read-only


def check_plain_head(model_config, spec: str) -> None:
    """Refuse a teacher whose logits are not its output layer's product with its last hidden state."""
    softcap = getattr(model_config, "final_logit_softcapping", None)
    scale = getattr(model_config, "logit_scale", None)
    if softcap is not None or scale not in (None, 1.0):
        what = f"final_logit_softcapping={softcap}" if softcap is not None else f"logit_scale={scale}"
        raise ModelLoadError(
            f"gkd.teacher_signal=hidden: the teacher {spec!r} transforms its logits after its output layer ({what}), "
            "which the learner does not reproduce from its hidden states; use gkd.teacher_signal=topk"
        )


@dataclass(frozen=True)
class OutputHead:
    """A teacher's output layer, frozen: [V, H] rows for the student's V ids (a teacher's padded rows past them
    dropped, as the top-k scorer's vocab_limit drops them) and its bias, if any."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def to(self, device: str) -> OutputHead:
        return OutputHead(self.weight.to(device), None if self.bias is None else self.bias.to(device))


def load_output_head(spec: str, vocab_size: int, trust_remote_code: bool = False) -> OutputHead:
    """The output layer of the model `spec` names, in float32, read from its safetensors files alone when they hold
    it under the name the model gives it (the input embedding's, when tied), else from the whole loaded model."""
    skeleton = meta_model(spec, trust_remote_code)
    check_plain_head(skeleton.config, spec)
    head = skeleton.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(
            f"gkd.teacher_signal=hidden needs a linear output layer; {spec!r} has {type(head).__name__}"
        )
    names = {id(param): [] for param in head.parameters()}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        if id(param) in names:
            names[id(param)].append(name)
    path = resolve_model_path(spec)
    stored = _read_tensors(path, names[id(head.weight)])
    bias = None if head.bias is None else _read_tensors(path, names[id(head.bias)])
    if stored is None or (head.bias is not None and bias is None):  # stored under other names: load it whole
        loaded = load_model(spec, "float32", trust_remote_code).get_output_embeddings()
        stored, bias = loaded.weight.detach(), None if loaded.bias is None else loaded.bias.detach()
    rows = stored.shape[0]
    if rows < vocab_size:
        raise ModelLoadError(
            f"gkd.teacher_signal=hidden: the teacher {spec!r} has {rows} output rows, fewer than the student's "
            f"{vocab_size}; the learner takes the divergence over the student's whole vocabulary. Use "
            "gkd.teacher_signal=topk"
        )
    weight = stored[:vocab_size].float().contiguous().requires_grad_(False)
    return OutputHead(weight, None if bias is None else bias[:vocab_size].float().contiguous())


def _read_tensors(path: Path, names: list[str]) -> torch.Tensor | None:
    """The first of `names` a safetensors file of the model directory holds (None: none does)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text()).get("weight_map", {})
        files = {name: path / where[name] for name in names if name in where}
    else:
        files = {name: path / "model.safetensors" for name in names if (path / "model.safetensors").is_file()}
    for name, file in files.items():
        with safe_open(str(file), framework="pt") as tensors:
            held = tensors.keys()
            if name in held:
                return tensors.get_tensor(name)
    return None
