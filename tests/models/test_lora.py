"""LoRA students (model.lora): the merge the learner publishes against PEFT's own, a learner step on two
gloo ranks that changes the adapters alone, and resume from an adapter-only checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from groups import K, make_groups
from ranks import join_group, leave_group, spawn_ranks
from reference import nudge_adapters, published_lora_weights
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from gkd_async.config.loading import load_config
from gkd_async.errors import ConfigError
from gkd_async.models.loading import load_model, tied_aliases
from gkd_async.models.lora import load_trainable_student
from gkd_async.preflight.checks import preflight
from gkd_async.rewards import functions as reward_functions
from gkd_async.train.checkpoint import full_state_dict, load_checkpoint, save_checkpoint
from gkd_async.train.fsdp import shard_model
from gkd_async.train.step import train_step
from gkd_async.weight_sync.buckets import unshared


def qwen2_with_biases(path):
    """A small untied Qwen2, whose q, k and v projections have biases, saved as save_pretrained writes it."""
    config = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("student", ["tiny:student", "qwen2-biases"])
def test_the_published_merge_equals_peft_merge_and_unload(tmp_path, student):
    """What the learner publishes (streamed a tensor at a time) is what PEFT's merge_and_unload computes."""
    from peft import LoraConfig, get_peft_model

    spec = qwen2_with_biases(tmp_path / "qwen2") if student == "qwen2-biases" else student
    peft_model = get_peft_model(load_model(spec), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    nudge_adapters(peft_model, seed=3)
    published = published_lora_weights(peft_model.base_model.model)
    reference = peft_model.merge_and_unload()
    expected = {n: t for n, t in reference.state_dict().items() if n not in tied_aliases(reference)}
    assert set(published) == set(expected)
    assert any(n.endswith("q_proj.bias") for n in published) == (student == "qwen2-biases")
    for name, tensor in expected.items():
        torch.testing.assert_close(published[name], tensor, atol=1e-6, rtol=0, msg=name)
    untouched = load_model(spec).state_dict()
    assert not torch.equal(
        published["model.layers.0.self_attn.q_proj.weight"], untouched["model.layers.0.self_attn.q_proj.weight"]
    )


def test_target_modules_that_match_nothing_are_refused_at_start():
    """By the driver's checks, before Redis and the stages start (the student built without weights)."""
    config = load_config(None, ["model.lora.rank=4", "model.lora.target_modules=[qkv]"])
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['qkv'\]: .*Name linear layers of the student"):
        preflight(config)
    preflight(load_config(None, ["model.lora.rank=4", "model.lora.target_modules=[q_proj, v_proj]"]))


def train_lora(rank, world, init_file, out_dir):
    """Two learner steps with LoRA on `world` ranks, a checkpoint after the first; then a learner built afresh
    (its adapters initialised from another seed) resumes from it and takes the second step again."""
    join_group(rank, world, init_file)
    reward = f"custom_reward_function.path={reward_functions.__file__}"
    cfg = load_config(None, [f"gkd.teacher_topk={K}", "model.lora.rank=4", "model.lora.alpha=8", reward])
    groups, pad = make_groups()
    mine = [s for group in groups[rank::world] for s in group]

    def learner(seed):
        model = shard_model(load_trainable_student(cfg.model, seed), "float32", False)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer

    model, optimizer = learner(seed=0)
    start = full_state_dict(model)
    train_step(model, optimizer, mine, world, pad, K, cfg)
    save_checkpoint(Path(out_dir) / "ckpt", 1, model, optimizer, {})
    train_step(model, optimizer, mine, world, pad, K, cfg)
    two_steps = full_state_dict(model)
    optimized = sum(len(group["params"]) for group in optimizer.param_groups)
    resumed, resumed_optimizer = learner(seed=1)
    load_checkpoint(Path(out_dir) / "ckpt" / "step_0000001", resumed, resumed_optimizer)
    train_step(resumed, resumed_optimizer, mine, world, pad, K, cfg)
    again = full_state_dict(resumed)
    if rank == 0:
        for name, state in (("start", start), ("two_steps", two_steps), ("resumed", again)):
            save_file(unshared(state), f"{out_dir}/{name}.safetensors")
        with open(f"{out_dir}/facts.json", "w") as f:
            json.dump({"optimized": optimized}, f)
    leave_group(rank, init_file)


@pytest.mark.slow
def test_a_lora_learner_on_two_ranks_trains_the_adapters_alone_and_resumes_bitwise(tmp_path):
    import torch.distributed.checkpoint as dcp

    spawn_ranks(train_lora, 2, str(tmp_path / "init"), str(tmp_path))
    start, two_steps, resumed = (
        load_file(str(tmp_path / f"{n}.safetensors")) for n in ("start", "two_steps", "resumed")
    )
    adapters = [n for n in start if ".lora_A." in n or ".lora_B." in n]
    assert adapters and json.loads((tmp_path / "facts.json").read_text())["optimized"] == len(adapters)
    for name in start:
        if name in adapters:
            assert not torch.equal(two_steps[name], start[name]), f"{name} did not train"
        else:  # the base (projections, embedding, norms) is frozen
            assert torch.equal(two_steps[name], start[name]), f"{name} changed"
    for name in two_steps:
        assert torch.equal(resumed[name], two_steps[name]), f"{name}: the resumed step differs"
    saved = dcp.FileSystemReader(str(tmp_path / "ckpt" / "step_0000001")).read_metadata().state_dict_metadata
    model_keys = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    assert model_keys == set(adapters)  # the checkpoint holds the adapters (and their optimizer state) only
