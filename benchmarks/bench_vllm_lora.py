"""A LoRA student on the vLLM rollout engine: the merged publish gkd-async does (the learner merges the
adapters into the plain weights, vLLM reloads them) against vLLM's own LoRA path (the adapter saved as PEFT
writes it, named by a new LoRARequest each version, vLLM loading it at its first request), in one run.

For each of `--versions` versions (the adapters moved by seeded noise, as training would): the publish
(merge + reload, or save + vLLM's load at the first request) and one rollout of 8 prompts x 32 new tokens
with it, then the same rollout again with nothing new, which is the per-token cost of generating through
the adapter (vLLM's LoRA kernels) against merged weights. Student `tiny:qwen-student` (Qwen's real
vocabulary, tied), LoRA r=8 on every linear layer, fp32, one thread. Both paths' greedy tokens of the last
version are compared, so that a faster path that samples from another model would show.

    .venv/bin/python benchmarks/bench_vllm_lora.py [--versions 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gkd_async.config.engines import VllmSection
from gkd_async.engines.vllm import VLLMRolloutEngine, import_vllm
from gkd_async.models.loading import load_model, load_tokenizer, resolve_model_path, tied_aliases, without_tied
from gkd_async.models.lora import lora_scalings, merge_lora

STUDENT, RANK, PROMPTS, NEW_TOKENS, MAX_LEN = "tiny:qwen-student", 8, 8, 32, 256


def nudge(peft_model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def sampling(vllm, seed: int, temperature: float):
    return vllm.SamplingParams(
        temperature=temperature, top_p=1.0, top_k=0, max_tokens=NEW_TOKENS, seed=seed, logprobs=0,
        flat_logprobs=True, detokenize=False, ignore_eos=True,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from vllm.lora.request import LoRARequest

    vllm = import_vllm()
    tokenizer = load_tokenizer(STUDENT)
    prompts = [
        np.asarray(tokenizer(f"What is {i} plus {3 * i}? Answer:")["input_ids"], dtype=np.int32) for i in range(PROMPTS)
    ]
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    peft_model = get_peft_model(load_model(STUDENT), config)
    inner = peft_model.base_model.model
    scalings, aliases = lora_scalings(inner), tied_aliases(inner)
    settings = VllmSection(kv_cache_memory_mb=256, max_num_batched_tokens=MAX_LEN * PROMPTS)

    merged_engine = VLLMRolloutEngine(STUDENT, "float32", tokenizer.eos_token_id, settings, MAX_LEN)
    adapter_llm = vllm.LLM(
        model=str(resolve_model_path(STUDENT)), dtype="float32", seed=0, max_model_len=MAX_LEN, max_logprobs=1,
        enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=MAX_LEN * PROMPTS,
        kv_cache_memory_bytes=256 << 20, disable_log_stats=True, enable_lora=True, max_lora_rank=RANK,
        max_loras=1,
    )  # fmt: skip
    requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]

    def merged_rollout(temperature: float = 1.0) -> list[list[int]]:
        groups = merged_engine.generate_groups(prompts, list(range(PROMPTS)), 1, temperature, 1.0, NEW_TOKENS)
        return [group[0].response_ids.tolist() for group in groups]

    def adapter_rollout(request, temperature: float = 1.0) -> list[list[int]]:
        params = [sampling(vllm, seed, temperature) for seed in range(PROMPTS)]
        outputs = adapter_llm.generate(requests, params, lora_request=request, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    rows = {key: [] for key in ("merged publish", "merged rollout", "adapter publish", "adapter rollout")}
    with tempfile.TemporaryDirectory(prefix="gkd-bench-vllm-lora-") as tmp:
        merged_rollout(), adapter_rollout(None)  # warm both engines up
        for version in range(1, args.versions + 1):
            nudge(peft_model, version)
            start = time.perf_counter()
            state = without_tied(dict(merge_lora(inner.state_dict().items(), scalings)), aliases)
            merged_engine.load_weights(state, version)
            merged_rollout()
            rows["merged publish"].append(time.perf_counter() - start)
            start = time.perf_counter()
            merged_rollout()
            rows["merged rollout"].append(time.perf_counter() - start)

            start = time.perf_counter()
            peft_model.save_pretrained(Path(tmp) / f"v{version}")
            request = LoRARequest(f"v{version}", version, str(Path(tmp) / f"v{version}"))
            adapter_rollout(request)
            rows["adapter publish"].append(time.perf_counter() - start)
            start = time.perf_counter()
            adapter_rollout(request)
            rows["adapter rollout"].append(time.perf_counter() - start)
        greedy_merged, greedy_adapter = merged_rollout(0.0), adapter_rollout(request, 0.0)
    same = sum(a == b for m, d in zip(greedy_merged, greedy_adapter, strict=True) for a, b in zip(m, d, strict=True))
    median = {key: statistics.median(values) for key, values in rows.items()}
    print(f"{STUDENT}, LoRA r={RANK} all-linear, {PROMPTS} prompts x {NEW_TOKENS} tokens, median of {args.versions}")
    print("| path | publish + first rollout s | rollout s | publish s (difference) | ratio to merged |")
    print("|---|---|---|---|---|")
    for path in ("merged", "adapter"):
        first, again = median[f"{path} publish"], median[f"{path} rollout"]
        ratio = first / median["merged publish"]
        print(f"| {path} | {first:.3f} | {again:.3f} | {first - again:.3f} | {ratio:.2f}x |")
    print(f"greedy tokens of the last version alike on both paths: {same} of {PROMPTS * NEW_TOKENS}")


if __name__ == "__main__":
    main()
