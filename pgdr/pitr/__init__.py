"""Continuous archiving and point-in-time recovery: the WAL archive, base backups, recovery."""
