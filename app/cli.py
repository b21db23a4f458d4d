"""The `prefixserve` console script."""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.config import SettingsError, load_settings
from app.logs import configure_logging

cli = typer.Typer(
    help="prefixserve: many prefix-tuned virtual models on one frozen LLM.", no_args_is_help=True
)
log = logging.getLogger("prefixserve")


@cli.callback()
def _logging(ctx: typer.Context) -> None:
    # Once for every command, before it runs. `train` draws a progress bar: INFO lines would tear it.
    try:
        settings = load_settings()
    except SettingsError:
        return  # the command reports it when it loads its settings (and `--help` still works)
    level = settings.log_level
    if ctx.invoked_subcommand == "train" and level == "INFO":
        level = "WARNING"
    configure_logging(level, json_format=settings.log_json)


def _settings(**overrides: object):  # type: ignore[no-untyped-def]
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default PREFIXSERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PREFIXSERVE_PORT).")] = None,
) -> None:
    """Start the HTTP server (the embedded default needs no other service). SIGTERM stops it gracefully:
    in-flight requests get PREFIXSERVE_SHUTDOWN_GRACE_S to finish (app/server.py)."""
    # the CLI imports each command's modules only when that command runs (fast --help)
    from app.main import create_app
    from app.server import serve as run_server  # the same reason

    settings = _settings(host=host, port=port)
    run_server(create_app(settings), settings)


@cli.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (run once per deployment, before the replicas start)."""
    # the CLI imports each command's modules only when that command runs (fast --help)
    from app.db.migrate import current, upgrade

    settings = _settings()
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url, revision)
    log.info("database at revision %s", current(url))


@cli.command()
def worker(
    burst: Annotated[bool, typer.Option(help="Run the jobs waiting now, then exit.")] = False,
    check: Annotated[bool, typer.Option(help="Exit 0 if a worker on this Redis is alive (health check).")] = False,
) -> None:
    """Run training jobs from the Redis queue (needs PREFIXSERVE_REDIS_URL; loads its own copy of the model)."""
    settings = _settings()
    if not settings.redis_url:
        typer.echo("error: prefixserve worker needs PREFIXSERVE_REDIS_URL (without Redis, the server's in-process "
                   "worker runs the jobs)", err=True)
        raise typer.Exit(2)
    # the CLI imports each command's modules only when that command runs (fast --help)
    from app.worker import build_worker, check_health

    if check:
        raise typer.Exit(0 if check_health(settings) else 1)
    build_worker(settings, burst=burst).run()


class TrainKind(enum.StrEnum):
    """What `prefixserve train` learns (the fine-tuning API's `kind`)."""

    prefix_tuning = "prefix_tuning"  # per-layer keys/values
    prompt_tuning = "prompt_tuning"  # a soft prompt: learned input embeddings


@cli.command()
def train(
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training examples (JSONL).")],
    name: Annotated[str, typer.Option(help="The prefix to train (a new name, or the next version of yours).")],
    validation: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="Validation JSONL.")] = None,
    server: Annotated[str | None, typer.Option(help="Server URL; without it, train in this process.")] = None,
    api_key: Annotated[str | None, typer.Option(help="The tenant's API key (with --server).")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant name without --server (created if missing).")] = "default",
    model: Annotated[str | None, typer.Option(help="Base model id (default: the served one).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (wins over --epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    num_virtual_tokens: Annotated[int | None, typer.Option(help="Prefix length P.")] = None,
    prefix_projection: Annotated[bool | None, typer.Option(help="Li & Liang's MLP reparameterization.")] = None,
    kind: Annotated[TrainKind | None, typer.Option(help="What to learn (default prefix_tuning).")] = None,
    warm_start: Annotated[str | None, typer.Option(help="Start from your prefix `name[@version]`.")] = None,
    validation_split: Annotated[float | None, typer.Option(help="Fraction held out for validation.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Train a prefix on a JSONL file with a live progress bar; print the model name to use at the end."""
    # the CLI imports each command's modules only when that command runs (fast --help)
    from rich.console import Console

    from app.cli_progress import TrainOptions  # the same reason
    from app.cli_train import TrainCommandError, train_local, train_remote  # the same reason

    settings = _settings()
    opts = TrainOptions(
        name=name, model=model,
        hyperparameters={"n_epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
                         "learning_rate": learning_rate, "checkpoint_every": checkpoint_every},
        options={"kind": kind.value if kind else None,
                 "num_virtual_tokens": num_virtual_tokens, "prefix_projection": prefix_projection,
                 "warm_start": warm_start, "validation_split": validation_split, "seed": seed},
    )
    console = Console(soft_wrap=True)  # long lines (an API key, an error) stay whole in logs and pipes
    try:
        if server is not None:
            if not api_key:
                typer.echo("error: --server needs --api-key (a tenant key with the manage scope)", err=True)
                raise typer.Exit(2)
            ok = train_remote(data=data, validation=validation, opts=opts, server=server, api_key=api_key,
                              console=console)
        else:
            ok = train_local(data=data, validation=validation, opts=opts, settings=settings, tenant=tenant,
                             console=console)
    except TrainCommandError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    try:
        cli()
    except SettingsError as exc:  # pragma: no cover - surfaced by typer normally
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
