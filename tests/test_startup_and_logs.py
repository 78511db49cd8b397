"""First impressions: quiet, honest logs from successful runs, and start-up errors that are one line and come first.

- A successful run of the main job's commands, `digits serve`, `digits web` (and, in
  test_monitoring_config.py, `digits monitor`) writes no error-level line to stderr.
- TensorFlow's CUDA-plugin lines are dropped while it is imported, and only those.
- A taken port, a missing model directory or a bad flag ends each server in one line and a non-zero
  exit, before TensorFlow or a model is loaded (the log line that says TensorFlow is being imported
  never appears).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import requests

from conftest import REPO, run_digits, start_server
from log_lines import error_lines
from serving.ports import Port, PortError, check_free, reserve, reserve_all

TF_CUDA_LINES = ("Unable to register cuFFT factory", "Unable to register cuDNN factory",
                 "Unable to register cuBLAS factory")


# --- what counts as an error-level line ----------------------------------------------------------


def test_error_lines_are_told_from_the_rest():
    output = "\n".join([
        "2026-12-04 19:21:54.870243: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:479] Unable to ...",
        "2026-12-04 19:21:54.870243: W tensorflow/core/framework/op_kernel.cc:1827] a warning",
        "2026-12-04 19:21:54.870243: I tensorflow/core/platform/cpu_feature_guard.cc:210] info",
        "E1204 19:21:54.870243   1234 main.cc:12] absl error",
        "W1204 19:21:54.870243   1234 main.cc:12] absl warning",
        "2026-12-04 19:23:47,684 INFO serving.cli: starting: importing TensorFlow",
        "2026-12-04 19:23:47,684 ERROR serving.models: version 3 failed to load",
        "2026-12-04 19:23:47,684 WARNING components.base_weights: ImageNet weights are not in the cache",
        "ERROR:root:plain logging",
        "CRITICAL web.app: down",
        "Traceback (most recent call last):",
        "Error: cannot start the server: 127.0.0.1:8500 (gRPC) is already in use",
        "error: data anomalies, pipeline stopped before Transform",
        "  - Trainer: done in 3.2 s",
        "held-out accuracy 0.9880, macro F1 0.9880: BLESSED, pushed to serving_model/digits/1",
        "the word ERROR inside a line is not a level",
    ])
    assert [line.split()[0] for line in error_lines(output)] == [
        "2026-12-04", "E1204", "2026-12-04", "ERROR:root:plain", "CRITICAL", "Traceback", "Error:", "error:"]


# --- TensorFlow's import, filtered by name -------------------------------------------------------


def _python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={"PATH": "/usr/bin:/bin", "TF_USE_LEGACY_KERAS": "1",
                                                          "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow
def test_tensorflow_prints_its_cuda_lines_and_the_digits_command_drops_exactly_those():
    plain = _python("import tensorflow")
    assert plain.returncode == 0, plain.stderr
    # The fact the filter is for: TensorFlow 2.16 prints them on a machine without a GPU. If a new
    # TensorFlow stops, this fails, and digits/quiet.py can go.
    assert all(text in plain.stderr for text in TF_CUDA_LINES), plain.stderr
    quiet = _python("""
        import os, sys
        from digits.quiet import quiet_tensorflow_import
        quiet_tensorflow_import()
        sys.stderr.write("before\\n")
        import importlib.util
        assert importlib.util.find_spec("tensorflow") is not None  # a look-up first, as libraries do
        import tensorflow
        sys.stderr.write("after\\n")
        os.write(2, b"2026-12-04 19:21:54.870243: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:479] "
                    b"Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one "
                    b"has already been registered\\n")
        print(tensorflow.__spec__.loader.__class__.__name__)
    """)
    assert quiet.returncode == 0, quiet.stderr
    assert not any(text in quiet.stderr for text in TF_CUDA_LINES[1:]), quiet.stderr
    # Only during the import: the same line written afterwards is shown (once), as is everything else.
    assert quiet.stderr.splitlines()[0] == "before" and "after" in quiet.stderr.splitlines()
    during, afterwards = quiet.stderr.split("after", 1)
    assert "cuFFT" not in during and afterwards.count("Unable to register cuFFT factory") == 1, quiet.stderr
    assert quiet.stdout.strip() != "_QuietLoader"  # the module names its own loader again


def test_the_filter_passes_every_other_line_and_restores_stderr_after_an_error():
    result = _python("""
        import os, sys
        from digits.quiet import HARMLESS_STARTUP_LINES, stderr_without
        line = (b"2026-12-04 19:21:54.870243: E external/local_xla/xla/stream_executor/cuda/cuda_dnn.cc:10575] "
                b"Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one "
                b"has already been registered\\n")
        try:
            with stderr_without(HARMLESS_STARTUP_LINES):
                os.write(2, line)
                os.write(2, b"2026-12-04 19:21:54.870243: E some/other.cc:1] a real error\\n")
                sys.stderr.write("from Python\\n")
                os.write(2, b"no newline at the end")
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        os.write(2, b"\\nafter\\n")
    """, timeout=60)
    assert result.returncode == 0
    assert result.stderr.splitlines() == ["2026-12-04 19:21:54.870243: E some/other.cc:1] a real error",
                                          "from Python", "no newline at the end", "after"]


def test_the_filter_survives_a_flood_written_under_the_gil_and_a_crash():
    """A native library's initialiser writes with the GIL held (ctypes.PyDLL does the same): 300 KB,
    more than a pipe holds, must not hang the import. And a process that aborts in the middle still
    gets its last words (TensorFlow's F-lines come just before an abort) to the terminal."""
    flood = _python("""
        import ctypes, os
        from digits.quiet import HARMLESS_STARTUP_LINES, stderr_without
        data = (b"x" * 99 + b"\\n") * 3000
        with stderr_without(HARMLESS_STARTUP_LINES):
            ctypes.PyDLL(None).write(2, data, len(data))
        os.write(2, b"after\\n")
    """, timeout=60)
    assert flood.returncode == 0 and flood.stderr.splitlines() == ["x" * 99] * 3000 + ["after"]
    crash = _python("""
        import os
        from digits.quiet import HARMLESS_STARTUP_LINES, stderr_without
        with stderr_without(HARMLESS_STARTUP_LINES):
            os.write(2, b"2026-12-04 19:21:54.870243: F some/file.cc:1] the reason for the abort\\n")
            os.abort()
    """, timeout=60)
    assert crash.returncode < 0
    assert crash.stderr == "2026-12-04 19:21:54.870243: F some/file.cc:1] the reason for the abort\n"


# --- successful runs are quiet -------------------------------------------------------------------


def test_the_main_jobs_data_commands_write_no_error_line(tmp_path):
    sample = run_digits("data", "sample", "--out", tmp_path / "mnist-png", timeout=300)
    assert sample.returncode == 0, sample.stderr
    build = run_digits("data", "build", tmp_path / "mnist-png", "--out", tmp_path / "tfrecords", "--per-class", "5",
                       "--test-per-class", "2", "--if-changed", timeout=300)
    assert build.returncode == 0, build.stderr
    assert error_lines(sample.stderr) == [] and error_lines(build.stderr) == []
    assert (tmp_path / "tfrecords" / "manifest.json").is_file()


def test_a_successful_pipeline_run_writes_no_error_line(pushed_run):
    _, result = pushed_run
    assert "BLESSED" in result.stdout and "report:" in result.stdout  # it is the whole run's output
    assert error_lines(result.stderr) == [], result.stderr
    assert not any(text in result.stderr for text in TF_CUDA_LINES)


@pytest.mark.slow
def test_serve_and_web_write_no_error_line_from_start_to_stop(pushed_model, sample_tree):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    import tensorflow as tf

    from web.process import start_web

    png = next((sample_tree / "testing" / "7").iterdir()).read_bytes()
    server = start_server(pushed_model)
    try:
        with start_web("--serving-url", server.rest_url, "--model-dir", pushed_model) as web:
            assert requests.get(f"{web.url}/", timeout=30).status_code == 200
            answer = requests.post(f"{web.url}/api/predict", data=png, timeout=60)
            assert answer.status_code == 200, answer.text
            assert requests.get(f"{web.url}/metrics", timeout=30).status_code == 200
        assert web.process.returncode == 0
        rest = requests.post(f"{server.rest_url}/v1/models/digits:predict", timeout=60,
                             data=json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}))
        assert rest.status_code == 200, rest.text
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([png], dtype=tf.string))
        with grpc.insecure_channel(server.grpc_target) as channel:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
        assert requests.get(f"{server.rest_url}/monitoring/prometheus/metrics", timeout=30).status_code == 200
    finally:
        code = server.stop()
    assert code == 0
    # The stderr was really read: the start-up and shutdown lines are there, and nothing error-level.
    assert any("importing TensorFlow" in line for line in server.errors), server.errors
    assert any("stopped: every in-flight request was answered" in line for line in server.errors), server.errors
    assert error_lines(server.errors) == [], "".join(server.errors)
    assert not any(text in line for line in server.errors for text in TF_CUDA_LINES)
    assert any("web app" in line or "aiohttp" in line for line in web.output), web.output
    assert error_lines(web.errors) == [], "".join(web.errors)


# --- ports: claimed first ------------------------------------------------------------------------


@pytest.fixture
def taken_port():
    """A port another process listens on (here: this one)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_reserved_port_refuses_connections_until_its_server_listens():
    sock = reserve(Port("127.0.0.1", 0, "REST", "--rest-port"))
    port = sock.getsockname()[1]
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        for reuse in (0, 1):  # another program cannot take it meanwhile, not even one that shares addresses
            with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
                other.bind(("127.0.0.1", port))
            with pytest.raises(PortError, match="is already in use"):
                reserve(Port("127.0.0.1", port, "gRPC", "--grpc-port"))
        sock.listen()
        with pytest.raises(PortError, match=f"127.0.0.1:{port} \\(gRPC\\) is already in use"):
            reserve(Port("127.0.0.1", port, "gRPC", "--grpc-port"))  # nor, once it listens, another server
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        sock.close()


def test_taken_ports_are_refused_in_words(taken_port):
    with pytest.raises(PortError) as error:
        reserve(Port("127.0.0.1", taken_port, "gRPC", "--grpc-port"))
    assert str(error.value) == (f"127.0.0.1:{taken_port} (gRPC) is already in use: stop what listens there, or "
                                "pick another with --grpc-port (0: any free port)")
    free = reserve(Port("127.0.0.1", 0, "x", "--x"))
    free_port = free.getsockname()[1]
    free.close()
    with pytest.raises(PortError, match="--rest-port and --grpc-port are both"):
        reserve_all([Port("127.0.0.1", free_port, "REST", "--rest-port"),
                     Port("127.0.0.1", free_port, "gRPC", "--grpc-port")])
    # All or nothing: the free port reserved before the taken one is released again.
    with pytest.raises(PortError):
        reserve_all([Port("127.0.0.1", free_port, "REST", "--rest-port"),
                     Port("127.0.0.1", taken_port, "gRPC", "--grpc-port")])
    check_free([Port("127.0.0.1", free_port, "REST", "--rest-port")])
    with pytest.raises(PortError, match="unknown host"):
        reserve(Port("no-such-host.invalid", 0, "REST", "--rest-port"))
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() == "0":
        with pytest.raises(PortError, match="not an address of this machine"):
            reserve(Port("192.0.2.1", 0, "REST", "--rest-port"))


def test_a_port_held_only_by_a_socket_nobody_listens_on_is_usable():
    """As after a restart (old connections in TIME_WAIT): bound with SO_REUSEADDR, as servers bind."""
    with socket.socket() as old:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        old.bind(("127.0.0.1", 0))
        sock = reserve(Port("127.0.0.1", old.getsockname()[1], "REST", "--rest-port"))
        sock.close()


def _one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_serve_ends_in_one_line_before_loading_anything(taken_port, pushed_model, tmp_path):
    rest = run_digits("serve", "--model-dir", pushed_model, "--rest-port", taken_port, "--grpc-port", "0",
                      timeout=60)
    _one_line(rest, 1, f"127.0.0.1:{taken_port} (REST) is already in use", "--rest-port")
    grpc_taken = run_digits("serve", "--model-dir", pushed_model, "--rest-port", "0", "--grpc-port", taken_port,
                            timeout=60)
    _one_line(grpc_taken, 1, "cannot start the server", f"127.0.0.1:{taken_port} (gRPC) is already in use")
    assert "importing TensorFlow" not in rest.stderr + grpc_taken.stderr  # nothing slow happened first
    _one_line(run_digits("serve", "--model-dir", tmp_path / "none", timeout=60), 1, "no model directory")
    _one_line(run_digits("serve", "--rest-port", "abc", timeout=60), 2, "'--rest-port'", "not a valid integer",
              "(see 'digits serve --help')")
    _one_line(run_digits("serve", "--rest-prot", "1", timeout=60), 2, "No such option", "--rest-port")
    _one_line(run_digits("serve", "--model-dir", pushed_model, "--rest-port", "70000", timeout=60), 2,
              "REST port must be 0..65535")


def test_web_ends_in_one_line_before_starting(taken_port, tmp_path):
    _one_line(run_digits("web", "--port", taken_port, timeout=60), 1,
              f"127.0.0.1:{taken_port} (the web page) is already in use", "--port")
    _one_line(run_digits("web", "--port", "0", "--model-dir", tmp_path / "none", timeout=60), 1,
              "--model-dir", "is not a directory")
    _one_line(run_digits("web", "--port", "-1", timeout=60), 2, "--port must be 0-65535")
    _one_line(run_digits("web", "--serving", "x", timeout=60), 2, "No such option", "--serving-url")


def test_monitor_ends_in_one_line_before_starting_anything(taken_port, tmp_path):
    data = tmp_path / "m"
    taken = run_digits("monitor", "--data-dir", data, "--alertmanager-port", taken_port, "--prometheus-port", "1",
                       timeout=60)
    assert taken.returncode == 1 and taken.stdout == "", taken.stdout  # nothing said to be starting
    line = _one_line(taken, 1)
    # --prometheus-port 1 is checked first: as root it binds, otherwise it is refused for permission.
    assert (f"127.0.0.1:{taken_port} (Alertmanager) is already in use" in line
            or "no permission to listen on 127.0.0.1:1 (Prometheus)" in line), line
    assert not data.exists()  # nothing was written
    _one_line(run_digits("monitor", "--data-dir", data, "--prometheus-port", "9999", "--receiver-port", "9999",
                         timeout=60), 1, "--prometheus-port and --receiver-port are both 9999")
    _one_line(run_digits("monitor", "--prometheus-port", "0", timeout=60), 2, "'--prometheus-port'")
    (tmp_path / "file").write_text("x")
    _one_line(run_digits("monitor", "--data-dir", tmp_path / "file", timeout=60), 2, "is a file")
    ports = [str(free) for free in _free_ports(3)]
    _one_line(run_digits("monitor", "--data-dir", tmp_path / "file" / "m", "--prometheus-port", ports[0],
                         "--alertmanager-port", ports[1], "--receiver-port", ports[2], timeout=60), 1,
              f"cannot use {tmp_path / 'file' / 'm'} for the monitoring data")


def _free_ports(count: int) -> list[int]:
    sockets = [reserve(Port("127.0.0.1", 0, "x", "--x")) for _ in range(count)]
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_every_command_reports_a_usage_error_in_one_line():
    _one_line(run_digits("pipeline", "run", "--epochs", "x", timeout=60), 2, "'--epochs'", "digits pipeline run --help")
    _one_line(run_digits("data", "build", "--eval-fraction", "x", timeout=60), 2, "'--eval-fraction'")
    _one_line(run_digits("nope", timeout=60), 2, "No such command 'nope'")
    helped = run_digits("pipeline", timeout=60)  # a group alone shows its help, as click does
    assert helped.returncode == 2 and helped.stderr.startswith("Usage: digits pipeline")


# --- warnings in the test run --------------------------------------------------------------------


def test_a_warning_from_the_projects_code_fails_and_known_third_party_ones_are_silent():
    import warnings

    for module in ("serving.ports", "pipeline.report", "web", "test_docs", "conftest"):
        with pytest.raises(UserWarning):
            warnings.warn_explicit("something is off", UserWarning, f"{module}.py", 1, module=module)
    with warnings.catch_warnings(record=True) as seen:  # the pytest configuration's filters, recorded
        warnings.warn_explicit("Conversion of an array with ndim > 0 to a scalar is deprecated, and will error",
                               DeprecationWarning, "metric_util.py", 669,
                               module="tensorflow_model_analysis.metrics.metric_util")
        warnings.warn_explicit("non-integer arguments to randrange() have been deprecated", DeprecationWarning,
                               "random.py", 370, module="random")
        warnings.warn_explicit("a new deprecation", DeprecationWarning, "metric_util.py", 1,
                               module="tensorflow_model_analysis.metrics.metric_util")
    assert [str(warning.message) for warning in seen] == ["a new deprecation"]  # a new one still shows
