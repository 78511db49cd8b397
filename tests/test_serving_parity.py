"""`digits serve` behaves as TF Serving 2.16.1 with the container's own batching file, and so do its metrics.

Each test names the TF Serving source it mirrors (tensorflow/serving at tag 2.16.1, and
TensorFlow's shared_batch_scheduler.h for the batch queue).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests

from conftest import REPO, run_digits, start_server
from serving.config import BatchingConfig
from serving_clients import MetricsDelta, b64, grpc_predict, grpc_status, predict_rest

pytestmark = [pytest.mark.slow]

CONTAINER_BATCHING = REPO / "docker" / "batching_parameters.txt"
MAX_BATCH = BatchingConfig().max_batch_size  # 32, as the container's file says
QUEUING = ":tensorflow:serving:batching_session:queuing_latency"
PROCESSED = ":tensorflow:serving:batching_session:processed_batch_size"
NO_INK_NOTE = "no ink found: a guess on an empty image"  # what `digits predict` adds to an image without ink


@pytest.fixture(scope="module")
def pngs(sample_tree) -> list[bytes]:
    """100 held-out digits (10 of each class)."""
    return [path.read_bytes() for digit in range(10)
            for path in sorted((sample_tree / "testing" / str(digit)).iterdir())[:10]]


@pytest.fixture(scope="module")
def container_server(pushed_model):
    """`digits serve` reading the TF Serving container's own batching_parameters.txt."""
    server = start_server(pushed_model, "--batching-parameters-file", CONTAINER_BATCHING)
    yield server
    assert server.stop() == 0


# -- requests larger than the batch limit --------------------------------------------------------------------------

def test_a_request_over_max_batch_size_is_refused_with_tf_servings_message(container_server, pngs):
    # shared_batch_scheduler.h: "Task size %d is larger than maximum input batch size %d", INVALID_ARGUMENT.
    message = f"Task size {MAX_BATCH + 1} is larger than maximum input batch size {MAX_BATCH}"
    too_many = predict_rest(container_server.rest_url, pngs[:MAX_BATCH + 1])
    assert too_many.status_code == 400 and too_many.json() == {"error": message}
    with pytest.raises(grpc.RpcError) as refused:
        grpc_predict(container_server.grpc_target, pngs[:MAX_BATCH + 1])
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    full = predict_rest(container_server.rest_url, pngs[:MAX_BATCH])
    assert full.status_code == 200 and len(full.json()["predictions"]) == MAX_BATCH


def test_digits_predict_sends_many_files_in_requests_the_container_accepts(container_server, sample_tree, tmp_path):
    """The docs' `digits predict data/mnist-png/testing/7/*.png`: 100 files, in requests of at most 32, each
    line its own file's answer, in order, as the model gives it when asked directly over REST.

    The tiny pipeline's model gives every image the same probabilities; three images without ink, one in
    each of three requests, carry the no-ink note (from the model's ink_fraction), which shows a line
    given another file's answer.
    """
    from PIL import Image

    files = sorted((sample_tree / "testing" / "7").iterdir())[:97]
    for position in (3, 50, 97):
        blank = tmp_path / f"blank-{position}.png"
        Image.new("L", (28, 28), 128).save(blank, format="PNG")
        files.insert(position, blank)
    assert len(files) == 100
    rows = [row for start in range(0, len(files), MAX_BATCH) for row in predict_rest(
        container_server.rest_url, [path.read_bytes() for path in files[start:start + MAX_BATCH]]
    ).json()["predictions"]]
    expected = [(str(path), row["predicted_class"], max(row["probabilities"]), row["ink_fraction"] == 0.0)
                for path, row in zip(files, rows)]
    assert [position for position, (*_, blank) in enumerate(expected) if blank] == [3, 50, 97]
    for transport in (["--rest", container_server.rest_url], ["--grpc", container_server.grpc_target]):
        result = run_digits("predict", *files, *transport, timeout=300)
        assert result.returncode == 0, result.stderr
        lines = [line.split(maxsplit=3) for line in result.stdout.splitlines()]
        answers = [(name, int(digit), float(confidence.strip("()")), note == [NO_INK_NOTE])
                   for name, digit, confidence, *note in lines]
        assert [(name, digit, noted) for name, digit, _, noted in answers] == \
            [(name, digit, blank) for name, digit, _, blank in expected]
        np.testing.assert_allclose([answer[2] for answer in answers], [answer[2] for answer in expected],
                                   rtol=0, atol=5e-4 + 1e-5)
    too_big = run_digits("predict", *files[:40], "--rest", container_server.rest_url, "--batch-size", "40")
    assert too_big.returncode == 1
    assert too_big.stderr.strip() == ("Error: the server refused: HTTP 400: Task size 40 is larger than maximum "
                                      "input batch size 32")


def test_large_batch_splitting_as_the_batching_file_asks(pushed_model, pngs, tmp_path):
    # bundle_factory_util.h: enable_large_batch_splitting lets a request up to max_batch_size through,
    # run in batches of at most max_execution_batch_size.
    batching = tmp_path / "batching_parameters.txt"
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 0 }\n"
                        "enable_large_batch_splitting { value: true }\nmax_execution_batch_size { value: 16 }\n")
    with start_server(pushed_model, "--batching-parameters-file", batching) as server:
        delta = MetricsDelta(server.rest_url)
        response = predict_rest(server.rest_url, pngs[:40])
        assert response.status_code == 200, response.text
        probabilities = [row["probabilities"] for row in response.json()["predictions"]]
        for index in (0, 13, 26, 39):  # in order: each answer is its own image's
            alone = predict_rest(server.rest_url, [pngs[index]]).json()["predictions"][0]["probabilities"]
            np.testing.assert_allclose(probabilities[index], alone, atol=1e-5)
        delta.take()
        assert delta.total(PROCESSED + "_count") == 3 + 4  # 16 + 16 + 8, then the four single ones
        assert _at_most(delta, PROCESSED, 8) == 1 + 4  # no allowed_batch_sizes in the file: no padding
        assert delta.total(PROCESSED + "_sum") == 40 + 4
        assert predict_rest(server.rest_url, pngs[:65]).json() == {
            "error": "Task size 65 is larger than maximum input batch size 64"}


def _at_most(delta: MetricsDelta, histogram: str, bound: float) -> float:
    """How many observations of a label-less histogram were <= bound (its cumulative bucket)."""
    return sum(value - delta.before.get(histogram + "_bucket", {}).get(labels, 0)
               for labels, value in delta.after[histogram + "_bucket"].items() if float(dict(labels)["le"]) == bound)


# -- metrics, each as TF Serving records it ------------------------------------------------------------------------

def test_queuing_latency_is_recorded_per_request_and_processed_batch_size_per_batch(container_server, pngs):
    # batching_session.cc ProcessBatch: queuing_latency{thread_pool_name=""} gets one observation per task;
    # batching_util.h RecordProcessedBatchSize: one per batch, no labels, Exponential(1, 2, 14) buckets,
    # the size after padding to allowed_batch_sizes.
    delta = MetricsDelta(container_server.rest_url)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda png: predict_rest(container_server.rest_url, [png]).status_code, pngs[:48]))
    assert statuses == [200] * 48
    delta.take()
    assert delta(QUEUING + "_count", thread_pool_name="") == 48
    batches = delta(PROCESSED + "_count")
    assert 1 <= batches < 48
    assert delta(":tensorflow:serving:batching_session:wrapped_run_count") == batches
    assert [set(dict(labels)) for labels in delta.after[PROCESSED + "_bucket"]] == [{"le"}] * 15
    assert sorted(float(dict(labels)["le"]) for labels in delta.after[PROCESSED + "_bucket"]) == [
        2.0 ** i for i in range(14)] + [float("inf")]
    # Padded up to the container's allowed sizes (1, 2, 4, 8, 16, 32): what was run plus the padding.
    padding = delta.total(":tensorflow:serving:batching_session:padding_size_sum")
    assert delta.total(PROCESSED + "_sum") == 48 + padding
    assert delta.total(":tensorflow:serving:batching_session:input_batch_size_sum") == 48


def test_request_count_counts_rest_status_requests_and_not_grpc_ones(container_server):
    # http_server.cc counts every /v1/ REST request, status and metadata GETs included, with API="" in
    # request_latency; prediction_service_impl.cc and model_service_impl.cc count no gRPC status call.
    delta = MetricsDelta(container_server.rest_url)
    for _ in range(3):
        assert requests.get(f"{container_server.rest_url}/v1/models/digits", timeout=30).status_code == 200
    assert requests.get(f"{container_server.rest_url}/v1/models/digits/metadata", timeout=30).status_code == 200
    for _ in range(5):
        grpc_status(container_server.grpc_target)
    delta.take()
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="OK") == 4
    assert delta(":tensorflow:serving:request_latency_count", model_name="digits", API="", entrypoint="REST") == 4


def test_runtime_latency_is_predict_for_both_apis_and_only_for_model_calls(container_server, pngs):
    # predict_util.cc: RecordRuntimeLatency(model, "Predict", "TF1") around the session's Run, on success;
    # a request refused before the model runs records none.
    delta = MetricsDelta(container_server.rest_url)
    assert predict_rest(container_server.rest_url, pngs[:2]).status_code == 200
    grpc_predict(container_server.grpc_target, pngs[:1])
    assert predict_rest(container_server.rest_url, [b"not an image"]).status_code == 400
    delta.take()
    assert delta(":tensorflow:serving:runtime_latency_count", model_name="digits", API="Predict", runtime="TF1") == 2
    assert delta(":tensorflow:serving:request_count", model_name="digits", status="INVALID_ARGUMENT") == 1


def test_a_slow_upload_is_not_the_servers_request_latency(container_server, pngs):
    """TF Serving starts the clock once the whole request has arrived (http_server.cc ProcessRequest).

    The client pauses mid-body, as a slow uplink does. The latency the server records must fit between
    the moment the client began sending the rest of the body and the moment the answer was in: whatever
    the machine's speed, it cannot hold the pause before.
    """
    import socket
    import time

    body = ('{"instances": [%s]}' % ",".join(['{"b64": "%s"}' % b64(pngs[0])["b64"]])).encode()
    head = (f"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    host, port = container_server.rest_url.removeprefix("http://").split(":")
    delta = MetricsDelta(container_server.rest_url)
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(head + body[:10])
        time.sleep(1.0)  # the slow upload itself: the client pauses before sending the rest
        rest_sent = time.perf_counter()
        connection.sendall(body[10:])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        answered = time.perf_counter()
    assert answer.startswith(b"HTTP/1.1 200")
    delta.take()
    assert delta(":tensorflow:serving:request_latency_count", model_name="digits", API="predict",
                 entrypoint="REST") == 1
    latency_us = delta(":tensorflow:serving:request_latency_sum", model_name="digits", API="predict",
                       entrypoint="REST")
    assert 0 < latency_us <= (answered - rest_sent) * 1e6


def _corrupt_pixel_stream(png: bytes) -> bytes:
    """The PNG with one byte of its pixel stream flipped and the chunk's CRC fixed up: only decoding tells."""
    import struct
    import zlib

    start = png.index(b"IDAT") + 4
    corrupt = bytearray(png)
    corrupt[start + 5] ^= 0xFF
    length = struct.unpack(">I", png[start - 8:start - 4])[0]
    struct.pack_into(">I", corrupt, start + length, zlib.crc32(bytes(corrupt[start - 4:start + length])))
    return bytes(corrupt)


def test_a_corrupt_image_among_batched_requests_fails_only_its_own_request(pushed_model, pngs, tmp_path):
    """Single-image requests held until they fill one batch of 12 (its wait outlasts the test).

    A PNG cut short at its end reads fine to the server's Pillow check, so it joins the batch, and
    TensorFlow's decoder fails the batch's model call; decoding alone then finds it, and the other 11
    run once more, together: two model calls in all (wrapped_run_count, as TF Serving counts them), not
    one per request. A PNG whose pixel stream is broken is refused before it joins a batch: the 12
    good requests beside it run in one call.
    """
    batching = tmp_path / "batching_parameters.txt"
    batching.write_text("max_batch_size { value: 12 }\nbatch_timeout_micros { value: 300000000 }\n")
    truncated, corrupt = pngs[0][:-20], _corrupt_pixel_stream(pngs[0])
    with start_server(pushed_model, "--batching-parameters-file", batching, "--batch-wait", "always") as server:
        for bad, good_count, calls, message in (
                (truncated, 11, 2, f"Invalid PNG data, size {len(truncated)}"),
                (corrupt, 12, 1, "image_bytes[0] is a corrupt PNG image that cannot be decoded")):
            images = [*pngs[1:1 + good_count // 2], bad, *pngs[1 + good_count // 2:1 + good_count]]
            delta = MetricsDelta(server.rest_url)
            with ThreadPoolExecutor(len(images)) as pool:
                results = list(pool.map(lambda image: predict_rest(server.rest_url, [image]), images))
            delta.take()
            refused = images.index(bad)
            assert results[refused].status_code == 400 and message in results[refused].json()["error"], \
                results[refused].text
            assert [response.status_code for index, response in enumerate(results) if index != refused] == \
                [200] * good_count
            assert delta(":tensorflow:serving:batching_session:wrapped_run_count") == calls
            # The first call ran the 12 queued requests; after a failure, the second ran the 11 good ones.
            assert delta.total(PROCESSED + "_sum") == (12 + 11 if calls == 2 else 12)
