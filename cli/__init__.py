"""The `actstore` command line: thin click commands over the library (installed as actstore.cli)."""
