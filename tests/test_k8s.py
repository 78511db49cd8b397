"""deploy/k8s/ checked without a cluster: every built-in object against one Kubernetes release's schema
(strict), the kustomizations, the probes, security and rollout settings, ports and image against docker/,
and the Prometheus Operator objects (checked structurally) against the scrape config and rules they carry."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from conftest import REPO, require_tool
from monitoring import kubernetes as kubernetes_alerts, local, names
from serving.docker_context import IMAGE_NAME, parse_batching_parameters
from test_docker import DOCKER, DOCKERFILE, entrypoint_flags, instructions

# The one Kubernetes release every built-in kind is validated against (kubernetes-validate ships its schemas).
KUBERNETES_VERSION = "1.35"

K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
PRODUCTION = K8S / "overlays" / "production"
GCS = K8S / "overlays" / "gcs"
CANARY = K8S / "overlays" / "canary"
KUSTOMIZATIONS = [BASE, *sorted(path.parent for path in (K8S / "overlays").glob("*/kustomization.yaml"))]
PROMETHEUS_YML = REPO / "monitoring" / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((REPO / "monitoring" / "prometheus" / "rules").glob("*.yml"))
REGENERATE = "run `python -m monitoring.rules` (it writes the rule files and deploy/k8s/base/prometheusrule.yaml)"

# Kinds that kubernetes-validate has no schema for: the Prometheus Operator's CRDs, checked structurally here.
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
                  ("monitoring.coreos.com/v1", "Probe")}
BLACKBOX_YML = REPO / "monitoring" / "blackbox" / "blackbox.yml"
# The Operator's CRD (monitoring.coreos.com_prometheusrules.yaml): the fields a group and a rule may have,
# and its Duration pattern for `for` and `interval`.
RULE_GROUP_FIELDS = {"name", "interval", "rules", "labels", "limit", "partial_response_strategy", "query_offset"}
RULE_FIELDS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
OPERATOR_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")

# The server's resident memory in the serving soak test (docs/performance.md, "Serving"), and the
# headroom the memory limit must leave above it.
MEASURED_RSS_MB = 1301
MEMORY_HEADROOM = 1.5


# --- Reading the manifests -----------------------------------------------------------------------

def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def base_objects() -> list[dict]:
    """The objects of deploy/k8s/base, in the order its kustomization lists their files."""
    return [document for name in kustomization(BASE)["resources"] for document in documents(BASE / name)]


def the(objects: list[dict], kind: str, name: str | None = None) -> dict:
    [found] = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def container(deployment: dict) -> dict:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """matchLabels (and, if present, matchExpressions In/Exists) of a label selector against labels."""
    if not selector:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        if expression["operator"] == "In" and labels.get(expression["key"]) not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and not present:
            return False
    return True


def args_flags(deployment: dict) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in container(deployment).get("args", []))


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The Dockerfile HEALTHCHECK's options (--interval=30s ...) and its CMD in exec form."""
    [arguments] = [arguments for name, arguments in instructions(DOCKERFILE) if name == "HEALTHCHECK"]
    options, command = arguments.split("CMD", 1)
    return dict(option.removeprefix("--").split("=", 1) for option in options.split()), json.loads(command)


def seconds(duration: str) -> int:
    return int(duration.removesuffix("s"))


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)?", quantity).groups()
    return int(number) * units.get(unit, 1)


def kubectl() -> str:
    return require_tool("kubectl", "the overlays are checked file by file only (no `kubectl kustomize`)")


def built(directory: Path) -> list[dict]:
    """What `kubectl apply -k directory` would send: `kubectl kustomize`, which needs no cluster."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


# --- Checks: each returns the problems it finds, so that a broken copy can show it fails ---------

def schema_problems(objects: list[dict]) -> list[str]:
    problems = []
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in OPERATOR_KINDS:
            continue
        try:
            version = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
            continue
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{where}: {error.message}")
            continue
        if version != KUBERNETES_VERSION:
            problems.append(f"{where}: validated against {version}, not {KUBERNETES_VERSION}")
    return problems


def kustomization_problems(directory: Path) -> list[str]:
    """Every manifest in the directory is listed (as a resource or a patch) and everything listed exists."""
    spec = kustomization(directory)
    listed = {name for name in spec.get("resources", []) if not (directory / name).is_dir()}
    listed |= {patch["path"] for patch in spec.get("patches", []) if "path" in patch}
    present = {path.name for path in directory.glob("*.y*ml")} - {"kustomization.yaml"}
    problems = [f"{directory.name}: {name} is not in kustomization.yaml" for name in sorted(present - listed)]
    problems += [f"{directory.name}: {name} is listed but missing" for name in sorted(listed - present)]
    for name in spec.get("resources", []):
        if (directory / name).is_dir() and not (directory / name / "kustomization.yaml").exists():
            problems.append(f"{directory.name}: resource {name} is not a kustomization")
    return problems


def underlying(directory: Path) -> list[dict]:
    """The objects an overlay builds on: the base's files, or the other overlay it names, as kubectl renders it."""
    [resource] = [name for name in kustomization(directory)["resources"] if (directory / name).is_dir()]
    target = (directory / resource).resolve()
    return base_objects() if target == BASE.resolve() else built(target)


def overlay_problems(directory: Path, base: list[dict]) -> list[str]:
    """An overlay only references the base's image, patches the base's objects and replaces (or merges into)
    the base's ConfigMaps; `base` is what it builds on (see `underlying`)."""
    spec, problems = kustomization(directory), []
    configmaps = {o["metadata"]["name"] for o in base if o["kind"] == "ConfigMap"}
    for generator in spec.get("configMapGenerator", []):
        if generator.get("behavior", "create") != "create" and generator["name"] not in configmaps:
            problems.append(f"{directory.name}: generator {generator['behavior']}s ConfigMap/{generator['name']}, "
                            "which the base does not have")
    images = {container(o)["image"].split(":")[0] for o in base if o["kind"] == "Deployment"}
    for image in spec.get("images", []):
        if image["name"] not in images:
            problems.append(f"{directory.name}: image {image['name']} is in no Deployment of the base")
        if not re.fullmatch(r"\d+", str(image.get("newTag", ""))):
            problems.append(f"{directory.name}: tag {image.get('newTag')!r} is not a model version")
    existing = {(o["kind"], o["metadata"]["name"]) for o in base}
    for patch in spec.get("patches", []):
        for document in documents(directory / patch["path"]) if "path" in patch else []:
            target = patch.get("target") or {"kind": document["kind"], "name": document["metadata"]["name"]}
            if (target["kind"], target["name"]) not in existing:
                problems.append(f"{directory.name}: patch {patch['path']} targets {target['kind']}/{target['name']}, "
                                "which the base does not have")
    return problems


def probe_problems(deployment: dict) -> list[str]:
    box, problems = container(deployment), []
    options, command = healthcheck()
    ports = {port["name"] for port in box["ports"]}
    readiness = box.get("readinessProbe", {})
    if readiness.get("exec", {}).get("command") != command:
        problems.append("readiness: not the Dockerfile HEALTHCHECK command (which waits for AVAILABLE)")
    if readiness.get("timeoutSeconds") != seconds(options["timeout"]):
        problems.append(f"readiness: timeout {readiness.get('timeoutSeconds')} s, "
                        f"the HEALTHCHECK's is {options['timeout']}")
    if readiness.get("failureThreshold") != int(options["retries"]):
        problems.append(f"readiness: {readiness.get('failureThreshold')} failures, the HEALTHCHECK's retries are "
                        f"{options['retries']}")
    for name in ("livenessProbe", "startupProbe"):
        probe = box.get(name)
        if probe is None:
            problems.append(f"{name}: missing")
            continue
        if "exec" in probe:
            problems.append(f"{name}: an exec probe (forks a shell); use httpGet or tcpSocket")
        action = probe.get("httpGet") or probe.get("tcpSocket") or {}
        if action.get("port") not in ports:
            problems.append(f"{name}: port {action.get('port')} is not a named container port")
    startup = box.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < seconds(options["start-period"]):
        problems.append(f"startup: {budget} s for a model load, less than the HEALTHCHECK's start period")
    return problems


def security_problems(deployment: dict) -> list[str]:
    pod = deployment["spec"]["template"]["spec"]
    box, problems = container(deployment), []
    uid = re.search(r"SERVING_UID=(\d+)", DOCKERFILE.read_text())[1]
    merged = {**pod.get("securityContext", {}), **box.get("securityContext", {})}
    expected = {"runAsNonRoot": True, "runAsUser": int(uid), "runAsGroup": int(uid), "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}
    for key, value in expected.items():
        if merged.get(key) != value:
            problems.append(f"securityContext.{key} is {merged.get(key)}, not {value}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("the pod mounts a service account token")
    if any(key in pod for key in ("hostNetwork", "hostPID", "hostIPC")):
        problems.append("the pod shares a host namespace")
    return problems


def rollout_problems(deployment: dict) -> list[str]:
    spec, problems = deployment["spec"], []
    pod, box = spec["template"]["spec"], container(deployment)
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 0:
        problems.append(f"rolling update: maxUnavailable {rolling.get('maxUnavailable')}, not 0")
    if rolling.get("maxSurge") != 1:
        problems.append(f"rolling update: maxSurge {rolling.get('maxSurge')}, not 1")
    if not spec.get("minReadySeconds", 0) > 0:
        problems.append("minReadySeconds is not set")
    if "replicas" in spec:
        problems.append("replicas is set: every `kubectl apply` would undo the autoscaler")
    startup = box["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"] + spec.get("minReadySeconds", 0)
    if spec.get("progressDeadlineSeconds", 600) <= budget:
        problems.append(f"progressDeadlineSeconds {spec.get('progressDeadlineSeconds')} does not cover a slow start "
                        f"({budget} s)")
    sleep = box.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not 0 < sleep < grace:
        problems.append(f"preStop sleep {sleep} s is not within terminationGracePeriodSeconds {grace} s")
    arguments = args_flags(deployment).get("grpc_channel_arguments", "")
    channel = dict(pair.split("=") for pair in arguments.split(",") if pair)
    if "grpc.max_connection_age_ms" not in channel:
        problems.append("gRPC connections never age out: clients stay pinned to one pod")
    else:  # gRPC adds up to 10 % jitter to the age, then waits the grace for calls in flight
        drained = (int(channel["grpc.max_connection_age_ms"]) * 1.1
                   + int(channel.get("grpc.max_connection_age_grace_ms", 0)))
        if drained > sleep * 1000:
            problems.append(f"gRPC connections drain in {drained / 1000:g} s, after the {sleep} s preStop sleep")
    return problems


def resource_problems(deployment: dict) -> list[str]:
    resources, problems = container(deployment).get("resources", {}), []
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if not requests or requests != limits:
        problems.append(f"requests {requests} differ from limits {limits}: not Guaranteed QoS")
    cpu = limits.get("cpu", "0")
    if not re.fullmatch(r"\d+", str(cpu)):
        problems.append(f"CPU limit {cpu} is not whole CPUs")
    batching = parse_batching_parameters((DOCKER / "batching_parameters.txt").read_text())
    flags = args_flags(deployment)
    for flag in ("tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if flags.get(flag) != str(cpu):
            problems.append(f"--{flag} is {flags.get(flag)}, not the CPU limit {cpu}")
    if batching.num_batch_threads.value != int(cpu or 0):
        problems.append(f"num_batch_threads {batching.num_batch_threads.value} is not the CPU limit {cpu}")
    memory = memory_bytes(limits.get("memory", "0"))
    if memory < MEASURED_RSS_MB * 2 ** 20 * MEMORY_HEADROOM:
        problems.append(f"memory limit {limits.get('memory')} leaves under {MEMORY_HEADROOM}x the measured "
                        f"{MEASURED_RSS_MB} MB")
    return problems


def port_problems(objects: list[dict]) -> list[str]:
    deployment, problems = the(objects, "Deployment"), []
    flags = entrypoint_flags(DOCKERFILE)
    expected = {"grpc": int(flags["port"]), "http": int(flags["rest_api_port"])}
    declared = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    if declared != expected:
        problems.append(f"container ports {declared}, the entrypoint's flags give {expected}")
    exposed = {int(port) for name, arguments in instructions(DOCKERFILE) if name == "EXPOSE"
               for port in arguments.split()}
    if set(declared.values()) != exposed:
        problems.append(f"container ports {sorted(declared.values())}, the Dockerfile exposes {sorted(exposed)}")
    for service in (o for o in objects if o["kind"] == "Service"):
        name = service["metadata"]["name"]
        selector = service["spec"].get("selector")
        if not selector or not selects({"matchLabels": selector}, pod_labels(deployment)):
            problems.append(f"Service {name} selects no model server pod")
        for port in service["spec"]["ports"]:
            if port.get("targetPort") not in declared or expected.get(port["name"]) != port["port"]:
                problems.append(f"Service {name}: port {port['name']} {port['port']} -> {port.get('targetPort')} "
                                f"is not the container's")
            if not port.get("appProtocol"):
                problems.append(f"Service {name}: port {port['name']} has no appProtocol")
    return problems


def availability_problems(objects: list[dict]) -> list[str]:
    deployment, problems = the(objects, "Deployment"), []
    hpa, pdb = the(objects, "HorizontalPodAutoscaler"), the(objects, "PodDisruptionBudget")
    target = hpa["spec"]["scaleTargetRef"]
    if [target["apiVersion"], target["kind"], target["name"]] != ["apps/v1", "Deployment",
                                                                  deployment["metadata"]["name"]]:
        problems.append(f"the autoscaler scales {target}, not the Deployment")
    if hpa["spec"].get("minReplicas", 1) < 2 or hpa["spec"]["maxReplicas"] <= hpa["spec"].get("minReplicas", 1):
        problems.append(f"autoscaler {hpa['spec'].get('minReplicas')}..{hpa['spec']['maxReplicas']} replicas")
    if [m["resource"]["name"] for m in hpa["spec"].get("metrics", []) if m["type"] == "Resource"] != ["cpu"]:
        problems.append("the autoscaler does not scale on CPU")
    if hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 0) < 300:
        problems.append("scale-down is not stabilised over at least 5 minutes")
    if not selects(pdb["spec"]["selector"], pod_labels(deployment)):
        problems.append("the disruption budget selects no model server pod")
    if pdb["spec"].get("maxUnavailable", hpa["spec"].get("minReplicas", 1)) >= hpa["spec"].get("minReplicas", 1):
        problems.append("the disruption budget lets every pod go at once")
    hosts = [c for c in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
             if c["topologyKey"] == "kubernetes.io/hostname"]
    if not hosts or not selects(hosts[0]["labelSelector"], pod_labels(deployment)) or hosts[0]["maxSkew"] != 1 \
            or hosts[0]["whenUnsatisfiable"] != "DoNotSchedule":
        problems.append("pods are not spread across nodes")
    return problems


def scrape_config(job: str) -> tuple[dict, str]:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    [scrape] = [entry for entry in config["scrape_configs"] if entry["job_name"] == job]
    return scrape, scrape.get("scrape_interval", config["global"]["scrape_interval"])


def scraped_job(monitor: dict, labels: dict[str, str], namespace: str, endpoint: dict) -> str:
    """The `job` label the Prometheus Operator gives a PodMonitor's series (its promcfg.go, in order): the
    monitor's "<namespace>/<name>", replaced by the value of the pod label `jobLabel` names if the pod has
    it, then the endpoint's relabelings that set job."""
    job = f"{namespace}/{monitor['metadata']['name']}"
    if labels.get(monitor["spec"].get("jobLabel", "")):
        job = labels[monitor["spec"]["jobLabel"]]
    for relabel in endpoint.get("relabelings", []):
        if relabel.get("targetLabel") != "job":
            continue
        assert relabel.get("action", "replace") == "replace" and not relabel.get("sourceLabels"), relabel
        job = relabel.get("replacement", "$1")
    return job


def monitor_problems(objects: list[dict], namespace: str) -> list[str]:
    deployment, monitor, problems = the(objects, "Deployment"), the(objects, "PodMonitor"), []
    scrape, interval = scrape_config(names.SERVING_JOB)
    if not selects(monitor["spec"]["selector"], pod_labels(deployment)):
        problems.append("the PodMonitor selects no model server pod")
    ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    rest = int(entrypoint_flags(DOCKERFILE)["rest_api_port"])
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        if ports.get(endpoint.get("port")) != rest:
            problems.append(f"scrapes port {endpoint.get('port')}, not the REST port {rest} that serves metrics")
        if endpoint.get("path") != scrape["metrics_path"] or scrape["metrics_path"] != names.METRICS_PATH:
            problems.append(f"scrapes {endpoint.get('path')}, prometheus.yml {scrape['metrics_path']}")
        if endpoint.get("interval") != interval:
            problems.append(f"scrapes every {endpoint.get('interval')}, prometheus.yml every {interval}")
        job = scraped_job(monitor, pod_labels(deployment), namespace, endpoint)
        if job != names.SERVING_JOB:
            problems.append(f"series get job {job}, the rules select job=\"{names.SERVING_JOB}\"")
    return problems


def blackbox_probe_problems(objects: list[dict], namespace: str) -> list[str]:
    """The Probe sends what prometheus.yml's probe job sends: the predict module, to the Service's REST
    predict URL, with the job and `module` label the rules select, as often."""
    probe, service, problems = the(objects, "Probe"), the(objects, "Service", "digits-serving"), []
    spec = probe["spec"]
    scrape, interval = scrape_config(names.PROBE_JOB)
    if spec.get("jobName") != names.PROBE_JOB:
        problems.append(f"series get job {spec.get('jobName')}, the rules select job=\"{names.PROBE_JOB}\"")
    module = spec.get("module")
    if module != names.PROBE_PREDICT_MODULE or module not in yaml.safe_load(BLACKBOX_YML.read_text())["modules"]:
        problems.append(f"module {module}, not {names.PROBE_PREDICT_MODULE} of monitoring/blackbox/blackbox.yml")
    static = spec["targets"]["staticConfig"]
    if static.get("labels", {}).get("module") != module:
        problems.append(f"series get module {static.get('labels', {}).get('module')}, the probe sends {module}")
    [rest] = [port["port"] for port in service["spec"]["ports"] if port["name"] == "http"]
    expected = local.predict_url(f"{service['metadata']['name']}.{namespace}.svc:{rest}")
    if static["static"] != [expected]:
        problems.append(f"probes {static['static']}, not the Service's predict URL {expected}")
    if spec.get("interval") != interval or spec.get("prober", {}).get("path", "/probe") != scrape["metrics_path"]:
        problems.append(f"probes every {spec.get('interval')} at {spec.get('prober', {}).get('path')}, "
                        f"prometheus.yml every {interval} at {scrape['metrics_path']}")
    return problems


def alert_target_problems(objects: list[dict]) -> list[str]:
    """The Kubernetes alerts (monitoring/kubernetes.py) select the base's Deployment, autoscaler and container,
    and their pod pattern matches the names the Deployment's pods get and no other Deployment's."""
    deployment, hpa, problems = the(objects, "Deployment"), the(objects, "HorizontalPodAutoscaler"), []
    name = deployment["metadata"]["name"]
    for what, found, selected in (("Deployment", name, kubernetes_alerts.DEPLOYMENT),
                                  ("HorizontalPodAutoscaler", hpa["metadata"]["name"], kubernetes_alerts.AUTOSCALER),
                                  ("container", container(deployment)["name"], kubernetes_alerts.CONTAINER)):
        if found != selected:
            problems.append(f"{what} {found}, the Kubernetes alerts select {selected}")
    # <deployment>-<pod-template-hash>-<suffix>, as the ReplicaSet controller names them
    if not re.fullmatch(kubernetes_alerts.POD_REGEX, f"{name}-7d9c5b6f4-x2x7q") \
            or re.fullmatch(kubernetes_alerts.POD_REGEX, f"{name}-canary-7d9c5b6f4-x2x7q"):
        problems.append(f"pod pattern {kubernetes_alerts.POD_REGEX} does not match exactly the pods of {name}")
    return problems


def rule_file_groups() -> list[dict]:
    return [group for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]


def rule_problems(rule: dict) -> list[str]:
    problems = []
    if (rule["apiVersion"], rule["kind"]) != ("monitoring.coreos.com/v1", "PrometheusRule"):
        problems.append(f"{rule['apiVersion']} {rule['kind']} is not a PrometheusRule")
    groups = rule["spec"]["groups"]
    by_name = {group["name"]: group for group in groups}
    expected = {group["name"]: group for group in rule_file_groups()}
    if len(by_name) != len(groups) or by_name != expected:
        changed = sorted(name for name in by_name.keys() | expected.keys() if by_name.get(name) != expected.get(name))
        problems.append(f"groups {changed} differ from monitoring/prometheus/rules/*.yml: {REGENERATE}")
    for group in groups:
        if set(group) - RULE_GROUP_FIELDS:
            extra = sorted(set(group) - RULE_GROUP_FIELDS)
            problems.append(f"group {group['name']}: fields {extra} are not in the CRD")
        durations = [group.get("interval")] + [r.get(key) for r in group["rules"] for key in ("for", "keep_firing_for")]
        for duration in filter(None, durations):
            if not OPERATOR_DURATION.match(duration):
                problems.append(f"group {group['name']}: {duration} is not an Operator duration")
        for r in group["rules"]:
            if set(r) - RULE_FIELDS or ("record" in r) == ("alert" in r) or "expr" not in r:
                name = r.get("record") or r.get("alert")
                problems.append(f"group {group['name']}: rule {name} has fields {sorted(r)}")
    return problems


# --- The files as committed ----------------------------------------------------------------------

def test_every_builtin_object_is_valid_kubernetes_of_the_pinned_release():
    objects = base_objects()
    assert {o["kind"] for o in objects} >= {"Namespace", "ServiceAccount", "Deployment", "Service",
                                            "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert schema_problems(objects) == []


def test_only_the_prometheus_operator_kinds_go_without_a_schema():
    unknown = set()
    for obj in base_objects():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unknown.add((obj["apiVersion"], obj["kind"]))
    assert unknown == OPERATOR_KINDS


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda path: str(path.relative_to(K8S)))
def test_kustomization_lists_every_manifest_and_only_existing_ones(directory):
    assert kustomization_problems(directory) == []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS[1:], ids=lambda path: str(path.relative_to(K8S)))
def test_overlay_references_only_what_the_base_has(directory):
    assert overlay_problems(directory, underlying(directory)) == []


def test_the_namespace_is_the_kustomizations_and_admits_only_restricted_pods():
    namespace = kustomization(BASE)["namespace"]
    assert the(base_objects(), "Namespace")["metadata"]["name"] == namespace
    assert the(base_objects(), "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_image_is_the_one_docker_readme_tells_operators_to_build():
    built_as = re.findall(r"docker build -t ([\w./-]+):(\w+) build/docker", (REPO / "docs" / "docker.md").read_text())
    assert built_as and {name for name, _ in built_as} == {IMAGE_NAME}
    assert container(the(base_objects(), "Deployment"))["image"] == IMAGE_NAME
    [image] = kustomization(PRODUCTION)["images"]
    assert image["name"] == IMAGE_NAME and image["newName"].rsplit("/", 1)[1] == IMAGE_NAME
    assert re.fullmatch(r"\d+", image["newTag"]), "the tag is the model version `digits docker context` prints"


def test_ports_are_the_dockerfiles_expose_and_entrypoint_flags():
    assert port_problems(base_objects()) == []
    service = the(base_objects(), "Service", "digits-serving")
    assert service["spec"]["type"] == "ClusterIP"
    protocols = {port["name"]: port["appProtocol"] for port in service["spec"]["ports"]}
    assert protocols == {"grpc": "kubernetes.io/h2c", "http": "http"}


def test_readiness_probe_is_the_dockerfile_healthcheck_command():
    _, command = healthcheck()
    probe = container(the(base_objects(), "Deployment"))["readinessProbe"]
    assert probe["exec"]["command"] == command
    assert '"AVAILABLE"' in command[-1] and "/v1/models/digits" in command[-1]
    assert probe_problems(the(base_objects(), "Deployment")) == []


def test_liveness_is_cheap_and_a_startup_probe_covers_slow_model_loads():
    box = container(the(base_objects(), "Deployment"))
    assert box["livenessProbe"]["httpGet"] == {"path": "/v1/models/digits", "port": "http"}
    assert box["startupProbe"]["periodSeconds"] * box["startupProbe"]["failureThreshold"] == 300


def test_the_pod_runs_as_the_images_non_root_user_with_nothing_to_escalate():
    assert security_problems(the(base_objects(), "Deployment")) == []
    assert the(base_objects(), "ServiceAccount")["automountServiceAccountToken"] is False


def test_rollout_never_drops_below_the_ready_pods_and_termination_drains():
    deployment = the(base_objects(), "Deployment")
    assert rollout_problems(deployment) == []
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_resources_are_guaranteed_and_threads_match_the_cpu_limit():
    assert resource_problems(the(base_objects(), "Deployment")) == []


def test_autoscaler_disruption_budget_and_spread_keep_two_pods_serving():
    assert availability_problems(base_objects()) == []


def test_only_labelled_clients_and_monitoring_reach_the_unauthenticated_server():
    """The NetworkPolicy selects the Deployment's pods, lets labelled clients reach both of the Service's
    ports and the monitoring namespace reach only the port the PodMonitor and the probe use."""
    objects = base_objects()
    policy = the(objects, "NetworkPolicy", "digits-serving")
    deployment = the(objects, "Deployment")
    assert selects(policy["spec"]["podSelector"], pod_labels(deployment))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    clients, monitoring = policy["spec"]["ingress"]
    service_ports = {port["targetPort"] for port in the(objects, "Service", "digits-serving")["spec"]["ports"]}
    container_ports = {port["name"] for port in container(deployment)["ports"]}
    assert {port["port"] for port in clients["ports"]} == service_ports <= container_ports
    assert all(selector.get("podSelector", selector.get("namespaceSelector")) == {
        "matchLabels": {"digits-serving/client": "true"}} for selector in clients["from"])
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    scraped = {endpoint["port"] for endpoint in the(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    assert {port["port"] for port in monitoring["ports"]} == scraped == {"http"}


def test_pod_monitor_scrapes_like_prometheus_yml_and_series_get_the_rules_job():
    assert monitor_problems(base_objects(), kustomization(BASE)["namespace"]) == []
    rules = the(base_objects(), "PrometheusRule")
    jobs = {job for group in rules["spec"]["groups"] for r in group["rules"]
            for job in re.findall(r'job="([^"]+)"', r["expr"])}
    assert names.SERVING_JOB in jobs


def test_the_probe_sends_prometheus_ymls_predict_probe_to_the_service():
    assert blackbox_probe_problems(base_objects(), kustomization(BASE)["namespace"]) == []


def test_the_kubernetes_alerts_select_the_manifests_deployment_autoscaler_and_container():
    assert alert_target_problems(base_objects()) == []


def test_the_readme_sets_the_retention_the_slo_window_needs():
    """The Operator keeps 24 h by default; the 30-day budget needs what `digits monitor` and compose keep."""
    assert f"retention: {local.RETENTION}" in (K8S / "README.md").read_text()


def test_prometheus_rule_carries_exactly_the_rule_files_groups():
    assert rule_problems(the(base_objects(), "PrometheusRule")) == []


def test_promtool_accepts_the_groups_of_the_prometheus_rule(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run `bash .ci/tasks.sh setup` (installs prometheus from Debian)"
    groups = the(base_objects(), "PrometheusRule")["spec"]["groups"]
    path = tmp_path / "prometheusrule-groups.yml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(group['rules']) for group in groups)} rules found" in result.stdout


def test_readme_names_the_pinned_kubernetes_release():
    assert f"Kubernetes {KUBERNETES_VERSION}" in (REPO / "docs" / "kubernetes.md").read_text()


def documented_replicas() -> dict[str, tuple[int, int]]:
    """The autoscaler's (min, max) pods that docs/kubernetes.md promises, for the base and production."""
    text = " ".join((REPO / "docs" / "kubernetes.md").read_text().split())
    match = re.search(r"between (\d+) and (\d+) pods \(production: (\d+) and (\d+)\)", text)
    assert match, "docs/kubernetes.md (Scale) no longer says `between N and M pods (production: N and M)`"
    base_min, base_max, production_min, production_max = map(int, match.groups())
    return {"base": (base_min, base_max), "production": (production_min, production_max)}


def test_the_base_autoscaler_keeps_the_documented_replica_range():
    hpa = the(base_objects(), "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == documented_replicas()["base"]


# --- The overlays as kubectl would apply them (`kubectl kustomize`, no cluster needed) ------------

@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), (None, pytest.skip.Exception)],
                         ids=["CI=true", "local"])
def test_without_kubectl_the_render_tests_skip_locally_and_fail_under_ci(monkeypatch, tmp_path, ci, outcome):
    """So that no CI run passes with the overlays unrendered."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no kubectl
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as stopped:
        built(PRODUCTION)
    assert stopped.type is outcome and "kubectl is not installed" in str(stopped.value)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda path: str(path.relative_to(K8S)))
def test_kustomize_build_is_valid_and_keeps_every_promise(directory):
    objects = built(directory)
    assert schema_problems(objects) == []
    namespace = the(objects, "Namespace")["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {namespace}
    deployment = the(objects, "Deployment")
    problems = (probe_problems(deployment) + security_problems(deployment) + rollout_problems(deployment)
                + resource_problems(deployment) + port_problems(objects) + availability_problems(objects)
                + monitor_problems(objects, namespace) + rule_problems(the(objects, "PrometheusRule")))
    assert problems == []


def test_production_overlay_runs_the_registry_image_of_a_model_version_with_more_headroom():
    objects = built(PRODUCTION)
    [image] = kustomization(PRODUCTION)["images"]
    assert container(the(objects, "Deployment"))["image"] == f"{image['newName']}:{image['newTag']}"
    hpa = the(objects, "HorizontalPodAutoscaler")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == documented_replicas()["production"]
    assert hpa["minReplicas"] >= the(base_objects(), "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    # patched, not replaced
    assert hpa["behavior"] == the(base_objects(), "HorizontalPodAutoscaler")["spec"]["behavior"]
    assert the(objects, "Deployment")["spec"]["selector"] == the(base_objects(), "Deployment")["spec"]["selector"]


def test_a_digest_pin_renders_as_the_image_reference_and_stays_valid(tmp_path):
    """docs/kubernetes.md's pin by digest: `kustomize edit set image NAME=IMAGE@sha256:...` writes `digest:` into
    the kustomization, which renders one immutable image reference. The digest here is made up (no registry can
    be reached from these machines to read a real one); what is checked is the shape kubectl renders."""
    digest = "sha256:" + "0123456789abcdef" * 4
    overlay = tmp_path / "pinned"
    overlay.mkdir()
    [image] = kustomization(PRODUCTION)["images"]
    relative = os.path.relpath(PRODUCTION, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": [relative],
        "images": [{"name": image["newName"], "digest": digest}]}))
    objects = built(overlay)
    assert container(the(objects, "Deployment"))["image"] == f"{image['newName']}@{digest}"
    assert schema_problems(objects) == []
    assert "kustomize edit set image digits-serving=REGISTRY/digits-serving@sha256:" in " ".join(
        (REPO / "docs" / "kubernetes.md").read_text().split())


ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"


def test_production_also_scales_on_the_batching_queue_wait_the_adapter_serves(tmp_path):
    """The production autoscaler's Pods metric is the one prometheus-adapter's rule names, computed from
    TF Serving's queuing latency histogram (monitoring/names.py) as a query promtool accepts; CPU stays
    as the base has it; the target is far above the batch timeout, so idle batching waits never scale."""
    base_hpa = the(base_objects(), "HorizontalPodAutoscaler")["spec"]
    hpa = the(built(PRODUCTION), "HorizontalPodAutoscaler")["spec"]
    cpu, queue = hpa["metrics"]
    assert [cpu] == base_hpa["metrics"]
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    assert queue["type"] == "Pods" and queue["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["seriesQuery"].startswith(f"{names.QUEUING_LATENCY}_count{{")
    assert re.fullmatch(rule["name"]["matches"], f"{names.QUEUING_LATENCY}_count")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "namespace, pod").replace(
        "<<.LabelMatchers>>", 'namespace="digits", pod=~"digits-serving-.*"')
    assert f"{names.QUEUING_LATENCY}_sum" in query and f"{names.QUEUING_LATENCY}_count" in query
    rules_file = tmp_path / "adapter.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": "digits:batch_queue_wait_seconds", "expr": query}]}]}))
    promtool = require_tool("promtool", "the adapter's query is checked by Prometheus' own parser")
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    target = queue["pods"]["target"]
    assert target["type"] == "AverageValue" and target["averageValue"].endswith("m")
    batching = parse_batching_parameters((DOCKER / "batching_parameters.txt").read_text())
    timeout_s = batching.batch_timeout_micros.value / 1e6
    assert int(target["averageValue"][:-1]) / 1000 >= 10 * timeout_s


def test_the_gcs_overlay_serves_the_bucket_the_pusher_writes_as_workload_identity():
    """The pods read models.config from the overlay's ConfigMap (a directory mount, so edits arrive), whose
    model is the Pusher's gs:// base path; the flag naming it comes after the image's own and keeps the
    base's other flags; the ServiceAccount is bound to a Google service account; nothing else changes."""
    from serving.docker_context import parse_models_config

    objects, base = built(GCS), built(BASE)
    deployment, configmap = the(objects, "Deployment"), the(objects, "ConfigMap", "digits-serving-models")
    [model] = parse_models_config(configmap["data"]["models.config"]).model_config_list.config
    assert model.name == "digits" and model.base_path.startswith("gs://") and model.base_path.endswith("/digits")
    assert model.model_version_policy.latest.num_versions == 2 and not model.version_labels
    box = container(deployment)
    [volume] = [volume for volume in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in volume]
    [mount] = [mount for mount in box["volumeMounts"] if mount["name"] == volume["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    base_box = container(the(base, "Deployment"))
    assert [m for m in box["volumeMounts"] if m is not mount] == base_box.get("volumeMounts", [])
    assert "subPath" not in mount and mount["readOnly"] is True
    flags = [arg for arg in box["args"] if arg.startswith("--model_config_file=")]
    assert flags == [f"--model_config_file={mount['mountPath']}/models.config"]
    image_flag = entrypoint_flags(DOCKERFILE)["model_config_file"]
    assert image_flag != flags[0].split("=", 1)[1]  # replaced, as the last value given wins
    assert [arg for arg in box["args"] if arg not in flags] == container(the(base, "Deployment"))["args"]
    account = the(objects, "ServiceAccount")
    assert re.fullmatch(r"[a-z][-a-z0-9]+@[a-z][-a-z0-9]+\.iam\.gserviceaccount\.com",
                        account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"])
    assert account["automountServiceAccountToken"] is False
    assert configmap["metadata"]["namespace"] == the(objects, "Namespace")["metadata"]["name"]


def test_the_canary_overlay_pins_two_versions_of_the_gcs_bucket_with_a_stable_and_a_canary_label():
    """Only models.config differs from the gcs overlay: TF Serving's `specific` policy over two pushed
    versions of the same gs:// base path, `stable` and `canary` each naming one of them. Every pod starts
    by assigning both labels before either version has loaded, which TF Serving refuses (the whole config,
    so the pod never serves) unless --allow_version_labels_for_unavailable_models is on: the image's
    entrypoint sets it and the overlay does not take it back."""
    from serving.docker_context import parse_models_config

    canary, gcs = built(CANARY), built(GCS)
    configmap = the(canary, "ConfigMap", "digits-serving-models")
    [model] = parse_models_config(configmap["data"]["models.config"]).model_config_list.config
    [gcs_model] = parse_models_config(
        the(gcs, "ConfigMap", "digits-serving-models")["data"]["models.config"]).model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        gcs_model.name, gcs_model.base_path, gcs_model.model_platform)
    assert model.model_version_policy.WhichOneof("policy_choice") == "specific"
    versions = list(model.model_version_policy.specific.versions)
    assert len(set(versions)) == len(versions) == 2, "the memory limit is sized for two loaded versions"
    assert all(re.fullmatch(r"\d{10}", str(version)) for version in versions), "the Pusher's versions: Unix times"
    assert set(model.version_labels) == {"stable", "canary"}
    assert set(model.version_labels.values()) <= set(versions), "a label names a version that is not loaded"
    assert configmap["data"] == {"models.config": (CANARY / "models.config").read_text()}  # replaced, not merged

    def without_data(objects):
        return [{key: value for key, value in o.items() if key != "data"} for o in objects]
    assert without_data(canary) == without_data(gcs)
    assert entrypoint_flags(DOCKERFILE)["allow_version_labels_for_unavailable_models"] == "true"
    assert not any(arg.startswith("--allow_version_labels_for_unavailable_models")
                   for arg in container(the(canary, "Deployment"))["args"])


# --- Broken copies: each check finds what it is for ----------------------------------------------

def _deployment(path: str, value):
    """Sets (or with None deletes) a dotted path under the Deployment; `container` stands for the only one."""
    def mutate(objects):
        node = the(objects, "Deployment")
        *parents, last = path.split(".")
        for key in parents:
            node = container({"spec": {"template": {"spec": node}}}) if key == "container" else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return mutate


def _object(kind: str, path: str, value, name: str | None = None):
    def mutate(objects):
        node = the(objects, kind, name)
        *parents, last = path.split(".")
        for key in parents:
            node = node[key][0] if isinstance(node[key], list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return mutate


def _edit_rule(objects):
    the(objects, "PrometheusRule")["spec"]["groups"][0]["rules"][0]["expr"] += " > 0"


def _deployment_check(check):
    return lambda objects: check(the(objects, "Deployment"))


NAMESPACE = "digits"
BROKEN = {
    "unknown field": (_deployment("spec.template.spec.container.readinesProbe", {}), schema_problems,
                      "'readinesProbe' was unexpected"),
    "wrong type": (_deployment("spec.minReadySeconds", "10"), schema_problems, "is not of type 'integer'"),
    "http readiness": (_deployment("spec.template.spec.container.readinessProbe",
                                   {"httpGet": {"path": "/v1/models/digits", "port": "http"}, "timeoutSeconds": 5,
                                    "failureThreshold": 3}),
                       _deployment_check(probe_problems), "not the Dockerfile HEALTHCHECK command"),
    "no startup probe": (_deployment("spec.template.spec.container.startupProbe", None),
                         _deployment_check(probe_problems), "startupProbe: missing"),
    "exec liveness": (_deployment("spec.template.spec.container.livenessProbe", {"exec": {"command": ["true"]}}),
                      _deployment_check(probe_problems), "an exec probe"),
    "root": (_deployment("spec.template.spec.container.securityContext.runAsUser", 0),
             _deployment_check(security_problems), "runAsUser is 0"),
    "writable root": (_deployment("spec.template.spec.container.securityContext.readOnlyRootFilesystem", False),
                      _deployment_check(security_problems), "readOnlyRootFilesystem is False"),
    "capabilities kept": (_deployment("spec.template.spec.container.securityContext.capabilities",
                                      {"drop": ["NET_RAW"]}),
                          _deployment_check(security_problems), "capabilities"),
    "token mounted": (_deployment("spec.template.spec.automountServiceAccountToken", None),
                      _deployment_check(security_problems), "service account token"),
    "surge down": (_deployment("spec.strategy.rollingUpdate.maxUnavailable", 1), _deployment_check(rollout_problems),
                   "maxUnavailable 1"),
    "replicas": (_deployment("spec.replicas", 2), _deployment_check(rollout_problems), "undo the autoscaler"),
    "sleep past the grace": (_deployment("spec.template.spec.terminationGracePeriodSeconds", 20),
                             _deployment_check(rollout_problems), "not within terminationGracePeriodSeconds"),
    "pinned grpc": (_deployment("spec.template.spec.container.args", ["--tensorflow_intra_op_parallelism=2",
                                                                     "--tensorflow_inter_op_parallelism=2"]),
                    _deployment_check(rollout_problems), "pinned to one pod"),
    "burstable": (_deployment("spec.template.spec.container.resources.requests", {"cpu": "1", "memory": "1Gi"}),
                  _deployment_check(resource_problems), "not Guaranteed QoS"),
    "threads unbounded": (_deployment("spec.template.spec.container.args", []), _deployment_check(resource_problems),
                          "--tensorflow_intra_op_parallelism is None"),
    "moved port": (_deployment("spec.template.spec.container.ports", [{"name": "grpc", "containerPort": 9000},
                                                                      {"name": "http", "containerPort": 8501}]),
                   port_problems, "the entrypoint's flags give"),
    "no app protocol": (_object("Service", "spec.ports.appProtocol", None, "digits-serving"), port_problems,
                        "has no appProtocol"),
    "scale to one": (_object("HorizontalPodAutoscaler", "spec.minReplicas", 1), availability_problems,
                     "1..10 replicas"),
    "quick scale down": (_object("HorizontalPodAutoscaler", "spec.behavior.scaleDown.stabilizationWindowSeconds", 60),
                         availability_problems, "stabilised"),
    "budget elsewhere": (_object("PodDisruptionBudget", "spec.selector", {"matchLabels": {"app": "other"}}),
                         availability_problems, "selects no model server pod"),
    "no job label": (_object("PodMonitor", "spec.jobLabel", None),
                     lambda objects: monitor_problems(objects, NAMESPACE), "job digits/digits-serving"),
    "job relabelled": (_object("PodMonitor", "spec.podMetricsEndpoints.relabelings",
                               [{"targetLabel": "job", "replacement": "serving"}]),
                       lambda objects: monitor_problems(objects, NAMESPACE), "series get job serving"),
    "scrapes grpc": (_object("PodMonitor", "spec.podMetricsEndpoints.port", "grpc"),
                     lambda objects: monitor_problems(objects, NAMESPACE), "not the REST port"),
    "slower scrape": (_object("PodMonitor", "spec.podMetricsEndpoints.interval", "30s"),
                      lambda objects: monitor_problems(objects, NAMESPACE), "every 30s"),
    "probe job renamed": (_object("Probe", "spec.jobName", "blackbox"),
                          lambda objects: blackbox_probe_problems(objects, NAMESPACE), "series get job blackbox"),
    "probe module unknown": (_object("Probe", "spec.module", "http_2xx"),
                             lambda objects: blackbox_probe_problems(objects, NAMESPACE), "module http_2xx"),
    "probe of the metrics page": (_object("Probe", "spec.targets.staticConfig.static",
                                          ["http://digits-serving.digits.svc:8501/monitoring/prometheus/metrics"]),
                                  lambda objects: blackbox_probe_problems(objects, NAMESPACE),
                                  "not the Service's predict URL"),
    "hand-edited rule": (_edit_rule, lambda objects: rule_problems(the(objects, "PrometheusRule")),
                         "python -m monitoring.rules"),
    "container renamed": (_deployment("spec.template.spec.container.name", "serving"),
                          alert_target_problems, "container serving, the Kubernetes alerts select tensorflow-serving"),
    "autoscaler renamed": (_object("HorizontalPodAutoscaler", "metadata.name", "digits"), alert_target_problems,
                           "HorizontalPodAutoscaler digits, the Kubernetes alerts select digits-serving"),
    "bad duration": (lambda objects: the(objects, "PrometheusRule")["spec"]["groups"][1].update(interval="5 min"),
                     lambda objects: rule_problems(the(objects, "PrometheusRule")), "not an Operator duration"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_is_caught(case):
    mutate, check, words = BROKEN[case]
    objects = copy.deepcopy(base_objects())
    mutate(objects)
    problems = check(objects)
    assert any(words in problem for problem in problems), problems


def test_an_unlisted_manifest_and_a_missing_one_are_caught(tmp_path):
    copied = tmp_path / "base"
    shutil.copytree(BASE, copied)
    (copied / "ingress.yaml").write_text("apiVersion: networking.k8s.io/v1\nkind: Ingress\n")
    (copied / "podmonitor.yaml").unlink()
    problems = kustomization_problems(copied)
    assert "base: ingress.yaml is not in kustomization.yaml" in problems
    assert "base: podmonitor.yaml is listed but missing" in problems


def test_an_overlay_patching_what_the_base_lacks_is_caught(tmp_path):
    copied = tmp_path / "production"
    shutil.copytree(PRODUCTION, copied)
    patch = copied / "horizontalpodautoscaler.yaml"
    patch.write_text(patch.read_text().replace("name: digits-serving", "name: digits"))
    spec = kustomization(copied)
    spec["images"][0]["newTag"] = "latest"
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    problems = overlay_problems(copied, base_objects())
    assert any("HorizontalPodAutoscaler/digits, which the base does not have" in p for p in problems), problems
    assert any("'latest' is not a model version" in p for p in problems), problems


def test_an_overlay_replacing_a_config_map_its_base_lacks_is_caught(tmp_path):
    copied = tmp_path / "canary"
    shutil.copytree(CANARY, copied)
    spec = kustomization(copied)
    spec["configMapGenerator"][0]["name"] = "digits-serving-model"
    (copied / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    assert overlay_problems(copied, underlying(CANARY)) == [
        "canary: generator replaces ConfigMap/digits-serving-model, which the base does not have"]
