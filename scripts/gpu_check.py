"""What can only be checked on a GPU machine, in a few minutes, as one short table.

    python scripts/gpu_check.py [--only NAME ...] [--timeout-s 150]

Each check runs in a process of its own (vLLM sets up torch.distributed and seeds the RNG of the
process that runs it) with a time limit, and prints one row: the check, ok / FAIL / skipped, seconds,
and what it measured. Checks:

- env: torch, CUDA, the GPU, vLLM's version (or why it cannot be imported)
- hf-engines: the HF teacher on the GPU against the same model on the CPU (fp32, TF32 off), its log-probs at
  the student's own top-k ids (gkd.topk_source=union) likewise, and the rollout's behaviour log-probs against a
  recompute
- learner: FSDP2 train steps on the GPU over NCCL in bf16, fused LM-head loss and full logits (the loss
  must fall on both, the first losses agree), seconds per step
- learner-multi-gpu: two learner ranks, one GPU each, FSDP2 over NCCL (skipped with fewer than 2 GPUs)
- weights-collective: pipeline.weight_transport=collective over NCCL, learner on GPU 0 to a rollout worker
  on GPU 1 (skipped with fewer than 2 GPUs): a 100M-parameter version's seconds and GB/s, values checked
- learner-real-vocab: one FSDP2 learner step of a Qwen2.5-0.5B-shaped student (V = 151,936) on 2 x 8,192
  tokens, fused LM-head loss against full logits: peak GPU memory and time
- head-memory: benchmarks/bench_head.py on the GPU (peak memory and time of the fused loss against full
  logits at V=151,936, T up to 65,536, and of the fused loss with every row a stale sample's, reweighted)
- vllm-engines: vLLM's teacher top-k against the HF teacher, behaviour log-probs against HF, and both
  again after an in-place weight reload (skipped when vLLM is not installed)
- pipeline-hf, pipeline-vllm: `gkd-async run` end to end for a few steps (Redis, Ray, every stage);
  reports the learner's device and process-group backend, s/step and the loss
- bench-engines: benchmarks/bench_engines.py (tokens/s, vLLM against HF)
- bench-data: benchmarks/bench_data.py --rows 300000 (a first tokenization in one process against it with
  worker processes, one per core but one: 1.34x faster on 2 cores)
- vllm-lora: benchmarks/bench_vllm_lora.py (a LoRA student's merged publish against vLLM's LoRA adapter path:
  seconds a version; on the CPU the merged one is 2.6x cheaper, and on a GPU the balance may turn)
- bench-prefix: benchmarks/bench_prefix.py (teacher.share_prompts: the HF teacher's scored tokens/s with each
  prompt prefilled once per group against once per sample, P = 64 / 512 / 2,048, R = 64, n = 4 and 8)
- bench-packing: benchmarks/bench_packing.py (trainer.pack_sequences: the learner's response tokens/s with
  long-tailed samples packed into rows of 16,384 tokens against padded micro-batches of 8, at V = 151,936)
- bench-updates: benchmarks/bench_updates.py (trainer.ppo_mini_batch_size / ppo_epochs: the learner's seconds
  per global step in 1, 2, 4 optimiser steps and 1, 2 epochs against one step, at V = 151,936)
- bench-branches: benchmarks/bench_branches.py (teacher.cross_tokenizer_branches: the HF teacher's branch rows
  in one tree-attention pass a batch against the score pass, P = 2,048, R = 512, 4 branches at 75% of the rows)

On a machine without CUDA the same checks run on the CPU (gloo), which is how the script is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHECKS: dict[str, Callable[[], dict]] = {}


def check(fn: Callable[[], dict]) -> Callable[[], dict]:
    CHECKS[fn.__name__.replace("_", "-")] = fn
    return fn


class Skipped(Exception):
    pass


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pairs(tok, count: int = 8) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [
        (
            np.asarray(tok(f"{a}+{b}=")["input_ids"], dtype=np.int32),
            rng.integers(4, 100, rng.integers(4, 40)).astype(np.int32),
        )
        for a, b in rng.integers(10, 99, (count, 2))
    ]


def _behaviour_error(model, prompt, samples, temperature: float) -> float:
    """Largest gap between the engine's behaviour log-probs and log_softmax(z / T) recomputed by HF."""
    import numpy as np
    import torch

    worst = 0.0
    device = next(model.parameters()).device
    for sample in samples:
        seq = torch.tensor(np.concatenate([prompt, sample.response_ids]), dtype=torch.long, device=device)[None]
        with torch.no_grad():
            logits = model(seq).logits[0].double()
        rows = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1).cpu().numpy()
        ref = rows[np.arange(len(sample.response_ids)), sample.response_ids]
        worst = max(worst, float(np.abs(ref - sample.logprobs).max()))
    return worst


@check
def env() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": _device()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError as exc:
        info["vllm"] = f"not importable ({exc})"
    return info


@check
def hf_engines() -> dict:
    import numpy as np
    import torch

    from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine
    from gkd_async.models.loading import load_tokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    device = _device()
    tok = load_tokenizer("tiny:student")
    pairs = _pairs(tok)
    on_device = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device).score(pairs, 64, 1.0, 4)
    on_cpu = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, "cpu").score(pairs, 64, 1.0, 4)
    teacher_gap = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(on_device, on_cpu, strict=True))
    rollout = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id, device)
    samples = rollout.generate(pairs[0][0], 4, 0.8, 1.0, 32, seed=1)
    behaviour_gap = _behaviour_error(rollout.model, pairs[0][0], samples, 0.8)
    # gkd.topk_source=union: the rollout's own top-k ids, and the teacher's log-probs at them, on the device
    (student,) = rollout.generate_groups([pairs[0][0]], [1], 1, 0.8, 1.0, 32, topk=16)[0]
    union = [(pairs[0][0], student.response_ids)]
    extra = [student.topk_ids]
    union_device = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device).score(
        union, 64, 1.0, 4, extra_ids=extra
    )[0]
    union_cpu = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, "cpu").score(
        union, 64, 1.0, 4, extra_ids=extra
    )[0]
    finite = np.isfinite(union_cpu[1])
    union_gap = float(np.abs(union_device[1][finite] - union_cpu[1][finite]).max())
    assert teacher_gap < 1e-4 and behaviour_gap < 1e-4 and union_gap < 1e-4, (teacher_gap, behaviour_gap, union_gap)
    return {
        "teacher_vs_cpu_max_abs": f"{teacher_gap:.1e}",
        "behaviour_vs_recompute": f"{behaviour_gap:.1e}",
        "union_with_student_topk_vs_cpu": f"{union_gap:.1e}",
    }


@check
def learner() -> dict:
    """FSDP2 steps in bf16 mixed precision with the fused LM-head loss and with full logits: both must
    learn, and their first losses agree."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from gkd_async.config.loading import load_config
    from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine
    from gkd_async.models.loading import load_model, load_tokenizer
    from gkd_async.train.batching import TrainSample
    from gkd_async.train.fsdp import process_group_backend, shard_model
    from gkd_async.train.step import train_step

    device = _device()
    backend = process_group_backend(device)
    if device == "cuda":
        torch.cuda.set_device(0)
    with tempfile.NamedTemporaryFile() as init:
        dist.init_process_group(backend, init_method=f"file://{init.name}", rank=0, world_size=1)
    k = 64
    tok = load_tokenizer("tiny:student")
    rollout = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id, device)
    teacher = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device)
    samples = []
    for g, (prompt, _) in enumerate(_pairs(tok, 8)):
        generated = rollout.generate(prompt, 4, 1.0, 1.0, 24, seed=g)
        scores = teacher.score([(prompt, s.response_ids) for s in generated], k, 1.0, 8)
        for i, (s, (ids, lps)) in enumerate(zip(generated, scores, strict=True)):
            samples.append(TrainSample(f"{g}/{i}", str(g), 0, prompt, s.response_ids, ids, lps, s.logprobs))
    result = {"backend": backend}
    first = {}
    for fused in (True, False):
        cfg = load_config(
            None, [f"gkd.teacher_topk={k}", "trainer.ppo_micro_batch_size_per_gpu=8", f"trainer.fused_lm_head={fused}"]
        )
        dtype = "bfloat16" if device == "cuda" else "float32"
        model = shard_model(load_model("tiny:student").to(device), dtype, False, device_type=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses, start = [], time.perf_counter()
        for _ in range(10):
            stats = train_step(model, optimizer, samples, 1, tok.pad_token_id, k, cfg, device=device)
            losses.append(float(stats["actor/distill_loss"]))
        seconds = (time.perf_counter() - start) / len(losses)
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (fused, losses)
        name = "fused" if fused else "full_logits"
        first[name] = losses[0]
        result[name] = f"{seconds:.3f} s/step, loss {losses[0]:.3f} -> {losses[-1]:.3f} ({dtype})"
    dist.destroy_process_group()
    gap = abs(first["fused"] - first["full_logits"]) / first["full_logits"]
    assert gap < 2e-2, first  # bf16 logits on one path, fp32 on the other
    result["first_loss_gap"] = f"{gap:.1e}"
    return result


def _multi_rank_learner(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One learner rank (a process of its own, on GPU `rank`): the samples split over the ranks as the
    learner splits them, 5 FSDP2 steps; rank 0 writes the losses."""
    import json

    import torch
    import torch.distributed as dist

    from gkd_async.config.loading import load_config
    from gkd_async.engines.hf import HFRolloutEngine, HFTeacherEngine
    from gkd_async.models.loading import load_model, load_tokenizer
    from gkd_async.train.batching import TrainSample
    from gkd_async.train.fsdp import process_group_backend, shard_model
    from gkd_async.train.step import train_step

    device = _device()
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        process_group_backend(device), init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    tok = load_tokenizer("tiny:student")
    rollout = HFRolloutEngine("tiny:student", "float32", tok.pad_token_id, tok.eos_token_id, device)
    teacher = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device)
    samples = []
    for g, (prompt, _) in enumerate(_pairs(tok, 8)):
        if g % world != rank:
            continue
        generated = rollout.generate(prompt, 4, 1.0, 1.0, 24, seed=g)
        scores = teacher.score([(prompt, s.response_ids) for s in generated], 64, 1.0, 8)
        for i, (s, (ids, lps)) in enumerate(zip(generated, scores, strict=True)):
            samples.append(TrainSample(f"{g}/{i}", str(g), 0, prompt, s.response_ids, ids, lps, s.logprobs))
    cfg = load_config(None, ["gkd.teacher_topk=64", "trainer.ppo_micro_batch_size_per_gpu=8"])
    model = shard_model(load_model("tiny:student").to(device), "float32", False, device_type=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [
        float(
            train_step(model, optimizer, samples, world, tok.pad_token_id, 64, cfg, device=device)["actor/distill_loss"]
        )
        for _ in range(5)
    ]
    if rank == 0:
        with open(f"{out_dir}/losses.json", "w") as f:
            json.dump(losses, f)
    dist.barrier()  # every rank done before any tears the group down: gloo aborted a rank left alone
    dist.destroy_process_group()


@check
def learner_multi_gpu() -> dict:
    """Two learner ranks, one GPU each, FSDP2 over NCCL (gloo on the CPU): the loss falls on both together."""
    import json

    import torch
    import torch.multiprocessing as mp

    if _device() == "cuda" and torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        mp.spawn(_multi_rank_learner, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        losses = json.loads(Path(f"{tmp}/losses.json").read_text())
    assert losses[-1] < losses[0], losses
    return {"ranks": 2, "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}", "s": f"{time.perf_counter() - start:.1f}"}


def _collective_reader(url: str, key: str, backend: str, out: str) -> None:
    """A rollout worker of the collective transport (a process of its own, on GPU 1 with NCCL): waits for
    versions 1 and 2, then writes the sum of each one's values and where they arrived."""
    import json

    import torch

    from gkd_async.transport.redis_client import connect_redis
    from gkd_async.weight_sync.collective import CollectiveWeights

    if backend == "nccl":
        torch.cuda.set_device(1)
    store = CollectiveWeights(connect_redis(url), key, backend=backend)
    for version in (1, 2):
        while (latest := store.latest()) is None or latest[0] != version:
            time.sleep(0.001)
        state = store.read(version)
        total = sum(float(t.double().sum()) for t in state.values())
        with open(f"{out}/v{version}.tmp", "w") as f:
            json.dump({"sum": total, "device": str(next(iter(state.values())).device)}, f)
        os.replace(f"{out}/v{version}.tmp", f"{out}/v{version}.json")  # the checker never reads half a file


@check
def weights_collective() -> dict:
    """pipeline.weight_transport=collective: 2 versions of a 100M-parameter bf16 model from the learner's
    GPU 0 to a worker on GPU 1 over NCCL (gloo on the CPU), in 64 MB buckets: seconds and GB/s of a
    version, values checked on arrival."""
    import json

    import torch
    import torch.multiprocessing as mp

    from gkd_async.transport.local_redis import LocalRedisServer
    from gkd_async.transport.redis_client import connect_redis
    from gkd_async.weight_sync.collective import CollectiveWeights

    device = _device()
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise Skipped(f"NCCL needs the two ends on 2 GPUs; this machine has {torch.cuda.device_count()}")
    backend = "nccl" if device == "cuda" else "gloo"
    torch.manual_seed(0)
    rows = {}
    with LocalRedisServer() as server, tempfile.TemporaryDirectory() as tmp:
        learner = CollectiveWeights(connect_redis(server.url), "gpu-check:weights", backend=backend)
        learner.serve()
        reader = mp.get_context("spawn").Process(
            target=_collective_reader, args=(server.url, "gpu-check:weights", backend, tmp)
        )
        reader.start()
        while learner.connected_workers < 1:
            time.sleep(0.01)
        for version in (1, 2):
            model = {f"layers.{i}.weight": torch.randn(4_000_000, device=device).bfloat16() for i in range(25)}
            expected = sum(float(t.double().sum()) for t in model.values())
            start = time.perf_counter()
            sent = learner.publish(iter(model.items()), version)
            seconds = time.perf_counter() - start
            result = Path(f"{tmp}/v{version}.json")
            while not result.exists():
                assert reader.is_alive() or result.exists(), "the reader died before it received the version"
                time.sleep(0.01)
            got = json.loads(result.read_text())
            assert abs(got["sum"] - expected) <= 1e-6 * abs(expected) + 1e-2, (got, expected)
            rows[f"v{version}"] = f"{seconds:.2f}s {sent / seconds / 1e9:.1f}GB/s on {got['device']}"
        reader.join(timeout=60)
        learner.close()
    return {"backend": backend, **rows}


def _real_vocab_step(fused: bool, tokens: int, layers: int) -> tuple[float, float, float]:
    """One FSDP2 learner step of a Qwen2.5-0.5B-shaped student (random weights, V = 151,936) on two
    sequences of `tokens` tokens with a top-256 teacher: seconds, peak GPU GB, the distillation loss."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from gkd_async.config.loading import load_config
    from gkd_async.train.batching import TrainSample
    from gkd_async.train.fsdp import shard_model
    from gkd_async.train.step import train_step

    device = _device()
    config = Qwen2Config(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=tokens + 8, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    model = shard_model(model, "bfloat16" if device == "cuda" else "float32", False, device_type=device)
    cfg = load_config(None, ["trainer.ppo_micro_batch_size_per_gpu=1", f"trainer.fused_lm_head={fused}"])
    rng = np.random.default_rng(0)
    samples = []
    for i in range(2):
        response = rng.integers(0, 151_936, tokens - 16).astype(np.int32)
        logprobs = np.log(rng.dirichlet(np.ones(257), len(response))[:, :256]).astype(np.float32)
        ids = rng.integers(0, 151_936, (len(response), 256)).astype(np.int32)
        prompt = rng.integers(0, 151_936, 16).astype(np.int32)
        behaviour = np.full(len(response), -12.0, np.float32)
        samples.append(TrainSample(str(i), str(i), 0, prompt, response, ids, logprobs, behaviour))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    stats = train_step(model, optimizer, samples, 1, 0, 256, cfg, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return time.perf_counter() - start, peak, float(stats["actor/distill_loss"])


@check
def learner_real_vocab() -> dict:
    """A learner step at a real vocabulary: Qwen2.5-0.5B's shape, 2 x 8,192 tokens, fused head against full
    logits (the fused one first, so it pays the warm-up), GPU peak memory and time."""
    import torch
    import torch.distributed as dist

    from gkd_async.train.fsdp import process_group_backend

    device = _device()
    if device == "cuda":
        torch.cuda.set_device(0)
    with tempfile.NamedTemporaryFile() as init:
        dist.init_process_group(process_group_backend(device), init_method=f"file://{init.name}", rank=0, world_size=1)
    tokens, layers = (8192, 24) if device == "cuda" else (64, 1)
    result = {"shape": f"2 x {tokens} tokens, {layers} layers"}
    losses = {}
    for fused in (True, False, True):
        seconds, peak, loss = _real_vocab_step(fused, tokens, layers)
        name = "fused" if fused else "full_logits"
        result[name] = f"{seconds:.2f} s, peak {peak:.1f} GB"
        losses[name] = loss
    dist.destroy_process_group()
    gap = abs(losses["fused"] - losses["full_logits"]) / abs(losses["full_logits"])
    assert gap < 2e-2, losses
    result["loss_gap"] = f"{gap:.1e}"
    return result


@check
def head_memory() -> dict:
    """benchmarks/bench_head.py: the fused LM-head loss against full logits at V=151,936 (GPU memory, time), with
    stale rows reweighted and with the teacher's hidden states (gkd.teacher_signal=hidden, H = 896 and 3,584)."""
    cuda = _device() == "cuda"
    shapes = ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "8192", "32768", "65536"]
    args = [*(shapes if cuda else ["--tokens", "64"]), "--stale", "--hidden", "896", "3584"]
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_head.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-400:])
    out = out.stdout
    print(out, flush=True)
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 7 and parts[0].isdigit():
            rows[f"T={parts[0]} {' '.join(parts[1:-5])}"] = f"{parts[-5]} s, {parts[-4]} MB"
    return rows


@check
def vllm_engines() -> dict:
    import numpy as np
    import torch

    from gkd_async.config.engines import VllmSection
    from gkd_async.engines.hf import HFTeacherEngine
    from gkd_async.models.loading import load_model, load_tokenizer, tied_aliases, with_tied
    from gkd_async.weight_sync.files import WEIGHTS_FILE, WeightStore

    try:
        from gkd_async.engines.vllm import VLLMRolloutEngine, VLLMTeacherEngine, import_vllm

        import_vllm()
    except Exception as exc:
        raise Skipped(str(exc)) from None
    from safetensors.torch import save_file

    torch.backends.cuda.matmul.allow_tf32 = False
    device = _device()
    settings = VllmSection(kv_cache_memory_mb=256 if device == "cpu" else None, gpu_memory_utilization=0.2)
    tok = load_tokenizer("tiny:student")
    pairs = _pairs(tok)
    hf = HFTeacherEngine("tiny:teacher", "float32", tok.pad_token_id, device).score(pairs, 64, 1.5, 4)
    teacher = VLLMTeacherEngine("tiny:teacher", "float32", settings, 256, max_topk=64)
    got = teacher.score(pairs, 64, 1.5)
    teacher_gap = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(got, hf, strict=True))
    same_sets = np.mean([np.mean(np.sort(a[0], -1) == np.sort(b[0], -1)) for a, b in zip(got, hf, strict=True)])

    rollout = VLLMRolloutEngine("tiny:student", "float32", tok.eos_token_id, settings, 256)
    model = load_model("tiny:student").to(device).eval()
    prompt = pairs[0][0]
    before = _behaviour_error(model, prompt, rollout.generate(prompt, 4, 0.8, 1.0, 32, seed=1), 0.8)
    generator = torch.Generator().manual_seed(0)
    # as the learner publishes a tied student: each parameter once, the output layer under the embedding's name
    new = {k: v.detach() + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.cpu().named_parameters()}
    with tempfile.TemporaryDirectory() as weights_dir:
        save_file({k: v.contiguous() for k, v in new.items()}, f"{weights_dir}/{WEIGHTS_FILE}")
        start = time.perf_counter()
        rollout.load_weights(WeightStore.load(Path(weights_dir)), 1)  # as the rollout worker does
        reload_s = time.perf_counter() - start
    model.load_state_dict(with_tied(new, tied_aliases(model)))
    model.to(device)
    after = _behaviour_error(model, prompt, rollout.generate(prompt, 4, 0.8, 1.0, 32, seed=1), 0.8)
    assert teacher_gap < 1e-3 and before < 1e-3 and after < 1e-3, (teacher_gap, before, after)
    return {
        "teacher_vs_hf": f"{teacher_gap:.1e}",
        "same_topk_ids": f"{same_sets:.3f}",
        "behaviour_vs_hf": f"{before:.1e}",
        "after_reload": f"{after:.1e}",
        "reload_s": f"{reload_s:.2f}",
    }


def _pipeline(backend: str) -> dict:
    import shutil

    from gkd_async.config.loading import load_config
    from gkd_async.train.metrics import read_metrics
    from workers.launch.run import run_pipeline

    if backend == "vllm":
        try:
            from gkd_async.engines.vllm import import_vllm

            import_vllm()
        except Exception as exc:
            raise Skipped(str(exc)) from None
    if shutil.which("redis-server") is None:
        raise Skipped("redis-server is not installed")
    steps = 12
    with tempfile.TemporaryDirectory() as logs:
        overrides = [
            f"rollout.backend={backend}",
            f"teacher.backend={backend}",
            f"trainer.total_steps={steps}",
            "trainer.lr=3e-3",
            "logging.tensorboard=false",
            f"logging.dir={logs}",
        ]
        if _device() == "cuda":
            overrides.append("vllm.kv_cache_memory_mb=null")
        start = time.perf_counter()
        summary = run_pipeline(load_config(REPO / "configs" / "default.yaml", overrides))
        wall = time.perf_counter() - start
        metrics = read_metrics(Path(summary["run_dir"]))
    step_s = [m["timing/step_s"] for m in metrics[1:]]
    losses = [m["actor/distill_loss"] for m in metrics]
    assert summary["step"] == steps and losses[-1] < losses[0], losses
    return {
        "learner": f"{summary['device']}/{summary['dist_backend']}",
        "s_per_step": f"{sum(step_s) / len(step_s):.3f}",
        "loss": f"{losses[0]:.3f} -> {losses[-1]:.3f}",
        "wall_s": f"{wall:.0f}",
    }


@check
def pipeline_hf() -> dict:
    return _pipeline("hf")


@check
def pipeline_vllm() -> dict:
    return _pipeline("vllm")


def _benchmark(script: str, *args: str) -> str:
    """What benchmarks/SCRIPT printed."""
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout


@check
def bench_engines() -> dict:
    out = _benchmark("bench_engines.py")
    rows = {}
    for line in out.splitlines():
        if line.startswith(("rollout", "teacher")):
            name, rate, ratio = line[:58].strip(), line.split()[-2], line.split()[-1]
            rows[name] = f"{rate} tok/s ({ratio})"
    return rows


@check
def bench_data() -> dict:
    """benchmarks/bench_data.py: a first tokenization of 300,000 verl rows alone and with worker processes."""
    out = _benchmark("bench_data.py", "--rows", "300000")
    rows = {}
    for line in out.splitlines():
        if line.startswith(("first load", "second load")):
            label, _, figures = line.partition(":")
            rows[label.strip()] = " ".join(figures.split())
    return rows


@check
def vllm_lora() -> dict:
    """benchmarks/bench_vllm_lora.py: a LoRA student's merged publish against vLLM's own LoRA path."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"vLLM is not installed ({exc})") from None
    out = _benchmark("bench_vllm_lora.py", "--versions", "3")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("merged", "adapter"):
            rows[cells[0]] = f"{cells[1]} s a version ({cells[4]})"
        elif line.startswith("greedy tokens"):
            rows["greedy agreement"] = line.rsplit(":", 1)[1].strip()
    return rows


@check
def bench_prefix() -> dict:
    """benchmarks/bench_prefix.py: prefix-shared teacher scoring against a prefill per sample."""
    out = _benchmark("bench_prefix.py", "--device", _device())
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("tiny:"):
            rows[f"{cells[0]} P={cells[1]} n={cells[2]}"] = f"{cells[4]} tok/s shared, {cells[5]} (bound {cells[6]})"
    return rows


@check
def bench_packing() -> dict:
    """benchmarks/bench_packing.py: packed learner batches against padded ones (response tokens/s)."""
    args = ["--device", _device(), "--samples", "128", "--micro-batch", "8", "--max-tokens", "16384"]
    out = _benchmark("bench_packing.py", *args)
    rows = {}
    for line in out.splitlines():
        if line.lstrip().startswith(("padded", "packed")):
            name, numbers = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            cells = numbers.split()
            rows[name] = f"{cells[-3]} s/step, {cells[-2]} response tok/s, {cells[-1]} padded's"
    return rows


@check
def bench_updates() -> dict:
    """benchmarks/bench_updates.py: mini-batch updates' learner seconds per global step against one update."""
    out = _benchmark("bench_updates.py", "--device", _device(), "--groups", "16", "--n", "8", "--response", "256")
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 4 and cells[0].isdigit():
            rows[f"{cells[0]} updates x {cells[1]} epochs"] = f"{cells[2]} s/step, {cells[3]}"
    return rows


@check
def bench_branches() -> dict:
    """benchmarks/bench_branches.py: the cross-tokenizer branch rows by tree attention against the score pass."""
    args = ["--device", _device(), "--prompt", "2048", "--response", "512", "--samples", "8"]
    out = _benchmark("bench_branches.py", *args)
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("tiny:"):
            rows[cells[0]] = (
                f"{cells[1]} branches, score {cells[2]} s, + tree {cells[3]} s ({cells[4]}), mask {cells[5]} MB"
            )
    return rows


def run_one(name: str) -> None:
    """Child process: run one check and print its row as JSON on the last line."""
    start = time.perf_counter()
    try:
        row = {"status": "ok", "detail": CHECKS[name]()}
    except Skipped as why:
        row = {"status": "skipped", "detail": {"why": str(why)}}
    except Exception as exc:
        row = {"status": "FAIL", "detail": {"error": f"{type(exc).__name__}: {exc}"[:400]}}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print("\n" + json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run these checks alone")
    parser.add_argument("--timeout-s", type=float, default=150.0, help="limit for each check")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_one(args.child)
        return 0
    failed = False
    print(f"{'check':<19} {'status':<8} {'s':>6}  detail", flush=True)
    for name in args.only or list(CHECKS):
        cmd = [sys.executable, __file__, "--child", name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s, cwd=REPO)
            lines = proc.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
            if row is None:
                detail = {"exit": proc.returncode, "stderr": proc.stderr[-400:]}
                row = {"status": "FAIL", "seconds": 0, "detail": detail}
        except subprocess.TimeoutExpired:
            row = {"status": "FAIL", "seconds": args.timeout_s, "detail": {"error": "timed out"}}
        failed |= row["status"] == "FAIL"
        detail = ", ".join(f"{k}={v}" for k, v in row["detail"].items())
        print(f"{name:<19} {row['status']:<8} {row['seconds']:>6}  {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
