"""PostgreSQL's archive_command and restore_command: `pgdr wal-push` and `pgdr wal-fetch`.

They run once per WAL segment: this module imports no Prefect, boto3 (for a file
repository), psycopg, rich, nor the command-line parser (flows.cli.main binds their
plain command lines itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.cli import render
from flows.cli.common import CommandExit, command, settings
from flows.cli.results import WalFetchResult, WalPushResult
from pgdr.ops.errors import PgdrError


def wal_target(repo: str | None, name: str | None, server_url: str | None = None) -> tuple[Any, Any, str]:
    """(settings, repository, database name) for the WAL commands: the name given, else
    PGDR_WAL_DB, else the database of the server's URL (DATABASE_URL)."""
    from pgdr.storage.repository import open_repository

    config = settings()
    database = name or config.wal_db
    if not database and (server_url or config.db_url):
        from pgdr.postgres.dsn import database_name

        database = database_name(server_url or config.db_url)
    if not database:
        from pgdr.ops.errors import ConfigError

        raise ConfigError("name the database the WAL belongs to: --db NAME, PGDR_WAL_DB or DATABASE_URL")
    repository = open_repository(repo or config.repo_url, sse=config.s3_sse,
                                 kms_key_id=config.s3_kms_key_id, region=config.aws_region)
    return config, repository, database


@command(render.show_nothing, runs_flow=False)
def wal_push(path: str, /, *, repo: str | None = None, db: str | None = None,
             encrypt_to: str | None = None, jobs: int = 1, spool: str | None = None,
             json: bool = False) -> WalPushResult:
    """Archive one WAL file (PostgreSQL's archive_command).

    Args:
        path: the WAL file (%p)
        repo: repository URL
        db: database name the WAL is archived under
        encrypt_to: gpg recipient to encrypt to (KEYID)
        jobs: push up to N-1 more segments PostgreSQL marked ready, in parallel
        spool: where pushes ahead are noted (with --jobs; writable by the postgres user)
        json: print one JSON object on stdout
    """
    from pgdr.pitr import wal

    config, repository, database = wal_target(repo, db)
    options = {"encrypt_to": encrypt_to or config.encrypt_to, "gpg_homedir": config.gpg_homedir,
               "zstd_level": config.zstd_level}
    if jobs > 1:
        if not spool:
            from pgdr.ops.errors import ConfigError

            raise ConfigError("--jobs above 1 needs --spool DIR (where pushes ahead are noted)")
        result = wal.push_ahead(repository, database, Path(path), Path(spool), jobs, **options)
    else:
        result = wal.push(repository, database, Path(path), **options)
    # Not copied to PGDR_REPLICA_REPO here: a second repository (an S3 client, ~1 s of CPU)
    # for every segment would undo the light push. `pgdr replicate --all` copies the WAL.
    return {"name": result.name, "key": result.key, "stored": result.stored, "size_bytes": result.size,
            "wal_bytes": result.wal_size, "database": database, "repository": repository.url}


@command(render.show_nothing, runs_flow=False)
def wal_fetch(name: str, path: str, /, *, repo: str | None = None, db: str | None = None,
              json: bool = False) -> WalFetchResult:
    """Restore one archived WAL file (PostgreSQL's restore_command).

    Args:
        name: the WAL file name (%f)
        path: where to write it (%p)
        repo: repository URL
        db: database name the WAL is archived under
        json: print one JSON object on stdout
    """
    from pgdr.ops.errors import NotFoundError, first_line
    from pgdr.pitr import wal

    try:
        config, repository, database = wal_target(repo, db)
        size = wal.fetch(repository, database, name, Path(path), gpg_homedir=config.gpg_homedir,
                         passphrase=config.gpg_passphrase)
    except NotFoundError as exc:
        # The end of the archive, as recovery expects to find it.
        raise CommandExit(str(exc), wal.FETCH_NOT_FOUND, quiet=True) from None
    except Exception as exc:
        # Anything else must stop recovery rather than look like the end of the archive.
        reason = str(exc) if isinstance(exc, PgdrError) else f"{type(exc).__name__}: {exc}"
        raise CommandExit(f"{first_line(reason)} (wal-fetch aborts recovery)",
                          wal.FETCH_ABORT_RECOVERY) from None
    return {"name": name, "path": path, "wal_bytes": size, "database": database}
