"""Per-step metrics: one JSON line per step, TensorBoard events, and W&B when enabled."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from gkd_async.config.trainer import LoggingSection
from gkd_async.errors import ConfigError

WANDB_RUN_ID = "wandb_run_id"  # in the run directory: `gkd-async resume` continues the same W&B run


class MetricsWriter:
    def __init__(
        self, run_dir: Path, logging: LoggingSection, run_id: str, config: dict[str, Any] | None = None
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a")
        self.tb = None
        if logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = open_wandb_run(run_dir, logging, run_id, config or {}) if logging.wandb else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for name, value in metrics.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def open_wandb_run(run_dir: Path, logging: LoggingSection, run_id: str, config: dict[str, Any]):
    """The run's W&B run: a new one named `logging.run_name` (or the run id) the first time, whose id is
    kept in the run directory; the same one again when the run is resumed there."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb=true needs the wandb package: pip install wandb") from None
    id_file = run_dir / WANDB_RUN_ID
    wandb_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # as W&B ids: [a-z0-9]
    id_file.write_text(wandb_id)
    return wandb.init(
        project=logging.wandb_project,
        entity=logging.wandb_entity,
        name=logging.run_name or run_id,
        id=wandb_id,
        resume="allow",
        dir=str(run_dir),
        config=config,
    )
