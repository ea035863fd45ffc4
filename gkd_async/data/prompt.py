"""A prompt as the pipeline carries it: its token ids, and the row's other fields for the reward function."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gkd_async.transport.wire import FieldValue


@dataclass
class Prompt:
    ids: np.ndarray
    extra: dict[str, FieldValue] = field(default_factory=dict)
