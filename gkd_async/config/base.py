"""What every configuration section shares: unknown keys are errors, defaults are validated."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

LossType = Literal["forward_kl", "reverse_kl", "jsd"]
TEACHER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
Backend = Literal["hf", "vllm"]
TeacherBackend = Literal["hf", "vllm", "openai"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
