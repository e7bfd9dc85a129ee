"""`deepseek-serve keys create|list|revoke`: API keys (the secret is printed once, at creation)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from deepseek_serve.cli._common import fail, settings_from_cli
from deepseek_serve.cli.db import DatabaseUrlOpt, run_db

# the ranges of the database columns: rpm/tpm limits are INTEGER, key ids BIGINT
INT32_MAX = 2**31 - 1
MAX_KEY_ID = 2**63 - 1

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from deepseek_serve.storage.keys import CreatedKey, KeyInfo

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
console = Console()


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="who or what the key is for")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="add the admin scope (keys, usage)")] = False,
    rpm: Annotated[
        int | None, typer.Option(min=0, max=INT32_MAX, help="requests/minute; default DS_DEFAULT_RPM")
    ] = None,
    tpm: Annotated[int | None, typer.Option(min=0, max=INT32_MAX, help="tokens/minute; default DS_DEFAULT_TPM")] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="lifetime such as 30d or 12h (at most 100 years); default never")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Create a key and print its secret. It is shown only this once: store it now."""
    from deepseek_serve.serving.schemas import check_text
    from deepseek_serve.storage.db import create_session_factory
    from deepseek_serve.storage.keys import KeyRepository
    from deepseek_serve.storage.retention import parse_duration

    settings = settings_from_cli(database_url=database_url)
    try:
        check_text(name)
    except ValueError as exc:
        fail(f"invalid --name: {exc}")
    if not 1 <= len(name) <= 128:
        fail("invalid --name: 1 to 128 characters")
    try:
        lifetime = parse_duration(expires_in) if expires_in else None
    except ValueError as exc:
        fail(str(exc))

    async def work(engine: AsyncEngine) -> CreatedKey:
        repo = KeyRepository(create_session_factory(engine))
        return await repo.create(name, admin=admin, rpm_limit=rpm, tpm_limit=tpm, expires_in=lifetime)

    created = run_db(settings, work, auto_migrate=True)
    if as_json:
        typer.echo(json.dumps({**created.info.to_dict(), "key": created.secret}))
        return
    info = created.info
    console.print(
        f"created key {info.id} '{info.name}' scopes={','.join(sorted(info.scopes))}"
        + (f" expires={info.expires_at.isoformat(timespec='seconds')}Z" if info.expires_at else "")
    )
    console.print("secret (shown only once):")
    typer.echo(created.secret)


@keys_app.command("list")
def list_keys(
    show_all: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Keys with their prefix, scopes, limits and dates (never the secret)."""
    from deepseek_serve.storage.db import create_session_factory
    from deepseek_serve.storage.keys import KeyRepository

    settings = settings_from_cli(database_url=database_url)

    async def work(engine: AsyncEngine) -> list[KeyInfo]:
        return await KeyRepository(create_session_factory(engine)).list(include_revoked=show_all)

    keys = run_db(settings, work, auto_migrate=True)
    if as_json:
        typer.echo(json.dumps([k.to_dict() for k in keys]))
        return
    table = Table("id", "name", "prefix", "scopes", "rpm", "tpm", "created", "expires", "last used", "revoked")
    for k in keys:
        d = k.to_dict()
        table.add_row(
            str(k.id),
            k.name,
            k.display_prefix,
            ",".join(sorted(k.scopes)),
            str(k.rpm_limit or "-"),
            str(k.tpm_limit or "-"),
            str(d["created_at"]),
            str(d["expires_at"] or "-"),
            str(d["last_used_at"] or "-"),
            str(d["revoked_at"] or "-"),
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(
    key_id: Annotated[int, typer.Argument(min=1, max=MAX_KEY_ID, help="key id, as shown by `keys list`")],
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Revoke a key. Running servers refuse it within DS_KEY_CACHE_TTL_S seconds."""
    from deepseek_serve.storage.db import create_session_factory
    from deepseek_serve.storage.keys import KeyRepository

    settings = settings_from_cli(database_url=database_url)

    async def work(engine: AsyncEngine) -> KeyInfo | None:
        return await KeyRepository(create_session_factory(engine)).revoke(key_id)

    info = run_db(settings, work, auto_migrate=True)
    if info is None:
        fail(f"no key with id {key_id}")
    console.print(f"revoked key {info.id} '{info.name}' ({info.display_prefix})")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
