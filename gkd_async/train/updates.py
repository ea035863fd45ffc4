"""The optimiser steps of one global step: the batch's prompt groups in mini-batches, each one optimiser step,
for `trainer.ppo_epochs` passes (`trainer.ppo_mini_batch_size`; unset, the whole batch is one step).

Groups fall into mini-batches in the order they arrive. The first mini-batch's forward and backward run as its
groups arrive (as a whole batch's do without mini-batches); every optimiser step waits until the batch is
complete, so a stop arriving mid-batch leaves the model as it was and the batch is trained again after resume.
Each rank takes the same share of each piece of a mini-batch (`piece[rank::world]`, a piece being the part of a
fed chunk that falls in it) in every epoch, so with one mini-batch and one epoch this is today's step exactly.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from gkd_async.train.batching import TrainSample
from gkd_async.train.step import StepAccumulator

Group = Sequence[TrainSample]  # one prompt's samples
# Counts over the batch, summed over the first pass's mini-batches; every other metric is averaged over the
# optimiser steps.
SUMMED_PREFIXES = ("tokens",)


class MiniBatchUpdate:
    def __init__(
        self,
        new_step: Callable[[], StepAccumulator],
        rank: int,
        world: int,
        groups_per_update: int,
        epochs: int = 1,
        before_updates: Callable[[], None] = lambda: None,
    ) -> None:
        self.new_step, self.rank, self.world = new_step, rank, world
        self.groups_per_update, self.epochs, self.before_updates = groups_per_update, epochs, before_updates
        self.mini_batches: list[list[list[Group]]] = []  # each mini-batch's pieces, as they arrived
        self.filled = groups_per_update  # groups in the last mini-batch (full: the next group opens one)
        self.first = new_step()  # the first mini-batch's step, fed as its groups arrive

    def add(self, groups: Sequence[Group]) -> None:
        """A chunk of the batch's groups (every rank's copy, in the order they arrived)."""
        groups = list(groups)
        while groups:
            if self.filled == self.groups_per_update:
                self.mini_batches.append([])
                self.filled = 0
            room = self.groups_per_update - self.filled
            piece, groups = groups[:room], groups[room:]
            self.mini_batches[-1].append(piece)
            self.filled += len(piece)
            if len(self.mini_batches) == 1:
                self.first.add(self._share(piece))

    def finish(self) -> dict[str, float]:
        """Every optimiser step of the batch; each step's metrics, the counts summed over the batch and the rest
        averaged over the steps."""
        self.before_updates()
        steps = [self.first.finish()]
        for epoch in range(self.epochs):
            for index, pieces in enumerate(self.mini_batches):
                if epoch == 0 and index == 0:
                    continue
                step = self.new_step()
                for piece in pieces:
                    step.add(self._share(piece))
                steps.append(step.finish())
        return merge_update_metrics(steps, first_pass=max(len(self.mini_batches), 1))

    def abandon(self) -> None:
        """A stop or failure arrived mid-batch: nothing was updated; drop the first mini-batch's gradients."""
        self.first.abandon()

    def _share(self, piece: list[Group]) -> list[TrainSample]:
        return [sample for group in piece[self.rank :: self.world] for sample in group]


def merge_update_metrics(steps: list[dict[str, float]], first_pass: int) -> dict[str, float]:
    """One global step's metrics from its optimiser steps' (`first_pass` of them cover the batch once)."""
    merged = {}
    for key in steps[0]:
        values = [step[key] for step in steps if key in step]
        if key.startswith(SUMMED_PREFIXES):
            merged[key] = sum(step.get(key, 0) for step in steps[:first_pass])
        else:
            merged[key] = statistics.fmean(values)
    merged["actor/updates"] = float(len(steps))
    return merged
