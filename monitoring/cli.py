"""`digits monitor`: Prometheus, Alertmanager and the blackbox exporter on loopback, watching a local
`digits serve`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click
from click.core import ParameterSource

from monitoring.local import RETENTION, MonitoringError, MonitoringStack, StackConfig
from serving.config import ServerConfig

# The default --serving is `digits serve` at its defaults, so its gRPC port is known too: health-checked
# unless --serving names other servers (the TF Serving container has no health service).
DEFAULT_GRPC_TARGETS = (f"{ServerConfig.host}:{ServerConfig.grpc_port}",)


def _target(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"expected HOST:PORT (for example 127.0.0.1:8501), got {value!r}")
    return value


@click.command("monitor")
@click.option("--serving", "serving_targets", multiple=True, default=StackConfig.serving_targets, show_default=True,
              metavar="HOST:PORT", callback=lambda _ctx, _param, values: tuple(_target(v) for v in values),
              help="REST address of a model server to scrape (`digits serve` or the TF Serving container); repeatable.")
@click.option("--web", "web_targets", multiple=True, metavar="HOST:PORT",
              callback=lambda _ctx, _param, values: tuple(_target(v) for v in values),
              help="Address of a `digits web` to scrape (its /metrics); repeatable. None by default.")
@click.option("--grpc", "grpc_targets", multiple=True, metavar="HOST:PORT",
              callback=lambda _ctx, _param, values: tuple(_target(v) for v in values),
              help=f"gRPC address to health-check (grpc.health.v1: `digits serve` has it, TF Serving does "
                   f"not); repeatable. Default: {DEFAULT_GRPC_TARGETS[0]} (`digits serve`'s) while --serving is "
                   f"left at its default; none once --serving is given.")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".monitoring"),
              show_default=True, help="Where Prometheus and Alertmanager keep their data, configs and logs.")
@click.option("--prometheus-port", type=click.IntRange(1, 65535), default=StackConfig.prometheus_port,
              show_default=True)
@click.option("--alertmanager-port", type=click.IntRange(1, 65535), default=StackConfig.alertmanager_port,
              show_default=True)
@click.option("--receiver-port", type=click.IntRange(1, 65535), default=StackConfig.receiver_port, show_default=True,
              help="The webhook receiver that prints alerts here and serves the runbook their links open.")
@click.option("--blackbox-port", type=click.IntRange(1, 65535), default=StackConfig.blackbox_port,
              show_default=True, help="The blackbox exporter that sends the predict probe.")
def monitor_command(serving_targets, web_targets, grpc_targets, data_dir, prometheus_port, alertmanager_port,
                    receiver_port, blackbox_port):
    """Start Prometheus, Alertmanager and the blackbox exporter (the Debian binaries) with the project's
    configs and rules.

    Every model server is probed with a real predict of a known digit, and `digits serve`'s gRPC port
    with a health check (see --grpc). Alerts are printed on this
    console as Alertmanager delivers them (and appended to DATA_DIR/alerts.jsonl); their runbook links
    open docs/runbook.md served on the receiver's port. Ctrl-C stops everything.
    """
    if not grpc_targets and click.get_current_context().get_parameter_source("serving_targets") \
            is ParameterSource.DEFAULT:
        grpc_targets = DEFAULT_GRPC_TARGETS
    config = StackConfig(data_dir=data_dir, serving_targets=serving_targets, web_targets=web_targets,
                         grpc_targets=grpc_targets, prometheus_port=prometheus_port,
                         alertmanager_port=alertmanager_port, receiver_port=receiver_port,
                         blackbox_port=blackbox_port)
    stack = MonitoringStack(config)
    stop = threading.Event()
    # Ctrl-C and SIGTERM both stop. Set explicitly: a process started with SIGINT ignored (a
    # background job of a non-interactive shell, nohup) inherits that, and Python then never raises
    # KeyboardInterrupt, so Ctrl-C would never stop it.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack.start(on_starting=lambda: click.echo(
            f"starting Prometheus, Alertmanager and the blackbox exporter (data in {data_dir})..."))
        click.echo(f"Prometheus    {config.prometheus_url}  (alerts: {config.prometheus_url}/alerts; "
                   f"keeps {RETENTION})")
        click.echo(f"Alertmanager  {config.alertmanager_url}")
        click.echo(f"runbook       {config.runbook_url}")
        click.echo(f"scraping      {', '.join(serving_targets + web_targets)}")
        click.echo(f"probing       {', '.join(config.predict_probe_targets + grpc_targets)}")
        click.echo("alerts are printed below as they are delivered; Ctrl-C stops")
        while not stop.wait(1.0):
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    raise MonitoringError(f"{name} exited with code {process.returncode}; see its log in {data_dir}")
    except KeyboardInterrupt:
        pass
    except MonitoringError as error:
        raise click.ClickException(str(error)) from None
    finally:
        stack.stop()
    click.echo("stopped")
