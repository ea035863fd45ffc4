"""A resumable shuffled cursor over the prompts: the same order after a resume."""

from __future__ import annotations

import random


class PromptCursor:
    """Walks the prompts epoch after epoch, reshuffled per epoch; its state is two integers."""

    def __init__(self, count: int, shuffle: bool, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.count, self.shuffle, self.seed = count, shuffle, seed
        self.epoch, self.position = epoch, position
        self._order = self._order_of(epoch)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(self.count))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> tuple[str, int]:
        """(group id, prompt index) of the next prompt."""
        if self.position >= self.count:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._order_of(self.epoch)
        index = self._order[self.position]
        group_id = f"{self.epoch}:{self.position}"
        self.position += 1
        return group_id, index

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
