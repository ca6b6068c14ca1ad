"""The tables of a selective table recovery: their shape read from the catalog, and the
backup's rows read from the temporary database (counted, and streamed by COPY into the
target)."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgdr.ops.errors import ConfigError, first_line


@dataclass
class TableShape:
    """The columns of a table (in order) and its primary key, read from the catalog."""

    schema: str
    table: str
    name: str  # as SQL writes it, quoted where needed
    columns: list[str]
    types: dict[str, str]
    primary_key: list[str]
    # Columns the server computes or fills (GENERATED ALWAYS AS (...) STORED): never written.
    generated: set[str] = field(default_factory=set)
    partitioned: bool = False

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    @property
    def own_rows(self) -> sql.Composable:
        """The table as a source of its own rows: ONLY the table (never an inheritance
        child's rows), but all of a partitioned table, whose rows live in its partitions."""
        return self.ident if self.partitioned else sql.SQL("ONLY {}").format(self.ident)


_COLUMNS_SQL = """
SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attgenerated <> ''
FROM pg_catalog.pg_attribute a
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PRIMARY_KEY_SQL = """
SELECT a.attname
FROM pg_catalog.pg_constraint c
CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
WHERE c.conrelid = %(oid)s AND c.contype = 'p'
ORDER BY k.position
"""

_TABLE_OID_SQL = """
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind = 'p'
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""


def table_shape(conn: psycopg.Connection, schema: str, table: str) -> TableShape | None:
    """The table's shape, or None when the database has no such table. Type names are
    written schema-qualified (search_path is only pg_catalog while they are read), so
    that they mean the same in another database."""
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        row = conn.execute(_TABLE_OID_SQL, (schema, table)).fetchone()
        if row is None:
            return None
        columns = conn.execute(_COLUMNS_SQL, {"oid": row[0]}).fetchall()
        key = [r[0] for r in conn.execute(_PRIMARY_KEY_SQL, {"oid": row[0]})]
    return TableShape(schema, table, row[1], [c[0] for c in columns], {c[0]: c[1] for c in columns}, key,
                      {c[0] for c in columns if c[2]}, bool(row[2]))


def column_list(names: list[str], alias: str | None = None) -> sql.Composable:
    """Column names as SQL lists them, each qualified by alias when given."""
    if alias is None:
        return sql.SQL(", ").join(map(sql.Identifier, names))
    return sql.SQL(", ").join(sql.Identifier(alias, name) for name in names)


def source_query(shape: TableShape, select: sql.Composable, row_filter: str | None) -> sql.Composed:
    """SELECT select from the table's own rows, where the row filter holds."""
    query = sql.SQL("SELECT {} FROM {}").format(select, shape.own_rows)
    if row_filter is not None:
        # Checked by check_row_filter: one expression that cannot leave its parentheses.
        query = sql.SQL("{} WHERE ({})").format(query, sql.SQL(row_filter))  # type: ignore[arg-type]
    return query


def count_source_rows(conn: psycopg.Connection, shape: TableShape, row_filter: str | None) -> int:
    """Rows of the backup's table that pass the filter. prepare=True sends the query by
    the extended protocol, which refuses more than one statement; the connection is
    read-only, so the filter cannot write even through a function."""
    query = source_query(shape, sql.SQL("count(*)"), row_filter)
    try:
        return int(conn.execute(query, prepare=True).fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        conn.rollback()
        raise ConfigError(f"the row filter does not work on {shape.name}: {first_line(exc)}") from None


def stream_rows(source: psycopg.Connection, target: psycopg.Connection, shape: TableShape,
                columns: list[str], destination: sql.Composable, row_filter: str | None) -> int:
    """COPY the backup's rows out of the temporary database and into `destination` on
    the target, chunk by chunk. Returns the rows copied."""
    out_query = sql.SQL("COPY ({}) TO STDOUT").format(source_query(shape, column_list(columns), row_filter))
    in_query = sql.SQL("COPY {} ({}) FROM STDIN").format(destination, column_list(columns))
    with source.cursor() as out_cur, target.cursor() as in_cur:
        with out_cur.copy(out_query) as reader, in_cur.copy(in_query) as writer:
            for chunk in reader:
                writer.write(chunk)
        return in_cur.rowcount
