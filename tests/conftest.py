"""Shared fixtures: real digit trees made from the embedded MNIST sample, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Before anything imports TensorFlow: Keras 2 (tf_keras), as TFX 1.16 expects, and quiet logs.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory) -> Path:
    """The embedded sample as written by `digits data sample`: 4,000 training/ + 1,000 testing/ PNGs.

    Read-only for tests: copy it (see `small_tree`) before changing anything.
    """
    from data.sample import write_sample

    root = tmp_path_factory.mktemp("sample") / "mnist-png"
    write_sample(root)
    return root


@pytest.fixture
def small_tree(sample_tree, tmp_path):
    """Factory: a fresh, writable copy of the first `per_class` files of each class and part."""

    def make(train_per_class: int = 10, test_per_class: int = 4, name: str = "tree") -> Path:
        root = tmp_path / name
        for part, limit in (("training", train_per_class), ("testing", test_per_class)):
            for digit_dir in sorted((sample_tree / part).iterdir()):
                target = root / part / digit_dir.name
                target.mkdir(parents=True)
                for png in sorted(digit_dir.iterdir())[:limit]:
                    shutil.copyfile(png, target / png.name)
        return root

    return make


def require_tool(name: str, why: str) -> str:
    """The path of a program a test needs. Missing, the test is skipped with `why`, except under CI=true,
    where it fails: CI must never pass a check that did not run."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: a missing tool fails)", pytrace=False)
        pytest.skip(message)
    return path


def run_digits(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Runs the real `digits` command line in a subprocess (bounded in time)."""
    return subprocess.run(
        [sys.executable, "-m", "digits", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", REPO), **kwargs,
    )


@pytest.fixture(scope="session")
def tiny_records(sample_tree, tmp_path_factory) -> Path:
    """TFRecords of 20 training digits per class (18 train + 2 eval) and 5 test digits per class."""
    from tfrecord_builder.builder import build
    from tfrecord_builder.config import BuildConfig

    output = tmp_path_factory.mktemp("tiny") / "tfrecords"
    build(BuildConfig(source=sample_tree, output=output, per_class=20, test_per_class=5, workers=1))
    return output


def pipeline_run_args(records: Path, root: Path, serving: Path, *extra: str) -> list[str]:
    """`digits pipeline run` on tiny data: one short epoch, random init, always blessed."""
    return ["pipeline", "run", "--data", str(records), "--pipeline-root", str(root), "--serving-dir", str(serving),
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--base-weights", "none",
            "--min-accuracy", "0", "--min-class-recall", "0", "--max-accuracy-drop", "1", "--max-class-recall-drop", "1",
            "--min-coverage", "0", "--max-coverage-drop", "1", "--max-selective-error", "1",
            "--max-selective-error-rise", "1", *extra]


@pytest.fixture(scope="session")
def pushed_run(tiny_records, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One real, tiny `digits pipeline run` that pushed a version: its model directory and what it printed."""
    work = tmp_path_factory.mktemp("pushed")
    result = run_digits(*pipeline_run_args(tiny_records, work / "root", work / "serving"), timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    model_dir = work / "serving" / "digits"
    assert [path.name.isdigit() for path in model_dir.iterdir()] == [True]
    return model_dir, result


@pytest.fixture(scope="session")
def pushed_model(pushed_run) -> Path:
    """The model directory (serving_model/digits) after one real, tiny pipeline run pushed a version.

    Read-only for tests: copy it before adding or removing versions.
    """
    return pushed_run[0]


def start_server(model_dir: Path, *extra: str, timeout: float = 180):
    """`digits serve` on loopback, on ports the OS picks, polling every 0.2 s (see serving/process.py)."""
    from serving.process import start_server as start

    return start(model_dir, "--poll-interval", "0.2", *extra, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def model_server(pushed_model):
    """One server for the tests that only send requests (they must not change its model directory)."""
    server = start_server(pushed_model)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sevens_server(pushed_model, tmp_path_factory):
    """`digits serve` with one version: the pushed tiny model made to answer 7, and to stand by it (the form
    reader's tests: which boxes hold ink then decides every number)."""
    from model_copies import copy_version_answering

    (source,) = pushed_model.iterdir()
    model_dir = tmp_path_factory.mktemp("sevens") / "digits"
    copy_version_answering(source, model_dir / source.name, 7)
    server = start_server(model_dir)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="session")
def form_file(tmp_path_factory) -> Path:
    """tests/form_sheets.py's small form, as a file."""
    from form_sheets import FORM_YAML

    path = tmp_path_factory.mktemp("form") / "ballots.yaml"
    path.write_text(FORM_YAML)
    return path


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (Debian's, through Playwright) for every browser test."""
    from playwright.sync_api import sync_playwright

    from web.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()
