"""The root `digits` command: its own package, gathering every package's subcommands, imported by none."""

from __future__ import annotations

import ast

from conftest import REPO, run_digits

PACKAGES = ("pipeline", "components", "data", "tfrecord_builder", "serving", "monitoring", "web", "forms")


def test_python_m_digits_lists_every_subcommand():
    result = run_digits("--help", timeout=120)
    assert result.returncode == 0, result.stderr
    commands = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert commands == {"data", "docker", "feedback", "form", "monitor", "pipeline", "predict", "read", "serve", "web"}


def test_no_package_imports_the_root_command():
    importers = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                           else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(module == "digits" or module.startswith("digits.") for module in modules):
                    importers.append(str(path.relative_to(REPO)))
    assert importers == []
