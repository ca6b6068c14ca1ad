"""What a database is beyond its tables: the database's own properties, and the roles it
refers to.

pg_dump writes the objects inside a database. The database itself (owner, ACL, connection
limit, `ALTER DATABASE ... SET`, `ALTER ROLE ... IN DATABASE ... SET`, comment) is read in
the backup's snapshot into the manifest, and applied by every restore to the database it
created, before that database takes the real name.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from pgdr.ops.errors import PgdrError
from pgdr.pipeline.process import run
from pgdr.postgres import postgres, programs
from pgdr.restore.tags import stopped_writes_tag

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
    if (stopped := stopped_writes_tag(comment)) is not None:
        # --stop-writes-first is closing it for a restore: its own limit and comment are in the tag.
        limit, comment = stopped["connection_limit"], stopped["comment"]
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


def open_to_public(conn: psycopg.Connection, dbname: str) -> None:
    """PostgreSQL's default database ACL, which close_to_public took away."""
    conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO PUBLIC").format(sql.Identifier(dbname)))


def existing_roles(conn: psycopg.Connection, names: list[str]) -> set[str]:
    rows = conn.execute("SELECT rolname FROM pg_catalog.pg_roles WHERE rolname = ANY(%s)", (names,))
    return {row[0] for row in rows}


def apply_properties(conn: psycopg.Connection, dbname: str, properties: dict[str, Any], *,
                     owner: bool = True, acl: bool = True, comment: bool = True) -> list[str]:
    """Give database `dbname` the backed-up database's properties: owner (unless not
    `owner`), ACL (unless not `acl`: then PostgreSQL's default ACL), connection limit,
    settings and comment (unless not `comment`: a restore carries it in pgdr's tag until
    the database takes its name). A setting of a role this server lacks cannot be applied:
    it is skipped and named in the returned list."""
    db = sql.Identifier(dbname)
    present = existing_roles(conn, sorted({s["role"] for s in properties["settings"] if s["role"]}))
    skipped: list[str] = []
    with conn.transaction():
        if owner:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                db, sql.Identifier(properties["owner"])))
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
            db, sql.Literal(int(properties["connection_limit"]))))
        if comment:
            conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                db, sql.Literal(properties["comment"])))
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
            # Without the backed-up owner, its own privileges go to the database's owner here.
            here = conn.execute("SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database"
                                " WHERE datname = %s", (dbname,)).fetchone()[0]  # type: ignore[index]
            holders = [row[0] for row in conn.execute(_GRANTEES_SQL, (dbname,))]
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(
                db, sql.SQL(", ").join(_role(name) for name in holders)))
            for entry in properties["acl"]:
                grantee = here if entry["grantee"] == properties["owner"] and not owner else entry["grantee"]
                conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    _privilege(entry["privilege"]), db, _role(grantee),
                    sql.SQL(" WITH GRANT OPTION" if entry["grantable"] else "")))
        else:
            open_to_public(conn, dbname)
    return skipped


# --- roles and tablespaces -------------------------------------------------------------------

# Roles the objects of this database depend on, by kind: owners, grantees (ACLs), roles
# named by row-level security policies. pg_shdepend records every role but the bootstrap
# superuser, which is added when it owns something pg_dump writes an owner for.
_ROLE_REFERENCES_SQL = """
WITH db AS (SELECT oid, datdba FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
SELECT DISTINCT CASE s.deptype WHEN 'o' THEN 'owner' WHEN 'a' THEN 'acl' ELSE 'policy' END, r.rolname
FROM pg_catalog.pg_shdepend s CROSS JOIN db JOIN pg_catalog.pg_roles r ON r.oid = s.refobjid
WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype IN ('o', 'a', 'r')
  AND (s.dbid = db.oid OR (s.dbid = 0 AND s.classid = 'pg_catalog.pg_database'::pg_catalog.regclass
                           AND s.objid = db.oid))
UNION
SELECT 'owner', pg_catalog.pg_get_userbyid(10) FROM db
WHERE db.datdba = 10
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relowner = 10 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\\_%')
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
              WHERE n.nspowner = 10 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\\_%')
   OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
              WHERE p.proowner = 10 AND n.nspname NOT IN ('pg_catalog', 'information_schema'))
ORDER BY 1, 2
"""

_TABLESPACES_SQL = """
SELECT DISTINCT t.spcname FROM pg_catalog.pg_tablespace t
WHERE t.spcname NOT IN ('pg_default', 'pg_global')
  AND (t.oid IN (SELECT reltablespace FROM pg_catalog.pg_class)
       OR t.oid = (SELECT dattablespace FROM pg_catalog.pg_database
                   WHERE datname = pg_catalog.current_database()))
ORDER BY 1
"""

ROLE_KINDS = ("owner", "acl", "policy", "settings")

_NAME = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_SUBJECT = re.compile(
    rf"^(?:CREATE ROLE|ALTER ROLE|COMMENT ON ROLE|SECURITY LABEL FOR \S+ ON ROLE) ({_NAME})")
_MEMBERSHIP = re.compile(rf"^GRANT ({_NAME}) TO ({_NAME})(.*?)(?: GRANTED BY {_NAME})?;$", re.DOTALL)


def read_role_references(conn: psycopg.Connection, properties: dict[str, Any]) -> dict[str, list[str]]:
    """The roles the connected database refers to, by kind (ROLE_KINDS). Predefined roles
    (pg_*) exist on every server and are left out."""
    found: dict[str, set[str]] = {kind: set() for kind in ROLE_KINDS}
    for kind, role in conn.execute(_ROLE_REFERENCES_SQL):
        found[kind].add(role)
    found["owner"].add(properties["owner"])
    # The owner's own privileges are the owner's: --no-owner restores them to the new owner.
    found["acl"] |= {a["grantee"] for a in properties["acl"]
                     if a["grantee"] not in (None, properties["owner"])}
    found["settings"] |= {s["role"] for s in properties["settings"] if s["role"]}
    return {kind: sorted(r for r in roles if not r.startswith("pg_")) for kind, roles in found.items()}


def read_tablespaces(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute(_TABLESPACES_SQL)]


def missing_tablespaces(conn: psycopg.Connection, names: list[str]) -> list[str]:
    rows = conn.execute("SELECT spcname FROM pg_catalog.pg_tablespace WHERE spcname = ANY(%s)", (names,))
    return sorted(set(names) - {row[0] for row in rows})


def unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def statements(script: str) -> list[str]:
    """The SQL statements of a pg_dumpall script: split at `;` outside quotes, without
    comments, psql meta-commands and SET lines."""
    found: list[str] = []
    current: list[str] = []
    quote = ""
    for line in script.splitlines(keepends=True):
        if not quote and not current and (not line.strip() or line.startswith(("--", "\\", "SET "))):
            continue
        for char in line:
            current.append(char)
            if quote:
                quote = "" if char == quote else quote  # a doubled quote closes and reopens
            elif char in "'\"":
                quote = char
            elif char == ";":
                found.append("".join(current).strip())
                current = []
    return found


def with_groups(script: list[str], roles: set[str]) -> set[str]:
    """The roles, and the roles they are members of (and theirs), by the script's GRANTs."""
    found = set(roles)
    grown = True
    while grown:
        grown = False
        for statement in script:
            grant = _MEMBERSHIP.match(statement)
            if grant and unquote(grant[2]) in found and unquote(grant[1]) not in found:
                found.add(unquote(grant[1]))
                grown = True
    return found


def roles_script(script: str, references: dict[str, list[str]]) -> list[str]:
    """The statements of `pg_dumpall --roles-only` about the referenced roles and, through
    their memberships, the roles they are members of."""
    parsed = statements(script)
    wanted = with_groups(parsed, {role for roles in references.values() for role in roles})
    kept = []
    for statement in parsed:
        subject, grant = _SUBJECT.match(statement), _MEMBERSHIP.match(statement)
        if (subject and unquote(subject[1]) in wanted) or (grant and unquote(grant[2]) in wanted):
            kept.append(statement)
    return kept


def dump_roles(db_url: str, dbname: str, references: dict[str, list[str]], server_major: int,
               secrets: list[str] | None = None) -> list[str]:
    """pg_dumpall --roles-only --no-role-passwords (it works on RDS), filtered by roles_script."""
    argv = [programs.pg_bin("pg_dumpall", server_major), "--roles-only", "--no-role-passwords",
            "--no-password", f"--database={dbname}"]
    with postgres.libpq_env(db_url) as env:
        return roles_script(run(argv, env=env, secrets=secrets or []), references)


def needed_roles(references: dict[str, list[str]], *, no_owner: bool, no_acl: bool) -> set[str]:
    """The roles a restore cannot do without (role settings are skipped when missing)."""
    needed = set(references.get("policy", []))
    if not no_owner:
        needed |= set(references.get("owner", []))
    if not no_acl:
        needed |= set(references.get("acl", []))
    return needed


def create_roles(conn: psycopg.Connection, script: list[str], missing: set[str]) -> list[str]:
    """Create the `missing` roles from the backup's role statements (no passwords: a
    created role cannot log in with one until it is given one), with their memberships.
    Roles the server already has are never altered. One transaction; returns the roles
    created."""
    absent = with_groups(script, missing)
    absent -= existing_roles(conn, sorted(absent))
    with conn.transaction():
        for statement in script:
            subject, grant = _SUBJECT.match(statement), _MEMBERSHIP.match(statement)
            if subject and unquote(subject[1]) in absent:
                conn.execute(statement.encode())
            elif grant and unquote(grant[2]) in absent:
                # Without GRANTED BY: the grantor may not exist here.
                conn.execute(sql.SQL("GRANT {} TO {}{}").format(
                    sql.Identifier(unquote(grant[1])), sql.Identifier(unquote(grant[2])),
                    sql.SQL(" WITH ADMIN OPTION" if "ADMIN OPTION" in grant[3] else "")))
    return sorted(absent)
