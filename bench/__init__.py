"""The pgdr benchmark: pgdr against the tools a user would pick instead (the plain
`pg_dump | zstd` pipe, `pg_dump -Fc`, pgBackRest) and the runbook's old scripts, side by
side in one run.

`make bench` (or `python -m bench`) builds the sample fleet database in a throwaway
PostgreSQL cluster with a pgBackRest stanza, starts a moto S3 endpoint and a local Prefect
server, then measures each way of backing up and restoring that database on the same
machine, against the same server and the same S3 endpoint: wall time, CPU seconds and peak
memory of the whole process tree, repeated, median reported. See docs/benchmarks.md.
"""
