"""The server-side batcher on its own: who waits, what is merged, who runs it, who gets an error, what is dropped.

Each request runs on its own thread, as in the server (a REST worker or a gRPC thread). Last, with batching
off: a request whose deadline passed on its way to the model, through the server's gRPC service.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import Batcher, BatchStats, Caller
from serving.config import BatchingConfig
from serving.errors import ServingError


class Model:
    """Records the batches it is called with; refuses any batch holding b"bad"; can be held."""

    def __init__(self):
        self.calls: list[list[bytes]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, inputs: dict) -> dict:
        self.entered.set()
        self.release.wait(timeout=30)
        images = list(inputs["image_bytes"])
        self.calls.append(images)
        if b"bad" in images:
            raise ServingError("INVALID_ARGUMENT", "Invalid PNG data")
        return {"length": np.array([len(image) for image in images])}


def _request(*images: bytes) -> dict:
    return {"image_bytes": np.array(images, dtype=object)}


def _locate(parts: list[dict]) -> list[ServingError | None]:
    """Decoding only, as Signature.undecodable does: finds b"bad" without a model call."""
    return [ServingError("INVALID_ARGUMENT", "Invalid PNG data") if b"bad" in list(part["image_bytes"]) else None
            for part in parts]


class Clients:
    """Threads that each send one request through the batcher; on exit, the model is let go and they finish."""

    def __init__(self, batcher: Batcher, model: Model):
        self._batcher = batcher
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=24)

    def send(self, *images: bytes, caller: Caller = Caller()) -> Future:
        return self._pool.submit(self._batcher.run, _request(*images), len(images), caller)

    def send_held(self, *images: bytes) -> Future:
        """Sends a request and holds the model inside its call (until `model.release` is set)."""
        self._model.release.clear()
        future = self.send(*images)
        assert self._model.entered.wait(timeout=10)
        return future

    def send_queued(self, *images: bytes, caller: Caller = Caller()) -> Future:
        """Sends a request and waits until it is queued behind the batch that is running."""
        queued = self._batcher.queued
        future = self.send(*images, caller=caller)
        _wait_for(lambda: self._batcher.queued == queued + 1)
        return future

    def __enter__(self) -> "Clients":
        return self

    def __exit__(self, *_) -> None:
        self._model.release.set()
        self._pool.shutdown(wait=True)


def _wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


# -- who waits ---------------------------------------------------------------------------------------------------

def test_a_lone_request_does_not_wait_for_company():
    model = Model()
    batcher = Batcher(model, BatchingConfig(batch_timeout_micros=60_000_000), "lone")
    with Clients(batcher, model) as clients:
        # Were it to wait for the 60 s timeout, result() would give up after 10 s.
        assert clients.send(b"abc").result(timeout=10)["length"].tolist() == [3]
    assert model.calls == [[b"abc"]]


def test_a_lone_request_runs_on_its_own_thread():
    threads = []

    def model(inputs: dict) -> dict:
        threads.append(threading.current_thread())
        return {"length": np.array([len(image) for image in inputs["image_bytes"]])}

    batcher = Batcher(model, BatchingConfig(), "inline")
    assert batcher.run(_request(b"abc"), 1)["length"].tolist() == [3]
    assert threads == [threading.current_thread()]


def test_batch_wait_always_is_tf_servings_timeout_even_for_a_lone_request():
    # TF Serving keeps a batch that is not full open for batch_timeout_micros, whoever is coming.
    model = Model()
    batcher = Batcher(model, BatchingConfig(batch_timeout_micros=300_000, batch_wait="always"), "always")
    started = time.monotonic()
    assert batcher.run(_request(b"abc"), 1)["length"].tolist() == [3]
    assert time.monotonic() - started >= 0.3  # a lower bound: the wait itself, not a speed


def test_batch_wait_always_merges_what_comes_within_the_timeout():
    model = Model()
    config = BatchingConfig(max_batch_size=2, allowed_batch_sizes=(1, 2), batch_timeout_micros=30_000_000,
                            batch_wait="always")
    batcher = Batcher(model, config, "always")
    with Clients(batcher, model) as clients:
        first = clients.send(b"first")
        _wait_for(lambda: batcher.busy and batcher.queued == 0)  # it leads, and waits for a second request
        time.sleep(0.05)
        assert not first.done()
        second = clients.send(b"second")  # fills the batch: it runs at once, long before the timeout
        assert first.result(timeout=10)["length"].tolist() == [5]
        assert second.result(timeout=10)["length"].tolist() == [6]
    assert model.calls == [[b"first", b"second"]]


def test_a_batch_waits_for_a_request_on_its_way_and_not_for_one_that_gave_up():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8, allowed_batch_sizes=(8,), batch_timeout_micros=60_000_000),
                      "wait")
    with Clients(batcher, model) as clients:
        late = batcher.arrival()  # resolved and being checked: counted here
        early = clients.send(b"early")
        _wait_for(lambda: batcher.busy)  # the early one leads, and waits for company
        time.sleep(0.05)
        assert not early.done()
        batcher.run(_request(b"late"), 1, arrival=late)  # joins the batch
        assert early.result(timeout=10)["length"].tolist() == [5]

        refused = batcher.arrival()
        alone = clients.send(b"alone")
        _wait_for(lambda: batcher.busy)
        time.sleep(0.05)
        assert not alone.done()
        refused.close()  # its input was bad: the leader is woken at once, not after 60 s
        assert alone.result(timeout=10)["length"].tolist() == [5]
    assert model.calls == [[b"early", b"late"], [b"alone"]]
    assert batcher.arriving == 0


def test_arrivals_are_counted_per_queue():
    # A request on its way to another version's or signature's queue never delays this one.
    model = Model()
    config = BatchingConfig(batch_timeout_micros=60_000_000)
    this, other = Batcher(model, config, "this"), Batcher(model, config, "other")
    with other.arrival():
        assert this.run(_request(b"abc"), 1)["length"].tolist() == [3]  # would hang for 60 s otherwise


# -- what is merged, what is refused -------------------------------------------------------------------------------

def test_requests_queued_while_the_model_is_busy_share_one_call():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=4, allowed_batch_sizes=(1, 2, 4)), "busy")
    with Clients(batcher, model) as clients:
        first = clients.send_held(b"a")
        rest = [clients.send_queued(b"b" * n) for n in range(1, 6)]  # 5 queue up behind
        model.release.set()
        assert first.result(timeout=10)["length"].tolist() == [1]
        assert [f.result(timeout=10)["length"].tolist() for f in rest] == [[1], [2], [3], [4], [5]]
    # The 5 queued ones: one call of 4 (max_batch_size), then the fifth.
    assert [len(call) for call in model.calls] == [1, 4, 1]


def test_a_request_larger_than_the_batch_limit_is_refused_in_tf_servings_words():
    model = Model()
    batcher = Batcher(model, BatchingConfig(), "big")
    with pytest.raises(ServingError) as refused:
        batcher.run(_request(*[b"x"] * 33), 33)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert refused.value.message == "Task size 33 is larger than maximum input batch size 32"
    assert model.calls == []


def test_large_batch_splitting_runs_a_big_request_in_parts_and_answers_in_order():
    model = Model()
    config = BatchingConfig(max_batch_size=64, enable_large_batch_splitting=True, max_execution_batch_size=16,
                            allowed_batch_sizes=(4, 8, 16))
    batcher = Batcher(model, config, "split")
    images = [b"x" * n for n in range(1, 41)]
    assert batcher.run(_request(*images), 40)["length"].tolist() == list(range(1, 41))
    assert [len(call) for call in model.calls] == [16, 16, 8]
    with pytest.raises(ServingError, match="Task size 65 is larger than maximum input batch size 64"):
        batcher.run(_request(*[b"x"] * 65), 65)


def test_a_full_queue_refuses_with_unavailable():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=1, max_enqueued_batches=1, allowed_batch_sizes=()), "full")
    with Clients(batcher, model) as clients:
        running = clients.send_held(b"a")
        queued = clients.send_queued(b"b")
        with pytest.raises(ServingError, match="queue .* is full") as refused:
            batcher.run(_request(b"c"), 1)  # refused at once, on the caller's thread
        assert refused.value.code == "UNAVAILABLE" and refused.value.http_status == 503
        model.release.set()
        assert running.result(timeout=10) and queued.result(timeout=10)


# -- who gets an error ---------------------------------------------------------------------------------------------

def test_one_bad_request_does_not_fail_the_others_and_the_batch_runs_again_once():
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8, allowed_batch_sizes=(8,)), "bad", locate=_locate)
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        good, bad, also_good = (clients.send_queued(data) for data in (b"ok", b"bad", b"fine"))
        model.release.set()
        blocker.result(timeout=10)
        assert good.result(timeout=10)["length"].tolist() == [2]
        assert also_good.result(timeout=10)["length"].tolist() == [4]
        with pytest.raises(ServingError, match="Invalid PNG data"):
            bad.result(timeout=10)
    # Tried together, the bad one located without the model, the rest run once more together.
    assert model.calls == [[b"x"], [b"ok", b"bad", b"fine"], [b"ok", b"fine"]]


@pytest.mark.parametrize("queued", [2, 7, 16])
def test_without_a_locator_a_bad_request_costs_log2_calls_not_one_per_request(queued):
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=32), "halving")
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        datas = [b"ok%d" % n for n in range(queued - 1)] + [b"bad"]
        futures = [clients.send_queued(data) for data in datas]
        model.release.set()
        blocker.result(timeout=10)
        for data, future in zip(datas, futures):
            if data == b"bad":
                with pytest.raises(ServingError, match="Invalid PNG data"):
                    future.result(timeout=10)
            else:
                assert future.result(timeout=10)["length"].tolist() == [len(data)]
    calls_after_the_blocker = len(model.calls) - 1
    assert calls_after_the_blocker <= 1 + 2 * math.ceil(math.log2(queued))
    if queued >= 7:
        assert calls_after_the_blocker < queued + 1  # the old way: one batched call, then one per request


def test_a_model_failure_that_is_not_bad_input_fails_the_batch_without_retries():
    calls = []

    def broken(inputs: dict) -> dict:
        calls.append(len(inputs["image_bytes"]))
        raise ServingError("INTERNAL", "out of memory")

    batcher = Batcher(broken, BatchingConfig(), "broken", locate=_locate)
    with pytest.raises(ServingError, match="out of memory"):
        batcher.run(_request(b"a", b"b"), 2)
    assert calls == [2]


# -- what is dropped -----------------------------------------------------------------------------------------------

def test_a_request_whose_deadline_passed_in_the_queue_is_dropped_not_run():
    model = Model()
    stats: list[BatchStats] = []
    batcher = Batcher(model, BatchingConfig(max_batch_size=8, allowed_batch_sizes=(8,)), "deadline",
                      on_stats=stats.append)
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        expiring = clients.send_queued(b"late", caller=Caller.within(0.05))
        patient = clients.send_queued(b"patient", caller=Caller.within(60))
        time.sleep(0.1)  # the first one's deadline passes while the model is busy
        model.release.set()
        with pytest.raises(ServingError) as dropped:
            expiring.result(timeout=10)
        assert dropped.value.code == "RESOURCE_EXHAUSTED"
        assert dropped.value.message == "Run() timeout exceeded while waiting in batching queue"  # TF Serving's
        assert patient.result(timeout=10)["length"].tolist() == [7]
        blocker.result(timeout=10)
    assert model.calls == [[b"x"], [b"patient"]]  # nobody spent the CPU on the expired one
    # Queueing time is reported per request, the dropped one included (as TF Serving records it).
    queued = [seconds for entry in stats for seconds in entry.queued_s]
    assert len(queued) == 3 and sum(1 for seconds in queued if seconds >= 0.1) == 2


def test_a_request_whose_client_went_away_is_dropped_as_cancelled():
    model = Model()
    gone = threading.Event()
    batcher = Batcher(model, BatchingConfig(), "gone")
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        abandoned = clients.send_queued(b"abandoned", caller=Caller(gone=gone.is_set))
        gone.set()  # the client closed its connection
        model.release.set()
        with pytest.raises(ServingError) as dropped:
            abandoned.result(timeout=10)
        assert dropped.value.code == "CANCELLED"
        blocker.result(timeout=10)
    assert model.calls == [[b"x"]]


def test_batch_statistics_are_tf_servings_per_request_and_per_call_figures():
    model = Model()
    stats: list[BatchStats] = []
    batcher = Batcher(model, BatchingConfig(), "stats", on_stats=stats.append)
    with Clients(batcher, model) as clients:
        blocker = clients.send_held(b"x")
        queued = [clients.send_queued(b"a" * n, b"b") for n in range(1, 4)]  # 3 requests of 2 images
        model.release.set()
        for future in [blocker, *queued]:
            future.result(timeout=10)
    assert [size for entry in stats for size in entry.input_sizes] == [1, 2, 2, 2]
    assert [len(entry.queued_s) for entry in stats if entry.queued_s] == [1, 3]  # per request, per dequeue
    # 1 image runs as 1; 6 images run as 8, the next allowed size of the container's file.
    assert [(entry.batch_size, entry.padding) for entry in stats if entry.batch_size] == [(1, 0), (8, 2)]


def test_a_deadline_that_passes_while_its_batch_waits_drops_the_request_when_the_batch_runs():
    model = Model()
    batcher = Batcher(model, BatchingConfig(batch_timeout_micros=300_000, batch_wait="always"), "expires")
    with Clients(batcher, model) as clients:
        patient = clients.send(b"patient")
        _wait_for(lambda: batcher.busy)  # gathering: the batch waits 0.3 s for company
        hasty = clients.send(b"hasty", caller=Caller.within(0.05))  # joins the open batch
        with pytest.raises(ServingError, match="Run\\(\\) timeout exceeded while waiting in batching queue"):
            hasty.result(timeout=10)
        assert patient.result(timeout=10)["length"].tolist() == [7]
    assert model.calls == [[b"patient"]]


# -- without batching ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_without_batching_an_expired_request_gets_deadline_exceeded_before_the_model_runs(pushed_model, sample_tree,
                                                                                           monkeypatch):
    """docs/serving.md: without batching, an expired request is refused with DEADLINE_EXCEEDED before the
    model runs. A gRPC call to the server's own service, over the pushed model loaded with batching off,
    is held on its way to the model until its deadline has passed (as a busy server would hold it): the
    server answers DEADLINE_EXCEEDED without calling the model. The next call, with time left, is answered."""
    import grpc
    from prometheus_client.parser import text_string_to_metric_families

    from serving import runtime
    from serving.config import ServerConfig
    from serving.grpc_service import make_server
    from serving.metrics import ServingMetrics
    from serving.models import ModelManager
    from serving.service import PredictionService
    from serving_clients import grpc_predict

    # TensorFlow's threads here are pytest's own: leave their scheduling priority alone.
    monkeypatch.setattr(runtime, "lower_compute_priority", lambda: 0)
    config = ServerConfig(model_base_path=pushed_model, grpc_port=0, batching=BatchingConfig(enabled=False),
                          warmup=False)
    metrics = ServingMetrics()
    manager = ModelManager(config, metrics)
    manager.load_existing()
    servable = manager.resolve("digits")
    signature = servable.signatures["serving_default"]
    run_model, run_servable = signature.run, servable.run
    model_calls: list[int] = []
    held: list[Caller] = []

    def counted(inputs: dict) -> dict:
        model_calls.append(len(inputs["image_bytes"]))
        return run_model(inputs)

    def held_until_its_deadline_passed(signature, inputs, size, caller, arrival=None):
        if not held:  # the first call only
            held.append(caller)
            _wait_for(lambda: time.monotonic() >= caller.deadline, timeout=30)
        return run_servable(signature, inputs, size, caller, arrival)

    def requests_counted(status: str) -> float:
        return sum(sample.value for family in text_string_to_metric_families(metrics.render())
                   for sample in family.samples if family.name == ":tensorflow:serving:request_count"
                   and sample.labels == {"model_name": "digits", "status": status})

    monkeypatch.setattr(signature, "run", counted)
    monkeypatch.setattr(servable, "run", held_until_its_deadline_passed)
    png = sorted((sample_tree / "testing" / "3").iterdir())[0].read_bytes()
    server, port = make_server(config, PredictionService(manager, metrics, config.max_concurrent_requests), port=0)
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as expired:
            grpc_predict(f"127.0.0.1:{port}", [png], timeout=1)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own view
        _wait_for(lambda: sum(map(requests_counted, ("DEADLINE_EXCEEDED", "OK"))) == 1, timeout=30)
        assert requests_counted("DEADLINE_EXCEEDED") == 1  # the server's answer
        assert held[0].deadline is not None and model_calls == []
        answered = grpc_predict(f"127.0.0.1:{port}", [png], timeout=60)
        assert answered.outputs["probabilities"].tensor_shape.dim[0].size == 1
        assert model_calls == [1] and requests_counted("OK") == 1
    finally:
        server.stop(None)
        servable.release()
