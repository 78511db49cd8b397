"""Prometheus, Alertmanager, the blackbox exporter and the alert receiver on loopback, with the project's
own configs.

`digits monitor` and the tests both start the stack through `MonitoringStack`. The configs are the
committed ones (what docker/compose.yaml runs); only what differs outside Docker is rewritten: the
scrape and probe targets and webhook URLs move from compose service names to loopback ports, the rule
files are generated into the data directory with runbook links to the receiver's loopback port (it
serves docs/runbook.md there), and tests may shorten intervals.
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
from monitoring.alert_receiver import RUNBOOK_PATH
from serving.ports import Port, PortError, check_free

PACKAGE = Path(__file__).resolve().parent
PROMETHEUS_CONFIG = PACKAGE / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = PACKAGE / "alertmanager" / "alertmanager.yml"
ALERT_RECEIVER = PACKAGE / "alert_receiver.py"
BLACKBOX_CONFIG = PACKAGE / "blackbox" / "blackbox.yml"
RUNBOOK = PACKAGE.parent / "docs" / "runbook.md"
INSTALL_HINT = ("install them with `apt-get install prometheus prometheus-alertmanager "
                "prometheus-blackbox-exporter` (Debian/Ubuntu) or put them on PATH")
# The SLO window is 30 days; Prometheus keeps 15 by default, which would cut the budget series short.
RETENTION = "35d"
# Debian prefixes the Alertmanager and blackbox exporter servers with prometheus-; upstream tarballs do not.
BINARIES = {"prometheus": ("prometheus",), "alertmanager": ("prometheus-alertmanager", "alertmanager"),
            "blackbox exporter": ("prometheus-blackbox-exporter", "blackbox_exporter")}


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
    blackbox_port: int = 9115
    # gRPC ports to health-check (grpc.health.v1); none unless given: `digits serve` answers it, TF Serving
    # 2.16 does not (UNIMPLEMENTED, so the probe would fail and page). `digits monitor` adds `digits serve`'s
    # default port when it watches the default server (monitoring/cli.py).
    grpc_targets: tuple[str, ...] = ()
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    # Alertmanager's grouping delays; the defaults are the committed file's. Tests shorten them.
    group_wait: str | None = None
    group_interval: str | None = None
    # The rule files; None: the generator's (monitoring/rules.py), written into data_dir/rules with
    # `runbook_url`s on the receiver. Tests pass a copy with a shorter `for` where only production
    # needs the wait (promtool's unit tests check the committed durations).
    rules_dir: Path | None = None
    ready_timeout_s: float = 60.0
    # Prometheus sends an alert again only after this (default 1m). Alerts that fire before it has
    # discovered Alertmanager are dropped and wait for it, so a fresh stack's first notification takes a
    # minute; tests shorten it.
    resend_delay: str | None = None

    def _url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def prometheus_url(self) -> str:
        return self._url(self.prometheus_port)

    @property
    def alertmanager_url(self) -> str:
        return self._url(self.alertmanager_port)

    @property
    def receiver_url(self) -> str:
        return self._url(self.receiver_port)

    @property
    def blackbox_url(self) -> str:
        return self._url(self.blackbox_port)

    @property
    def runbook_url(self) -> str:
        """Where the receiver serves docs/runbook.md: the rules' runbook base here."""
        return f"{self.receiver_url}{RUNBOOK_PATH}"

    @property
    def predict_probe_targets(self) -> tuple[str, ...]:
        """The REST predict URL of every model server: what the predict probe POSTs its digit to."""
        return tuple(predict_url(target) for target in self.serving_targets)


def predict_url(address: str, model_name: str = names.DEFAULT_MODEL_NAME) -> str:
    """TF Serving's REST predict URL of the model server at HOST:PORT."""
    return f"http://{address}/v1/models/{model_name}:predict"


def local_rule_files(config: StackConfig) -> dict[str, dict]:
    """The generator's rule files with every `runbook_url` on this stack's receiver."""
    return rules.rule_files(runbook_base=config.runbook_url)


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
    document["rule_files"] = [str((config.rules_dir or config.data_dir.resolve() / "rules") / "*.yml")]
    alertmanager = f"{config.host}:{config.alertmanager_port}"
    blackbox = f"{config.host}:{config.blackbox_port}"
    document["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    probes = {names.PROBE_PREDICT_MODULE: config.predict_probe_targets, names.PROBE_GRPC_MODULE: config.grpc_targets}
    groups = {
        names.SERVING_JOB: [{"targets": list(config.serving_targets)}],
        names.WEB_JOB: [{"targets": list(config.web_targets)}],
        names.PROMETHEUS_JOB: [{"targets": [f"{config.host}:{config.prometheus_port}"]}],
        names.ALERTMANAGER_JOB: [{"targets": [alertmanager]}],
        # One group per module; the job's relabelling turns __param_module into the `module` label.
        names.PROBE_JOB: [{"targets": list(targets), "labels": {"__param_module": module}}
                          for module, targets in probes.items() if targets],
        names.BLACKBOX_JOB: [{"targets": [blackbox]}],
    }
    # A job with nothing to scrape is left out rather than kept empty (its alerts then stay silent).
    document["scrape_configs"] = [job for job in document["scrape_configs"] if job["job_name"] not in groups
                                  or any(group["targets"] for group in groups[job["job_name"]])]
    for job in document["scrape_configs"]:
        if job["job_name"] not in groups:
            raise MonitoringError(f"no loopback target known for scrape job {job['job_name']!r} (monitoring/local.py)")
        job["static_configs"] = groups[job["job_name"]]
        for relabel in job.get("relabel_configs", []):
            if relabel.get("target_label") == "__address__":  # the probe job: scraped at the exporter
                relabel["replacement"] = blackbox
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
                Port(self.config.host, self.config.receiver_port, "the alert receiver", "--receiver-port", False),
                Port(self.config.host, self.config.blackbox_port, "the blackbox exporter", "--blackbox-port", False)]

    def check_ports(self) -> None:
        """Before anything starts: a taken port is one line, rather than a program's log after it exits."""
        try:
            check_free(self.ports())
        except PortError as error:
            raise MonitoringError(str(error)) from None

    def start(self, on_starting: Callable[[], None] | None = None) -> MonitoringStack:
        """Checks the binaries and ports (one-line MonitoringErrors), calls `on_starting`, starts all four."""
        import yaml

        prometheus, alertmanager = find_binary("prometheus"), find_binary("alertmanager")
        blackbox = find_binary("blackbox exporter")
        self.check_ports()
        if on_starting is not None:
            on_starting()
        data = self.config.data_dir.resolve()
        try:
            for sub in ("prometheus", "alertmanager", "rules"):
                (data / sub).mkdir(parents=True, exist_ok=True)
            if self.config.rules_dir is None:
                for name, document in local_rule_files(self.config).items():
                    (data / "rules" / name).write_text(rules.render(document))
            (data / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(self.config), sort_keys=False))
            (data / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager_config(self.config),
                                                                  sort_keys=False))
            # As committed (the probe targets are Prometheus's); the copy is what this stack runs.
            (data / "blackbox.yml").write_text(BLACKBOX_CONFIG.read_text())
        except OSError as error:
            raise MonitoringError(f"cannot use {self.config.data_dir} for the monitoring data: "
                                  f"{error.strerror or error}") from None
        try:
            runbook = ["--runbook", str(RUNBOOK)] if RUNBOOK.is_file() else []  # docs/ is in a checkout only
            self._spawn("alert receiver", [sys.executable, str(ALERT_RECEIVER), "--host", self.config.host,
                                           "--port", str(self.config.receiver_port),
                                           "--log", str(data / "alerts.jsonl"), *runbook],
                        stdout=self.receiver_output, log=data / "alert_receiver.log")
            self._spawn("blackbox exporter", [
                blackbox, f"--config.file={data / 'blackbox.yml'}",
                f"--web.listen-address={self.config.host}:{self.config.blackbox_port}",
            ], log=data / "blackbox_exporter.log")
            self._spawn("alertmanager", [
                alertmanager, f"--config.file={data / 'alertmanager.yml'}", f"--storage.path={data / 'alertmanager'}",
                f"--web.listen-address={self.config.host}:{self.config.alertmanager_port}",
                "--cluster.listen-address=",  # no HA gossip: it would listen on 0.0.0.0:9094
            ], log=data / "alertmanager.log")
            # Prometheus last, once what it scrapes and notifies answers.
            self._wait_ready("alert receiver", f"{self.config.receiver_url}/healthz", data / "alert_receiver.log")
            self._wait_ready("blackbox exporter", f"{self.config.blackbox_url}/-/healthy",
                             data / "blackbox_exporter.log")
            self._wait_ready("alertmanager", f"{self.config.alertmanager_url}/-/ready", data / "alertmanager.log")
            self._spawn("prometheus", [
                prometheus, f"--config.file={data / 'prometheus.yml'}", f"--storage.tsdb.path={data / 'prometheus'}",
                f"--web.listen-address={self.config.host}:{self.config.prometheus_port}",
                f"--storage.tsdb.retention.time={RETENTION}",
                *([f"--rules.alert.resend-delay={self.config.resend_delay}"] if self.config.resend_delay else []),
            ], log=data / "prometheus.log")
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
        for name in ("prometheus", "alertmanager", "blackbox exporter", "alert receiver"):
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
