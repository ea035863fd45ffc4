"""The FSDP2 learner step over real torch.distributed (gloo) ranks: the update must not depend on the
world size, the micro-batch size, the offload and checkpointing knobs, the fused LM-head loss or on streaming
the batch in chunks."""

import json

import numpy as np
import pytest
import torch
from groups import K, make_groups
from ranks import join_group, leave_group, spawn_ranks
from safetensors.torch import load_file, save_file

from gkd_async.config.loading import load_config
from gkd_async.loss.topk import distill_loss
from gkd_async.models.loading import load_model
from gkd_async.rewards import functions as reward_functions
from gkd_async.train.batching import collate
from gkd_async.train.checkpoint import full_state_dict
from gkd_async.train.fsdp import shard_model
from gkd_async.train.step import StepAccumulator, train_step
from gkd_async.train.updates import MiniBatchUpdate
from gkd_async.weight_sync.buckets import unshared


def train_once(rank, world, init_file, out_dir, overrides, chunk=0, parity=None, stale_shift=None):
    """One step on the five groups: all at once, or (chunk > 0) streamed `chunk` groups at a time, each
    chunk shared over the ranks as the learner shares it. With model.teachers, the even groups are teacher
    "even"'s and the odd ones teacher "odd"'s; `parity` 0 or 1 keeps only the even or the odd groups."""
    join_group(rank, world, init_file)
    reward = f"custom_reward_function.path={reward_functions.__file__}"
    cfg = load_config(None, [f"gkd.teacher_topk={K}", "trainer.grad_clip=1e9", reward, *overrides])
    groups, pad = make_groups()
    if parity is not None:
        groups = groups[parity::2]
    for group in groups:
        for sample in group:
            sample.teacher = ("even", "odd")[int(sample.group_id) % 2] if cfg.model.teachers else ""
            if stale_shift is not None:
                sample.reweighted = True
                sample.behaviour_logprobs = sample.behaviour_logprobs - np.float32(stale_shift)
    mine = [s for group in groups[rank::world] for s in group]
    t = cfg.trainer
    model = shard_model(
        load_model("tiny:student"), "float32", t.param_offload, activation_checkpointing=t.activation_checkpointing
    )
    model.train()  # as the learner: transformers checkpoints layers only in training mode
    layer_calls = []  # counted in forward itself: checkpointing's recomputation skips module hooks
    layer, forward = model.model.layers[0], model.model.layers[0].forward
    layer.forward = lambda *args, **kwargs: layer_calls.append(1) or forward(*args, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    if chunk:  # as the learner's rank does it: trainer.ppo_mini_batch_size groups per optimiser step
        per_update = t.ppo_mini_batch_size or len(groups)
        update = MiniBatchUpdate(
            lambda: StepAccumulator(model, optimizer, world, pad, K, cfg), rank, world, per_update, t.ppo_epochs
        )
        for start in range(0, len(groups), chunk):
            update.add(groups[start : start + chunk])
        stats = update.finish()
    else:
        stats = train_step(model, optimizer, mine, world, pad, K, cfg)
    stats["layer_0_forward_calls"] = len(layer_calls)
    weights = full_state_dict(model)
    if rank == 0:
        save_file(unshared(weights), f"{out_dir}/weights.safetensors")  # the tied output layer: a copy of its own
        with open(f"{out_dir}/stats.json", "w") as f:
            json.dump(stats, f)
    leave_group(rank, init_file)


def run(tmp_path, name, world, overrides, chunk=0, parity=None, stale_shift=None):
    out = tmp_path / name
    out.mkdir()
    spawn_ranks(train_once, world, str(tmp_path / f"{name}.init"), str(out), overrides, chunk, parity, stale_shift)
    return load_file(str(out / "weights.safetensors")), json.loads((out / "stats.json").read_text())


def train_on_signal(rank, world, init_file, out_dir, signal, chunk):
    """One step (JSD) on the five groups streamed `chunk` at a time, the teacher's signal its hidden states with its
    output layer (gkd.teacher_signal=hidden), or its log-probs at every id of the vocabulary (k = V)."""
    from gkd_async.engines.hf import HFTeacherEngine
    from gkd_async.models.hidden_signal import load_output_head

    join_group(rank, world, init_file)
    hidden = ["gkd.teacher_signal=hidden"] if signal == "hidden" else []
    cfg = load_config(
        None, ["trainer.grad_clip=1e9", "trainer.ppo_micro_batch_size_per_gpu=3", "gkd.distill_loss_type=jsd", *hidden]
    )
    groups, pad = make_groups()
    teacher = HFTeacherEngine("tiny:teacher", "float32", pad)
    vocab = teacher.vocab_size
    for sample in (s for group in groups for s in group):
        ((ids, lps, states),) = teacher.score(
            [(sample.prompt_ids, sample.response_ids)], vocab, 1.0, 1, hidden_dtype="float32"
        )
        keep = 0 if hidden else vocab
        sample.topk_ids, sample.topk_logprobs, sample.teacher_hidden = (
            ids[:, :keep],
            lps[:, :keep],
            states if hidden else None,
        )
    head = load_output_head("tiny:teacher", vocab) if hidden else None
    model = shard_model(load_model("tiny:student"), "float32", False)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    k = 0 if hidden else vocab
    update = MiniBatchUpdate(
        lambda: StepAccumulator(model, optimizer, world, pad, k, cfg, "cpu", head), rank, world, len(groups), 1
    )
    for start in range(0, len(groups), chunk):
        update.add(groups[start : start + chunk])
    stats = update.finish()
    weights = full_state_dict(model)
    if rank == 0:
        save_file(unshared(weights), f"{out_dir}/weights.safetensors")
        with open(f"{out_dir}/stats.json", "w") as f:
            json.dump(stats, f)
    leave_group(rank, init_file)


@pytest.mark.slow
def test_the_teachers_hidden_states_train_as_its_whole_vocabulary_does(tmp_path):
    """gkd.teacher_signal=hidden in the learner's step: the update from the teacher's hidden states and output layer
    equals the update from its log-probs at every id (top-k at k = V, itself checked against numpy), on one rank,
    and on two ranks streamed two groups a chunk (a rank with nothing in the last chunk runs an empty micro-batch
    without hidden states)."""
    results = {}
    for name, signal, world, chunk in (
        ("whole", "topk", 1, 5),
        ("hidden", "hidden", 1, 5),
        ("hidden2", "hidden", 2, 2),
    ):
        out = tmp_path / name
        out.mkdir()
        spawn_ranks(train_on_signal, world, str(tmp_path / f"{name}.init"), str(out), signal, chunk)
        results[name] = load_file(str(out / "weights.safetensors")), json.loads((out / "stats.json").read_text())
    base_w, base_s = results["whole"]
    assert base_s["actor/teacher_topk_mass"] == pytest.approx(1.0, abs=1e-5)
    for name in ("hidden", "hidden2"):
        weights, stats = results[name]
        assert stats["actor/distill_loss"] == pytest.approx(base_s["actor/distill_loss"], rel=1e-5), name
        for key in base_w:
            torch.testing.assert_close(weights[key], base_w[key], rtol=0, atol=2e-6, msg=f"{name}: {key}")


@pytest.mark.slow
def test_update_is_independent_of_world_size_micro_batches_and_offload(tmp_path):
    base_w, base_s = run(tmp_path, "base", 1, ["trainer.ppo_micro_batch_size_per_gpu=16"])
    before = load_model("tiny:student").state_dict()
    assert any(not torch.equal(before[k], base_w[k]) for k in base_w), "the step changed nothing"
    variants = {
        "tiny_micro_batches": (1, ["trainer.ppo_micro_batch_size_per_gpu=1"]),
        "token_budget": (1, ["trainer.ppo_max_token_len_per_gpu=20"]),
        "two_ranks": (2, ["trainer.ppo_micro_batch_size_per_gpu=3"]),
        "offload": (1, ["trainer.param_offload=true", "trainer.optimizer_offload=true"]),
        "activation_checkpointing": (
            1,
            ["trainer.ppo_micro_batch_size_per_gpu=16", "trainer.activation_checkpointing=true"],
        ),
        "materialised_logits": (1, ["trainer.ppo_micro_batch_size_per_gpu=16", "trainer.fused_lm_head=false"]),
        "materialised_two_ranks": (2, ["trainer.ppo_micro_batch_size_per_gpu=3", "trainer.fused_lm_head=false"]),
        "streamed_group_by_group": (1, ["trainer.ppo_micro_batch_size_per_gpu=16"], 1),
        # chunks of 2, 2 and 1 groups: rank 1 has nothing in the last one
        "streamed_two_ranks": (2, ["trainer.ppo_micro_batch_size_per_gpu=3"], 2),
        # trainer.pack_sequences: rows of several samples end to end within the token budget, no padding
        "packed": (1, ["trainer.pack_sequences=true", "trainer.ppo_max_token_len_per_gpu=40"]),
        "packed_materialised": (
            1,
            ["trainer.pack_sequences=true", "trainer.ppo_max_token_len_per_gpu=40", "trainer.fused_lm_head=false"],
        ),
        "packed_two_ranks_streamed": (2, ["trainer.pack_sequences=true", "trainer.ppo_max_token_len_per_gpu=30"], 2),
    }
    for name, (world, overrides, *chunk) in variants.items():
        weights, stats = run(tmp_path, name, world, overrides, *chunk)
        assert stats["tokens"] == base_s["tokens"], name
        if name == "activation_checkpointing":  # each layer ran again in the backward pass
            assert stats["layer_0_forward_calls"] == 2 * base_s["layer_0_forward_calls"]
        assert stats["actor/distill_loss"] == pytest.approx(base_s["actor/distill_loss"], rel=1e-5), name
        for key in base_w:
            torch.testing.assert_close(weights[key], base_w[key], rtol=0, atol=2e-6, msg=f"{name}: {key}")
        # the student's tied output layer stays its embedding through FSDP2, offload and the update
        assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"]), name


@pytest.mark.slow
def test_the_fused_and_materialised_paths_report_the_same_statistics(tmp_path):
    """Distillation, the RL term and OPD at once: every metric of a step (losses, masses, entropy, PPO ratio
    and clip fraction, reverse KL) is the same whichever path computed it; each names its sums alike."""
    terms = [
        "trainer.ppo_micro_batch_size_per_gpu=4",
        "gkd.use_rl_loss=true",
        "gkd.rl_loss_coef=0.5",
        "gkd.opd_coef=0.5",
        "gkd.rl_clip_ratio=0.1",
        "rollout.temperature=0.7",
    ]  # sampled at 1.0: ratios off 1, so the PPO terms and statistics are not 0
    # fmt: skip
    _, fused = run(tmp_path, "fused", 1, terms)
    _, materialised = run(tmp_path, "materialised", 1, [*terms, "trainer.fused_lm_head=false"])
    assert fused.keys() == materialised.keys()
    assert min(abs(fused[k]) for k in ("actor/pg_loss", "actor/opd_loss", "actor/pg_clipfrac")) > 1e-3
    for key in fused.keys() - {"actor/grad_norm", "layer_0_forward_calls"}:
        assert materialised[key] == pytest.approx(fused[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("fused", ["true", "false"])
def test_several_teachers_each_report_their_own_losses_and_the_update_is_unchanged(tmp_path, fused):
    """Per-teacher metrics equal those of a step on that teacher's samples alone; routing leaves the update
    as it was. Two ranks, each holding one teacher's groups (rank 0 the even ones, rank 1 the odd ones)."""
    common = ["trainer.ppo_micro_batch_size_per_gpu=3", "gkd.opd_coef=0.5", f"trainer.fused_lm_head={fused}"]
    teachers = ["model.teachers.even=tiny:teacher", "model.teachers.odd=tiny:teacher", "data.teacher_key=domain"]
    base_w, base_s = run(tmp_path, "one_teacher", 2, common)
    weights, stats = run(tmp_path, "two_teachers", 2, [*common, *teachers])
    for key in base_w:
        torch.testing.assert_close(weights[key], base_w[key], rtol=0, atol=2e-6, msg=key)
    assert stats["actor/distill_loss"] == pytest.approx(base_s["actor/distill_loss"], rel=1e-6)
    assert stats["tokens/even"] + stats["tokens/odd"] == stats["tokens"]
    for parity, name in enumerate(("even", "odd")):
        _, alone = run(tmp_path, f"{name}_alone", 1, common, parity=parity)
        assert stats[f"tokens/{name}"] == alone["tokens"]
        for metric in ("actor/distill_loss", "actor/opd_loss", "actor/teacher_reverse_kl"):
            assert stats[f"{metric}/{name}"] == pytest.approx(alone[metric], rel=1e-5), (name, metric)
    assert stats["actor/distill_loss/even"] != pytest.approx(stats["actor/distill_loss/odd"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_sequence_aggregation_matches_a_per_sequence_reference(tmp_path, mode):
    """trainer.loss_agg_mode: the FSDP step (one rank, two ranks streamed in chunks, packed rows) against an
    unsharded model trained on the formula itself, each sample's summed divergence divided by its length
    (token-mean) or not (token-sum), then by the number of samples; and different from token-mean."""
    agg = f"trainer.loss_agg_mode={mode}"
    token_w, _ = run(tmp_path, "token", 1, [])
    one_w, one_s = run(tmp_path, "one", 1, [agg, "trainer.ppo_micro_batch_size_per_gpu=16"])
    two_w, two_s = run(tmp_path, "two", 2, [agg, "trainer.ppo_micro_batch_size_per_gpu=3"], 2)
    packed_w, _ = run(
        tmp_path, "packed", 1, [agg, "trainer.pack_sequences=true", "trainer.ppo_max_token_len_per_gpu=40"]
    )

    groups, pad = make_groups()
    samples = [s for group in groups for s in group]
    model = load_model("tiny:student")
    loss = 0.0
    for sample in samples:
        mb = collate([sample], pad, K)
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
        total, count, _ = distill_loss(logits, mb.topk_ids, mb.topk_logprobs, mb.response_mask)
        loss = loss + (total / count if mode == "seq-mean-token-mean" else total)
    (loss / len(samples)).backward()
    reference = {name: (p - p.grad).detach() for name, p in model.named_parameters()}  # SGD at lr 1
    assert one_s["actor/distill_loss"] == pytest.approx(loss.item() / len(samples), rel=1e-5)
    assert two_s["actor/distill_loss"] == pytest.approx(one_s["actor/distill_loss"], rel=1e-5)
    for key, expected in reference.items():
        torch.testing.assert_close(one_w[key], expected, rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(two_w[key], expected, rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(packed_w[key], expected, rtol=0, atol=2e-6, msg=key)  # per sample, not row
    assert max(float((one_w[k] - token_w[k]).abs().max()) for k in reference) > 1e-4


@pytest.mark.slow
def test_mini_batches_and_epochs_are_optimiser_steps_in_turn(tmp_path):
    """trainer.ppo_mini_batch_size and trainer.ppo_epochs: the five groups arrive in chunks and fall into
    mini-batches of two (2, 2, 1), each one optimiser step normalised by its own tokens, over two epochs; on one
    and two ranks equal to a hand-written loop over the same mini-batches on an unsharded model. One mini-batch
    of the whole batch and one epoch is the default step, bitwise."""
    default_w, default_s = run(tmp_path, "default", 1, [], chunk=2)
    whole_w, whole_s = run(tmp_path, "whole", 1, ["trainer.train_batch_size=5", "trainer.ppo_mini_batch_size=5"], 2)
    assert all(torch.equal(whole_w[k], default_w[k]) for k in default_w)
    assert whole_s["actor/updates"] == 1 and whole_s["actor/distill_loss"] == default_s["actor/distill_loss"]
    mini = ["trainer.train_batch_size=6", "trainer.ppo_mini_batch_size=2", "trainer.ppo_epochs=2"]
    one_w, one_s = run(tmp_path, "one_rank", 1, mini, chunk=1)
    two_w, two_s = run(tmp_path, "two_ranks", 2, [*mini, "trainer.ppo_micro_batch_size_per_gpu=3"], chunk=3)

    groups, pad = make_groups()
    model = load_model("tiny:student")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # as train_once
    losses = []
    for _epoch in range(2):
        for mini_batch in (groups[0:2], groups[2:4], groups[4:5]):
            total, tokens = 0.0, 0
            for sample in (s for group in mini_batch for s in group):
                mb = collate([sample], pad, K)
                logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1]
                loss, count, _ = distill_loss(logits, mb.topk_ids, mb.topk_logprobs, mb.response_mask)
                total, tokens = total + loss, tokens + int(count)
            (total / tokens).backward()
            losses.append(total.item() / tokens)
            optimizer.step()
            optimizer.zero_grad()
    reference = {name: p.detach() for name, p in model.named_parameters()}
    for stats in (one_s, two_s):
        assert stats["actor/updates"] == 6 and stats["tokens"] == default_s["tokens"]
        assert stats["actor/distill_loss"] == pytest.approx(sum(losses) / 6, rel=1e-5)
    assert losses[3] < losses[0]  # the second epoch saw the first mini-batch again, after training on it
    for key, expected in reference.items():
        torch.testing.assert_close(one_w[key], expected, rtol=0, atol=1e-5, msg=key)
        torch.testing.assert_close(two_w[key], expected, rtol=0, atol=1e-5, msg=key)
    assert max(float((one_w[k] - default_w[k]).abs().max()) for k in reference) > 1e-3


@pytest.mark.slow
def test_stale_samples_kept_are_weighted_by_their_truncated_importance_ratio(tmp_path):
    """pipeline.stale_policy=reweight in the learner's step (SGD, distillation): the samples were generated by
    this very student, so a sample whose behaviour log-probs are lowered by log 4 has an importance ratio of 4,
    truncated to the clip 1.5: the update is 1.5 times the fresh one. Raised by 1, the ratio is e^-1 (under the
    clip): the update shrinks by e^-1. The fused path and full logits report the same; unmarked samples train
    as with `drop`."""
    policy = ["pipeline.stale_policy=reweight", "pipeline.stale_weight_clip=1.5", "trainer.grad_clip=1e9"]
    initial = load_model("tiny:student").state_dict()
    fresh_w, _ = run(tmp_path, "fresh", 1, [])
    unmarked_w, unmarked_s = run(tmp_path, "unmarked", 1, policy)
    assert all(torch.equal(unmarked_w[k], fresh_w[k]) for k in fresh_w)
    assert unmarked_s["staleness/reweighted_tokens"] == 0
    over_w, over_s = run(tmp_path, "over", 1, policy, stale_shift=float(np.log(4.0)))
    under_w, under_s = run(tmp_path, "under", 1, [*policy, "trainer.fused_lm_head=false"], stale_shift=-1.0)
    assert over_s["staleness/reweighted_tokens"] == over_s["tokens"]
    assert (over_s["staleness/is_weight_mean"], over_s["staleness/is_clipped_fraction"]) == (pytest.approx(1.5), 1.0)
    assert under_s["staleness/is_weight_mean"] == pytest.approx(np.exp(-1.0), rel=1e-4)
    assert under_s["staleness/is_clipped_fraction"] == 0.0
    for key in initial:
        fresh = fresh_w[key] - initial[key]
        torch.testing.assert_close(over_w[key] - initial[key], 1.5 * fresh, rtol=0, atol=4e-6, msg=key)
        torch.testing.assert_close(under_w[key] - initial[key], np.exp(-1.0) * fresh, rtol=0, atol=4e-5, msg=key)


@pytest.mark.slow
def test_both_loss_coefficients_are_honoured(tmp_path):
    """With SGD the update is linear in the loss: halving a coefficient halves its part of the update, and
    RL + distillation moves the weights by the sum of the two parts."""
    initial = load_model("tiny:student").state_dict()

    def delta(name, overrides):
        weights, stats = run(tmp_path, name, 1, overrides)
        return {k: weights[k] - initial[k] for k in initial}, stats

    rl = ["gkd.use_rl_loss=true", "gkd.distill_loss_coef=0"]
    distill_1, stats_distill = delta("d1", ["gkd.distill_loss_coef=1.0"])
    distill_half, _ = delta("d05", ["gkd.distill_loss_coef=0.5"])
    rl_1, stats_rl = delta("r1", [*rl, "gkd.rl_loss_coef=1.0"])
    rl_half, _ = delta("r05", [*rl, "gkd.rl_loss_coef=0.5"])
    both, stats_both = delta("both", ["gkd.use_rl_loss=true", "gkd.rl_loss_coef=0.5", "gkd.distill_loss_coef=1.0"])
    # The seed's metrics are always there; the loss that is off is 0 with its coefficient 0.
    assert (
        stats_rl["actor/distill_loss"] == 0 and stats_rl["actor/distill_coef"] == 0 and stats_rl["actor/rl_coef"] == 1
    )
    assert stats_distill["actor/pg_loss"] == 0 and stats_distill["actor/rl_coef"] == 0
    assert stats_distill["actor/distill_loss"] > 0 and stats_rl["actor/pg_loss"] != 0
    assert stats_rl["actor/ppo_ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # fresh samples
    assert stats_both["actor/rl_coef"] == 0.5 and stats_both["actor/distill_loss"] > 0
    for key in initial:
        assert rl_1[key].abs().max() > 0 or distill_1[key].abs().max() == 0, key
        torch.testing.assert_close(distill_half[key], distill_1[key] / 2, atol=2e-6, rtol=0)
        torch.testing.assert_close(rl_half[key], rl_1[key] / 2, atol=2e-6, rtol=0)
        torch.testing.assert_close(both[key], distill_1[key] + rl_half[key], atol=4e-6, rtol=0)


def train_with_a_nan(rank, world, init_file, out_dir):
    join_group(rank, world, init_file)
    cfg = load_config(None, [f"gkd.teacher_topk={K}"])
    groups, pad = make_groups()
    samples = [s for group in groups for s in group]
    samples[0].topk_logprobs = np.full_like(samples[0].topk_logprobs, np.nan)  # what the codec would refuse
    model = shard_model(load_model("tiny:student"), "float32", False)
    before = {k: v.clone() for k, v in full_state_dict(model).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = train_step(model, optimizer, samples, world, pad, K, cfg)
    after = full_state_dict(model)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump({"stats": stats, "unchanged": unchanged, "adam_state": len(optimizer.state)}, f)
    leave_group(rank, init_file)


def test_a_non_finite_loss_skips_the_update(tmp_path):
    spawn_ranks(train_with_a_nan, 1, str(tmp_path / "init"), str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["stats"]["actor/skipped_nonfinite"] == 1.0
    assert result["unchanged"] and result["adam_state"] == 0  # no optimizer step was taken


@pytest.mark.slow
def test_sampled_token_distillation_is_reinforce_with_the_teachers_log_prob_as_reward(tmp_path):
    """gkd.opd_coef alone: on fresh samples (ratio 1, nothing clipped) the update is the policy gradient with
    per-token advantage log p_teacher(x_t) - log p_behaviour(x_t), token-mean; one rank (fused head and full
    logits) and two streamed ranks against an unsharded model trained on that formula."""
    opd = ["gkd.distill_loss_coef=0", "gkd.opd_coef=1"]
    one_w, one_s = run(tmp_path, "one", 1, [*opd, "trainer.ppo_micro_batch_size_per_gpu=16"])
    two_w, _ = run(tmp_path, "two", 2, [*opd, "trainer.ppo_micro_batch_size_per_gpu=3"], 2)
    full_w, full_s = run(tmp_path, "full", 1, [*opd, "trainer.fused_lm_head=false"])

    groups, _pad = make_groups()
    samples = [s for group in groups for s in group]
    model = load_model("tiny:student")
    loss, tokens, gap = 0.0, 0, 0.0
    for s in samples:
        seq = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))[None]
        rows = model(seq).logits[0, len(s.prompt_ids) - 1 : -1]
        logp = torch.log_softmax(rows, -1)[
            torch.arange(len(s.response_ids)), torch.from_numpy(s.response_ids.astype(np.int64))
        ]
        behaviour = torch.from_numpy(s.behaviour_logprobs.astype(np.float32))
        advantage = torch.from_numpy(s.teacher_token_logprobs.astype(np.float32)) - behaviour
        loss = loss - (torch.exp(logp - behaviour) * advantage).sum()
        tokens += len(s.response_ids)
        gap += float(-advantage.sum())
    (loss / tokens).backward()
    reference = {name: (p - p.grad).detach() for name, p in model.named_parameters()}
    assert one_s["actor/opd_loss"] == pytest.approx(loss.item() / tokens, rel=1e-5)
    assert one_s["actor/teacher_reverse_kl"] == pytest.approx(gap / tokens, rel=1e-5)
    assert one_s["actor/ppo_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and one_s["actor/distill_loss"] == 0
    for key, expected in reference.items():
        torch.testing.assert_close(one_w[key], expected, rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(two_w[key], expected, rtol=0, atol=2e-6, msg=key)
        torch.testing.assert_close(full_w[key], expected, rtol=0, atol=2e-6, msg=key)
    assert full_s["actor/opd_loss"] == pytest.approx(one_s["actor/opd_loss"], rel=1e-5)
