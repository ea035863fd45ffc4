"""The `gkd-async` command: a typer app whose commands turn GKDError into one clear message."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from gkd_async import __version__
from gkd_async.config import dump_config, load_config
from gkd_async.errors import GKDError

app = typer.Typer(help="On-policy knowledge distillation with an async Redis-streams pipeline.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
_err = Console(stderr=True)


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: a first argument without '=' is the config file."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@config_app.command("show")
def config_show(
    args: list[str] = typer.Argument(None, metavar="[CONFIG] [KEY=VALUE]...", help="YAML file, then overrides."),
) -> None:
    """Print the resolved config: defaults, then the file, then the overrides."""
    path, overrides = split_config_args(args or [])
    typer.echo(dump_config(load_config(path, overrides)), nl=False)


def main() -> None:
    try:
        app()
    except GKDError as exc:
        _err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
