"""The run report as the pipeline's last step, so every orchestrator (the local runner, Vertex AI)
leaves the page among the run's artifacts.

RunReport reads the artifacts the page is about as its inputs and writes `index.html` into its own
output artifact (pipeline/report.py renders it; no MLMD needed). A section it cannot read becomes a
line on the page, never a failed run.
"""

# No `from __future__ import annotations`: TFX reads the component's type hints at runtime.
from tfx import v1 as tfx

standard = tfx.types.standard_artifacts


class HtmlReport(tfx.dsl.Artifact):
    """A directory holding one self-contained HTML page, `index.html`.

    TFX's Vertex AI entry point imports a custom artifact type by its name, which must be
    `<package>.<Class>` (one dot): `pipeline` resolves it lazily (pipeline/__init__.py)."""

    TYPE_NAME = "pipeline.HtmlReport"


@tfx.dsl.components.component
def RunReport(
    statistics: tfx.dsl.components.InputArtifact[standard.ExampleStatistics],
    anomalies: tfx.dsl.components.InputArtifact[standard.ExampleAnomalies],
    model_run: tfx.dsl.components.InputArtifact[standard.ModelRun],
    model: tfx.dsl.components.InputArtifact[standard.Model],
    evaluation: tfx.dsl.components.InputArtifact[standard.ModelEvaluation],
    blessing: tfx.dsl.components.InputArtifact[standard.ModelBlessing],
    pushed_model: tfx.dsl.components.InputArtifact[standard.PushedModel],
    report: tfx.dsl.components.OutputArtifact[HtmlReport],
    pipeline_name: tfx.dsl.components.Parameter[str],
    data_root: tfx.dsl.components.Parameter[str],
):
    """Writes REPORT/index.html about this run from its artifacts (a not-blessed model is a verdict
    on the page: the Pusher then records pushed=0)."""
    import logging

    from tfx.dsl.io import fileio

    from pipeline import report as run_report
    from pipeline import uri

    run = run_report.RunArtifacts(
        artifacts={"statistics": statistics, "anomalies": anomalies, "model_run": model_run, "model": model,
                   "evaluation": evaluation, "blessing": blessing, "pushed_model": pushed_model},
        location=report.uri, location_label="RunReport artifact", data_root=data_root or None)
    page = run_report.render(run, pipeline_name)
    fileio.makedirs(report.uri)
    with fileio.open(uri.join(report.uri, run_report.PAGE_FILE), "w") as sink:
        sink.write(page.html)
    logging.getLogger(__name__).info("run report: %s (%s)", uri.join(report.uri, run_report.PAGE_FILE),
                                     page.summary)
