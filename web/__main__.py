"""`python -m web ...`: `digits web` alone, without the rest of the project (what docker/web.Dockerfile runs)."""

from web.cli import web_command

web_command(prog_name="python -m web")
