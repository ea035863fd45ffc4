"""Publishing the student's weights to the rollout, and evaluating them when an evaluation is due.

Gathering the sharded weights is a collective: every rank runs `Publisher.publish`; what rank 0 does with the
gathered tensors is its `WeightSink`'s job (ranks other than 0 get a `NullSink`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from gkd_async.config.plan import RunPlan
from gkd_async.models.loading import without_tied
from gkd_async.models.lora import merge_lora
from gkd_async.train.checkpoint import full_state_dict, iter_full_tensors
from gkd_async.train.evaluation import Evaluator


class WeightSink:
    """Rank 0: hands the weights to the run's weight transport and evaluates them."""

    def __init__(self, weights, evaluator: Evaluator | None, reporter, tied: dict[str, str]) -> None:
        """`tied`: the student's tied aliases (models.tied_aliases), published once under their owner's name."""
        self.weights, self.evaluator, self.reporter, self.tied = weights, evaluator, reporter, tied

    def stream(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.weights.publish(tensors, version)

    def whole(self, state: Mapping[str, torch.Tensor], version: int, evaluate: bool, first: bool) -> None:
        self.weights.publish(without_tied(state, self.tied), version)
        if evaluate:
            self.reporter.evaluated(version, self.evaluator.evaluate(state), before_training=first)

    def close(self) -> None:
        self.weights.close()


class NullSink:
    """Ranks other than 0 take part in the gathers and keep nothing."""

    def stream(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        for _ in tensors:  # each tensor's gather is a collective
            pass

    def whole(self, state: Mapping[str, torch.Tensor], version: int, evaluate: bool, first: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Publisher:
    def __init__(self, model, lora_scalings: dict, plan: RunPlan, sink: WeightSink | NullSink):
        """With `plan.weights_streamed` (every transport but `file`), a publish without an evaluation streams the
        weights into the transport's buckets a tensor at a time, without a full copy of the model on rank 0."""
        self.model, self.lora_scalings, self.plan, self.sink = model, lora_scalings, plan, sink
        self.published = -1  # the policy version last published

    def publish(self, step: int) -> None:
        evaluate = self.plan.evaluate_due(step)
        if self.plan.weights_streamed and not evaluate:
            self.sink.stream(merge_lora(iter_full_tensors(self.model), self.lora_scalings), step)
        else:
            state = dict(merge_lora(full_state_dict(self.model).items(), self.lora_scalings))
            self.sink.whole(state, step, evaluate, first=self.published < 0)
        self.published = step
