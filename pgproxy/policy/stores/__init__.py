"""Approval store implementations: SQLite (default, one host) and PostgreSQL (several proxy replicas)."""
