"""Alembic migrations of the tuneserve schema."""
