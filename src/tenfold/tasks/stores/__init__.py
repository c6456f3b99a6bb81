"""Task store backends: one SQL store for SQLite (embedded) and PostgreSQL (scale)."""
