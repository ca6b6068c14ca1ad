"""PostgreSQL helpers for tests: the session server, SQL loading, exact fingerprints."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from pgdr.postgres.cluster import LocalCluster
from tests.support.secrets import PG_SECRET_PASSWORD, PG_SECRET_ROLE


@dataclass(frozen=True)
class PgServer:
    """The test session's PostgreSQL server (the `pg` fixture)."""

    cluster: LocalCluster
    secret_role: str = PG_SECRET_ROLE
    secret_password: str = PG_SECRET_PASSWORD

    @property
    def port(self) -> int:
        return self.cluster.port

    def url(self, db: str = "postgres") -> str:
        """A superuser URL with no password (trust authentication)."""
        return self.cluster.url(db)

    def secret_url(self, db: str = "postgres") -> str:
        """A URL carrying the password role's password, which must never leak."""
        return self.cluster.url(db, user=self.secret_role, password=self.secret_password)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def load_sql(self, url: str, path: Path) -> None:
        """Run a SQL script with psql, stopping at the first error."""
        result = subprocess.run(
            [str(self.cluster.bin_dir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-d", url, "-f", str(path)],
            capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise AssertionError(f"loading {path.name} failed:\n{result.stderr[-4000:]}")


_TABLES = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1
"""

_SEQUENCES = """
SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value::text
FROM pg_sequences ORDER BY 1
"""

_LARGE_OBJECTS = "SELECT oid::text, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY oid"


def table_fingerprints(url: str) -> dict[str, str]:
    """Everything a logical restore must reproduce, as comparable strings.

    - `schema.table` (each part as quote_ident writes it, e.g. `"Sales Data"."Order Items"`):
      md5 of the table's rows as text, in row-text order (a partitioned table covers
      its partitions, which also appear on their own);
    - `sequence:schema.name`: its last_value ("None" if never called);
    - `large_object:<oid>`: md5 of the large object's data.
    """
    prints: dict[str, str] = {}
    with psycopg.connect(url) as conn:
        for key, schema, table in conn.execute(_TABLES).fetchall():
            query = sql.SQL(
                "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
                "FROM {} AS t"
            ).format(sql.Identifier(schema, table))
            prints[key] = conn.execute(query).fetchone()[0]
        for key, last_value in conn.execute(_SEQUENCES).fetchall():
            prints[f"sequence:{key}"] = str(last_value)
        for oid, digest in conn.execute(_LARGE_OBJECTS).fetchall():
            prints[f"large_object:{oid}"] = digest
    return prints


def counts_in(url: str) -> dict[str, int]:
    """Rows per table, keyed as pgdr's manifests key them."""
    from pgdr.postgres.postgres import connect, count_rows

    with connect(url) as conn:
        return count_rows(conn)
