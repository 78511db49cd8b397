"""`digits serve` against a model pushed by the real pipeline, over real HTTP and gRPC on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from conftest import REPO, run_digits, start_server
from model_copies import copy_version_answering
from prometheus_api import wait_for
from serving_clients import b64 as _b64
from serving_clients import grpc_predict as _grpc_predict
from serving_clients import predict_rest as _predict_rest
from serving_clients import scrape as _metrics
from data import contract
from serving.runtime import ONEDNN_ENV

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def pngs(sample_tree) -> list[tuple[int, bytes]]:
    """Two test digits of each class: (label, PNG bytes)."""
    return [(digit, path.read_bytes()) for digit in range(10)
            for path in sorted((sample_tree / "testing" / str(digit)).iterdir())[:2]]


@pytest.fixture(scope="module")
def in_process(pushed_model):
    """The floor: the pushed SavedModel's serving_default, called in this process."""
    import tensorflow as tf

    (version,) = pushed_model.iterdir()
    signature = tf.saved_model.load(str(version)).signatures[contract.SERVING_SIGNATURE]

    class InProcess:
        def __call__(self, images: list[bytes]) -> np.ndarray:
            return self.outputs(images)[contract.PROBABILITIES_OUTPUT]

        @staticmethod
        def outputs(images: list[bytes]) -> dict[str, np.ndarray]:
            return {name: value.numpy() for name, value in signature(image_bytes=tf.constant(images)).items()}

    return InProcess()


def test_rest_and_grpc_answer_as_the_model_does_in_process(model_server, pngs, in_process):
    import tensorflow as tf

    images = [png for _, png in pngs]
    expected = in_process(images)

    rows = _predict_rest(model_server.rest_url, images)
    assert rows.status_code == 200 and rows.headers["Content-Type"] == "application/json"
    predictions = rows.json()["predictions"]
    assert len(predictions) == len(images)
    np.testing.assert_allclose([p[contract.PROBABILITIES_OUTPUT] for p in predictions], expected, atol=1e-5)
    assert [p[contract.PREDICTED_CLASS_OUTPUT] for p in predictions] == list(expected.argmax(axis=1))

    columns = requests.post(f"{model_server.rest_url}/v1/models/digits:predict", timeout=60, json={
        "signature_name": contract.SERVING_SIGNATURE, "inputs": {contract.IMAGE_BYTES_INPUT: [_b64(i) for i in images]}})
    assert columns.status_code == 200, columns.text
    np.testing.assert_allclose(columns.json()["outputs"][contract.PROBABILITIES_OUTPUT], expected, atol=1e-5)

    response = _grpc_predict(model_server.grpc_target, images)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs[contract.PROBABILITIES_OUTPUT]), expected, atol=1e-5)
    assert response.model_spec.name == "digits" and response.model_spec.signature_name == contract.SERVING_SIGNATURE

    # The examples signature, through REST, as batch scoring would call it.
    example = tf.train.Example(features=tf.train.Features(feature={
        contract.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[images[0]]))}))
    scored = requests.post(f"{model_server.rest_url}/v1/models/digits:predict", timeout=60, json={
        "signature_name": contract.EXAMPLES_SIGNATURE, "instances": [_b64(example.SerializeToString())]})
    assert scored.status_code == 200, scored.text
    np.testing.assert_allclose(scored.json()["predictions"][0][contract.PROBABILITIES_OUTPUT], expected[0], atol=1e-5)


def test_status_and_metadata_have_tf_servings_shape(model_server, pushed_model):
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                         prediction_service_pb2_grpc)

    (version_dir,) = pushed_model.iterdir()
    version = version_dir.name
    status = requests.get(f"{model_server.rest_url}/v1/models/digits", timeout=30)
    assert status.status_code == 200
    assert status.json() == {"model_version_status": [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert requests.get(f"{model_server.rest_url}/v1/models/digits/versions/{version}", timeout=30).json() == \
        status.json()

    metadata = requests.get(f"{model_server.rest_url}/v1/models/digits/metadata", timeout=30).json()
    assert metadata["model_spec"] == {"name": "digits", "signature_name": "", "version": version}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    # As in TF Serving, the whole SignatureDef map of the MetaGraph, init op entry included.
    assert set(signatures) == {contract.SERVING_SIGNATURE, contract.EXAMPLES_SIGNATURE, contract.NORMALIZED_SIGNATURE,
                               "__saved_model_init_op"}
    image_input = signatures[contract.SERVING_SIGNATURE]["inputs"][contract.IMAGE_BYTES_INPUT]
    assert image_input["dtype"] == "DT_STRING" and image_input["tensor_shape"]["dim"][0]["size"] == "-1"
    assert signatures[contract.SERVING_SIGNATURE]["outputs"][contract.PROBABILITIES_OUTPUT]["dtype"] == "DT_FLOAT"

    with grpc.insecure_channel(model_server.grpc_target) as channel:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "digits"
        reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
        assert [(s.version, s.state) for s in reply.model_version_status] == [
            (int(version), get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "digits"
        reply = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        assert reply.metadata["signature_def"].Unpack(signature_map)
        assert reply.model_spec.version.value == int(version)
        assert {contract.SERVING_SIGNATURE, contract.EXAMPLES_SIGNATURE} <= set(signature_map.signature_def)


def test_metrics_use_tf_servings_names_and_move_with_traffic(model_server, pngs):
    before = _metrics(model_server.rest_url)
    images = [png for _, png in pngs[:3]]
    for _ in range(2):
        assert _predict_rest(model_server.rest_url, images).status_code == 200
    _grpc_predict(model_server.grpc_target, images)
    assert requests.get(f"{model_server.rest_url}/v1/models/nope", timeout=30).status_code == 404
    after = _metrics(model_server.rest_url)

    def delta(name: str, **labels) -> float:
        key = tuple(sorted(labels.items()))
        return after.get(name, {}).get(key, 0) - before.get(name, {}).get(key, 0)

    # request_count counts REST predicts, the gRPC predict and this module's other requests: at least these.
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="OK") >= 3
    # Unknown names are counted as "unknown", so clients cannot create series without bound.
    assert delta(":tensorflow:serving:request_count", model_name="unknown", status="NOT_FOUND") == 1
    assert delta(":tensorflow:serving:request_latency_count", model_name="digits", API="predict",
                 entrypoint="REST") == 2
    assert delta(":tensorflow:serving:request_latency_count", model_name="digits", API="Predict",
                 entrypoint="GRPC") == 1
    assert delta(":tensorflow:serving:runtime_latency_count", model_name="digits", API="Predict",
                 runtime="TF1") == 3
    buckets = [labels for labels in after[":tensorflow:serving:request_latency_bucket"]
               if dict(labels)["API"] == "predict"]
    assert len(buckets) == 34  # Exponential(10, 1.8, 33) and +Inf, as TF Serving
    (version,) = {dict(labels)["model_version"] for labels in after["digits_serving_predictions"]}
    assert sum(value for labels, value in after["digits_serving_predictions"].items()) - sum(
        before.get("digits_serving_predictions", {}).values()) == 9
    assert delta("digits_serving_prediction_confidence_count", model_name="digits", model_version=version) == 9
    assert after[":tensorflow:cc:saved_model:load_attempt_count"]  # the version's load was counted
    assert any(dict(labels)["status"] == "success"
               for labels in after[":tensorflow:cc:saved_model:load_attempt_count"])
    # The exposition has TF Serving's spelling: no `_total` on its counters.
    page = requests.get(f"{model_server.rest_url}/monitoring/prometheus/metrics", timeout=30).text
    assert "# TYPE :tensorflow:serving:request_count counter" in page
    assert ":tensorflow:serving:request_count_total" not in page


def test_the_models_warmup_requests_run_before_it_serves(model_server, pushed_model, tmp_path):
    """Every request of the Trainer's warmup file is replayed while the version loads: before it is AVAILABLE,
    hence before the ports open. And replayed for real: a file whose last request the model refuses fails
    the load (as in TF Serving), and that version is never served."""
    import re

    import tensorflow as tf

    from components.warmup import read_warmup_requests, write_warmup_requests
    from serving.config import ServerConfig
    from serving.metrics import ServingMetrics
    from serving.models import END, ModelManager

    (version,) = pushed_model.iterdir()
    trainers = read_warmup_requests(str(version))
    output = "".join(model_server.output)
    loaded = re.search(rf"digits version {version.name} AVAILABLE after [\d.]+ s \((\d+) warmup requests\)", output)
    assert loaded and int(loaded.group(1)) == len(trainers) == 3, output[-3000:]
    assert loaded.end() < output.index("ready (")
    # One warmup per load, as TF Serving records model_warmup_latency.
    assert _metrics(model_server.rest_url)[":tensorflow:serving:model_warmup_latency_count"] == {
        (("model_path", str(version)), ("status", "OK")): 1}

    copy = shutil.copytree(version, tmp_path / "digits" / version.name)
    first, second = (tf.make_ndarray(request.inputs[contract.IMAGE_BYTES_INPUT])[0] for request in trainers[:2])
    write_warmup_requests(str(copy), [first, second, b"not an image"])  # requests of 1, 1 and 8 images
    assert [len(tf.make_ndarray(request.inputs[contract.IMAGE_BYTES_INPUT]))
            for request in read_warmup_requests(str(copy))] == [1, 1, 8]
    manager = ModelManager(ServerConfig(model_base_path=copy.parent), ServingMetrics())
    manager.load_existing()
    (status,) = manager.statuses("digits")
    assert (status.version, status.state, status.error_code) == (int(version.name), END, "UNKNOWN")
    assert status.error_message.startswith(f"Failed to load servable digits version {version.name}: "), status
    assert manager.available_versions() == []


def test_the_server_runs_eigen_kernels_unless_asked_for_onednn(model_server, pushed_model, pngs):
    # The default follows TF Serving's CPU image (serving/runtime.py); the environment may choose, as for TF.
    default = "oneDNN" if os.environ.get(ONEDNN_ENV, "0").lower() in ("1", "true", "yes", "on") else "Eigen"
    assert f": {default} kernels, intra-op threads TF's default, inter-op threads TF's default; " \
           f"GIL switch interval 1 ms" in "".join(model_server.output)
    with start_server(pushed_model, "--onednn", "--intra-op-threads", "1", "--inter-op-threads", "2") as server:
        assert ": oneDNN kernels, intra-op threads 1, inter-op threads 2" in "".join(server.output)
        assert _predict_rest(server.rest_url, [pngs[0][1]]).status_code == 200
        assert "not as asked" not in "".join(server.output)


def test_concurrent_requests_are_batched(model_server, pngs):
    before = _metrics(model_server.rest_url).get(":tensorflow:serving:batching_session:processed_batch_size_count",
                                                 {})
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda png: _predict_rest(model_server.rest_url, [png]).status_code,
                                 [png for _, png in pngs] * 4))
    assert statuses == [200] * 80
    after = _metrics(model_server.rest_url)
    batches = sum(after[":tensorflow:serving:batching_session:processed_batch_size_count"].values()) - sum(
        before.values())
    assert batches < 80, "80 concurrent single-image requests should share model calls"


def test_version_labels_and_explicit_versions(pushed_model, pngs, in_process, tmp_path):
    """Two versions loaded (`--num-versions 2`), the newer answering otherwise, `stable` on the older:
    `labels/stable` and gRPC's `version_label` are answered by the older, plain requests by the newer."""
    import tensorflow as tf

    (source,) = pushed_model.iterdir()
    older, newer = int(source.name), int(source.name) + 1
    model_dir = tmp_path / "digits"
    shutil.copytree(source, model_dir / str(older))
    copy_version_answering(source, model_dir / str(newer), 0, raise_by=5.0)  # answers otherwise
    server = start_server(model_dir, "--num-versions", "2", "--label", f"stable={older}")
    try:
        states = requests.get(f"{server.rest_url}/v1/models/digits", timeout=30).json()["model_version_status"]
        assert [(s["version"], s["state"]) for s in states] == [(str(newer), "AVAILABLE"), (str(older), "AVAILABLE")]
        image = [pngs[14][1]]  # a 7
        older_answer = in_process(image)[0]

        def rest(suffix: str) -> np.ndarray:
            response = _predict_rest(server.rest_url, image, suffix)
            assert response.status_code == 200, response.text
            return np.array(response.json()["predictions"][0][contract.PROBABILITIES_OUTPUT])

        newer_answer = rest(f"/versions/{newer}")
        assert newer_answer[0] > older_answer[0] + 0.1  # the two versions are told apart by their answers
        np.testing.assert_allclose(rest(f"/versions/{older}"), older_answer, atol=1e-5)
        np.testing.assert_allclose(rest("/labels/stable"), older_answer, atol=1e-5)
        np.testing.assert_allclose(rest(""), newer_answer, atol=1e-5)
        for label, version, answered_by, answer in (("stable", None, older, older_answer),
                                                    (None, None, newer, newer_answer),
                                                    (None, older, older, older_answer)):
            response = _grpc_predict(server.grpc_target, image, version=version, label=label)
            assert response.model_spec.version.value == answered_by
            np.testing.assert_allclose(tf.make_ndarray(response.outputs[contract.PROBABILITIES_OUTPUT])[0], answer,
                                       atol=1e-5)
    finally:
        assert server.stop() == 0


CANARY_MODELS_CONFIG = REPO / "deploy" / "k8s" / "overlays" / "canary" / "models.config"


def _digits_serve_options(model) -> list[str]:
    """A ModelConfig of TF Serving's models.config as `digits serve` options. `digits serve` reads no model
    config file and has no `specific` policy; over a base path that holds exactly the specific versions,
    keeping the newest N (their count) loaded loads the same ones. Anything else is refused here."""
    policy = model.model_version_policy
    assert policy.WhichOneof("policy_choice") == "specific", policy
    versions = sorted(policy.specific.versions)
    on_disk = sorted(int(path.name) for path in Path(model.base_path).iterdir() if path.name.isdigit())
    assert on_disk == versions, f"the base path holds {on_disk}, the policy names {versions}"
    labels = [option for label, version in sorted(model.version_labels.items())
              for option in ("--label", f"{label}={version}")]
    return ["--model-name", model.name, "--num-versions", str(len(versions)), *labels]


def test_the_canary_overlays_models_config_sends_each_label_to_its_version(pushed_model, pngs, tmp_path):
    """deploy/k8s/overlays/canary/models.config, its base path and two versions made local (the older
    stays the older), served by `digits serve`: `labels/stable` and `labels/canary`, over REST and gRPC, are
    answered by the version each label names in the file, and the status call of each label says which;
    unlabelled requests reach the newer (the canary); a label the file does not define is refused with
    TF Serving's INVALID_ARGUMENT."""
    from serving.answers import tensor_values
    from serving.docker_context import parse_models_config

    config = parse_models_config(CANARY_MODELS_CONFIG.read_text(), str(CANARY_MODELS_CONFIG))
    [model] = config.model_config_list.config
    (source,) = pushed_model.iterdir()
    older, newer = int(source.name), int(source.name) + 1
    model_dir = tmp_path / "digits"
    shutil.copytree(source, model_dir / str(older))
    copy_version_answering(source, model_dir / str(newer), 0, raise_by=5.0)  # answers otherwise
    local = dict(zip(sorted(model.model_version_policy.specific.versions), (older, newer), strict=True))
    model.base_path = str(model_dir)
    model.model_version_policy.specific.versions[:] = [local[v] for v in model.model_version_policy.specific.versions]
    for label, version in list(model.version_labels.items()):
        model.version_labels[label] = local[version]
    labels = dict(model.version_labels)
    assert set(labels) == {"stable", "canary"}

    server = start_server(model_dir, *_digits_serve_options(model))
    try:
        image = [pngs[14][1]]  # a 7

        def rest(suffix: str) -> list[float]:
            response = _predict_rest(server.rest_url, image, suffix)
            assert response.status_code == 200, response.text
            return response.json()["predictions"][0][contract.PROBABILITIES_OUTPUT]

        answers = {version: rest(f"/versions/{version}") for version in (older, newer)}
        assert answers[newer][0] > answers[older][0] + 0.1  # the two versions are told apart by their answers
        for label, version in labels.items():
            status = requests.get(f"{server.rest_url}/v1/models/digits/labels/{label}", timeout=30).json()
            assert [(s["version"], s["state"]) for s in status["model_version_status"]] == [
                (str(version), "AVAILABLE")]
            np.testing.assert_allclose(rest(f"/labels/{label}"), answers[version], atol=1e-5)
            response = _grpc_predict(server.grpc_target, image, label=label)
            assert response.model_spec.version.value == version
            np.testing.assert_allclose(tensor_values(response.outputs[contract.PROBABILITIES_OUTPUT])[0],
                                       answers[version], atol=1e-5)
        np.testing.assert_allclose(rest(""), answers[newer], atol=1e-5)

        refused = _predict_rest(server.rest_url, image, "/labels/beta")
        assert (refused.status_code, refused.json()) == (400, {"error": "Unrecognized servable version label: beta"})
        with pytest.raises(grpc.RpcError) as raised:
            _grpc_predict(server.grpc_target, image, label="beta")
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "Unrecognized servable version label: beta"
    finally:
        assert server.stop() == 0


def _copy_version(source: Path, model_dir: Path, version: int) -> None:
    """Copies a SavedModel in file by file, as the Pusher does (not an atomic rename)."""
    shutil.copytree(source, model_dir / str(version))


def _wait_for_answers(versions_seen: list[int], version: int, count: int, timeout: float = 120) -> None:
    """Waits until the traffic threads have had `count` gRPC answers from `version`."""
    wait_for(lambda: versions_seen.count(version) >= count, timeout, interval=0.05,
             what=f"{count} answers from version {version}")


def test_a_new_version_is_served_without_restart_or_failed_requests(pushed_model, pngs, tmp_path):
    (source,) = pushed_model.iterdir()
    model_dir = tmp_path / "digits"
    _copy_version(source, model_dir, 1)
    server = start_server(model_dir, "--num-versions", "1")
    failures: list[str] = []
    versions_seen: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                response = _grpc_predict(server.grpc_target, [pngs[3][1]])
                versions_seen.append(response.model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(f"gRPC {error.code().name}: {error.details()}")
            rest = _predict_rest(server.rest_url, [pngs[4][1]])
            if rest.status_code != 200:
                failures.append(f"REST {rest.status_code}: {rest.text}")

    clients = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        _wait_for_answers(versions_seen, 1, 8)  # traffic flows on version 1 before the copy starts
        _copy_version(source, model_dir, 2)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            states = {s["version"]: s["state"] for s in requests.get(
                f"{server.rest_url}/v1/models/digits", timeout=30).json()["model_version_status"]}
            if states == {"2": "AVAILABLE", "1": "END"}:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"version 2 did not replace version 1: {states}")
        _wait_for_answers(versions_seen, 2, 8)  # and keeps flowing on the new version
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
        exit_code = server.stop()
    assert failures == []
    assert versions_seen[0] == 1 and versions_seen[-1] == 2 and set(versions_seen) == {1, 2}
    assert exit_code == 0
    assert "Traceback" not in "".join(server.output)


# How long the SIGTERM test's batch waits for company (`--batch-wait always`): it holds the requests in the
# queue across the signal, far longer than queueing them and signalling take, even on a loaded machine.
_HOLD_S = 8.0


def _queued(rest_url: str) -> int:
    """Requests that reached a batch queue so far (input_batch_size is recorded as each is queued)."""
    return int(sum(_metrics(rest_url).get(":tensorflow:serving:batching_session:input_batch_size_count",
                                          {}).values()))


def test_sigterm_lets_in_flight_requests_finish(pushed_model, pngs, in_process):
    """Four requests held in a batch queue when SIGTERM comes (the server counts them as it starts shutting
    down) are all answered, as the model answers them, before the server exits 0 and its ports close."""
    server = start_server(pushed_model, "--batch-wait", "always", "--batch-timeout-micros", int(_HOLD_S * 1e6),
                          "--shutdown-grace", 300)
    images = [png for _, png in pngs[:5]]
    try:
        before = _queued(server.rest_url)
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(_predict_rest, server.rest_url, images, "", 120) for _ in range(4)]
            deadline = time.monotonic() + 60
            while _queued(server.rest_url) < before + 4:
                assert time.monotonic() < deadline, "the requests never reached the batch queue"
                time.sleep(0.02)
            assert not any(future.done() for future in pending)  # held: their batch waits for company
            os.kill(server.pid, signal.SIGTERM)
            results = [future.result() for future in pending]
        assert server.process.wait(timeout=120) == 0
    finally:
        server.stop()  # once it has exited, this only waits until its output is read
    log = "".join(server.output)
    assert "shutting down: finishing 4 in-flight predict requests" in log, log[-3000:]
    assert "stopped: every in-flight request was answered" in log, log[-3000:]
    assert [response.status_code for response in results] == [200] * 4
    for response in results:
        np.testing.assert_allclose([p[contract.PROBABILITIES_OUTPUT] for p in response.json()["predictions"]],
                                   in_process(images), atol=1e-5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.rest_url}/v1/models/digits", timeout=5)


NO_INK_NOTE = "no ink found: a guess on an empty image"


def _predicted_lines(stdout: str) -> list[tuple[str, int, float, str]]:
    """`digits predict`'s answer lines (`FILE  DIGIT  (CONFIDENCE)`, then a note if the model found no ink or
    would not answer alone) as (file, digit, confidence, note)."""
    answers = []
    for line in stdout.splitlines():
        name, digit, confidence, *note = line.split(maxsplit=3)
        answers.append((name, int(digit), float(confidence.strip("()")), note[0] if note else ""))
    return answers


def _expected_note(outputs: dict, index: int) -> str:
    """The note `digits predict` owes an image, from the model's own outputs in process."""
    probabilities = outputs[contract.PROBABILITIES_OUTPUT][index]
    decision = contract.DECISIONS[int(outputs[contract.DECISION_OUTPUT][index])]
    if outputs[contract.INK_FRACTION_OUTPUT][index] <= 0:
        return NO_INK_NOTE
    if decision == "not_a_digit":
        return "not a digit"
    if decision == "unsure":
        first, second = np.argsort(-probabilities, kind="stable")[:2]
        return f"unsure: {first} or {second} ({probabilities[first]:.2f} / {probabilities[second]:.2f})"
    return ""


def _on_a_threshold(outputs: dict, point: dict) -> np.ndarray:
    """Images with ink whose out-of-distribution score or confidence lies within float rounding of an
    exported threshold: the server's kernels (Eigen) and this process's (oneDNN) may put them on
    different sides. The tiny test model answers every image almost uniformly, so its thresholds,
    fitted on its eval answers, can sit within 1e-6 of the test images' values."""
    near = (np.isclose(outputs[contract.OOD_SCORE_OUTPUT], point["ood_threshold"], rtol=1e-4, atol=1e-5)
            | np.isclose(outputs[contract.CONFIDENCE_OUTPUT], point["confidence_threshold"], rtol=1e-4, atol=1e-5))
    return near & (outputs[contract.INK_FRACTION_OUTPUT] > 0)


def _uniform_png(path: Path) -> Path:
    """A 28x28 PNG of one grey: no ink, which the model reports (its ink_fraction is 0)."""
    from PIL import Image

    Image.new("L", (28, 28), 128).save(path, format="PNG")
    return path


def test_digits_predict_over_rest_and_grpc(model_server, pushed_model, sample_tree, tmp_path, in_process):
    """Each line is its own file's answer, in the files' order: the digit and confidence the model gives that
    file in process (to the three decimals printed), and the no-ink note exactly on the files without ink.

    The tiny pipeline's model gives every image the same probabilities, so the no-ink note (from the
    model's ink_fraction, which does differ) is what shows a line given another file's answer.
    """
    digits = [sorted((sample_tree / "testing" / str(digit)).iterdir())[0] for digit in range(10)]
    blanks = [_uniform_png(tmp_path / "blank-a.png"), _uniform_png(tmp_path / "blank-b.png")]
    files = [*digits[:3], blanks[0], *digits[3:8], blanks[1], *digits[8:]]
    outputs = in_process.outputs([path.read_bytes() for path in files])
    probabilities = outputs[contract.PROBABILITIES_OUTPUT]
    expected = [(str(path), int(row.argmax()), float(row.max()), _expected_note(outputs, index))
                for index, (path, row) in enumerate(zip(files, probabilities))]
    assert [note == NO_INK_NOTE for *_, note in expected] == [path in blanks for path in files]
    from components import abstention

    (version,) = pushed_model.iterdir()
    ambiguous = _on_a_threshold(outputs, abstention.read(str(version))).tolist()
    for transport in (["--rest", model_server.rest_url], ["--grpc", model_server.grpc_target]):
        result = run_digits("predict", *files, *transport, timeout=120)
        assert result.returncode == 0, result.stderr
        answers = _predicted_lines(result.stdout)
        # A verdict on a threshold may fall either way (see _on_a_threshold); every other line is exact.
        assert [(name, digit, None if boundary else note) for (name, digit, _, note), boundary
                in zip(answers, ambiguous)] == \
            [(name, digit, None if boundary else note) for (name, digit, _, note), boundary
             in zip(expected, ambiguous)]
        np.testing.assert_allclose([answer[2] for answer in answers], [answer[2] for answer in expected],
                                   rtol=0, atol=5e-4 + 1e-5)

    missing = run_digits("predict", tmp_path / "nope.png", "--rest", model_server.rest_url)
    assert missing.returncode == 1 and missing.stderr.strip() == f"Error: cannot read {tmp_path / 'nope.png'}: " \
                                                                  f"No such file or directory"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    refused = run_digits("predict", not_an_image, "--rest", model_server.rest_url)
    assert refused.returncode == 1 and "HTTP 400" in refused.stderr and "not a PNG" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    down = run_digits("predict", files[0], "--rest", "http://127.0.0.1:9", timeout=60)
    assert down.returncode == 1 and "cannot reach http://127.0.0.1:9" in down.stderr


def test_the_decision_travels_with_the_model_and_every_transport_gives_it(model_server, pushed_model, pngs,
                                                                         in_process, tmp_path):
    """The abstention outputs come from constants inside the SavedModel: the thresholds in
    assets.extra/abstention.json decide exactly what the graph decided in process, and REST, gRPC and
    the Python clients return the same decisions. Non-digits (made by data/nondigits.py) and a blank
    image are among the inputs, so every decision the model can make has a chance to appear."""
    import io

    from PIL import Image

    from components import abstention
    from data import nondigits
    from data.sample import encode_png
    from serving.client import GrpcClient, RestClient

    (version,) = pushed_model.iterdir()
    point = abstention.read(str(version))
    assert point is not None and point["eval_examples"] > 0
    digits = np.stack([np.asarray(Image.open(io.BytesIO(png))) for _, png in pngs])
    others = [encode_png(image) for images in nondigits.corpus(2, 0, digits).values() for image in images]
    blank = io.BytesIO()
    Image.new("L", (28, 28), 200).save(blank, format="PNG")
    images = [png for _, png in pngs] + others + [blank.getvalue()]
    outputs = in_process.outputs(images)
    scores, confidence = outputs[contract.OOD_SCORE_OUTPUT], outputs[contract.CONFIDENCE_OUTPUT]
    ink, decisions = outputs[contract.INK_FRACTION_OUTPUT], outputs[contract.DECISION_OUTPUT]
    expected = np.where((scores > point["ood_threshold"]) | (ink <= 0), 2,
                        np.where(confidence < point["confidence_threshold"], 1, 0))
    assert decisions.tolist() == expected.tolist()
    assert decisions[-1] == 2  # no ink: not a digit, whatever the model guessed
    np.testing.assert_array_equal(outputs[contract.ACCEPTED_OUTPUT], decisions == 0)
    names = [contract.DECISIONS[code] for code in decisions]
    ambiguous = _on_a_threshold(outputs, point)
    assert not ambiguous[-1]  # the blank's verdict comes from its ink alone
    for client in (RestClient(model_server.rest_url), GrpcClient(model_server.grpc_target)):
        answers = client.predict(images)
        # Exact, but for a verdict within float rounding of a threshold (see _on_a_threshold).
        assert [None if boundary else answer.decision for answer, boundary in zip(answers, ambiguous)] == \
            [None if boundary else name for name, boundary in zip(names, ambiguous)]
        assert [answer.accepted for answer in answers] == [answer.decision == "accepted" for answer in answers]
        np.testing.assert_allclose([answer.calibrated_confidence for answer in answers], confidence, atol=1e-5)
        np.testing.assert_allclose([answer.ood_score for answer in answers], scores, rtol=1e-5, atol=1e-4)


def test_python_client_is_importable_for_users_code(model_server, pngs):
    from serving.client import GrpcClient, RestClient

    image = pngs[5][1]
    rest = RestClient(model_server.rest_url).predict([image])[0]
    grpc_answer = GrpcClient(model_server.grpc_target).predict([image])[0]
    assert rest.digit == grpc_answer.digit and abs(rest.confidence - grpc_answer.confidence) < 1e-5
    assert len(rest.probabilities) == contract.NUM_CLASSES


def test_clients_get_what_the_model_saw_and_are_told_about_blank_images(model_server, pngs, in_process,
                                                                         sample_tree, tmp_path):
    """The normalized_image signature through REST and gRPC: the same answer, the 28x28 input, the ink."""
    import io

    from PIL import Image

    from serving.client import GrpcClient, RestClient

    blank = io.BytesIO()
    Image.new("RGBA", (200, 200), (0, 0, 0, 0)).save(blank, format="PNG")  # an untouched HTML canvas
    images = [pngs[3][1], blank.getvalue()]
    expected = in_process(images)
    for client in (RestClient(model_server.rest_url), GrpcClient(model_server.grpc_target)):
        plain = client.predict(images)
        seen = client.predict(images, with_image=True)
        for answer, wanted in zip([*plain, *seen], [*expected, *expected]):
            np.testing.assert_allclose(answer.probabilities, wanted, atol=1e-5)
        assert [a.blank for a in plain] == [a.blank for a in seen] == [False, True]
        assert plain[0].normalized_image is None and 0.05 < seen[0].ink_fraction < 0.5
        picture = np.array(seen[0].normalized_image)
        assert picture.shape == (28, 28) and picture.max() > 0.9 and picture[0].max() == 0.0
        assert np.array(seen[1].normalized_image).max() == 0.0

    digit_file = sorted((sample_tree / "testing" / "1").iterdir())[0]
    blank_file = tmp_path / "blank.png"
    blank_file.write_bytes(blank.getvalue())
    shown = run_digits("predict", "--show-input", digit_file, blank_file, "--rest", model_server.rest_url,
                       timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 * (1 + 14)  # an answer line, then 14 lines of 28 characters, per image
    assert lines[0].startswith(str(digit_file)) and "no ink" not in lines[0]
    assert all(len(line) == 28 for line in lines[1:15]) and "█" in "".join(lines[1:15])
    assert lines[15].startswith(str(blank_file)) and lines[15].endswith("no ink found: a guess on an empty image")
    assert set("".join(lines[16:])) == {" "}


def test_serve_refuses_bad_arguments_with_one_line(tmp_path):
    missing = run_digits("serve", "--model-dir", tmp_path / "nothing")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"Error: no model directory at {tmp_path / 'nothing'}: run `digits pipeline run` first, "
        f"or point --model-dir at a directory of numbered SavedModel versions"]
    bad = run_digits("serve", "--model-dir", tmp_path, "--num-versions", "0")
    assert bad.returncode == 2 and "num versions must be at least 1, got 0" in bad.stderr
    label = run_digits("serve", "--model-dir", tmp_path, "--label", "stable")
    assert label.returncode == 2 and "expected NAME=VERSION" in label.stderr
    threads = run_digits("serve", "--model-dir", tmp_path, "--intra-op-threads", "-1")
    assert threads.returncode == 2 and "intra op threads must be >= 0 (0: TensorFlow's choice), got -1" in threads.stderr
