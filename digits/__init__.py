"""The root `digits` command, and only that: it gathers each package's subcommands (no package imports it)."""
