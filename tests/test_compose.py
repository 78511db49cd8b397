"""docker/compose.yaml checked without a Docker engine: the Compose schema, mounts, pinned images, health
checks, published ports, Grafana's credentials, and the service names the monitoring configs rely on."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import REPO
from serving.docker_context import context_command
from test_docker import DOCKERFILE, instructions

COMPOSE = REPO / "docker" / "compose.yaml"
CHECK_JSONSCHEMA = REPO / ".venv-tools" / "bin" / "check-jsonschema"

# Host ports a user needs, all on loopback: Prometheus and Alertmanager have no authentication.
# The alert receiver serves the runbook the alerts link to.
PUBLISHED = {"serving": {8500, 8501}, "web": {8080}, "prometheus": {9090}, "alertmanager": {9093}, "grafana": {3000},
             "alert-receiver": {9095}}
MONITORING = ("prometheus", "alertmanager", "alert-receiver", "blackbox-exporter", "grafana")

# Services allowed to run without a health check, each with the reason. None today.
WITHOUT_HEALTHCHECK: dict[str, str] = {}

# The program each image can run for its health check (from the images' own Dockerfiles).
HEALTHCHECK_PROGRAMS = {
    "tensorflow/serving": "bash",    # Ubuntu with no curl or wget
    "prom/prometheus": "wget",       # busybox
    "prom/alertmanager": "wget",     # busybox
    "prom/blackbox-exporter": "wget",  # busybox
    "python": "python",              # -slim has no curl or wget
    "grafana/grafana": "curl",       # installed in both the Alpine and the Ubuntu image
}

# Services whose image must be the release of the Debian binary the monitoring tests run.
DEBIAN_BINARIES = {"prometheus": "prometheus", "alertmanager": "prometheus-alertmanager",
                   "blackbox-exporter": "prometheus-blackbox-exporter"}

# The repository file each service must load, by the flag that names it inside the container.
CONFIG_FLAGS = {
    "prometheus": ("--config.file", "monitoring/prometheus/prometheus.yml"),
    "alertmanager": ("--config.file", "monitoring/alertmanager/alertmanager.yml"),
    "blackbox-exporter": ("--config.file", "monitoring/blackbox/blackbox.yml"),
}
# Where each service keeps its state, which must be a named volume.
DATA_DIRS = {"prometheus": "--storage.tsdb.path", "alertmanager": "--storage.path", "grafana": "/var/lib/grafana"}

PROMETHEUS_CONFIG = REPO / "monitoring" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"
ALERT_RECEIVER = REPO / "monitoring" / "alert_receiver.py"
GRAFANA = REPO / "monitoring" / "grafana"
PINNED = re.compile(r"^[a-z0-9][a-z0-9._/-]*:v?\d+\.\d+\.\d+(-[A-Za-z0-9.-]+)?$")


# --- Reading the file ----------------------------------------------------------------------------

def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def generated_paths() -> dict[Path, str]:
    """Paths a project command writes (never in the repository), with the command that writes them."""
    [out] = [option for option in context_command.params if option.name == "out"]
    return {(REPO / out.default).resolve(): "digits docker context"}


def on_host(source: str) -> Path:
    return (COMPOSE.parent / source).resolve()


def mounts(service: dict) -> list[tuple[str, str, str, bool]]:
    """(type, source, target, read-only) of each volume, short or long syntax."""
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            result.append((volume["type"], volume.get("source", ""), volume["target"], volume.get("read_only", False)))
            continue
        source, target, *mode = volume.split(":")
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        result.append((kind, source, target, "ro" in ",".join(mode).split(",")))
    return result


def host_path_of(service: dict, container_path: str) -> Path | None:
    """The host path behind a container path, through the deepest bind mount that holds it."""
    path, best = PurePosixPath(container_path), None
    for kind, source, target, _ in mounts(service):
        target = PurePosixPath(target)
        if kind == "bind" and (path == target or target in path.parents):
            if best is None or len(target.parts) > len(best[1].parts):
                best = (source, target)
    return None if best is None else on_host(best[0]) / path.relative_to(best[1])


def flags(service: dict) -> dict[str, str]:
    command = service.get("command", [])
    return dict(word.split("=", 1) for word in command if word.startswith("--") and "=" in word)


def ports(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port, short or long syntax."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip", ""), int(port.get("published", port["target"])), int(port["target"])))
            continue
        *host, container = str(port).split("/")[0].split(":")
        ip, published = (host[0], host[1]) if len(host) == 2 else ("", host[0] if host else container)
        result.append((ip, int(published), int(container)))
    return result


def container_ports(service: dict) -> set[int]:
    return {container for _, _, container in ports(service)} | {int(port) for port in service.get("expose", [])}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(entry.split("=", 1) for entry in env) if isinstance(env, list) else dict(env)


def image_of(service: dict) -> str:
    """The image a service runs; for a built image, its Dockerfile's base image (the TF Serving image's
    context is generated by `digits docker context` from docker/Dockerfile)."""
    if "image" in service:
        return service["image"]
    build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
    context = on_host(build["context"])
    if "dockerfile" in build:
        dockerfile = context / build["dockerfile"]
    else:
        assert generated_paths().get(context) == "digits docker context", context
        dockerfile = DOCKERFILE
    [base] = [arguments for name, arguments in instructions(dockerfile) if name == "FROM"]
    return base


# --- Checks: each returns the problems it finds, so that a broken copy can show it fails ---------

def schema_errors(path: Path) -> str:
    if not CHECK_JSONSCHEMA.exists():
        pytest.fail(f"{CHECK_JSONSCHEMA.relative_to(REPO)} is missing: run `bash .ci/tasks.sh setup`")
    result = subprocess.run([str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
                            capture_output=True, text=True, timeout=120)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def mount_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for kind, source, target, read_only in mounts(service):
            if kind == "volume" and source not in (compose.get("volumes") or {}):
                problems.append(f"{name}: named volume {source} is not declared")
            if kind != "bind":
                continue
            generated = any(path == on_host(source) or path in on_host(source).parents for path in generated_paths())
            if not on_host(source).exists() and not generated:
                problems.append(f"{name}: bind source {source} does not exist")
            if not read_only:
                problems.append(f"{name}: {target} is mounted writable")
        build = service.get("build")
        if build is not None:
            context = on_host(build["context"] if isinstance(build, dict) else build)
            if context not in generated_paths() and not context.is_dir():
                problems.append(f"{name}: build context {context} is neither in the repository nor generated")
    return problems


def image_problems(compose: dict) -> list[str]:
    return [f"{name}: image {image_of(service)} is not pinned to an exact version"
            for name, service in compose["services"].items() if not PINNED.match(image_of(service))]


def version_problems(compose: dict, debian: dict[str, str]) -> list[str]:
    problems = []
    for name, release in debian.items():
        tag = image_of(compose["services"][name]).partition(":")[2].lstrip("v")
        if ".".join(tag.split(".")[:2]) != release:
            problems.append(f"{name}: image {tag} is not the {release} release the tests run")
    return problems


def health_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        if service.get("restart") != "unless-stopped":
            problems.append(f"{name}: restart is {service.get('restart')}, not unless-stopped")
        check = service.get("healthcheck")
        if name in WITHOUT_HEALTHCHECK:
            continue
        if not check or check.get("disable") or check.get("test") in (None, ["NONE"]):
            problems.append(f"{name}: no health check")
            continue
        test = check["test"] if isinstance(check["test"], list) else ["CMD-SHELL", check["test"]]
        program = test[1] if test[0] == "CMD" else test[1].split()[0]
        expected = HEALTHCHECK_PROGRAMS[image_of(service).rsplit(":", 1)[0]]
        if program != expected:
            problems.append(f"{name}: health check runs {program}, but its image has {expected}")
        asked = {int(port) for port in re.findall(r"127\.0\.0\.1[:/](\d+)", " ".join(test))}
        if not asked or not asked <= container_ports(service):
            problems.append(f"{name}: health check asks ports {sorted(asked)}, not the service's own")
    for name, service in compose["services"].items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            if condition.get("condition") != "service_healthy":
                problems.append(f"{name}: waits for {dependency} to start, not to be healthy")
            if name in MONITORING and dependency == "serving":
                problems.append(f"{name}: monitoring waits for the model server it should report on")
    return problems


def port_problems(compose: dict) -> list[str]:
    problems = []
    published = {name: ports(service) for name, service in compose["services"].items() if ports(service)}
    if {name: {host for _, host, _ in entries} for name, entries in published.items()} != PUBLISHED:
        problems.append(f"published ports are {published}, expected {PUBLISHED}")
    for name, entries in published.items():
        for ip, host, container in entries:
            if ip != "127.0.0.1" or host != container:
                problems.append(f"{name}: port {container} is published as {ip or '0.0.0.0'}:{host}")
    return problems


def secret_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        for key, value in environment(service).items():
            # Required (`${X:?why}`), or empty unless given (`${X:-}`: the feature it unlocks is off);
            # never a value written here.
            if re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", key) and not re.fullmatch(
                    rf"\$\{{\w+:\?[^}}]+\}}|\$\{{\w+:-\}}", value):
                problems.append(f"{name}: {key} is not a required variable from the environment")
    grafana = environment(compose["services"]["grafana"])
    if not re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", grafana.get("GF_SECURITY_ADMIN_PASSWORD", "")):
        problems.append("grafana: the admin password does not come from GRAFANA_ADMIN_PASSWORD")
    for key in ("GF_AUTH_ANONYMOUS_ENABLED", "GF_USERS_ALLOW_SIGN_UP"):
        if str(grafana.get(key)).lower() != "false":
            problems.append(f"grafana: {key} is {grafana.get(key)}, not false")
    return problems


def loader(compose: dict, repo_file: Path) -> str | None:
    """The service that bind-mounts a repository file (or the directory holding it)."""
    for name, service in compose["services"].items():
        for kind, source, _, _ in mounts(service):
            if kind == "bind" and (on_host(source) == repo_file or on_host(source) in repo_file.parents):
                return name
    return None


def resolve(compose: dict, address: str, local: str | None) -> str | None:
    host, port = address.rsplit(":", 1)
    host = local if host in ("localhost", "127.0.0.1") else host
    if host not in compose["services"]:
        return f"{address}: no service {host}"
    if int(port) not in container_ports(compose["services"][host]):
        return f"{address}: {host} does not listen on {port}"
    return None


def grafana_provisioning(kind: str) -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted((GRAFANA / "provisioning" / kind).glob("*.y*ml"))]


def address_problems(compose: dict) -> list[str]:
    """Every host:port the monitoring configs name is a compose service listening on that port."""
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # A probe job's targets are URLs (or host:port) the exporter probes; its scrapes go to the exporter
    # named by the relabelling of __address__.
    targets = [urlsplit(target).netloc or target for job in prometheus["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]]
    targets += [relabel["replacement"] for job in prometheus["scrape_configs"]
                for relabel in job.get("relabel_configs", []) if relabel.get("target_label") == "__address__"]
    targets += [target for manager in prometheus["alerting"]["alertmanagers"]
                for static in manager["static_configs"] for target in static["targets"]]
    local = loader(compose, PROMETHEUS_CONFIG)
    problems = [resolve(compose, target, local) for target in targets]
    alertmanager = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    urls = [hook["url"] for receiver in alertmanager["receivers"] for hook in receiver.get("webhook_configs", [])]
    urls += [source["url"] for provisioned in grafana_provisioning("datasources")
             for source in provisioned.get("datasources", [])]
    if not any(url.startswith("http://prometheus") for url in urls):
        problems.append("no Grafana datasource provisioned for Prometheus")
    problems += [resolve(compose, urlsplit(url).netloc, None) for url in urls]
    return [problem for problem in problems if problem]


def config_problems(compose: dict) -> list[str]:
    """Each service reads the repository's config, and keeps its state in a named volume."""
    services, problems = compose["services"], []
    for name, (flag, repo_file) in CONFIG_FLAGS.items():
        if host_path_of(services[name], flags(services[name]).get(flag, "")) != REPO / repo_file:
            problems.append(f"{name}: {flag} does not name the mounted {repo_file}")
    config_dir = PurePosixPath(flags(services["prometheus"]).get("--config.file", "/")).parent
    for pattern in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]:
        host_dir = host_path_of(services["prometheus"], str(config_dir / PurePosixPath(pattern).parent))
        if host_dir is None or not list(host_dir.glob(PurePosixPath(pattern).name)):
            problems.append(f"prometheus: rule_files {pattern} matches nothing mounted")
    for name, flag_or_path in DATA_DIRS.items():
        path = flags(services[name]).get(flag_or_path) if flag_or_path.startswith("--") else flag_or_path
        if not any(kind == "volume" and target == path for kind, _, target, _ in mounts(services[name])):
            problems.append(f"{name}: its data directory {path} is not a named volume")
    receiver = services["alert-receiver"]
    script = next((word for word in receiver.get("command", []) if word.endswith(".py")), "")
    if host_path_of(receiver, script) != ALERT_RECEIVER:
        problems.append(f"alert-receiver: runs {script!r}, not the mounted monitoring/alert_receiver.py")
    command = receiver.get("command", [])
    if "--port" not in command or int(command[command.index("--port") + 1]) not in container_ports(receiver):
        problems.append("alert-receiver: its --port is not the port it exposes")
    paths = [provider.get("options", {}).get("path", "") for provisioned in grafana_provisioning("dashboards")
             for provider in provisioned.get("providers", [])]
    if not paths or any(host_path_of(services["grafana"], path) != GRAFANA / "dashboards" for path in paths):
        problems.append(f"grafana: dashboard providers read {paths}, not the mounted monitoring/grafana/dashboards")
    if host_path_of(services["grafana"], "/etc/grafana/provisioning") != GRAFANA / "provisioning":
        problems.append("grafana: monitoring/grafana/provisioning is not mounted at /etc/grafana/provisioning")
    return problems


# --- The file as committed -----------------------------------------------------------------------

def test_the_file_is_valid_against_the_compose_specification():
    assert schema_errors(COMPOSE) == ""


def test_every_bind_mount_is_a_repository_path_mounted_read_only():
    assert mount_problems(load()) == []


def test_every_image_is_pinned_to_an_exact_version():
    assert image_problems(load()) == []


def debian_release(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `bash .ci/tasks.sh setup` (installs it from Debian)")
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"version (\d+)\.(\d+)\.", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    return f"{match[1]}.{match[2]}"


def test_prometheus_and_alertmanager_images_are_the_releases_the_tests_run():
    debian = {name: debian_release(binary) for name, binary in DEBIAN_BINARIES.items()}
    assert version_problems(load(), debian) == []


def test_every_service_restarts_and_reports_its_health_with_a_program_its_image_has():
    assert health_problems(load()) == []


def test_serving_health_check_is_the_dockerfiles():
    [arguments] = [arguments for name, arguments in instructions(DOCKERFILE) if name == "HEALTHCHECK"]
    assert load()["services"]["serving"]["healthcheck"]["test"] == ["CMD", *json.loads(arguments.split("CMD", 1)[1])]


def test_only_the_user_facing_ports_are_published_on_loopback():
    compose = load()
    assert port_problems(compose) == []


def test_grafana_needs_an_admin_password_from_the_environment_and_refuses_anonymous_users():
    assert secret_problems(load()) == []


def test_monitoring_configs_name_compose_services_and_their_ports():
    assert address_problems(load()) == []


def test_services_read_the_repository_configs_and_keep_state_in_named_volumes():
    assert config_problems(load()) == []


# --- Broken copies: each check finds what it is for ----------------------------------------------

def _set(path: str, value):
    def mutate(compose):
        *parents, last = path.split(".")
        node = compose["services"]
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return mutate


def _rename(old: str, new: str):
    def mutate(compose):
        compose["services"][new] = compose["services"].pop(old)
    return mutate


def _edit_list(path: str, old: str, new: str):
    def mutate(compose):
        node = compose["services"]
        for key in path.split("."):
            node = node[key]
        node[node.index(old)] = new
    return mutate


DEBIAN = {"prometheus": "2.42", "alertmanager": "0.25"}
BROKEN = {
    "missing mount": (_edit_list("grafana.volumes", "../monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro",
                                 "../monitoring/grafana/dashbords:/var/lib/grafana/dashboards:ro"),
                      mount_problems, "dashbords does not exist"),
    "writable mount": (_edit_list("alertmanager.volumes",
                                  "../monitoring/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro",
                                  "../monitoring/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml"),
                       mount_problems, "mounted writable"),
    "undeclared volume": (_edit_list("grafana.volumes", "grafana-data:/var/lib/grafana", "grafana-db:/var/lib/grafana"),
                          mount_problems, "grafana-db is not declared"),
    "untagged image": (_set("prometheus.image", "prom/prometheus"), image_problems, "prom/prometheus is not pinned"),
    "latest image": (_set("grafana.image", "grafana/grafana:latest"), image_problems, "not pinned"),
    "minor-only tag": (_set("alert-receiver.image", "python:3.11-slim"), image_problems, "not pinned"),
    "newer prometheus": (_set("prometheus.image", "prom/prometheus:v2.53.0"),
                         functools.partial(version_problems, debian=DEBIAN), "2.53.0 is not the 2.42 release"),
    "no restart": (_set("grafana.restart", None), health_problems, "grafana: restart is None"),
    "no health check": (_set("alertmanager.healthcheck", None), health_problems, "alertmanager: no health check"),
    "disabled health check": (_set("grafana.healthcheck.disable", True), health_problems, "grafana: no health check"),
    "curl in tf serving": (_set("serving.healthcheck.test", ["CMD", "curl", "-f", "http://127.0.0.1:8501/v1/models"]),
                           health_problems, "runs curl, but its image has bash"),
    "health check elsewhere": (_set("prometheus.healthcheck.test", ["CMD", "wget", "-q", "http://127.0.0.1:9091/"]),
                               health_problems, "not the service's own"),
    "started, not healthy": (_set("grafana.depends_on.prometheus.condition", "service_started"),
                             health_problems, "waits for prometheus to start"),
    "prometheus waits for serving": (_set("prometheus.depends_on.serving", {"condition": "service_healthy"}),
                                     health_problems, "waits for the model server"),
    "published exporter": (_set("blackbox-exporter.ports", ["127.0.0.1:9115:9115"]), port_problems, "published ports"),
    "public port": (_edit_list("alertmanager.ports", "127.0.0.1:9093:9093", "9093:9093"),
                    port_problems, "published as 0.0.0.0:9093"),
    "literal password": (_set("grafana.environment.GF_SECURITY_ADMIN_PASSWORD", "admin"),
                         secret_problems, "GF_SECURITY_ADMIN_PASSWORD is not a required variable"),
    "optional password": (_set("grafana.environment.GF_SECURITY_ADMIN_PASSWORD", "${GRAFANA_ADMIN_PASSWORD:-admin}"),
                          secret_problems, "not a required variable"),
    "anonymous grafana": (_set("grafana.environment.GF_AUTH_ANONYMOUS_ENABLED", "true"),
                          secret_problems, "GF_AUTH_ANONYMOUS_ENABLED is true"),
    "renamed receiver": (_rename("alert-receiver", "receiver"), address_problems, "no service alert-receiver"),
    "renamed model server": (_rename("serving", "tf-serving"), address_problems, "serving:8501: no service serving"),
    "moved alertmanager port": (_edit_list("alertmanager.ports", "127.0.0.1:9093:9093", "127.0.0.1:9093:9094"),
                                address_problems, "alertmanager does not listen on 9093"),
    "receiver port not exposed": (_set("alert-receiver.ports", ["127.0.0.1:9096:9096"]), address_problems,
                                  "alert-receiver does not listen on 9095"),
    "renamed blackbox exporter": (_rename("blackbox-exporter", "blackbox"), address_problems,
                                  "no service blackbox-exporter"),
    "other probe config": (_edit_list("blackbox-exporter.volumes",
                                      "../monitoring/blackbox/blackbox.yml:/etc/blackbox_exporter/blackbox.yml:ro",
                                      "../monitoring/blackbox/blackbox.yml:/etc/blackbox_exporter/config.yml:ro"),
                           config_problems, "blackbox-exporter: --config.file does not name the mounted"),
    "other config file": (_edit_list("prometheus.command", "--config.file=/etc/prometheus/prometheus.yml",
                                     "--config.file=/etc/prometheus/other.yml"),
                          config_problems, "--config.file does not name the mounted"),
    "rules not mounted": (_edit_list("prometheus.volumes", "../monitoring/prometheus/rules:/etc/prometheus/rules:ro",
                                     "../monitoring/prometheus/rules:/etc/prometheus/alerts:ro"),
                          config_problems, "rule_files rules/*.yml matches nothing"),
    "data in the container": (_edit_list("prometheus.command", "--storage.tsdb.path=/prometheus",
                                         "--storage.tsdb.path=/tmp/prometheus"),
                              config_problems, "/tmp/prometheus is not a named volume"),
    "receiver on another port": (_edit_list("alert-receiver.command", "9095", "8080"),
                                 config_problems, "--port is not the port it exposes"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_caught(case):
    mutate, check, words = BROKEN[case]
    compose = copy.deepcopy(load())
    mutate(compose)
    problems = check(compose)
    assert any(words in problem for problem in problems), problems


def test_a_copy_that_breaks_the_compose_schema_is_caught(tmp_path):
    compose = load()
    compose["services"]["grafana"]["restrat"] = compose["services"]["grafana"].pop("restart")
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(compose))
    assert "'restrat' was unexpected" in schema_errors(broken)


def test_the_web_app_answers_the_host_names_it_is_reached_by():
    """The web service's command is one `digits web` accepts (with the image's entry point), and its
    Host allow-list holds every name it is reached by: Prometheus' scrape target and the published
    loopback port's (or the scrape gets 421 and the drift rules go blind)."""
    import shlex

    from web.cli import web_command

    service = load()["services"]["web"]
    dockerfile = (REPO / "docker" / "web" / "Dockerfile").read_text()
    [entry] = [line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT")]
    entry_args = yaml.safe_load(entry.split(None, 1)[1])[3:]  # after python -m web
    context = web_command.make_context("web", [*entry_args, *service["command"]])
    hosts = set(context.params["allowed_hosts"])
    prometheus = yaml.safe_load((REPO / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    scraped = {target.rsplit(":", 1)[0] for job in prometheus["scrape_configs"]
               for group in job.get("static_configs", []) for target in group["targets"]
               if target.rsplit(":", 1)[1] == "8080"}
    assert scraped == {"web"} and scraped <= hosts, (scraped, hosts)
    assert {"localhost", "127.0.0.1"} <= hosts
    assert shlex.join(entry_args).startswith("--host 0.0.0.0")
