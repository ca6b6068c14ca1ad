# syntax=docker/dockerfile:1
# The pgdr worker image: what a Docker or ECS work pool runs each flow run in
# (prefect.yaml, docs/fleet.md). Everything in it is pinned:
#   - the base image (Debian 12 "bookworm", Python 3.11);
#   - Debian packages, at the versions of bookworm's archive when this file was written:
#     update the ARGs below when Debian ships a security update (apt-cache policy <package>);
#   - Python packages from requirements.lock (`make lock`), pgdr itself without dependencies.
# The PostgreSQL client must be at least the servers' major version: pg_dump refuses to dump
# a newer server. pgdr runs the client of each server's major version when it is installed,
# else the newest, and refuses with one line when the newest is older than the server.
# PG_MAJOR 15 is the newest client Debian bookworm offers; to pin another major (16, 17...)
# use the PGDG archive (PGDG=1, and PG_CLIENT_VERSION set to one of its versions).
#
#   docker build -t pgdr:0.1.0 .
#   docker build -t pgdr:0.1.0-pg16 --build-arg PGDG=1 --build-arg PG_MAJOR=16 \
#       --build-arg PG_CLIENT_VERSION=16.6-1.pgdg120+1 .

FROM python:3.11.14-slim-bookworm

ARG PG_MAJOR=15
ARG PG_CLIENT_VERSION=15.20-0+deb12u1
ARG GNUPG_VERSION=2.2.40-1.1+deb12u2
ARG ZSTD_VERSION=1.5.4+dfsg2-5
ARG PGDG=0

RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates "gnupg=${GNUPG_VERSION}" "zstd=${ZSTD_VERSION}"; \
    if [ "$PGDG" = 1 ]; then \
        apt-get install -y --no-install-recommends curl; \
        install -d /usr/share/postgresql-common/pgdg; \
        curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
            https://www.postgresql.org/media/keys/ACCC4CF8.asc; \
        echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc]" \
            "https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" > /etc/apt/sources.list.d/pgdg.list; \
        apt-get update; \
    fi; \
    apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}=${PG_CLIENT_VERSION}"; \
    rm -rf /var/lib/apt/lists/*

# pgdr finds pg_dump & co. in /usr/lib/postgresql/<major>/bin by the server's version
# (pgdr.postgres.programs.pg_bin); PGDR_PG_BIN would force one directory for every server.
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pgdr
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY pgdr ./pgdr
COPY tasks ./tasks
COPY deployments ./deployments
COPY prefect.yaml ./
RUN pip install --no-cache-dir --no-deps . && pgdr --help > /dev/null

# pgdr needs no privilege: run as a plain user.
RUN useradd --create-home --uid 10001 pgdr && install -d -o pgdr /var/backups/pgdr
USER pgdr
# The flow run's command comes from the worker (Docker or ECS); this is for a shell in it.
CMD ["pgdr", "--help"]
