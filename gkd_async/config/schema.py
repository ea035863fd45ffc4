"""The typed run configuration: `GKDConfig`, the sections of config/*.py under their keys.

Loading (YAML plus dotted overrides) lives in config/loading.py, the checks across keys in config/checks.py,
the facts derived from a validated config in config/plan.py. docs/configuration.md is generated from here.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel, Field, model_validator

from gkd_async.config.base import _Section
from gkd_async.config.engines import RolloutSection, TeacherSection, VllmSection
from gkd_async.config.model_data import DataSection, ModelSection
from gkd_async.config.objective import CustomRewardFunctionSection, GkdSection
from gkd_async.config.pipeline import PipelineSection, RaySection
from gkd_async.config.trainer import CheckpointSection, LoggingSection, TrainerSection


class GKDConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    vllm: VllmSection = Field(default_factory=VllmSection)
    gkd: GkdSection = Field(default_factory=GkdSection)
    custom_reward_function: CustomRewardFunctionSection = Field(default_factory=CustomRewardFunctionSection)
    pipeline: PipelineSection = Field(default_factory=PipelineSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="after")
    def _samples_per_prompt(self) -> GKDConfig:
        """rollout.n left unset is resolved here, once: every reader (and the run's config.yaml) sees a number."""
        if self.rollout.n is None:
            self.rollout.n = 4 if self.gkd.rl_on else 1
        return self

    @property
    def samples_per_group(self) -> int:
        """Samples in each group the stages pass on: rollout.n, or one per row of a scored data set."""
        return 1 if self.rollout.source == "dataset" else int(self.rollout.n or 1)


def valid_keys(model: type[BaseModel] = GKDConfig, prefix: str = "") -> Iterator[str]:
    """Every dotted leaf key of the schema, in declaration order."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from valid_keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"
