"""LoRA students (`model.lora`): PEFT adapters on a frozen student, trained by the learner, published merged.

The learner trains the student model itself with PEFT's LoRA layers injected into it (its parameter names
gain `.base_layer.` and `.lora_A.default.` / `.lora_B.default.`); only the adapters require gradients, so the
optimizer and the checkpoints hold them alone. Rollout engines never see an adapter: what the learner
publishes is merged (W + scale * B @ A under the plain names), a tensor at a time, so the HF engine and
vLLM reload a plain model of the student's shape. `final/` holds the merged model and `final/adapter/`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from gkd_async.config.model_data import LoraSection, ModelSection
from gkd_async.errors import ConfigError
from gkd_async.models.loading import GLOBAL_RNG_LOCK, load_model, meta_model

ADAPTER = "default"  # PEFT's name for the one adapter
BASE, LORA_A, LORA_B = ".base_layer.", f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def load_trainable_student(model: ModelSection, seed: int = 0) -> torch.nn.Module:
    """The student as the learner trains it (float32 on the CPU): with `model.lora.rank>0`, with adapters
    injected (initialised from `seed`: the same on every rank) and everything else frozen."""
    student = load_model(model.student, "float32", model.trust_remote_code)
    return add_lora(student, model.lora, seed) if model.lora.enabled else student


def check_lora(model: ModelSection) -> None:
    """At start, before any stage: model.lora's target modules exist in the student (built without weights)."""
    if model.lora.enabled:
        add_lora(meta_model(model.student, model.trust_remote_code), model.lora)


def add_lora(model: torch.nn.Module, lora: LoraSection, seed: int = 0) -> torch.nn.Module:
    """`model` itself with LoRA layers injected at `lora.target_modules`; only they require gradients."""
    return _peft_model(model, lora, seed).base_model.model


def _peft_model(model: torch.nn.Module, lora: LoraSection, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
    )
    try:
        # The adapters' initialisation draws from torch's global generator: seeded, and left as it was.
        with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    except ValueError as exc:  # PEFT's word for target modules that match nothing
        raise ConfigError(
            f"model.lora.target_modules={lora.target_modules}: {str(exc).splitlines()[0]} Name linear layers of the "
            "student (for example [q_proj, v_proj]) or use all-linear"
        ) from None


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """Each LoRA layer's name -> the scale of its update (alpha / rank), as PEFT set it."""
    return {
        name: float(module.scaling[ADAPTER])
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and ADAPTER in module.scaling
    }


def merge_lora(
    pairs: Iterable[tuple[str, torch.Tensor]], scalings: dict[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a model with LoRA layers as those of the plain model: each layer's
    `base_layer.weight + scale * lora_B @ lora_A` under `weight`, its bias under `bias`. Holds one layer's
    tensors at a time; names of other modules pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in pairs:
        layer, part = _lora_part(name, scalings)
        if layer is None:
            yield name, tensor
            continue
        if part == "bias":
            yield f"{layer}.bias", tensor
            continue
        parts = pending.setdefault(layer, {})
        parts[part] = tensor
        if len(parts) == 3:
            del pending[layer]
            delta = (parts["B"].float() @ parts["A"].float()) * scalings[layer]
            yield f"{layer}.weight", (parts["weight"].float() + delta).to(parts["weight"].dtype)
    if pending:
        raise ValueError(f"LoRA layers without all of base, A and B: {', '.join(sorted(pending))}")


def _lora_part(name: str, scalings: dict[str, float]) -> tuple[str | None, str]:
    for suffix, part in ((BASE + "weight", "weight"), (BASE + "bias", "bias"), (LORA_A, "A"), (LORA_B, "B")):
        if name.endswith(suffix) and name[: -len(suffix)] in scalings:
            return name[: -len(suffix)], part
    return None, ""


def save_lora_final(state: dict[str, torch.Tensor], model: ModelSection, out: Path) -> None:
    """A trained LoRA student's full state (the names of `load_trainable_student`) as `out/` (the merged
    model, `save_pretrained`) and `out/adapter/` (PEFT's adapter_model.safetensors and adapter_config.json)."""
    peft_model = _peft_model(load_model(model.student, "float32", model.trust_remote_code), model.lora)
    peft_model.base_model.model.load_state_dict(state)
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out)
