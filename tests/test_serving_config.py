"""`digits serve`'s configuration and service plumbing without a model: batching settings as TF Serving
reads them, what runtime_latency times, and versions that cannot be unloaded under a request."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from serving.config import BatchingConfig, ServerConfig, batching_from_file

CONTAINER_BATCHING = REPO / "docker" / "batching_parameters.txt"


def test_digits_serves_defaults_are_the_containers_batching_file():
    # One set of defaults: `digits serve` batches as the TF Serving image does out of the box.
    assert batching_from_file(CONTAINER_BATCHING) == BatchingConfig()
    assert ServerConfig(model_base_path="unused").batching == BatchingConfig()


def test_a_field_the_file_leaves_out_has_tf_servings_default(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 16 }\n")
    config = batching_from_file(path)
    # SharedBatchScheduler::QueueOptions: no wait, 10 batches queued, no padding.
    assert (config.max_batch_size, config.batch_timeout_micros, config.max_enqueued_batches,
            config.allowed_batch_sizes) == (16, 0, 10, ())


def test_large_batch_splitting_from_the_file(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 64 }\nenable_large_batch_splitting { value: true }\n"
                    "max_execution_batch_size { value: 16 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n")
    config = batching_from_file(path)
    assert config.enable_large_batch_splitting and config.execution_batch_size == 16
    assert config.padded_size(5) == 8 and config.padded_size(9) == 16


def test_batching_files_tf_serving_would_refuse_are_refused(tmp_path):
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 32 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 16\n")
    with pytest.raises(ValueError, match="must increase and end at max_batch_size 32"):
        batching_from_file(path)
    path.write_text("max_batch_size { value: 32 }\nbatch_timeout_micro { value: 1 }\n")
    with pytest.raises(ValueError, match="is not a valid tensorflow.serving.BatchingParameters"):
        batching_from_file(path)
    with pytest.raises(ValueError, match="batch wait must be one of arriving, always"):
        BatchingConfig(batch_wait="sometimes")


# -- what runtime_latency times --------------------------------------------------------------------------------

class _SlowCheckSignature:
    """A signature whose input checks take 0.3 s and whose model call is instant."""

    name = "serving_default"

    def check(self, inputs):
        time.sleep(0.3)
        return 1


class _FakeServable:
    version = 7
    signatures = {"serving_default": _SlowCheckSignature()}

    def arrival(self, signature):
        return nullcontext()

    def run(self, signature, inputs, size, caller, arrival):
        return {"probabilities": np.full((1, 10), 0.1, dtype=np.float32)}


class _FakeManager:
    name = "digits"

    def lease(self, name, version=None, label=None):
        return nullcontext(_FakeServable())


def test_runtime_latency_times_the_model_call_not_the_input_checks():
    # TF Serving records runtime_latency around its session's Run only (predict_util.cc), after
    # the request was parsed and checked.
    from serving.metrics import ServingMetrics
    from serving.service import ModelRequest, PredictionService

    metrics = ServingMetrics()
    service = PredictionService(_FakeManager(), metrics, max_concurrent_requests=4)
    started = time.perf_counter()
    service.predict(ModelRequest("digits"), "", lambda signature: {"image_bytes": np.array([b"x"], dtype=object)},
                    missing_signature=lambda name: AssertionError(name))
    assert time.perf_counter() - started >= 0.3
    samples = {sample.name: sample.value for family in text_string_to_metric_families(metrics.render())
               for sample in family.samples if family.name == ":tensorflow:serving:runtime_latency"}
    assert samples[":tensorflow:serving:runtime_latency_count"] == 1
    assert samples[":tensorflow:serving:runtime_latency_sum"] < 100_000  # microseconds: not the 0.3 s of checks


# -- unloading waits for the requests that hold a version -------------------------------------------------------

class _Held:
    """Stands in for a Servable in the manager's table: counts requests, frees nothing, and tells when
    someone starts waiting for its requests to finish."""

    def __init__(self, version: int):
        self.version = version
        self._in_flight = 0
        self._idle = threading.Condition()
        self.waited_for = threading.Event()
        self.released = False

    def enter(self):
        with self._idle:
            self._in_flight += 1

    def leave(self):
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout=None):
        with self._idle:
            self.waited_for.set()
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    def release(self):
        self.released = True


def test_a_version_is_not_ended_while_a_request_holds_it(tmp_path):
    from serving.metrics import ServingMetrics
    from serving.models import AVAILABLE, END, UNLOADING, ModelManager, VersionStatus

    manager = ModelManager(ServerConfig(model_base_path=tmp_path), ServingMetrics())
    held = _Held(1)
    manager._servables[1] = held
    manager._set_status(VersionStatus(1, AVAILABLE))
    with manager.lease("digits") as servable:  # resolved and counted in one step
        assert servable is held
        unloading = threading.Thread(target=manager._unload, args=(1,))
        unloading.start()
        # The unload is held where it waits for this request: whenever it gets there, the state is the same.
        assert held.waited_for.wait(timeout=30), "the unload did not wait for the request holding the version"
        assert unloading.is_alive() and manager.statuses("digits")[0].state == UNLOADING
        assert not held.released
        with pytest.raises(Exception, match="Servable not found for request: Latest\\(digits\\)"):
            with manager.lease("digits"):  # new requests no longer find it
                pass
    unloading.join(timeout=10)
    assert not unloading.is_alive() and held.released
    assert manager.statuses("digits")[0].state == END


def test_another_max_batch_size_moves_the_end_of_the_allowed_sizes():
    # TF Serving refuses allowed_batch_sizes that do not end at max_batch_size: --max-batch-size keeps them valid.
    assert BatchingConfig().with_max_batch_size(16).allowed_batch_sizes == (1, 2, 4, 8, 16)
    assert BatchingConfig().with_max_batch_size(48).allowed_batch_sizes == (1, 2, 4, 8, 16, 32, 48)
    assert BatchingConfig().with_max_batch_size(32) == BatchingConfig()
