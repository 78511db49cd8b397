"""Typed configuration of `digits serve`: ports, version policy, batching and request limits.

Names and defaults follow TF Serving's flags and protos where it has them
(`--rest_api_port`, `latest { num_versions }`, `BatchingParameters`), so an
operator can read one and know the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from data import contract
from serving.ports import Port


BATCH_WAITS = ("arriving", "always")
# TF Serving's values for fields a batching parameters file leaves out (its SharedBatchScheduler::QueueOptions).
TF_SERVING_QUEUE_DEFAULTS = {"max_batch_size": 1000, "batch_timeout_micros": 0, "max_enqueued_batches": 10}


@dataclass(frozen=True)
class BatchingConfig:
    """Server-side batching of concurrent requests: TF Serving's `BatchingParameters`.

    The defaults are the container's own file, docker/batching_parameters.txt (a test
    keeps them equal), so `digits serve` and the TF Serving image batch alike out of the box.
    """

    enabled: bool = True
    # The most examples one request may have, and the most one batch holds (TF Serving's
    # input_batch_size_limit): a larger request is refused with TF Serving's "Task size N is
    # larger than maximum input batch size M", unless large batch splitting is on.
    max_batch_size: int = 32
    # The longest a batch that is not full waits for more requests, counted from its first one.
    batch_timeout_micros: int = 2_000
    # How that wait ends. "always": TF Serving's behaviour, every batch that is not full waits the
    # whole timeout, so a lone request pays it too. "arriving" (digits serve's default): the wait
    # ends as soon as no request is on its way to the same queue (parsed, its model resolved, its
    # inputs being checked), so a lone request never waits and batches still fill under load.
    batch_wait: str = "arriving"
    # Queue bound: beyond max_enqueued_batches x max_batch_size queued examples, requests get
    # UNAVAILABLE at once instead of memory and latency growing without bound.
    max_enqueued_batches: int = 100
    # Split a request into parts of at most max_execution_batch_size examples (each may join a
    # different batch) instead of refusing it; max_batch_size then only limits the request.
    enable_large_batch_splitting: bool = False
    max_execution_batch_size: int | None = None  # None: max_batch_size
    # TF Serving pads each batch up to the next of these sizes and records that size as
    # processed_batch_size. digits serve runs batches unpadded (it has no compiled shapes to
    # hit) but records the size TF Serving would have run, so the metric reads alike.
    allowed_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_batch_sizes", tuple(int(size) for size in self.allowed_batch_sizes))
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            problems.append(f"batch timeout must be >= 0 microseconds, got {self.batch_timeout_micros}")
        if self.batch_wait not in BATCH_WAITS:
            problems.append(f"batch wait must be one of {', '.join(BATCH_WAITS)}, got {self.batch_wait!r}")
        if self.max_enqueued_batches < 1:
            problems.append(f"max enqueued batches must be at least 1, got {self.max_enqueued_batches}")
        if self.max_execution_batch_size is not None and not 1 <= self.max_execution_batch_size:
            problems.append(f"max execution batch size must be at least 1, got {self.max_execution_batch_size}")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.execution_batch_size):
            problems.append(f"allowed batch sizes must increase and end at the largest batch, "
                            f"{self.execution_batch_size}, got {sizes}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def execution_batch_size(self) -> int:
        """The most examples one model call runs."""
        if self.enable_large_batch_splitting and self.max_execution_batch_size is not None:
            return self.max_execution_batch_size
        return self.max_batch_size

    def with_max_batch_size(self, max_batch_size: int) -> "BatchingConfig":
        """This config with another max_batch_size; its allowed batch sizes cut or extended to end there."""
        sizes = tuple(size for size in self.allowed_batch_sizes if size < max_batch_size)
        return dataclasses.replace(self, max_batch_size=max_batch_size,
                                   allowed_batch_sizes=(*sizes, max_batch_size) if self.allowed_batch_sizes else ())

    def padded_size(self, size: int) -> int:
        """The batch size TF Serving would run `size` examples as (the next allowed size up)."""
        return next((allowed for allowed in self.allowed_batch_sizes if allowed >= size), size)


def batching_from_file(path: Path) -> BatchingConfig:
    """The batching of a TF Serving batching parameters file (docker/batching_parameters.txt).

    Fields it leaves out take TF Serving's defaults, not ours, so that the file means what it
    means to TF Serving. num_batch_threads and pad_variable_length_inputs do not apply:
    each queue runs one batch at a time, on the thread of the request at its head
    (serving/batching.py), and the model's only inputs are vectors of strings.
    """
    from serving.docker_context import parse_batching_parameters

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read batching parameters file {path}: {error.strerror}") from None
    proto = parse_batching_parameters(text, str(path))

    def value(name: str, default):
        return getattr(proto, name).value if proto.HasField(name) else default

    # A field the file leaves out has TF Serving's default (SharedBatchScheduler::QueueOptions).
    return BatchingConfig(
        enabled=True,
        max_batch_size=value("max_batch_size", TF_SERVING_QUEUE_DEFAULTS["max_batch_size"]),
        batch_timeout_micros=value("batch_timeout_micros", TF_SERVING_QUEUE_DEFAULTS["batch_timeout_micros"]),
        max_enqueued_batches=value("max_enqueued_batches", TF_SERVING_QUEUE_DEFAULTS["max_enqueued_batches"]),
        enable_large_batch_splitting=value("enable_large_batch_splitting", False),
        max_execution_batch_size=value("max_execution_batch_size", None),
        allowed_batch_sizes=tuple(proto.allowed_batch_sizes))


@dataclass(frozen=True)
class ServerConfig:
    model_base_path: Path
    model_name: str = "digits"
    host: str = "127.0.0.1"  # loopback unless told otherwise
    rest_port: int = 8501  # TF Serving's --rest_api_port in its Docker image
    grpc_port: int = 8500  # TF Serving's --port
    num_versions: int = 2  # version policy `latest { num_versions }`: the newest N stay loaded
    labels: tuple[tuple[str, int], ...] = ()  # version labels, e.g. (("stable", 1700000000),)
    poll_interval_s: float = 1.0  # TF Serving's --file_system_poll_wait_seconds
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_body_bytes: int = 8 * 1024 * 1024  # larger REST bodies or gRPC messages: 413 / RESOURCE_EXHAUSTED
    max_instances: int = 256  # examples in one request (with batching on, its max_batch_size limits it too)
    max_image_bytes: int = contract.MAX_SERVED_IMAGE_BYTES  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, read from its header before decoding
    max_request_pixels: int = 64 * 1024 * 1024  # all images of one request together (~200 MB decoded)
    # Predict calls in flight, REST and gRPC together; more get 429 / RESOURCE_EXHAUSTED at once instead of
    # queueing without bound. Status and metadata requests do not count and are always answered.
    max_concurrent_requests: int = 64
    # TF Serving's --rest_api_timeout_in_ms: a REST predict still queued for the model after this long is
    # dropped (gRPC calls carry their own deadline).
    rest_api_timeout_ms: int = 30_000
    # A REST request body that has not fully arrived this long after its headers gets 408, so a client that
    # stops sending mid-body does not hold a connection forever (it holds no predict slot meanwhile).
    body_timeout_s: float = 30.0
    shutdown_grace_s: float = 10.0  # SIGTERM: in-flight requests get this long to finish
    warmup: bool = True  # replay assets.extra/tf_serving_warmup_requests before a version is AVAILABLE
    onednn: bool = False  # TensorFlow's oneDNN kernels; off: Eigen, as TF Serving's CPU image (serving/runtime.py)
    intra_op_threads: int = 0  # TF Serving's --tensorflow_intra_op_parallelism; 0: TensorFlow's choice
    inter_op_threads: int = 0  # TF Serving's --tensorflow_inter_op_parallelism; 0: TensorFlow's choice
    signature_image_input: str = contract.IMAGE_BYTES_INPUT  # string inputs checked as images

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_base_path", Path(self.model_base_path))
        object.__setattr__(self, "labels", tuple((str(name), int(version)) for name, version in self.labels))
        problems = []
        if not self.model_name or "/" in self.model_name:
            problems.append(f"model name must be a non-empty name without '/', got {self.model_name!r}")
        for name, port in (("REST", self.rest_port), ("gRPC", self.grpc_port)):
            if not 0 <= port <= 65535:
                problems.append(f"{name} port must be 0..65535, got {port}")
        if self.rest_port == self.grpc_port and self.rest_port != 0:
            problems.append(f"REST and gRPC ports must differ, both are {self.rest_port}")
        if self.num_versions < 1:
            problems.append(f"num versions must be at least 1, got {self.num_versions}")
        for name, _ in self.labels:
            if not name or name.isdigit() or "/" in name:
                problems.append(f"version label must be a name that is not a number, got {name!r}")
        if len({name for name, _ in self.labels}) != len(self.labels):
            problems.append("each version label may be given once")
        if not self.poll_interval_s > 0:
            problems.append(f"poll interval must be positive, got {self.poll_interval_s}")
        for name in ("max_body_bytes", "max_instances", "max_image_bytes", "max_image_pixels", "max_request_pixels",
                     "max_concurrent_requests", "rest_api_timeout_ms"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', ' ')} must be >= 0 (0: TensorFlow's choice), "
                                f"got {getattr(self, name)}")
        if not self.body_timeout_s > 0:
            problems.append(f"body timeout must be positive, got {self.body_timeout_s}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown grace must be >= 0 seconds, got {self.shutdown_grace_s}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def label_map(self) -> dict[str, int]:
        return dict(self.labels)

    def ports(self) -> list[Port]:
        """Where it listens, in the order they are claimed (and a taken one is reported)."""
        return [Port(self.host, self.rest_port, "REST", "--rest-port"),
                Port(self.host, self.grpc_port, "gRPC", "--grpc-port")]
