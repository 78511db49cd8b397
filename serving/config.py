"""Typed configuration of `digits serve`: ports, version policy, batching and request limits.

Names and defaults follow TF Serving's flags and protos where it has them
(`--rest_api_port`, `latest { num_versions }`, `BatchingParameters`), so an
operator can read one and know the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data import contract


@dataclass(frozen=True)
class BatchingConfig:
    """Server-side batching of concurrent requests (TF Serving's `BatchingParameters`)."""

    enabled: bool = True
    max_batch_size: int = 32  # images per model call
    # How long a batch that is not full may wait for requests that are still being parsed. It
    # waits only while there are such requests, so a lone request never waits; 0: never wait.
    batch_timeout_micros: int = 10_000
    max_enqueued_batches: int = 64  # queue bound: further requests get UNAVAILABLE, not unbounded memory

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batch timeout must be >= 0 microseconds, got {self.batch_timeout_micros}")
        if self.max_enqueued_batches < 1:
            raise ValueError(f"max enqueued batches must be at least 1, got {self.max_enqueued_batches}")


def batching_from_file(path: Path) -> BatchingConfig:
    """The batching of a TF Serving batching parameters file (docker/batching_parameters.txt).

    max_batch_size, batch_timeout_micros and max_enqueued_batches carry over; the
    server runs one batch at a time per signature, on a thread of one of its requests
    (serving/batching.py), and needs no padding, so num_batch_threads and
    allowed_batch_sizes do not apply.
    """
    from serving.docker_context import parse_batching_parameters

    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"cannot read batching parameters file {path}: {error.strerror}") from None
    proto = parse_batching_parameters(text, str(path))
    defaults = BatchingConfig()

    def value(name: str) -> int:
        return getattr(proto, name).value if proto.HasField(name) else getattr(defaults, name)

    return BatchingConfig(enabled=True, max_batch_size=value("max_batch_size"),
                          batch_timeout_micros=value("batch_timeout_micros"),
                          max_enqueued_batches=value("max_enqueued_batches"))


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
    max_instances: int = 256  # examples in one request
    max_image_bytes: int = 1024 * 1024  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, read from its header before decoding
    max_request_pixels: int = 64 * 1024 * 1024  # all images of one request together (~200 MB decoded)
    max_concurrent_requests: int = 64  # predict calls in flight; more are refused, not queued without bound
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
                     "max_concurrent_requests"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', ' ')} must be >= 0 (0: TensorFlow's choice), "
                                f"got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            problems.append(f"shutdown grace must be >= 0 seconds, got {self.shutdown_grace_s}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def label_map(self) -> dict[str, int]:
        return dict(self.labels)
