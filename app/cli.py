"""The `prefixserve` console script."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from app.config import SettingsError, load_settings
from app.logs import configure_logging

cli = typer.Typer(
    help="prefixserve: many prefix-tuned virtual models on one frozen LLM.", no_args_is_help=True
)
log = logging.getLogger("prefixserve")


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
    """Start the HTTP server (the embedded default needs no other service)."""
    import uvicorn

    from app.main import create_app

    settings = _settings(host=host, port=port)
    configure_logging(settings.log_level, json_format=settings.log_json)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


@cli.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (run once per deployment, before the replicas start)."""
    from app.db.migrate import current, upgrade

    settings = _settings()
    configure_logging(settings.log_level, json_format=settings.log_json)
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url, revision)
    log.info("database at revision %s", current(url))


def main() -> None:
    try:
        cli()
    except SettingsError as exc:  # pragma: no cover - surfaced by typer normally
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
