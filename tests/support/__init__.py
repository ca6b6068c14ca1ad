"""Helpers shared by the pgdr test suite (fixtures live in tests/conftest.py)."""
