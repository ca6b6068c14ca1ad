"""What a database is beyond its tables: the database's own properties, and the roles it
refers to.

pg_dump writes the objects inside a database. The database itself (owner, ACL, connection
limit, `ALTER DATABASE ... SET`, `ALTER ROLE ... IN DATABASE ... SET`, comment) is read in
the backup's snapshot into the manifest, and applied by every restore to the database it
created, before that database takes the real name.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from tasks.errors import PgdrError

_PROPERTIES_SQL = """
SELECT pg_catalog.pg_get_userbyid(d.datdba), d.datconnlimit,
       pg_catalog.shobj_description(d.oid, 'pg_database'),
       (SELECT coalesce(json_agg(json_build_object(
                  'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
                  'privilege', a.privilege_type, 'grantable', a.is_grantable)
                ORDER BY a.grantee, a.privilege_type), '[]')
        FROM pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a)
FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()
"""

_SETTINGS_SQL = """
SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(s.setrole) END, c.setting
FROM pg_catalog.pg_db_role_setting s
JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
CROSS JOIN LATERAL unnest(s.setconfig) WITH ORDINALITY AS c(setting, position)
WHERE d.datname = pg_catalog.current_database()
ORDER BY 1 NULLS FIRST, c.position
"""

_GRANTEES_SQL = """
SELECT DISTINCT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END
FROM pg_catalog.pg_database d,
     pg_catalog.aclexplode(coalesce(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
WHERE d.datname = %s
"""

# Settings whose value is a list of names: pg_dump writes each element as its own literal
# (one literal would become one element). The same list as pg_dump's.
_LIST_SETTINGS = {"local_preload_libraries", "search_path", "session_preload_libraries",
                  "shared_preload_libraries", "temp_tablespaces", "unix_socket_directories"}


_DATABASE_PRIVILEGES = ("CONNECT", "CREATE", "TEMPORARY")


def read_properties(conn: psycopg.Connection) -> dict[str, Any]:
    """The connected database's own properties, as the manifest stores them."""
    owner, limit, comment, acl = conn.execute(_PROPERTIES_SQL).fetchone()  # type: ignore[misc]
    settings = []
    for role, setting in conn.execute(_SETTINGS_SQL):
        name, _, value = setting.partition("=")
        settings.append({"role": role, "name": name, "value": value})
    return {"owner": owner, "connection_limit": limit, "comment": comment, "acl": acl, "settings": settings}


def split_list_setting(value: str) -> list[str]:
    """A list setting as PostgreSQL stores it (`"$user", public`) -> its elements."""
    elements, i, n = [], 0, len(value)
    while i < n:
        while i < n and value[i] in " \t,":
            i += 1
        if i >= n:
            break
        if value[i] == '"':
            j, element = i + 1, []
            while j < n:
                if value[j] == '"':
                    if value.startswith('""', j):
                        element.append('"')
                        j += 2
                        continue
                    break
                element.append(value[j])
                j += 1
            elements.append("".join(element))
            i = j + 1
        else:
            j = value.find(",", i)
            j = n if j < 0 else j
            elements.append(value[i:j].strip())
            i = j
    return elements


def setting_value(name: str, value: str) -> sql.Composable:
    """The value of `SET name TO ...` that stores exactly `value` again."""
    if name.lower() in _LIST_SETTINGS:
        return sql.SQL(", ").join(sql.Literal(element) for element in split_list_setting(value))
    return sql.Literal(value)


def _setting_name(name: str) -> sql.Composable:
    # A custom setting (`app.tenant`) is two names joined by a dot.
    return sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))


def _privilege(name: str) -> sql.Composable:
    if name not in _DATABASE_PRIVILEGES:
        raise PgdrError(f"the manifest names an unknown database privilege {name!r}")
    return sql.SQL(name)  # type: ignore[arg-type]


def _role(name: str | None) -> sql.Composable:
    return sql.SQL("PUBLIC") if name is None else sql.Identifier(name)


def close_to_public(conn: psycopg.Connection, dbname: str) -> None:
    """A new database accepts connections from every role (PUBLIC has CONNECT) until its
    own ACL is applied: close it while it is being restored."""
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(dbname)))


def existing_roles(conn: psycopg.Connection, names: list[str]) -> set[str]:
    rows = conn.execute("SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s)", (names,))
    return {row[0] for row in rows}


def apply_properties(conn: psycopg.Connection, dbname: str, properties: dict[str, Any], *,
                     owner: bool = True, acl: bool = True) -> list[str]:
    """Give database `dbname` the backed-up database's properties: owner (unless not
    `owner`), ACL (unless not `acl`: then PostgreSQL's default ACL), connection limit,
    settings and comment. A setting of a role this server lacks cannot be applied: it is
    skipped and named in the returned list."""
    db = sql.Identifier(dbname)
    roles = {s["role"] for s in properties["settings"] if s["role"]}
    if owner:
        roles.add(properties["owner"])
    if acl:
        roles |= {a["grantee"] for a in properties["acl"] if a["grantee"]}
    present = existing_roles(conn, sorted(roles))
    skipped: list[str] = []
    with conn.transaction():
        if owner:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                db, sql.Identifier(properties["owner"])))
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            db, sql.Literal(int(properties["connection_limit"]))))
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(properties["comment"])))
        for setting in properties["settings"]:
            name, value = _setting_name(setting["name"]), setting_value(setting["name"], setting["value"])
            if setting["role"] is None:
                conn.execute(sql.SQL("ALTER DATABASE {} SET {} TO {}").format(db, name, value))
            elif setting["role"] in present:
                conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} TO {}").format(
                    sql.Identifier(setting["role"]), db, name, value))
            else:
                skipped.append(f"{setting['name']} of role {setting['role']}")
        if acl:
            holders = [row[0] for row in conn.execute(_GRANTEES_SQL, (dbname,))]
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(
                db, sql.SQL(", ").join(_role(name) for name in holders)))
            for entry in properties["acl"]:
                conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    _privilege(entry["privilege"]), db, _role(entry["grantee"]),
                    sql.SQL(" WITH GRANT OPTION" if entry["grantable"] else "")))
        else:  # PostgreSQL's default, which close_to_public took away
            conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(db))
    return skipped
