"""Named DuckDB queries, one per `.sql` file, shipped as package data (installed as actstore.sql)."""
