"""The run report: one self-contained HTML page about a pipeline run, built by one function.

The page is built from the run's artifacts (data statistics and anomalies, the training history, TFMA's
metrics, confusion matrix and validation result, the blessing and the push) and whatever else the source
knows: read back from the local MLMD store (`digits pipeline report`, and after `digits pipeline run`),
it also has each component's state and wall time; inside the pipeline (pipeline/report_component.py,
the RunReport step every orchestrator runs, Vertex AI included) it has the step's input artifacts only.
Pictures are PNGs made with matplotlib and embedded, so the page is one file to open or share.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from data import contract
from components.config import CODE_FINGERPRINT_KEY
from components.history import read_history
from pipeline import uri
from pipeline.config import BlessingGates
from pipeline.run_history import ComponentRun, latest_run_outputs, latest_run_properties

log = logging.getLogger(__name__)

# What the page reads, by role: the component and output key of the run that produce it. The roles are
# also the RunReport step's input names (pipeline/pipeline.py wires them from these outputs).
ROLES: dict[str, tuple[str, str]] = {
    "statistics": ("StatisticsGen", "statistics"),
    "anomalies": ("ExampleValidator", "anomalies"),
    "model_run": ("Trainer", "model_run"),
    "model": ("Trainer", "model"),
    "evaluation": ("Evaluator", "evaluation"),
    "blessing": ("Evaluator", "blessing"),
    "pushed_model": ("Pusher", "pushed_model"),
}
PAGE_FILE = "index.html"  # in the report directory, and in the RunReport step's output artifact


class ReportError(Exception):
    """There is no run to report on."""


@dataclass(frozen=True)
class RunArtifacts:
    """What one run's page is built from, wherever it comes from."""

    # role (ROLES) -> TFX artifact: its URI and custom properties. A role missing: not made in this run.
    artifacts: dict[str, Any]
    location: str  # where the run is (a path or URI), for the page's heading
    location_label: str = "pipeline root"
    data_root: str | None = None  # the TFRecord build ImportExampleGen read (its manifest names corrections)
    # Each component's state and wall time: MLMD's. None inside the pipeline, where the step runs before
    # the run has ended (the orchestrator shows them: the Vertex AI console's run graph).
    components: list[ComponentRun] | None = None


def from_mlmd(pipeline_root: Path, pipeline_name: str = "digits") -> RunArtifacts:
    """The latest run in the local MLMD store: its components and the artifacts its own executions
    produced or reused. Never another run's: after a failed run, the page shows that run's failure
    and no verdict."""
    pipeline_root = Path(pipeline_root).resolve()
    metadata_path = pipeline_root / "metadata.sqlite"
    from pipeline import report_component  # noqa: F401 (the run report's own artifact type, for MLMD to read)

    components, outputs = latest_run_outputs(metadata_path, pipeline_name)
    if not components:
        raise ReportError(f"no pipeline run recorded in {metadata_path}; run `digits pipeline run` first")
    artifacts = {role: outputs[node][key] for role, (node, key) in ROLES.items() if key in outputs.get(node, {})}
    data_root = latest_run_properties(metadata_path, pipeline_name, "ImportExampleGen").get("input_base")
    return RunArtifacts(artifacts=artifacts, location=str(pipeline_root), data_root=data_root, components=components)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _training_curves(history: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = history["history"]
    epochs = np.arange(1, len(values.get("loss", [])) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, metric, title in ((left, "loss", "loss"), (right, contract.ACCURACY_METRIC, "accuracy")):
        if metric in values:
            axis.plot(epochs, values[metric], marker="o", label="train")
        if f"val_{metric}" in values:
            axis.plot(epochs, values[f"val_{metric}"], marker="o", label="eval split")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    return _png(figure)


def _confusion_image(matrix: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.2, 4.6))
    image = axis.imshow(matrix, cmap="Blues")
    for (row, column), value in np.ndenumerate(matrix):
        if value:
            axis.text(column, row, f"{int(value)}", ha="center", va="center", fontsize=7,
                      color="white" if value > matrix.max() / 2 else "black")
    axis.set_xticks(range(contract.NUM_CLASSES))
    axis.set_yticks(range(contract.NUM_CLASSES))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title("confusion matrix (held-out test split)")
    figure.colorbar(image, ax=axis, fraction=0.046)
    return _png(figure)


def confusion_matrix_from_plot(plot: dict) -> np.ndarray:
    """TFMA's MultiClassConfusionMatrixPlot (argmax predictions) as a dense [true, predicted] array."""
    matrix = np.zeros((contract.NUM_CLASSES, contract.NUM_CLASSES))
    entries = plot["multiClassConfusionMatrixAtThresholds"]["matrices"][0]["entries"]
    for entry in entries:  # ids of 0 are omitted from the JSON form
        matrix[int(entry.get("actualClassId", 0)), int(entry.get("predictedClassId", 0))] += entry.get(
            "numWeightedExamples", 0.0)
    return matrix


@dataclass(frozen=True)
class Evaluation:
    """What the Evaluator and Pusher of one run decided, read once for the page and the console."""

    accuracy: float
    examples: float
    matrix: np.ndarray  # [true, predicted] counts
    # TFMA's per-class precision, recall and F1 at the argmax, [class]; NaN where undefined (a class
    # never predicted has no precision).
    per_class: dict[str, np.ndarray]
    blessed: bool
    has_baseline: bool
    failures: list[str]  # thresholds that failed, in words
    pushed_version: str | None
    pushed_destination: str | None
    already_served_as: str | None = None  # blessed, but identical to this version already in the serving dir
    # At the exported operating point (pipeline/selective_metrics.py): the share answered without a
    # person, and the error among those answers; None where the Evaluator did not compute them.
    coverage: float | None = None
    selective_error: float | None = None
    gates: BlessingGates | None = None  # what the Evaluator was configured with
    pusher_finished: bool = True  # False: this run has no Pusher output (it failed, or was stopped)

    @property
    def support(self) -> np.ndarray:
        return self.matrix.sum(axis=1)

    @property
    def macro(self) -> dict[str, float]:
        """Unweighted means over the classes, an undefined value counting as 0 (sklearn's zero_division=0)."""
        return {name: float(np.mean(np.nan_to_num(values))) for name, values in self.per_class.items()}

    @property
    def push_outcome(self) -> str:
        if self.pushed_destination:
            return f"pushed to {self.pushed_destination}"
        if self.already_served_as:
            return f"not pushed: identical to version {self.already_served_as}, already in the serving directory"
        if not self.pusher_finished:
            return "not pushed: the Pusher did not finish in this run"
        return "not pushed"

    @property
    def selective(self) -> str:
        """The selective figures in words, '' where not computed."""
        if self.coverage is None or self.selective_error is None:
            return ""
        return (f"{100 * self.coverage:.1f} % answered without a person, "
                f"{100 * self.selective_error:.2f} % of those wrong")

    def summary(self) -> str:
        verdict = "BLESSED" if self.blessed else "NOT BLESSED (" + "; ".join(self.failures) + ")"
        selective = f" ({self.selective})" if self.selective else ""
        return (f"held-out accuracy {self.accuracy:.4f}, macro F1 {self.macro['f1']:.4f}{selective}: "
                f"{verdict}, {self.push_outcome}")


def _metric(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _evaluation(run: RunArtifacts) -> Evaluation | None:
    """From the Evaluator's artifacts alone: TFMA writes the EvalConfig it ran (gates, and a baseline
    model if there was one) beside its metrics, so no execution property is needed."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.writers import eval_config_writer

    from pipeline.pipeline import PER_CLASS_METRICS, gates_from_eval_config, per_class_metric_name
    from pipeline.pusher import ALREADY_SERVED_AS

    evaluation = run.artifacts.get("evaluation")
    if evaluation is None:
        return None
    config = eval_config_writer.load_eval_run(evaluation.uri)[0] or tfma.EvalConfig()
    has_baseline = any(spec.is_baseline for spec in config.model_specs)
    candidate = next((spec.name for spec in config.model_specs if not spec.is_baseline), "")
    result = tfma.load_eval_result(evaluation.uri, model_name=candidate or None)
    overall = result.get_metrics_for_slice() or {}
    per_class = {name: np.full(contract.NUM_CLASSES, np.nan) for name in ("precision", "recall", "f1")}
    for digit in range(contract.NUM_CLASSES):
        values = result.get_metrics_for_slice(class_id=digit, top_k=1) or {}
        for name, metric in zip(per_class, PER_CLASS_METRICS):
            value = values.get(per_class_metric_name(metric, digit), {}).get("doubleValue")
            if value is not None:
                per_class[name][digit] = float(value)
    plot = next(plots for key, plots in result.plots if key == ())
    failures = [
        describe_failure(failure.metric_key.name, failure.metric_key.is_diff, failure.metric_value.double_value.value,
                         failure.metric_threshold, _digit(per_slice.slice_key))
        for per_slice in tfma.load_validation_result(evaluation.uri).metric_validations_per_slice
        for failure in per_slice.failures
    ]
    blessing = run.artifacts.get("blessing")
    # Typed getters: they also read the custom properties Vertex AI hands a step as JSON metadata.
    pushed = run.artifacts.get("pushed_model")
    pushed_ok = pushed is not None and pushed.get_int_custom_property("pushed") == 1
    duplicate = pushed.get_string_custom_property(ALREADY_SERVED_AS) if pushed is not None else ""
    return Evaluation(
        accuracy=overall.get(contract.ACCURACY_METRIC, {}).get("doubleValue", 0.0),
        examples=overall.get("example_count", {}).get("doubleValue", 0.0),
        matrix=confusion_matrix_from_plot(plot[""][""]),
        per_class=per_class,
        blessed=blessing is not None and _exists(uri.join(blessing.uri, "BLESSED")),
        has_baseline=has_baseline,
        failures=failures,
        pushed_version=pushed.get_string_custom_property("pushed_version") if pushed_ok else None,
        pushed_destination=pushed.get_string_custom_property("pushed_destination") if pushed_ok else None,
        already_served_as=duplicate or None,
        coverage=_double(overall, contract.COVERAGE_METRIC),
        selective_error=_double(overall, contract.SELECTIVE_ERROR_METRIC),
        gates=gates_from_eval_config(config),
        pusher_finished=pushed is not None,
    )


def _double(metrics: dict, name: str) -> float | None:
    value = metrics.get(name, {}).get("doubleValue")
    return None if value is None else float(value)


def _exists(location: str) -> bool:
    """Artifacts may live under a remote pipeline root: through tf.io.gfile, as TFX wrote them."""
    from tfx.dsl.io import fileio

    return fileio.exists(location)


def _digit(slice_key) -> int | None:
    """The digit of a per-label slice key (`label = k`), None for the overall slice."""
    for key in slice_key.single_slice_keys:
        if key.column == contract.LABEL_KEY:
            return int(key.int64_value)
    return None


def describe_failure(metric: str, is_diff: bool, value: float, threshold, digit: int | None = None) -> str:
    """A failed blessing gate in words: which digit or metric, its value, and the bar it missed.
    Accuracy on a digit's slice is that digit's recall."""
    import tensorflow_model_analysis as tfma

    if metric == contract.ACCURACY_METRIC:
        what = "accuracy" if digit is None else f"digit {digit}: recall"
    else:
        what = _METRIC_WORDS.get(metric, metric) + ("" if digit is None else f" of digit {digit}")
    if is_diff:
        change = threshold.change_threshold
        allowed = abs(change.absolute.value)
        moved = "rise" if change.direction == tfma.MetricDirection.LOWER_IS_BETTER else "drop"
        return (f"{what} {value:+.4f} against the latest blessed model, a {moved} larger than the "
                f"{allowed:.4g} allowed")
    bounds = threshold.value_threshold
    if bounds.HasField("upper_bound") and value > bounds.upper_bound.value:
        return f"{what} {value:.4f}, above the bar of {bounds.upper_bound.value:.4g}"
    return f"{what} {value:.4f}, below the bar of {bounds.lower_bound.value:.4g}"


_METRIC_WORDS = {contract.COVERAGE_METRIC: "answered without a person",
                 contract.SELECTIVE_ERROR_METRIC: "error among the answers given without a person"}


_GATE_LABELS = {
    "min_accuracy": "held-out accuracy at least",
    "max_accuracy_drop": "accuracy drop against the latest blessed model at most",
    "min_class_recall": "every digit's recall at least",
    "max_class_recall_drop": "any digit's recall drop against the latest blessed model at most",
    "min_coverage": "share answered without a person at least",
    "max_coverage_drop": "drop of that share against the latest blessed model at most",
    "max_selective_error": "error among the answers given without a person at most",
    "max_selective_error_rise": "rise of that error against the latest blessed model at most",
}


def _setting_value(name: str, value) -> str:
    if value is None:
        return "one pass over the train split" if name == "steps_per_epoch" else "default"
    if value == "":
        return "none"
    if name == "base_weights_sha256":
        return f"{value[:12]}..."
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting_value(name, item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# The gates that compare with the latest blessed model. Without one, TFMA drops them from the EvalConfig it
# writes (read back as 0), so the report says they did not apply rather than "at most 0".
_CHANGE_GATES = ("max_accuracy_drop", "max_class_recall_drop", "max_coverage_drop", "max_selective_error_rise")
NOT_COMPARED = "not applied: no blessed model yet"


def settings_table(config: dict, gates: BlessingGates | None, compared: bool = True) -> str:
    """The training settings (`history.json`'s `config`) and the gates: a small table per group.

    A setting no group names (a history written by other code) is shown under "other", not dropped.
    `compared`: whether the Evaluator had a blessed model to compare with.
    """
    from components.config import NOT_SHOWN_AS_SETTINGS, SETTING_GROUPS

    groups = {group: [(name.replace("_", " "), _setting_value(name, config[name])) for name in names
                      if name in config]
              for group, names in SETTING_GROUPS.items()}
    grouped = {name for names in SETTING_GROUPS.values() for name in names} | set(NOT_SHOWN_AS_SETTINGS)
    other = [(name.replace("_", " "), _setting_value(name, value)) for name, value in sorted(config.items())
             if name not in grouped and name != CODE_FINGERPRINT_KEY]
    if other:
        groups["other"] = other
    if gates is not None:
        groups["gates"] = [(label, _setting_value(field, getattr(gates, field))
                            if compared or field not in _CHANGE_GATES else NOT_COMPARED)
                           for field, label in _GATE_LABELS.items()]
    return "<div class='row settings'>" + "".join(
        f"<table><caption>{html.escape(group)}</caption>"
        + "".join(f"<tr><td>{html.escape(label, quote=False)}</td>"
                  f"<td class=n>{html.escape(value, quote=False)}</td></tr>" for label, value in rows)
        + "</table>"
        for group, rows in groups.items() if rows) + "</div>"


def latest_results(pipeline_root: Path, pipeline_name: str = "digits") -> tuple[list[ComponentRun], Evaluation | None]:
    """The latest run's components (state, wall time) and what its Evaluator and Pusher decided."""
    run = from_mlmd(pipeline_root, pipeline_name)
    return run.components, _evaluation(run)


@dataclass(frozen=True)
class Report:
    path: Path
    summary: str  # one line for the console


def _read_abstention(model_uri: str) -> dict | None:
    from components import abstention

    try:
        return abstention.read(uri.join(model_uri, "Format-Serving"))
    except (OSError, ValueError):
        return None


def _risk_coverage_image(curve: list, operating: tuple[float, float] | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    coverage, risk = zip(*curve)
    figure, axis = plt.subplots(figsize=(5.2, 3.4), dpi=110)
    axis.plot(coverage, [100 * r for r in risk], color="#1f6feb", label="error among answers kept")
    if operating is not None:
        axis.plot([operating[0]], [100 * operating[1]], "o", color="#b42318", label="exported operating point")
    axis.set_xlabel("coverage (share of eval digits answered)")
    axis.set_ylabel("error among them (%)")
    axis.set_title("Risk-coverage, eval split")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return _png(figure)


def _abstention(model) -> str:
    point = _read_abstention(model.uri)
    return "" if point is None else _abstention_section(point)


def _abstention_section(point: dict) -> str:
    measured = point.get("measured", {}).get("eval", {})
    shares = measured.get("decision_share", {})
    error = measured.get("error_among_accepted")
    operating = (shares["accepted"], error) if "accepted" in shares and error is not None else None
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td class=n>{share:.1%}</td></tr>" for name, share in shares.items())
    text = (
        "<h2>When the model does not answer</h2>"
        f"<p>{html.escape(point['method'])}; inside the SavedModel, in every signature "
        "(<code>ood_score</code>, <code>confidence</code>, <code>decision</code>, <code>accepted</code>).</p>"
        f"<p>not a digit: energy score above <b>{point['ood_threshold']:.2f}</b> (keeps {point['ood_keep']:.1%} of eval "
        f"digits) or no ink &middot; unsure: calibrated confidence below <b>{point['confidence_threshold']:.3f}</b> "
        f"(keeps {point['confident_keep']:.1%} of the rest) &middot; temperature {point['temperature']:.2f}</p>"
    )
    if measured:
        text += (f"<div class=row><table><tr><th>on the {measured['examples']} eval digits</th><th>share</th></tr>"
                 f"{rows}<tr><td>error among accepted</td><td class=n>"
                 f"{'n/a' if error is None else f'{error:.2%}'}</td></tr>"
                 f"<tr><td>error, all answered</td><td class=n>{measured['error_all']:.2%}</td></tr></table>"
                 f"<img alt='risk-coverage curve' src='data:image/png;base64,"
                 f"{_risk_coverage_image(measured['risk_coverage'], operating)}'></div>")
    return text


def _corrections(data: str | None) -> str:
    """What the build's manifest says of people's corrections (--extra-source): how many it trained on,
    and how many it left out because no reviewer accepted them; '' for a build without any."""
    if not data:
        return ""
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(uri.join(data, "manifest.json")) as handle:
            extras = json.load(handle).get("extra_sources", [])
    except (tf.errors.OpError, ValueError, AttributeError):  # no manifest, or not the builder's
        return ""
    lines = []
    for extra in extras:
        review = extra.get("corrections") or {}
        line = f"{extra.get('training_files', 0):,} digits added to the train split from {extra.get('path')}"
        if review:
            line += (f": corrections a reviewer accepted; {review.get('pending', 0):,} waiting for review and "
                     f"{review.get('rejected', 0):,} rejected were not used")
        lines.append(f"<li>{html.escape(line)}</li>")
    if not lines:
        return ""
    return ("<h3>People's corrections</h3><ul>" + "".join(lines) + "</ul><p>Only reviewed corrections are "
            "trained on; the gates below (each digit's recall, and no regression against the served model) "
            "refuse a model that accepted wrong labels degraded against the latest blessed one.</p>")


def _components_section(components: list[ComponentRun] | None) -> str:
    if components is None:
        return ("<h2>Components</h2><p>Each component's state and wall time are not in this page, written by the "
                "run's last step while the run was still going: the orchestrator shows them (the Vertex AI "
                "console's run graph; locally, <code>digits pipeline report</code>).</p>")
    rows = "".join(
        f"<tr><td>{html.escape(c.node_id)}</td><td>{c.state.lower()}</td><td class=n>{c.seconds:.1f} s</td></tr>"
        for c in components
    )
    total = sum(c.seconds for c in components)
    return (f"<h2>Components</h2><table><tr><th>component</th><th>state</th><th>wall time</th></tr>{rows}"
            f"<tr><th>total</th><th></th><th class=n>{total:.1f} s</th></tr></table>")


def _data_section(statistics) -> str:
    import tensorflow_data_validation as tfdv

    rows = []
    for split in contract.SPLITS:
        path = uri.join(statistics.uri, f"Split-{split}", "FeatureStats.pb")
        if not _exists(path):
            continue
        dataset = tfdv.load_stats_binary(path).datasets[0]
        label = next((f.num_stats for f in dataset.features if f.path.step == [contract.LABEL_KEY]), None)
        image = next((f.string_stats for f in dataset.features if f.path.step == [contract.IMAGE_KEY]), None)
        rows.append(
            f"<tr><td>{split}</td><td class=n>{dataset.num_examples:,}</td>"
            f"<td class=n>{label.min:.0f} - {label.max:.0f}</td>"
            f"<td class=n>{image.avg_length:.0f} B</td></tr>" if label and image else
            f"<tr><td>{split}</td><td class=n>{dataset.num_examples:,}</td><td></td><td></td></tr>"
        )
    return ("<h2>Data</h2><table><tr><th>split</th><th>examples</th><th>label range</th>"
            f"<th>mean PNG size</th></tr>{''.join(rows)}</table>")


def _anomalies_section(anomalies) -> str:
    from pipeline.anomalies_gate import describe_anomalies

    found = describe_anomalies(anomalies.uri, [s for s in contract.SPLITS
                                               if _exists(uri.join(anomalies.uri, f"Split-{s}"))])
    return "<h3>Anomalies</h3>" + (
        "<ul>" + "".join(f"<li class=bad>{html.escape(line)}</li>" for line in found) + "</ul>" if found
        else "<p class=good>none: every split matches the curated schema</p>")


def _training_section(model_run, gates: BlessingGates | None, compared: bool) -> str:
    history = read_history(model_run.uri)
    if history is None:
        return ""
    warning = history.get("base_weights_warning")
    return (
        "<h2>Training</h2>"
        f"<p>base weights: <b>{html.escape(history['base_weights'])}</b></p>"
        + (f"<p class=bad>{html.escape(warning)}</p>" if warning else "")
        + f"<p>{history['epochs_run']} epochs x {history['steps_per_epoch']} steps</p>"
        + "<h3>Settings</h3>" + settings_table(history["config"], gates, compared)
        + f"<img alt='training curves' src='data:image/png;base64,{_training_curves(history)}'>"
    )


def _evaluation_sections(facts: Evaluation) -> str:
    metrics = facts.per_class
    rows = "".join(
        f"<tr><td>{digit}</td><td class=n>{_metric(metrics['precision'][digit])}</td>"
        f"<td class=n>{_metric(metrics['recall'][digit])}</td><td class=n>{_metric(metrics['f1'][digit])}</td>"
        f"<td class=n>{facts.support[digit]:.0f}</td></tr>" for digit in range(contract.NUM_CLASSES)
    )
    macro = facts.macro
    evaluation = (
        "<h2>Evaluation (held-out test split)</h2>"
        f"<p>examples: <b>{facts.examples:,.0f}</b> &middot; accuracy: <b>{facts.accuracy:.4f}</b> &middot; "
        f"macro precision {macro['precision']:.4f}, recall {macro['recall']:.4f}, "
        f"<b>F1 {macro['f1']:.4f}</b> (TFMA's per-class values; n/a: undefined, counted as 0 in the "
        f"macro average)</p>"
        + (f"<p>at the operating point exported with the model: <b>{html.escape(facts.selective)}</b></p>"
           if facts.selective else "")
        + "<div class=row><table><tr><th>digit</th><th>precision</th><th>recall</th><th>F1</th><th>examples</th>"
        f"</tr>{rows}</table>"
        f"<img alt='confusion matrix' src='data:image/png;base64,{_confusion_image(facts.matrix)}'></div>"
    )
    blessing = (
        "<h2>Blessing</h2>"
        + ("<p class=good><b>BLESSED</b>: accuracy, every digit's recall, the share answered without a "
           "person and the error among those answers passed their bars"
           + (" and did not drop against the latest blessed model by more than allowed" if facts.has_baseline
              else " (no blessed model yet to compare with)") + "</p>"
           if facts.blessed else
           "<p class=bad><b>NOT BLESSED</b></p><ul>"
           + "".join(f"<li>{html.escape(reason)}</li>" for reason in facts.failures) + "</ul>")
    )
    if facts.pushed_destination:
        push = (f"<h2>Push</h2><p class=good>pushed version <b>{html.escape(facts.pushed_version or '')}</b> to "
                f"<code>{html.escape(facts.pushed_destination)}</code></p>")
    elif facts.already_served_as:
        push = f"<h2>Push</h2><p>{html.escape(facts.push_outcome)} (nothing changed since it was pushed)</p>"
    else:
        outcome = facts.push_outcome if facts.blessed else "not pushed (the model was not blessed)"
        push = f"<h2>Push</h2><p class=bad>{html.escape(outcome)}</p>"
    return evaluation + blessing + push


def _guarded(title: str, build: Callable[[], str]) -> str:
    """A section, or one line saying why it is missing: an artifact that cannot be read costs its own
    section, never the page (nor, inside the pipeline, the run)."""
    try:
        return build()
    except Exception as error:  # any reader's error: TFMA, TFDV, gfile, a damaged file
        log.warning("run report: the %s section could not be built: %s", title, _one_line(error))
        log.info("run report: the %s section", title, exc_info=True)  # the traceback, for the log file
        return f"<h2>{html.escape(title)}</h2><p class=bad>could not be read: {html.escape(_one_line(error))}</p>"


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]


@dataclass(frozen=True)
class Page:
    html: str
    summary: str  # one line for the console


def render(run: RunArtifacts, pipeline_name: str = "digits") -> Page:
    """The page about one run: the one function every report comes from."""
    artifacts = run.artifacts
    sections = [_components_section(run.components)]
    try:
        facts = _evaluation(run)
        evaluation_error = None
    except Exception as error:  # the page, and the run, go on without the verdict
        log.warning("run report: the evaluation could not be read: %s", _one_line(error))
        log.info("run report: the evaluation", exc_info=True)  # the traceback, for the log file
        facts, evaluation_error = None, _one_line(error)

    if "statistics" in artifacts:
        sections.append(_guarded("Data", lambda: _data_section(artifacts["statistics"])))
    corrections = _guarded("People's corrections", lambda: _corrections(run.data_root))
    if corrections:
        sections.append(corrections)
    if "anomalies" in artifacts:
        sections.append(_guarded("Anomalies", lambda: _anomalies_section(artifacts["anomalies"])))
    if "model_run" in artifacts:
        gates = facts.gates if facts is not None else None
        compared = facts is not None and facts.has_baseline
        sections.append(_guarded("Training", lambda: _training_section(artifacts["model_run"], gates, compared)))
    # When the model does not answer: the operating point exported with it (components/abstention.py).
    if "model" in artifacts:
        sections.append(_guarded("When the model does not answer", lambda: _abstention(artifacts["model"])))
    if facts is not None:
        sections.append(_guarded("Evaluation", lambda: _evaluation_sections(facts)))
    elif evaluation_error is not None:
        sections.append(f"<h2>Evaluation</h2><p class=bad>could not be read: {html.escape(evaluation_error)}</p>")

    page = _PAGE.format(title=f"Pipeline run: {html.escape(pipeline_name)}", label=html.escape(run.location_label),
                        location=html.escape(run.location),
                        body="\n".join(section for section in sections if section))
    if facts is not None:
        summary = facts.summary()
    elif evaluation_error is not None:
        summary = f"the evaluation could not be read: {evaluation_error}"
    else:
        summary = "no evaluation in the latest run"
    return Page(html=page, summary=summary)


def write_report(pipeline_root: Path, pipeline_name: str = "digits", output: Path | None = None) -> Report:
    """PIPELINE_ROOT/report/index.html about the latest run in the local MLMD store, with its components'
    states and times."""
    page = render(from_mlmd(pipeline_root, pipeline_name), pipeline_name)
    output = Path(output) if output else Path(pipeline_root).resolve() / "report" / PAGE_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".html.tmp")
    temporary.write_text(page.html)
    os.replace(temporary, output)
    return Report(path=output, summary=page.summary)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }}
p, li {{ overflow-wrap: anywhere; }}
img {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; margin: 0.5em 1.5em 1em 0; display: block; max-width: 100%; overflow-x: auto; }}
td, th {{ border: 1px solid #ccc; padding: 3px 9px; text-align: left; }}
td.n, th.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.good {{ color: #1a7f37; }} .bad {{ color: #b42318; }}
.row {{ display: flex; align-items: flex-start; flex-wrap: wrap; }}
code {{ font-size: 0.85em; }}
.settings table {{ display: table; }}
.settings caption {{ text-align: left; font-weight: 600; text-transform: capitalize; padding: 0 0 3px; }}
</style></head>
<body><h1>{title}</h1><p>{label}: <code>{location}</code></p>
{body}
</body></html>
"""
