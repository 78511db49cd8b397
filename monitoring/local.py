"""Prometheus, Alertmanager and the alert receiver on loopback, with the project's own configs.

`digits monitor` and the tests both start the stack through `MonitoringStack`. The configs are the
committed ones (what docker/compose.yaml runs); only what differs outside Docker is rewritten: the
scrape targets and webhook URLs move from compose service names to loopback ports, rule files are
referenced by absolute path, and tests may shorten intervals.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from monitoring import names, rules
from serving.ports import Port, PortError, check_free

PACKAGE = Path(__file__).resolve().parent
PROMETHEUS_CONFIG = PACKAGE / "prometheus" / "prometheus.yml"
RULES_DIR = rules.RULES_DIR
ALERTMANAGER_CONFIG = PACKAGE / "alertmanager" / "alertmanager.yml"
ALERT_RECEIVER = PACKAGE / "alert_receiver.py"
INSTALL_HINT = ("install them with `apt-get install prometheus prometheus-alertmanager` (Debian/Ubuntu) "
                "or put them on PATH")
# The SLO window is 30 days; Prometheus keeps 15 by default, which would cut the budget series short.
RETENTION = "35d"
# Debian names the Alertmanager server prometheus-alertmanager; upstream tarballs call it alertmanager.
BINARIES = {"prometheus": ("prometheus",), "alertmanager": ("prometheus-alertmanager", "alertmanager")}


class MonitoringError(RuntimeError):
    """A one-line, user-facing reason why the monitoring stack cannot start."""


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    serving_targets: tuple[str, ...] = ("127.0.0.1:8501",)
    web_targets: tuple[str, ...] = ()  # `digits web` instances; none: the web job is left out
    host: str = "127.0.0.1"
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    receiver_port: int = 9095
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    # Alertmanager's grouping delays; the defaults are the committed file's. Tests shorten them.
    group_wait: str | None = None
    group_interval: str | None = None
    # The rule files; None: the committed ones. Tests pass a copy with a shorter `for` where only
    # production needs the wait (promtool's unit tests check the committed durations).
    rules_dir: Path | None = None
    ready_timeout_s: float = 60.0

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.alertmanager_port}"

    @property
    def receiver_url(self) -> str:
        return f"http://{self.host}:{self.receiver_port}"


def find_binary(kind: str) -> str:
    for candidate in BINARIES[kind]:
        path = shutil.which(candidate)
        if path:
            return path
    raise MonitoringError(f"{' or '.join(BINARIES[kind])} not found: {INSTALL_HINT}")


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def prometheus_config(config: StackConfig) -> dict:
    """The committed prometheus.yml with loopback targets, absolute rule paths and the given intervals."""
    document = _load_yaml(PROMETHEUS_CONFIG)
    document["global"]["scrape_interval"] = config.scrape_interval
    document["global"]["evaluation_interval"] = config.evaluation_interval
    document["rule_files"] = [str((config.rules_dir or RULES_DIR) / "*.yml")]
    alertmanager = f"{config.host}:{config.alertmanager_port}"
    document["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    targets = {
        names.SERVING_JOB: list(config.serving_targets),
        names.WEB_JOB: list(config.web_targets),
        names.PROMETHEUS_JOB: [f"{config.host}:{config.prometheus_port}"],
        names.ALERTMANAGER_JOB: [alertmanager],
    }
    # A job with nothing to scrape is left out rather than kept empty (its alerts then stay silent).
    document["scrape_configs"] = [job for job in document["scrape_configs"] if targets.get(job["job_name"], True)]
    for job in document["scrape_configs"]:
        if job["job_name"] not in targets:
            raise MonitoringError(f"no loopback target known for scrape job {job['job_name']!r} (monitoring/local.py)")
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return document


def alertmanager_config(config: StackConfig) -> dict:
    """The committed alertmanager.yml with its webhooks pointed at the loopback alert receiver."""
    document = _load_yaml(ALERTMANAGER_CONFIG)
    for receiver in document["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            path = urlsplit(webhook["url"]).path
            webhook["url"] = urlunsplit(("http", f"{config.host}:{config.receiver_port}", path, "", ""))
    for key, value in (("group_wait", config.group_wait), ("group_interval", config.group_interval)):
        if value is not None:
            document["route"][key] = value
            for route in document["route"].get("routes", []):
                route.pop(key, None)
    return document


@dataclass
class MonitoringStack:
    """Starts Prometheus, Alertmanager and the alert receiver; stops them by PID (also on errors)."""

    config: StackConfig
    receiver_output: int | None = None  # None: inherit (alerts print on the console); else a file descriptor
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def ports(self) -> list[Port]:
        return [Port(self.config.host, self.config.prometheus_port, "Prometheus", "--prometheus-port", False),
                Port(self.config.host, self.config.alertmanager_port, "Alertmanager", "--alertmanager-port", False),
                Port(self.config.host, self.config.receiver_port, "the alert receiver", "--receiver-port", False)]

    def check_ports(self) -> None:
        """Before anything starts: a taken port is one line, rather than a program's log after it exits."""
        try:
            check_free(self.ports())
        except PortError as error:
            raise MonitoringError(str(error)) from None

    def start(self, on_starting: Callable[[], None] | None = None) -> MonitoringStack:
        """Checks the binaries and ports (one-line MonitoringErrors), calls `on_starting`, starts all three."""
        import yaml

        prometheus, alertmanager = find_binary("prometheus"), find_binary("alertmanager")
        self.check_ports()
        if on_starting is not None:
            on_starting()
        data = self.config.data_dir.resolve()
        try:
            for sub in ("prometheus", "alertmanager"):
                (data / sub).mkdir(parents=True, exist_ok=True)
            (data / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(self.config), sort_keys=False))
            (data / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(self.config),
                                                                  sort_keys=False))
        except OSError as error:
            raise MonitoringError(f"cannot use {self.config.data_dir} for the monitoring data: "
                                  f"{error.strerror or error}") from None
        try:
            self._spawn("alert receiver", [sys.executable, str(ALERT_RECEIVER), "--host", self.config.host,
                                           "--port", str(self.config.receiver_port),
                                           "--log", str(data / "alerts.jsonl")],
                        stdout=self.receiver_output, log=data / "alert_receiver.log")
            self._spawn("alertmanager", [
                alertmanager, f"--config.file={data / 'alertmanager.yml'}", f"--storage.path={data / 'alertmanager'}",
                f"--web.listen-address={self.config.host}:{self.config.alertmanager_port}",
                "--cluster.listen-address=",  # no HA gossip: it would listen on 0.0.0.0:9094
            ], log=data / "alertmanager.log")
            self._spawn("prometheus", [
                prometheus, f"--config.file={data / 'prometheus.yml'}", f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={self.config.host}:{self.config.prometheus_port}",
                f"--storage.tsdb.retention.time={RETENTION}",
            ], log=data / "prometheus.log")
            self._wait_ready("alert receiver", f"{self.config.receiver_url}/healthz", data / "alert_receiver.log")
            self._wait_ready("alertmanager", f"{self.config.alertmanager_url}/-/ready", data / "alertmanager.log")
            self._wait_ready("prometheus", f"{self.config.prometheus_url}/-/ready", data / "prometheus.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str], log: Path, stdout: int | None = -1) -> None:
        with log.open("ab") as log_file:
            self.processes[name] = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file if stdout == -1 else stdout,
                stderr=log_file, start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )

    def _wait_ready(self, name: str, url: str, log: Path) -> None:
        wait_ready(name, self.processes[name], url, log, self.config.ready_timeout_s)

    def stop(self, grace_s: float = 10.0) -> None:
        for name in ("prometheus", "alertmanager", "alert receiver"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=grace_s)

    def __enter__(self) -> MonitoringStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(name: str, process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Polls `url` until it answers 200; a one-line MonitoringError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MonitoringError(f"{name} exited with code {process.returncode}: {_last_line(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise MonitoringError(f"{name} not ready at {url} after {timeout_s:.0f} s: {_last_line(log)}")


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(empty log)"
