"""`digits monitor`: Prometheus and Alertmanager on loopback, watching a local `digits serve`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from monitoring.local import MonitoringError, MonitoringStack, StackConfig


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
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=Path(".monitoring"),
              show_default=True, help="Where Prometheus and Alertmanager keep their data, configs and logs.")
@click.option("--prometheus-port", type=click.IntRange(1, 65535), default=StackConfig.prometheus_port,
              show_default=True)
@click.option("--alertmanager-port", type=click.IntRange(1, 65535), default=StackConfig.alertmanager_port,
              show_default=True)
@click.option("--receiver-port", type=click.IntRange(1, 65535), default=StackConfig.receiver_port, show_default=True,
              help="The webhook receiver that prints alerts here.")
def monitor_command(serving_targets, web_targets, data_dir, prometheus_port, alertmanager_port, receiver_port):
    """Start Prometheus and Alertmanager (the Debian binaries) with the project's configs and rules.

    Alerts are printed on this console as Alertmanager delivers them (and appended to
    DATA_DIR/alerts.jsonl). Ctrl-C stops everything.
    """
    config = StackConfig(data_dir=data_dir, serving_targets=serving_targets, web_targets=web_targets,
                         prometheus_port=prometheus_port, alertmanager_port=alertmanager_port,
                         receiver_port=receiver_port)
    stack = MonitoringStack(config)
    stop = threading.Event()
    # Ctrl-C and SIGTERM both stop. Set explicitly: a process started with SIGINT ignored (a
    # background job of a non-interactive shell, nohup) inherits that, and Python then never raises
    # KeyboardInterrupt, so Ctrl-C would never stop it.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack.start(on_starting=lambda: click.echo(f"starting Prometheus and Alertmanager (data in {data_dir})..."))
        click.echo(f"Prometheus    {config.prometheus_url}  (alerts: {config.prometheus_url}/alerts)")
        click.echo(f"Alertmanager  {config.alertmanager_url}")
        click.echo(f"scraping      {', '.join(serving_targets + web_targets)}")
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
