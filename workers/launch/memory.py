"""The run's memory ledger (gkd_async.preflight.memory): printed and checked before anything starts, kept in the
run directory (`memory.json`), and at the end set beside the peak resident memory each stage's process reported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gkd_async.config.schema import GKDConfig
from gkd_async.preflight.memory import (
    GB,
    MemoryLedger,
    RunShape,
    available_memory_bytes,
    check_fits,
    compare_with_measured,
    predict_memory,
)
from gkd_async.transport.streams import ProcessMemory
from workers.common import RunContext

LEDGER_FILE = "memory.json"


def plan_memory(config: GKDConfig, prompt_tokens: int) -> MemoryLedger:
    """The ledger, in one line on stderr (and a warning when the peaks together pass what is available); a run
    whose held memory cannot fit this machine is refused (ConfigError) unless
    pipeline.check_memory=false, it joins a Ray cluster (its stages run elsewhere) or the models are on a GPU."""
    import torch

    ledger = predict_memory(config, RunShape(prompt_tokens))
    available = available_memory_bytes()
    joined = config.pipeline.launcher == "ray" and config.ray.address is not None
    warning = None
    if config.pipeline.check_memory and not joined and not torch.cuda.is_available():
        warning = check_fits(ledger, config, available)
    each = ", ".join(
        f"{p.name.split(' (')[0]}{f' x {p.count}' if p.count > 1 else ''} {p.each_bytes / GB:.1f} GB"
        for p in ledger.processes
    )
    of = f" of {available / GB:.1f} GB available" if available is not None else ""
    print(f"memory ledger: peak {ledger.total_bytes / GB:.1f} GB{of} ({each}; see {LEDGER_FILE})", file=sys.stderr)
    if warning:
        print(warning, file=sys.stderr)
    return ledger


def write_ledger(run_dir: Path, ledger: MemoryLedger) -> None:
    (run_dir / LEDGER_FILE).write_text(json.dumps({"predicted": ledger.as_dict()}, indent=1))


def report_memory(ctx: RunContext) -> list[dict[str, Any]]:
    """The ledger's processes beside their measured peaks, added to memory.json and returned (empty without a
    ledger)."""
    path = ctx.run_dir / LEDGER_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    measured = ProcessMemory(ctx.client, ctx.names.memory, ctx.shown_url).by_process()
    if ctx.config.pipeline.redis_url is None:  # the run's private server: its own peak, as it counts it
        measured["redis"] = {"roles": ["redis"], "peak_rss": int(ctx.client.info("memory")["used_memory_peak"])}
    rows = compare_with_measured(record["predicted"]["processes"], measured)
    record["measured"] = rows
    path.write_text(json.dumps(record, indent=1))
    return rows
