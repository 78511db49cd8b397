"""`digits pipeline submit`: a compiled pipeline (pipeline/kubeflow.py) sent to Vertex AI Pipelines,
once or on a schedule.

The request is built here, offline, from the file: Vertex AI's own types (google-cloud-aiplatform's
PipelineJob reads the template), with the run-as service account, the network, labels and the
caching decision set explicitly. It is sent with the Vertex AI API client only at the end, so
`--dry-run` prints exactly what would be sent, and the tests check it without a network.

Not `aiplatform.PipelineJob.submit()`: it also creates the pipeline root's bucket if it is missing
(with the submitter's credentials), and with `enable_caching=True` as often written it overrides
the caching the compile decided (`--no-cache`). Here caching follows the file unless
`--cache` / `--no-cache` says otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
REGION = re.compile(r"[a-z]+-[a-z]+[0-9]+")
SERVICE_ACCOUNT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]@[a-z][-a-z0-9]{4,28}[a-z0-9]\.iam\.gserviceaccount\.com")
COMPUTE_DEFAULT = re.compile(r"[0-9]+-compute@developer\.gserviceaccount\.com")
NETWORK = re.compile(r"projects/[0-9]+/global/networks/[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
LABEL_KEY = re.compile(r"[a-z][-_a-z0-9]{0,62}")
LABEL_VALUE = re.compile(r"[-_a-z0-9]{0,63}")
CRON_FIELD = re.compile(r"[0-9*/,\-A-Za-z?]+")
# What the run-as service account needs, and the person (or CI) who submits: docs/scale-out.md.
RUN_AS_ROLES = ("roles/aiplatform.user", "roles/storage.objectAdmin", "roles/artifactregistry.reader",
                "roles/logging.logWriter")
DATAFLOW_ROLES = ("roles/dataflow.developer", "roles/dataflow.worker")
SUBMITTER_ROLES = ("roles/aiplatform.user", "roles/iam.serviceAccountUser")


class SubmitError(ValueError):
    """A submission that Vertex AI would refuse, or that would not run as intended; one line."""


@dataclass(frozen=True)
class Submission:
    template: Path
    project: str
    region: str
    service_account: str
    network: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    enable_caching: bool | None = None  # None: as the compiled file says
    display_name: str = "digits"
    schedule: str | None = None  # cron, five fields
    timezone: str = "UTC"
    max_concurrent_runs: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not PROJECT.fullmatch(self.project):
            problems.append(f"--project must be a Google Cloud project ID, got {self.project!r}")
        if not REGION.fullmatch(self.region):
            problems.append(f"--region must be a Google Cloud region such as europe-west4, got {self.region!r}")
        if COMPUTE_DEFAULT.fullmatch(self.service_account):
            problems.append("--service-account is the Compute Engine default account (Editor on the whole project): "
                            "create one for the pipeline with the roles docs/scale-out.md lists")
        elif not SERVICE_ACCOUNT.fullmatch(self.service_account):
            problems.append(f"--service-account must be NAME@PROJECT.iam.gserviceaccount.com, got "
                            f"{self.service_account!r}")
        if self.network is not None and not NETWORK.fullmatch(self.network):
            problems.append(f"--network must be projects/PROJECT_NUMBER/global/networks/NAME, got {self.network!r}")
        for key, value in self.labels.items():
            if not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
                problems.append(f"label {key}={value} breaks Google Cloud's rules (lowercase letters, digits, - "
                                "and _, a key starting with a letter, at most 63 characters each)")
        if self.schedule is not None:
            fields = self.schedule.split()
            if len(fields) != 5 or not all(CRON_FIELD.fullmatch(part) for part in fields):
                problems.append(f"--schedule must be a cron expression of five fields (minute hour day month "
                                f"weekday), got {self.schedule!r}")
        if self.timezone != "UTC":
            _check_timezone(self.timezone, problems)
        if self.max_concurrent_runs < 1:
            problems.append("--max-concurrent-runs must be at least 1")
        if problems:
            raise SubmitError(problems[0])

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def cron(self) -> str | None:
        """Vertex AI's cron, its time zone stated (`TZ=...`): without a prefix it would be UTC, silently."""
        return None if self.schedule is None else f"TZ={self.timezone} {self.schedule}"


def _check_timezone(name: str, problems: list[str]) -> None:
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(f"--timezone must be an IANA time zone such as Europe/Paris, got {name!r}")


def read_template(path: Path) -> dict:
    """The compiled PipelineJob, checked to be one (`digits pipeline compile`'s output)."""
    try:
        job = json.loads(path.read_text())
    except OSError as error:
        raise SubmitError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError:
        raise SubmitError(f"{path} is not JSON: compile it with `digits pipeline compile`") from None
    root = job.get("runtimeConfig", {}).get("gcsOutputDirectory", "") if isinstance(job, dict) else ""
    if not isinstance(job, dict) or "pipelineSpec" not in job or not root:
        raise SubmitError(f"{path} is not a Vertex AI PipelineJob: compile it with `digits pipeline compile`")
    if not root.startswith("gs://"):
        raise SubmitError(f"{path} keeps its artifacts in {root}, not Cloud Storage: compile it again with gs:// "
                          "locations")
    return job


def compiled_caching(job: dict) -> bool:
    """Whether the compiled tasks reuse cached results (`digits pipeline compile --no-cache` turns it off)."""
    tasks = job["pipelineSpec"].get("root", {}).get("dag", {}).get("tasks", {})
    return any(task.get("cachingOptions", {}).get("enableCache", False) for task in tasks.values())


def pipeline_job(submission: Submission, credentials=None):
    """The PipelineJob resource as it would be created (offline; nothing is sent)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    job = read_template(submission.template)
    caching = compiled_caching(job) if submission.enable_caching is None else submission.enable_caching
    built = aiplatform.PipelineJob(
        display_name=submission.display_name, template_path=str(submission.template), project=submission.project,
        location=submission.region, credentials=credentials or AnonymousCredentials(), enable_caching=caching,
        labels=dict(submission.labels))
    resource = built._gca_resource
    resource.service_account = submission.service_account
    if submission.network:
        resource.network = submission.network
    return resource, built.job_id


def schedule(submission: Submission, resource):
    """The Schedule resource that starts `resource` at `submission.cron`, one run at a time by default."""
    from google.cloud.aiplatform.compat.types import pipeline_service, schedule as schedule_types

    return schedule_types.Schedule(
        display_name=f"{submission.display_name}-schedule", cron=submission.cron,
        max_concurrent_run_count=submission.max_concurrent_runs, allow_queueing=False,
        create_pipeline_job_request=pipeline_service.CreatePipelineJobRequest(parent=submission.parent,
                                                                               pipeline_job=resource))


def request_json(submission: Submission) -> dict:
    """What `submit` sends, as JSON: the PipelineJob, or the Schedule that holds it."""
    from google.protobuf import json_format

    resource, job_id = pipeline_job(submission)
    if submission.schedule is None:
        return {"parent": submission.parent, "pipelineJobId": job_id,
                "pipelineJob": json_format.MessageToDict(type(resource).pb(resource))}
    created = schedule(submission, resource)
    return {"parent": submission.parent, "schedule": json_format.MessageToDict(type(created).pb(created))}


def submit(submission: Submission, pipelines=None, schedules=None) -> str:
    """Creates the PipelineJob (or the Schedule) with Vertex AI's API clients (given: for tests) and
    returns the created resource's name."""
    from google.api_core.client_options import ClientOptions
    from google.cloud import aiplatform_v1

    resource, job_id = pipeline_job(submission, credentials=_credentials() if pipelines is None else None)
    endpoint = ClientOptions(api_endpoint=f"{submission.region}-aiplatform.googleapis.com")
    if submission.schedule is None:
        client = pipelines or aiplatform_v1.PipelineServiceClient(client_options=endpoint)
        created = client.create_pipeline_job(parent=submission.parent, pipeline_job=resource, pipeline_job_id=job_id)
    else:
        client = schedules or aiplatform_v1.ScheduleServiceClient(client_options=endpoint)
        created = client.create_schedule(parent=submission.parent, schedule=schedule(submission, resource))
    return created.name


def _credentials():
    import google.auth

    credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    return credentials
