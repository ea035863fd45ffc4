"""The `gkd-async` command: a typer app whose commands turn GKDError into one clear message."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from cli.inspect_view import render_inspection
from gkd_async import __version__
from gkd_async.config.loading import dump_config, load_config
from gkd_async.errors import GKDError
from gkd_async.process_settings import compact_malloc, private_files
from gkd_async.redaction import SecretUrl

app = typer.Typer(help="On-policy knowledge distillation with an async Redis-streams pipeline.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
_err = Console(stderr=True)
_out = Console(soft_wrap=True)

ARGS_HELP = "YAML config file (optional), then KEY=VALUE overrides."


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: a first argument without '=' is the config file."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _config(args: list[str] | None, extra: list[str] = ()):
    path, overrides = split_config_args(args or [])
    return load_config(path, [*overrides, *extra])


def _prepare_process() -> None:
    """Before a command that runs stages: private files, compact malloc, one torch thread unless told."""
    compact_malloc()  # before torch and the stages start threads
    private_files()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@config_app.command("show")
def config_show(args: list[str] = typer.Argument(None, metavar="[CONFIG] [KEY=VALUE]...", help=ARGS_HELP)) -> None:
    """Print the resolved config: defaults, then the file, then the overrides."""
    typer.echo(dump_config(_config(args)), nl=False)


@app.command()
def run(args: list[str] = typer.Argument(None, metavar="[CONFIG] [KEY=VALUE]...", help=ARGS_HELP)) -> None:
    """Train end to end: start Redis (unless pipeline.redis_url is set) and Ray, launch every stage, stop them."""
    _run(_config(args))


@app.command()
def score(
    args: list[str] = typer.Argument(
        ..., metavar="DATA... [KEY=VALUE]...", help="JSONL files of prompts with responses, then overrides."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory of the scored data set (resumed if it exists)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config: the teacher, top-k, temperature."),
    shard_size: int = typer.Option(1024, "--shard-size", min=1, help="Rows per shard file."),
) -> None:
    """Score a fixed data set with the teacher once (top-k log-probs of every response token), to train from it
    with rollout.source=dataset data.scored_dir=OUT: supervised KD with no teacher cost per epoch."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from workers.commands.score import score_dataset

    data = [a for a in args if "=" not in a]
    if not data:
        raise GKDError("give the data to score: JSONL files with a prompt and its response on each line")
    _prepare_process()
    cfg = load_config(config, [a for a in args if "=" in a])
    with Progress("scoring", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_err) as progress:
        task = progress.add_task("score", total=None)
        summary = score_dataset(
            cfg, data, out, shard_size, lambda done, total: progress.update(task, completed=done, total=total)
        )
    _out.print(
        f"[bold green]done[/]: {summary['scored_rows']} of {summary['rows']} rows scored into {summary['shards']} "
        f"shards in {summary['out_dir']}"
        + (
            f"; {summary['failed_rows']} failed (see manifest.json; run again to retry)"
            if summary["failed_rows"]
            else ""
        )
    )
    _out.print(f"  train on it: gkd-async run rollout.source=dataset data.scored_dir={summary['out_dir']}")


@app.command()
def resume(
    run_dir: Path = typer.Argument(..., help="The run directory (runs/<run_id>) to continue."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides on the run's config."),
) -> None:
    """Continue a run from its latest checkpoint, with the same run id and config."""
    from gkd_async.train.checkpoint import resolve_checkpoint

    if not (run_dir / "config.yaml").is_file():
        raise GKDError(f"{run_dir} is not a run directory (no config.yaml); pass runs/<run_id>")
    try:
        resolve_checkpoint(run_dir / "checkpoints")
    except GKDError:
        if (run_dir / "checkpoints" / "latest").is_file():
            raise  # a pointer that names no checkpoint: its own message says what it names
        raise GKDError(
            f"{run_dir} has no checkpoint to resume from: the run stopped before it saved one "
            f"(checkpoint.save_every sets how often). Start it again with: gkd-async run {run_dir / 'config.yaml'}"
        ) from None
    config = load_config(run_dir / "config.yaml", [*(overrides or []), f"checkpoint.resume={run_dir / 'checkpoints'}"])
    url = config.pipeline.redis_url
    if url is not None and "***" in url.get_secret_value() and (run_dir / "redis_url").is_file():
        config.pipeline.redis_url = SecretUrl((run_dir / "redis_url").read_text().strip())  # config.yaml: no password
    _run(config)


@app.command()
def export(
    checkpoint: Path = typer.Argument(
        ..., help="A run directory, its checkpoints/ directory, or one of its step_* folders."
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the save_pretrained directory."),
) -> None:
    """Write a checkpoint's student as a save_pretrained directory with its tokenizer, to evaluate an
    intermediate step elsewhere."""
    from gkd_async.train.checkpoint import export_checkpoint

    run_dir = checkpoint
    while not (run_dir / "config.yaml").is_file() and run_dir != run_dir.parent:
        run_dir = run_dir.parent  # the run directory holds the config that names the student
    if not (run_dir / "config.yaml").is_file():
        raise GKDError(f"{checkpoint} is not inside a run directory (no config.yaml above it); pass runs/<run_id>")
    if checkpoint == run_dir:
        checkpoint = run_dir / "checkpoints"
    config = load_config(run_dir / "config.yaml")
    step = export_checkpoint(checkpoint, config.model, out)
    _out.print(f"exported {step} (model.student={config.model.student}) to {out}")


def _with_progress(job):
    """Run `job(on_progress)` under a progress bar fed by the learner's per-step metrics."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [
        TextColumn("[bold]step {task.completed:.0f}/{task.fields[total_steps]}"),
        BarColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=_err, transient=False) as progress:
        task = progress.add_task("train", total=None, loss="starting", speed="", total_steps="?")

        def on_progress(p: dict) -> None:
            if "training/global_step" not in p:
                return
            losses = [
                f"{label} {p[key]:.4f}"
                for key, coef, label in (
                    ("actor/distill_loss", "actor/distill_coef", "distill"),
                    ("actor/pg_loss", "actor/rl_coef", "pg"),
                )
                if key in p and p.get(coef, 1)
            ]
            progress.update(
                task,
                total=p.get("total_steps"),
                total_steps=f"{p.get('total_steps', 0):.0f}",
                completed=p["training/global_step"],
                loss="  ".join([*losses, f"entropy {p.get('actor/entropy', 0):.2f}"]),
                speed=f"{p.get('perf/tokens_per_s', 0):.0f} tok/s  wait {p.get('perf/learner_wait_fraction', 0):.0%}",
            )

        return job(on_progress)


def _run(config) -> None:
    from workers.launch.run import run_pipeline

    _prepare_process()
    if config.pipeline.redis_url is None and os.environ.get("GKD_REDIS_URL"):
        config.pipeline.redis_url = SecretUrl(os.environ["GKD_REDIS_URL"])  # as `worker` and `inspect` take it
    summary = _with_progress(lambda on_progress: run_pipeline(config, on_progress))
    _out.print(f"[bold green]done[/]: {summary['step']} steps, run {summary['run_id']}")
    if summary.get("startup_s") is not None and summary.get("median_step_s") is not None:
        _out.print(f"  start-up {summary['startup_s']:.1f} s, then {summary['median_step_s']:.3f} s a step (median)")
    _out.print(f"  final student (save_pretrained): {summary['final_dir']}")
    _out.print(
        f"  metrics: {Path(summary['run_dir']) / 'metrics.jsonl'}, TensorBoard: {summary['run_dir']}/tensorboard"
    )
    _out.print(
        f"  samples trained {summary['trained_samples']}, dropped as stale {summary['dropped_stale']}, "
        f"duplicates skipped {summary['duplicates']}, dead letters {summary['dead_letters']}"
    )
    peaks = [
        f"{row['process'].split(' (')[0]} {row['measured_bytes'] / 1e9:.2f} / {row['predicted_bytes'] / 1e9:.2f} GB"
        for row in summary.get("memory", [])
        if row["measured_bytes"] is not None
    ]
    if peaks:
        _out.print(f"  peak memory / ledger's prediction: {', '.join(peaks)} (memory.json)")


@app.command()
def demo(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides on the GKD run."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the data, runs, plot and report go."),
    teacher_steps: int = typer.Option(2000, help="Supervised steps that make the teacher (cached)."),
    student_steps: int = typer.Option(1000, help="At most this many supervised steps warm-start the student."),
    student_target: float = typer.Option(
        0.25, help="The warm start stops at this greedy accuracy on train problems (cached)."
    ),
    teacher: str = typer.Option(
        "tiny:teacher",
        help="Tiny model the teacher is trained from; tiny:teacher-pairs has another tokenizer (then pass "
        "teacher.cross_tokenizer=true).",
    ),
) -> None:
    """Show distillation working: train a tiny teacher on addition, warm-start a smaller student, run GKD,
    report held-out accuracy of teacher, student before and student after, and plot it."""
    from workers.commands.demo import DemoSettings, run_demo

    _prepare_process()
    settings = DemoSettings(
        teacher_steps=teacher_steps,
        student_sft_steps=student_steps,
        student_target_accuracy=student_target,
        teacher=teacher,
    )
    report = _with_progress(
        lambda on_progress: run_demo(
            out, settings, overrides or [], lambda msg: _err.print(f"[dim]demo:[/] {escape(msg)}"), on_progress
        )
    )
    _out.print("[bold]held-out exact-match accuracy[/]")
    _out.print(f"  teacher                {report['teacher_accuracy']:6.1%}")
    _out.print(f"  student before GKD     {report['student_accuracy_before']:6.1%}")
    _out.print(
        f"  student after GKD      {report['student_accuracy_after']:6.1%}  ({report['steps']} steps, "
        f"{report['loss_type']}, {report['gkd_wall_s']:.0f} s)"
    )
    _out.print(f"  plot: {report['plot']}   report: {out / 'report.json'}   run: {report['run_dir']}")


@app.command()
def worker(
    role: str = typer.Argument(..., help="rollout, teacher or learner"),
    args: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Overrides on --config."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config of the run."),
    redis_url: str = typer.Option(
        None,
        "--redis-url",
        help="Redis of the run (default: $GKD_REDIS_URL, then pipeline.redis_url). Prefer the variable for a URL "
        "with a password: a command line is visible to every user of the machine.",
    ),
    run_id: str = typer.Option(None, "--run-id", help="Run to join (default: pipeline.run_id)."),
    rank: int = typer.Option(None, "--rank", help="Learner rank (default: $RANK or 0)."),
    world_size: int = typer.Option(None, "--world-size", help="Learner ranks (default: $WORLD_SIZE or 1)."),
    init_method: str = typer.Option(None, "--init-method", help="torch.distributed init URL for the learner."),
    teacher: str = typer.Option(None, "--teacher", help="With model.teachers: the teacher this scorer scores for."),
) -> None:
    """Run one stage in this process, against an existing run's Redis: add teachers or rollout workers
    on other machines, or run the learner under torchrun."""
    from workers.launch.base import ROLES
    from workers.launch.run import run_standalone

    if role not in ROLES:
        raise GKDError(f"unknown role {role!r}; use one of: {', '.join(ROLES)}")
    cfg = load_config(config, args or [])
    configured = cfg.pipeline.redis_url.get_secret_value() if cfg.pipeline.redis_url is not None else None
    url = redis_url or os.environ.get("GKD_REDIS_URL") or configured
    run = run_id or cfg.pipeline.run_id
    if not url or not run:
        raise GKDError(
            "a standalone worker joins an existing run: give --redis-url and --run-id (or set pipeline.redis_url "
            "and pipeline.run_id); 'gkd-async inspect --redis-url URL' lists the runs a Redis holds"
        )
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if init_method is None and "MASTER_ADDR" in os.environ:
        init_method = "env://"
    _prepare_process()
    if teacher is not None and role != "teacher":
        raise GKDError(f"--teacher names the teacher of a teacher scorer; a {role} worker has none")
    _err.print(f"{role} worker joining run {run}")
    result = run_standalone(role, cfg, url, run, rank, world_size, init_method, teacher)
    _err.print(f"{role} worker finished: {result}")


@app.command()
def inspect(
    redis_url: str = typer.Option(None, "--redis-url", help="Redis to inspect (default: $GKD_REDIS_URL)."),
    run: str = typer.Option(None, "--run", help="Only this run id."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every --interval seconds, with rates."),
    interval: float = typer.Option(2.0, "--interval"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Streams, consumer groups, pending entries, consumers, heartbeats, dead letters and rates."""
    from gkd_async.transport.inspection import add_rates, list_runs, run_snapshot
    from gkd_async.transport.redis_client import connect_redis

    url = redis_url or os.environ.get("GKD_REDIS_URL")
    if not url:
        raise GKDError("give --redis-url (a run's URL is in runs/<run_id>/redis_url) or set GKD_REDIS_URL")
    client = connect_redis(url)
    runs = [run] if run else list_runs(client)
    previous: dict[str, dict] = {}
    while True:
        snapshots = [add_rates(run_snapshot(client, r), previous.get(r)) for r in runs]
        previous = {s["run_id"]: s for s in snapshots}
        if as_json:
            typer.echo(json.dumps(snapshots, indent=2))
        else:
            if watch:
                _out.clear()
            render_inspection(_out, snapshots)
        if not watch:
            return
        time.sleep(interval)


def main() -> None:
    try:
        app()
    except GKDError as exc:
        _err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _err.print("[bold red]interrupted[/]", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
