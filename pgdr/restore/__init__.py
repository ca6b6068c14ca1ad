"""Bringing data back: staging and pg_restore, selective restores, table recovery, and
the validation that proves a restore right."""
