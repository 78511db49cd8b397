"""Typed configuration of `digits web`: where the model server is, where people's corrections go, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from monitoring.names import DEFAULT_MODEL_NAME

DEFAULT_PORT = 8080
DEFAULT_SERVING_URL = "http://127.0.0.1:8501"  # `digits serve`'s and TF Serving's REST port
DEFAULT_FEEDBACK_DIR = Path("data") / "feedback"
# Loopback's names: the Host headers a loopback-bound app answers by default (a DNS-rebinding page,
# evil.example resolving to 127.0.0.1, sends its own name and is refused), and the only hosts a
# tested page may reach (web/browser.py).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MIN_REVIEW_TOKEN_CHARS = 16
REVIEW_TOKEN_ENV = "DIGITS_REVIEW_TOKEN"


@dataclass(frozen=True)
class WebConfig:
    """Everything `digits web` needs; checked when made, so a bad option is one line, not a traceback."""

    serving_url: str | None = DEFAULT_SERVING_URL  # REST base URL of TF Serving or `digits serve`
    grpc_target: str | None = None  # HOST:PORT of its gRPC API instead of REST
    model_name: str = DEFAULT_MODEL_NAME
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port
    feedback_dir: Path = DEFAULT_FEEDBACK_DIR
    # The model server's base path (read-only is enough), for each version's reference profile: the
    # drift metrics in front of a model server that exports none (the TF Serving container). None: none.
    model_dir: Path | None = None
    reference_sync_s: float = 60.0  # how often versions the model server unloaded lose their reference
    # A drawing exported by the page is ~10-30 KB; a phone photo a few MB.
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # a decompression bomb is refused before the model server sees it
    model_timeout_s: float = 10.0  # a model server that does not answer in time: 504, the page says so
    # Predicts sent to the model server at once, the rest wait (at most --model-timeout, then 503 with
    # Retry-After): `digits serve` admits 64 (--max-concurrent-requests) and answers more with 429.
    model_connections: int = 64
    # Uploads decoded at once (a 4096x4096 photo is ~64 MB decoded); the rest wait, as for the model.
    decode_slots: int = 4
    # How long the newest AVAILABLE version, read from the model status, is used before asking again
    # (REST predict answers do not say which version answered, so the backend names the version).
    version_ttl_s: float = 5.0
    # Answers kept so that a correction can refer to one by id (what the model said and saw is the
    # server's own record, not what the browser claims); the oldest go first. ~20 KB each.
    recent_answers: int = 1024
    # Of those, one client's at most: its newest push out its own oldest, never others' (a client is
    # its address; behind a proxy, the proxy's, unless it is the one client).
    answers_per_client: int = 64
    # Requests per minute one client may send (a token bucket, bursts up to the minute's worth):
    # more get 429 with Retry-After. A person draws a few digits a minute.
    predicts_per_minute: int = 120
    feedback_per_minute: int = 30
    # Corrections waiting for a reviewer, in all and from one client: more get 503 / 429, so that a
    # flood fills a bounded queue (~300 bytes a PNG), not the disk and not a reviewer's week.
    max_pending: int = 10_000
    pending_per_client: int = 100
    # The reviewers' token (GET /review, /api/review with `Authorization: Bearer <token>`); None: no
    # review page (review with `digits feedback review`). Never shown in logs or repr.
    review_token: str | None = field(default=None, repr=False)
    reviews_per_minute: int = 600
    # Host header names (without port) the app answers; empty: loopback names when it listens on
    # loopback, any name otherwise (behind a proxy that checks them, or give them here).
    allowed_hosts: tuple[str, ...] = ()
    # Origins besides the page's own allowed to send state-changing requests (a separate front end).
    allowed_origins: tuple[str, ...] = ()
    # The form POST /api/read-sheet reads (forms/ layout YAML or JSON); None: the example tally form,
    # forms/tally.yaml. A sheet is a photo: a minute's worth is a stack of them, not a person drawing.
    form_path: Path | None = None
    sheets_per_minute: int = 30
    # Sheets waiting for a person (<feedback-dir>/sheets/, about 200 KB each), in all and from one client:
    # past these a sheet is still read and answered, but not queued (the answer says so).
    max_pending_sheets: int = 1000
    pending_sheets_per_client: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "feedback_dir", Path(self.feedback_dir))
        object.__setattr__(self, "allowed_hosts", tuple(host.lower().strip("[]") for host in self.allowed_hosts))
        object.__setattr__(self, "allowed_origins",
                           tuple(origin.rstrip("/").lower() for origin in self.allowed_origins))
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        if self.form_path is not None:
            object.__setattr__(self, "form_path", Path(self.form_path))
        problems = []
        if (self.serving_url is None) == (self.grpc_target is None):
            problems.append("give either a REST URL (--serving-url) or a gRPC target (--grpc), not both")
        if self.serving_url is not None:
            parts = urlsplit(self.serving_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"--serving-url must be an http(s) URL such as {DEFAULT_SERVING_URL}, "
                                f"got {self.serving_url!r}")
        if self.grpc_target is not None:
            host, _, port = self.grpc_target.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"--grpc must be HOST:PORT such as 127.0.0.1:8500, got {self.grpc_target!r}")
        if not self.model_name or "/" in self.model_name or ":" in self.model_name:
            problems.append(f"--model-name must be a plain name, got {self.model_name!r}")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be 0-65535, got {self.port}")
        for name in ("max_image_bytes", "max_image_pixels", "recent_answers", "model_connections",
                     "answers_per_client", "predicts_per_minute", "feedback_per_minute", "decode_slots",
                     "max_pending", "pending_per_client", "reviews_per_minute", "sheets_per_minute",
                     "max_pending_sheets", "pending_sheets_per_client"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.model_timeout_s <= 0:
            problems.append(f"--model-timeout must be positive, got {self.model_timeout_s}")
        if self.version_ttl_s < 0:
            problems.append(f"version TTL must be >= 0 s, got {self.version_ttl_s}")
        if self.review_token is not None and (len(self.review_token) < MIN_REVIEW_TOKEN_CHARS
                                              or any(c.isspace() for c in self.review_token)):
            problems.append(f"the review token must be at least {MIN_REVIEW_TOKEN_CHARS} characters without "
                            "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')")
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/:@ ") and not _is_ipv6(host):
                problems.append(f"--allowed-host takes a host name without scheme or port, got {host!r}")
        for origin in self.allowed_origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
                problems.append(f"--allowed-origin takes scheme://host[:port], got {origin!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def hosts_answered(self) -> tuple[str, ...] | None:
        """The Host names the app answers; None: any."""
        if self.allowed_hosts:
            return self.allowed_hosts
        return LOOPBACK_HOSTS if _is_loopback(self.host) else None

    @property
    def model_server(self) -> str:
        """The model server as a person reads it in logs and on the page."""
        return self.serving_url if self.serving_url is not None else f"grpc://{self.grpc_target}"


def _is_ipv6(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
