"""Talking to PostgreSQL: connections, whole-database properties, local clusters, health
checks."""
