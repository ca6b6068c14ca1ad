"""Pure logic, tested without a database: key layout, ids, names, part sizes, settings."""

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgdr.catalog import catalog
from pgdr.ops.errors import ConfigError
from pgdr.ops.settings import load_settings
from pgdr.postgres.dsn import display_dsn, strip_password, with_database
from pgdr.postgres.postgres import parse_table_name
from pgdr.storage.repository import MiB, open_repository, validate_key
from pgdr.storage.s3upload import MAX_PART_SIZE, MAX_PARTS, base_part_size, part_size


def test_backup_id_sorts_by_time_and_names_its_tier():
    early = catalog.new_backup_id(datetime(2026, 1, 28, 2, 0, tzinfo=UTC), "daily")
    late = catalog.new_backup_id(datetime(2026, 1, 28, 2, 0, 1, tzinfo=UTC), "pre-deploy")
    assert early.startswith("20260128T020000Z-daily-")
    assert early < late
    parsed = catalog.parse_backup_id(late)
    assert parsed.tier == "pre-deploy"
    assert parsed.started == datetime(2026, 1, 28, 2, 0, 1, tzinfo=UTC)


def test_backup_id_is_utc_whatever_the_offset():
    from zoneinfo import ZoneInfo

    seoul = datetime(2026, 1, 28, 11, 0, tzinfo=ZoneInfo("Asia/Seoul"))
    assert catalog.new_backup_id(seoul, "daily").startswith("20260128T020000Z-daily-")


@pytest.mark.parametrize("bad", ["latest", "../../etc", "20260128T020000Z-bogus-3f2a",
                                 "20260128T020000Z-daily-3f2a/../x", ""])
def test_bad_backup_ids_are_refused(bad):
    with pytest.raises(ConfigError):
        catalog.parse_backup_id(bad)


def test_key_layout():
    prefix = catalog.backup_prefix("fleet", "20260128T020000Z-daily-3f2a")
    assert prefix == "fleet/daily/2026/01/28/20260128T020000Z-daily-3f2a"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "Sales Data", "audit", "ä", "%2F"])
def test_database_names_stay_one_key_component(name):
    component = catalog.database_component(name)
    assert "/" not in component and component not in (".", "..")
    assert component not in catalog.RESERVED_AREAS
    assert catalog.database_from_component(component) == name
    validate_key(component)


@given(st.text(min_size=1, max_size=40))
def test_any_database_name_round_trips_through_a_key(name):
    component = catalog.database_component(name)
    validate_key(component)
    assert catalog.database_from_component(component) == name


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../b", "a//b", "a/./b", "a\\b", "a/b/",
                                 "a\nb", "", "a/%2e%2e/b/..", "http://x"])
def test_keys_cannot_escape_the_repository(key):
    with pytest.raises(ConfigError):
        validate_key(key)


@given(st.lists(st.sampled_from(["a", "..", ".", "", "b.c", "x%y", "/", "\\"]), min_size=1, max_size=6))
def test_validated_keys_never_climb(parts):
    key = "/".join(parts)
    try:
        validate_key(key)
    except ConfigError:
        return
    assert ".." not in key.split("/") and not key.startswith("/")


def test_file_repository_refuses_keys_outside_its_root(tmp_path: Path):
    repo = open_repository(tmp_path.as_uri())
    with pytest.raises(ConfigError):
        repo.put_bytes("../escape", b"x")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("url", ["ftp://x/y", "s3://UPPER/x", "s3://b/../x", "file://host/x",
                                 "file:relative", "s3://bucket/x?versionId=1"])
def test_bad_repository_urls_are_refused(url):
    with pytest.raises(ConfigError):
        open_repository(url)


def test_a_terabyte_fits_in_ten_thousand_parts_even_without_a_size_hint():
    capacity = sum(part_size(n) for n in range(1, MAX_PARTS + 1))
    assert capacity >= 1024**4
    assert all(part_size(n) <= MAX_PART_SIZE for n in range(1, MAX_PARTS + 1))


def test_size_hint_chooses_parts_that_fit_the_database():
    assert base_part_size(None) == 8 * MiB
    assert base_part_size(10 * MiB) == 8 * MiB
    tb = 1024**4
    assert base_part_size(tb) * 9000 >= tb


def test_table_names_are_parsed_as_sql_writes_them():
    assert parse_table_name("vehicles") == ("public", "vehicles")
    assert parse_table_name("Fleet.Vehicles") == ("fleet", "vehicles")
    assert parse_table_name('"Sales Data"."Order Items"') == ("Sales Data", "Order Items")
    assert parse_table_name('public."user"') == ("public", "user")
    assert parse_table_name('"a""b".c') == ('a"b', "c")


@pytest.mark.parametrize("bad", ["a.b.c", "x; DROP TABLE y", '"unterminated', "a b", "", "1abc"])
def test_malformed_table_names_are_refused(bad):
    with pytest.raises(ConfigError):
        parse_table_name(bad)


def test_passwords_are_kept_out_of_urls_and_displays():
    url = "postgresql://app:Very-Secret-1@db.example:6543/fleet"
    assert "Very-Secret-1" not in display_dsn(url)
    stripped = strip_password(url)
    assert "Very-Secret-1" not in stripped
    assert "Very-Secret-1" not in with_database(stripped, "other")
    assert display_dsn(stripped) == "app@db.example:6543/fleet"


def test_runbook_variable_names_are_accepted(tmp_path: Path):
    env = {"DB_HOST": "db.internal", "DB_PORT": "5433", "DB_NAME": "gps", "DB_USER": "backup",
           "DB_PASSWORD": "p@ss:word", "S3_BUCKET": "fleet-backups", "RETENTION_DAYS": "45",
           "AWS_REGION": "ap-northeast-2"}
    settings = load_settings(env, dotenv=tmp_path / "none")
    assert settings.repo_url == "s3://fleet-backups/pgdr"
    assert settings.retention_days["daily"] == 45
    assert settings.aws_region == "ap-northeast-2"
    assert display_dsn(settings.db_url) == "backup@db.internal:5433/gps"
    assert "p@ss:word" in settings.secrets()


def test_dotenv_is_read_under_the_environment(tmp_path: Path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("BACKUP_DIR=/srv/backups\nPGDR_KEEP_VERIFIED=5\n")
    settings = load_settings({"PGDR_KEEP_VERIFIED": "4"}, dotenv=dotenv)
    assert settings.repo_url == "file:///srv/backups"
    assert settings.keep_verified == 4


def test_bad_numbers_in_configuration_are_one_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="PGDR_KEEP_VERIFIED"):
        load_settings({"PGDR_KEEP_VERIFIED": "three"}, dotenv=tmp_path / "none")


_NAME = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1, max_size=30)


@given(_NAME, _NAME)
def test_table_names_round_trip_through_sql_quoting(schema, table):
    """Whatever the names, pgdr quotes both parts (no name is ever SQL), and the quoted
    name parses back to the same names."""
    from pgdr.postgres.postgres import table_identifier

    quoted = table_identifier(schema, table).as_string()
    assert re.fullmatch(r'"(?:[^"]|"")*"\."(?:[^"]|"")*"', quoted, re.DOTALL), quoted
    assert parse_table_name(quoted) == (schema, table)


def test_first_line_of_an_error_is_one_redacted_line():
    from botocore.exceptions import ClientError

    from pgdr.ops.errors import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError("\n  pg_dump: error: no password s3cret given\ndetail")) == (
        "pg_dump: error: no password s3cret given")
    assert first_line(ValueError("no password s3cret given"), ["s3cret"]) == "no password *** given"
    assert first_line("cannot connect to postgresql://fleet:pa55@db:5432/fleet") == (
        "cannot connect to postgresql://fleet:***@db:5432/fleet")
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")
    assert first_line(denied) == "AccessDenied Access Denied"
