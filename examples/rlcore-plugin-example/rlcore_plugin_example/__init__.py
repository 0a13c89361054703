"""An example third-party rlcore plugin package: a task (`echo`) and an algorithm (`cispo`), each published
through an entry point in pyproject.toml and written only against rlcore's public API."""
