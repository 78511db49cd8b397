"""The Kubernetes alerts on the model server: what kube-state-metrics and cAdvisor see and its own metrics cannot.

A pod that fails readiness is still scraped (up == 1) but gets no request, a crash-looping or OOM-killed
container restarts between scrapes, and an autoscaler at its maximum or a throttled CPU shows only as
latency. Series are selected as kube-state-metrics v2 and the kubelet's cAdvisor write them (`namespace`
always, `cluster` where a multi-cluster setup adds it), and every expression keeps (cluster, namespace) so
that a failing staging namespace alerts for staging alone.
"""

from __future__ import annotations

# The names deploy/k8s/base gives the model server (tests/test_k8s.py checks them against the manifests).
DEPLOYMENT = "digits-serving"  # deployment.yaml
AUTOSCALER = "digits-serving"  # horizontalpodautoscaler.yaml
CONTAINER = "tensorflow-serving"  # deployment.yaml, the pod's only container
# A Deployment's pods are named <deployment>-<pod-template-hash>-<suffix>: this matches the model server's
# and not those of another Deployment whose name starts the same (digits-serving-canary-...).
POD_REGEX = f"{DEPLOYMENT}-[a-z0-9]+-[a-z0-9]+"

RESTART_WINDOW = "15m"
CPU_THROTTLING_THRESHOLD = 0.25  # kubernetes-mixin's CPUThrottlingHigh default

_DEPLOYMENT_KEYS = "cluster, namespace, deployment"
_AUTOSCALER_KEYS = "cluster, namespace, horizontalpodautoscaler"
_CONTAINER_KEYS = "cluster, namespace, pod, container"
_DEPLOYMENT = f'deployment="{DEPLOYMENT}"'
_AUTOSCALER = f'horizontalpodautoscaler="{AUTOSCALER}"'
_CONTAINER = f'pod=~"{POD_REGEX}",container="{CONTAINER}"'
_WHERE = "{{ with $labels.cluster }} in cluster {{ . }}{{ end }}"
_POD = "{{ $labels.namespace }}/{{ $labels.pod }}" + _WHERE


def _max(by: str, expr: str) -> str:
    # max, not sum: a second scrape of the same exporter (two Prometheus replicas behind one ruler,
    # a kube-state-metrics pod being replaced) duplicates a series instead of adding to it.
    return f"max by ({by}) ({expr})"


def _restarts(window: str) -> str:
    return _max(_CONTAINER_KEYS, f"increase(kube_pod_container_status_restarts_total{{{_CONTAINER}}}[{window}])")


def alerting_rules(runbook_base: str) -> list[dict]:
    """The model server's Kubernetes alerts, in the order of docs/runbook.md's "Kubernetes" section."""
    from monitoring.rules import alert  # rules includes these alerts: importing it at module level would be circular

    return [
        alert(
            "DigitsNoReadyReplicas",
            f"{_max(_DEPLOYMENT_KEYS, f'kube_deployment_spec_replicas{{{_DEPLOYMENT}}}')} > 0\n"
            f"and on ({_DEPLOYMENT_KEYS})\n"
            f"{_max(_DEPLOYMENT_KEYS, f'kube_deployment_status_replicas_available{{{_DEPLOYMENT}}}')} == 0",
            "5m", "critical",
            "No model server pod is ready: the Service sends requests nowhere.",
            "Deployment {{ $labels.namespace }}/{{ $labels.deployment }}" + _WHERE + " wants {{ $value }} model "
            "server replicas and none has been available for 5 minutes: every pod fails its readiness probe "
            "(no model version AVAILABLE), crashes or cannot be scheduled.",
            runbook_base,
        ),
        alert(
            "DigitsPodCrashLooping",
            f"{_restarts(RESTART_WINDOW)} > 0\n"
            f"and on ({_CONTAINER_KEYS})\n"
            + _max(_CONTAINER_KEYS, f'max_over_time(kube_pod_container_status_waiting_reason'
                                    f'{{{_CONTAINER},reason="CrashLoopBackOff"}}[5m])') + " >= 1",
            "15m", "warning",
            "A model server container is crash looping.",
            "Container {{ $labels.container }} of pod " + _POD + " is in CrashLoopBackOff, with "
            "{{ $value | printf \"%.0f\" }} restart(s) in the last " f"{RESTART_WINDOW}: this model server pod serves nothing "
            "between restarts.",
            runbook_base,
        ),
        alert(
            "DigitsHPAAtMaximum",
            f"{_max(_AUTOSCALER_KEYS, f'kube_horizontalpodautoscaler_status_current_replicas{{{_AUTOSCALER}}}')}\n"
            f"== on ({_AUTOSCALER_KEYS})\n"
            f"{_max(_AUTOSCALER_KEYS, f'kube_horizontalpodautoscaler_spec_max_replicas{{{_AUTOSCALER}}}')}\n"
            # A maximum equal to the minimum is a fixed size chosen on purpose, not a ceiling hit.
            f"and on ({_AUTOSCALER_KEYS})\n"
            f"{_max(_AUTOSCALER_KEYS, f'kube_horizontalpodautoscaler_spec_max_replicas{{{_AUTOSCALER}}}')}\n"
            f"!= on ({_AUTOSCALER_KEYS})\n"
            f"{_max(_AUTOSCALER_KEYS, f'kube_horizontalpodautoscaler_spec_min_replicas{{{_AUTOSCALER}}}')}",
            "15m", "warning",
            "The model server autoscaler has run at its maximum for 15 minutes.",
            "HorizontalPodAutoscaler {{ $labels.namespace }}/{{ $labels.horizontalpodautoscaler }}" + _WHERE
            + " has kept the model server at its maximum of {{ $value }} replicas for 15 minutes: more load "
            "would queue and slow every predict.",
            runbook_base,
        ),
        alert(
            "DigitsContainerOOMKilled",
            f"{_restarts(RESTART_WINDOW)} > 0\n"
            f"and on ({_CONTAINER_KEYS})\n"
            # The reason now, not over the window: kube-state-metrics keeps the last termination's reason
            # until the next one, so an OOM kill of yesterday would name today's crash an OOM kill.
            + _max(_CONTAINER_KEYS, f'kube_pod_container_status_last_terminated_reason'
                                    f'{{{_CONTAINER},reason="OOMKilled"}}') + " == 1",
            "0m", "warning",
            "A model server container was killed for running out of memory.",
            "Container {{ $labels.container }} of pod " + _POD + " was killed at its memory limit (OOMKilled) and "
            "restarted, {{ $value | printf \"%.0f\" }} restart(s) in the last " f"{RESTART_WINDOW}: the model "
            "server's requests in flight failed.",
            runbook_base,
        ),
        alert(
            "DigitsCPUThrottling",
            _max(_CONTAINER_KEYS, f"increase(container_cpu_cfs_throttled_periods_total{{{_CONTAINER}}}[5m])")
            + f"\n/ on ({_CONTAINER_KEYS})\n"
            + _max(_CONTAINER_KEYS, f"increase(container_cpu_cfs_periods_total{{{_CONTAINER}}}[5m])")
            + f"\n> {CPU_THROTTLING_THRESHOLD}",
            "15m", "warning",
            "A model server container is CPU-throttled.",
            "Container {{ $labels.container }} of pod " + _POD + " was throttled in {{ $value | humanizePercentage }} "
            "of its CPU periods over 5 minutes, for 15 minutes: the model server runs more threads than its CPU "
            "limit, and latency grows.",
            runbook_base,
        ),
    ]
