"""`digits pipeline submit`: the request Vertex AI would get, built offline from a compiled pipeline and
checked field by field (run-as account, network, labels, caching as compiled unless overridden, a
schedule's cron with its time zone); sent through a stand-in for Vertex AI's API client; and every
mistake one line before anything is sent. Nothing here reaches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO
from test_vertex_compile import ROOT, compile_args

SA = "digits-pipelines@my-project.iam.gserviceaccount.com"
NETWORK = "projects/123456789/global/networks/ml-vpc"


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, object]:
    """Two compiled pipelines: the default (cached steps) and `compile --no-cache`."""
    from digits.cli import cli

    work = tmp_path_factory.mktemp("submit")
    found = {}
    for name, extra in (("cached", ()), ("no-cache", ("--no-cache",))):
        output = work / f"{name}.json"
        result = CliRunner().invoke(cli, compile_args(output, *extra))
        assert result.exit_code == 0, result.output
        found[name] = output
    return found


def submit_args(template, *extra: str) -> list[str]:
    return ["pipeline", "submit", str(template), "--project", "my-project", "--region", "europe-west4",
            "--service-account", SA, *extra]


def dry_run(template, *extra: str) -> dict:
    from digits.cli import cli

    result = CliRunner().invoke(cli, submit_args(template, "--dry-run", *extra))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def caching(job: dict) -> set[bool]:
    return {task.get("cachingOptions", {}).get("enableCache", False)
            for task in job["pipelineSpec"]["root"]["dag"]["tasks"].values()}


def test_a_run_carries_its_account_network_labels_and_root(templates):
    request = dry_run(templates["cached"], "--network", NETWORK, "--label", "team=ml", "--label", "env=prod")
    assert request["parent"] == "projects/my-project/locations/europe-west4"
    job = request["pipelineJob"]
    assert (job["serviceAccount"], job["network"]) == (SA, NETWORK)
    assert {"team": "ml", "env": "prod"}.items() <= job["labels"].items()
    assert job["runtimeConfig"]["gcsOutputDirectory"] == ROOT
    assert request["pipelineJobId"].startswith("digits")


def test_caching_is_what_the_compile_decided_unless_the_submit_says_otherwise(templates):
    assert caching(dry_run(templates["cached"])["pipelineJob"]) == {True}
    assert caching(dry_run(templates["no-cache"])["pipelineJob"]) == {False}  # aiplatform's enable_caching=True won't
    assert caching(dry_run(templates["no-cache"], "--cache")["pipelineJob"]) == {True}
    assert caching(dry_run(templates["cached"], "--no-cache")["pipelineJob"]) == {False}


def test_a_schedule_states_its_time_zone_and_runs_one_at_a_time(templates):
    request = dry_run(templates["cached"], "--schedule", "0 3 * * *", "--timezone", "Europe/Paris")
    schedule = request["schedule"]
    assert schedule["cron"] == "TZ=Europe/Paris 0 3 * * *"
    assert schedule["maxConcurrentRunCount"] == "1" and not schedule.get("allowQueueing", False)
    inner = schedule["createPipelineJobRequest"]
    assert inner["parent"] == request["parent"] and inner["pipelineJob"]["serviceAccount"] == SA
    assert dry_run(templates["cached"], "--schedule", "30 2 * * 1")["schedule"]["cron"] == "TZ=UTC 30 2 * * 1"


class FakeService:
    """Stands in for Vertex AI's PipelineServiceClient / ScheduleServiceClient: records each call."""

    def __init__(self):
        self.calls = []

    def create_pipeline_job(self, **request):
        self.calls.append(("create_pipeline_job", request))
        return type("Created", (), {"name": f"{request['parent']}/pipelineJobs/{request['pipeline_job_id']}"})()

    def create_schedule(self, **request):
        self.calls.append(("create_schedule", request))
        return type("Created", (), {"name": f"{request['parent']}/schedules/42"})()


def test_submit_sends_the_request_the_dry_run_prints(templates):
    from pipeline.vertex import Submission, submit

    pipelines, schedules = FakeService(), FakeService()
    once = Submission(template=templates["cached"], project="my-project", region="europe-west4", service_account=SA)
    name = submit(once, pipelines=pipelines, schedules=schedules)
    [(method, request)] = pipelines.calls
    assert method == "create_pipeline_job"
    assert name.startswith("projects/my-project/locations/europe-west4/pipelineJobs/")
    assert request["pipeline_job"].service_account == SA and schedules.calls == []
    nightly = Submission(template=templates["cached"], project="my-project", region="europe-west4",
                         service_account=SA, schedule="0 3 * * *")
    assert submit(nightly, pipelines=pipelines, schedules=schedules).endswith("/schedules/42")
    [(method, request)] = schedules.calls
    assert request["schedule"].cron == "TZ=UTC 0 3 * * *"


@pytest.mark.parametrize("extra, words", [
    (["--service-account", "123456789-compute@developer.gserviceaccount.com"], "Compute Engine default"),
    (["--service-account", "pipelines"], "NAME@PROJECT.iam.gserviceaccount.com"),
    (["--project", "My_Project"], "--project must be"),
    (["--region", "europe"], "--region must be"),
    (["--network", "ml-vpc"], "projects/PROJECT_NUMBER/global/networks/NAME"),
    (["--label", "Team=ML"], "label Team=ML breaks"),
    (["--label", "team"], "expected KEY=VALUE"),
    (["--schedule", "every night"], "five fields"),
    (["--schedule", "0 3 * * *", "--timezone", "Paris"], "IANA time zone"),
    (["--timezone", "Europe/Paris"], "are for a --schedule"),
    (["--schedule", "0 3 * * *", "--max-concurrent-runs", "0"], "at least 1"),
])
def test_mistakes_are_one_line_before_anything_is_sent(templates, extra, words):
    from digits.cli import cli

    result = CliRunner().invoke(cli, submit_args(templates["cached"], *extra, "--dry-run"))
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    error = result.output.strip().splitlines()[-1]  # the `digits` entry point prints this line alone
    assert error.startswith("Error: ") and words in error, result.output


@pytest.mark.parametrize("content, words", [
    (None, "cannot read"), ("not json", "is not JSON"), ('{"a": 1}', "is not a Vertex AI PipelineJob"),
    ('{"pipelineSpec": {}, "runtimeConfig": {"gcsOutputDirectory": "s3://b/root"}}', "not Cloud Storage"),
])
def test_a_file_that_is_not_a_compiled_pipeline_is_refused(tmp_path, content, words):
    from pipeline.vertex import Submission, SubmitError, request_json

    template = tmp_path / "pipeline.json"
    if content is not None:
        template.write_text(content)
    with pytest.raises(SubmitError, match=words):
        request_json(Submission(template=template, project="my-project", region="europe-west4", service_account=SA))


def test_without_credentials_the_command_says_so_in_one_line(templates, tmp_path):
    """The real command, without Google Cloud credentials (and with the metadata server pointed at a
    closed loopback port, so nothing leaves the machine): one line, exit 1."""
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path), "GOOGLE_APPLICATION_CREDENTIALS": "",
           "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "NO_GCE_CHECK": "True"}
    result = subprocess.run([sys.executable, "-m", "digits", *submit_args(templates["cached"])], capture_output=True,
                            text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: cannot submit: DefaultCredentialsError")


def test_the_readme_and_the_docs_list_the_roles_the_code_names():
    from pipeline import vertex

    for page in (REPO / "README.md", REPO / "docs" / "scale-out.md"):
        text = page.read_text()
        for role in {*vertex.RUN_AS_ROLES, *vertex.DATAFLOW_ROLES, *vertex.SUBMITTER_ROLES}:
            assert f"`{role}`" in text, (page.name, role)
