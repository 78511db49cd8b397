"""Which Apache Beam runner the pipeline's data components run on: profiles as data, checked by Beam.

ImportExampleGen, StatisticsGen, Transform and the Evaluator are Beam pipelines. A profile is the
set of Beam arguments for one way of running them; `--beam-arg` adds or overrides arguments, and
the result is parsed by Beam's own option parser before anything runs, so an unknown option, a
Flink or Spark version Beam does not support, or a Dataflow job without a project fails in one
line instead of minutes into a run.

Dataflow, Flink and Spark workers run the pipeline image (docker/pipeline/Dockerfile). Naming
that image matters twice: the workers then have this project's code, and TFX stops building and
shipping an sdist of TFX itself, which it does whenever no dependency option is given. Workers
that are this interpreter (the local, local-mp and portable profiles) need no sdist either: the
runner skips it for them (pipeline/runner.py).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BeamProfile:
    name: str
    summary: str
    args: tuple[str, ...]
    executed_here: bool  # run end to end on these machines by the tests
    needs: tuple[str, ...] = ()  # options the user must add with --beam-arg
    # Where the pipeline image goes (--image fills these in): Dataflow reads --sdk_container_image; a
    # portable runner's DOCKER environment reads --environment_config, and TFX looks for
    # --sdk_container_image before deciding to ship an sdist of itself.
    image_args: tuple[str, ...] = ()


# Beam's FnApiRunner in this process. Plain DirectRunner in Beam 2.74 first tries to download the
# Prism runner binary, so the runner is named.
LOCAL = BeamProfile(
    "local", "in this process, one worker (the default: fastest on small data, see docs/scale-out.md)",
    ("--runner=FnApiRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"),
    executed_here=True)
LOCAL_MP = BeamProfile(
    "local-mp", "worker processes on this machine, one per core",
    ("--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=0"),
    executed_here=True)
# An embedded job server speaking Beam's portable Job API, the one Flink and Spark job servers
# speak, with the SDK harness looped back into this process.
PORTABLE = BeamProfile(
    "portable", "Beam's portable runner with an embedded job server (the Job API Flink and Spark speak)",
    ("--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"),
    executed_here=True)
DATAFLOW = BeamProfile(
    "dataflow", "Google Cloud Dataflow; workers run the pipeline image's root `dataflow` target",
    # sdk_location=container: the image has Beam, do not stage an SDK tarball. A machine type and a
    # worker cap, so that a first run has a known size and a bounded bill; --beam-arg changes them.
    ("--runner=DataflowRunner", "--sdk_location=container", "--machine_type=n2-standard-4",
     "--max_num_workers=10"),
    executed_here=False, needs=("--project", "--region", "--temp_location"),
    image_args=("--sdk_container_image={dataflow_image}",))
# Flink and Spark through the Beam job server the user runs next to the cluster (Beam's
# apache/beam_flink1.19_job_server or apache/beam_spark3_job_server image, or the Flink
# Kubernetes operator's): the pipeline only speaks the Job API to --job_endpoint. The SDK harness
# is the pipeline image, started by the cluster's Docker (DOCKER) or, as the Flink-on-Kubernetes
# guides do, already running as a worker-pool sidecar of each task manager (EXTERNAL, HOST:PORT).
FLINK = BeamProfile(
    "flink", "an Apache Flink cluster through its Beam job server; the SDK harness is the pipeline image",
    ("--runner=FlinkRunner", "--environment_type=DOCKER"),
    executed_here=False, needs=("--job_endpoint",),
    image_args=("--environment_config={image}", "--sdk_container_image={image}"))
SPARK = BeamProfile(
    "spark", "an Apache Spark cluster through its Beam job server; the SDK harness is the pipeline image",
    ("--runner=SparkRunner", "--environment_type=DOCKER"),
    executed_here=False, needs=("--job_endpoint",),
    image_args=("--environment_config={image}", "--sdk_container_image={image}"))
CLUSTER_HARNESSES = ("DOCKER", "EXTERNAL")
# Options that make Beam start a job server itself: from a jar downloaded at run time, with `java`.
# The master is the job server's own setting (its --flink-master / --spark-master-url flag).
JAR_OPTIONS = {"flink": ("flink_master", "flink_submit_uber_jar"),
               "spark": ("spark_master_url", "spark_submit_uber_jar", "spark_rest_url")}
# Beam's job-server images, tagged with the Beam version the pipeline runs (a job server must match it).
JOB_SERVER_IMAGES = {"flink": "apache/beam_flink1.19_job_server", "spark": "apache/beam_spark3_job_server"}


PROFILES: dict[str, BeamProfile] = {p.name: p for p in (LOCAL, LOCAL_MP, PORTABLE, DATAFLOW, FLINK, SPARK)}
DEFAULT_PROFILE = LOCAL.name
DEFAULT_ARGS = LOCAL.args


class BeamArgsError(ValueError):
    """Beam arguments that Beam would refuse or a runner could not start with; one line."""


def dataflow_image(image: str) -> str:
    """The root `dataflow` target of a pipeline image (pipeline/images.py)."""
    from pipeline import images

    try:
        return images.variant(image, images.DATAFLOW_SUFFIX, "--beam-arg=--sdk_container_image=IMAGE")
    except images.ImageError as error:
        raise BeamArgsError(str(error)) from None


def _name(arg: str) -> str:
    return arg.split("=", 1)[0]


def merge(base: tuple[str, ...], extra: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """base with extra appended; an option given in extra replaces base's option of the same name."""
    overridden = {_name(arg) for arg in extra if arg.startswith("--")}
    return tuple(arg for arg in base if _name(arg) not in overridden) + tuple(extra)


def profile_args(profile: str, extra: tuple[str, ...] | list[str] = (), image: str | None = None) -> tuple[str, ...]:
    """The Beam arguments of a profile plus the user's, checked (raises BeamArgsError)."""
    if profile not in PROFILES:
        raise BeamArgsError(f"unknown Beam profile {profile!r}; choose one of {', '.join(PROFILES)}")
    chosen = PROFILES[profile]
    base = chosen.args
    if image:
        given = {_name(arg) for arg in extra}
        for template in chosen.image_args:
            if _name(template) not in given:  # an explicit --beam-arg wins, and nothing is derived for it
                base += (template.format(image=image, dataflow_image=dataflow_image(image) if "{dataflow_image}"
                                         in template else ""),)
    args = merge(base, tuple(extra))
    validate(args, chosen)
    return args


# Runners whose workers are this Python process or processes it starts from this interpreter.
IN_PROCESS_RUNNERS = ("FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner")
PORTABLE_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner")


def workers_are_this_interpreter(args: tuple[str, ...] | list[str]) -> bool:
    """Whether every Beam worker runs in this process or one it starts from this interpreter (Beam's
    FnApiRunner, in memory or multi-process, and a portable job whose job server calls back into a
    LOOPBACK worker here): those workers import the TFX and project code installed here, so nothing
    need be shipped to them."""
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(args)).get_all_options()
    runner = str(options.get("runner") or "DirectRunner").rsplit(".", 1)[-1]
    if runner in IN_PROCESS_RUNNERS:
        return True
    return runner in PORTABLE_RUNNERS and options.get("environment_type") == "LOOPBACK"


def _parser():
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    class StrictParser(_BeamArgumentParser):
        def error(self, message):  # argparse would print usage and exit
            raise BeamArgsError(f"Beam refuses the arguments: {message}")

    parser = StrictParser(allow_abbrev=False)
    seen = {}
    # The options Beam itself knows, as PipelineOptions.get_all_options gathers them (one instance of
    # each subclass); TFX adds none of its own.
    for cls in PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return parser


def validate(args: tuple[str, ...] | list[str], profile: BeamProfile | None = None) -> None:
    """Parses args with Beam's option parser: no unknown option, no refused value, and what the
    profile's runner needs is there (Dataflow's own validator checks its options)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = _parser()
    _, unknown = parser.parse_known_args(list(args))
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        arg = unknown[0]
        close = difflib.get_close_matches(_name(arg), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BeamArgsError(f"Beam does not know the argument {arg!r}{hint}")
    if profile is None:
        return
    options = PipelineOptions(list(args)).get_all_options()
    # Beam's defaults do not count: Flink's `[auto]` and Spark's `local[4]` start a local cluster from
    # a job-server jar downloaded at run time, not the cluster the profile is for.
    defaults = vars(parser.parse_known_args([])[0])
    missing = [need for need in profile.needs
               if options.get(need.lstrip("-")) in (None, "", defaults.get(need.lstrip("-")))]
    if profile.name in JAR_OPTIONS:
        _check_cluster(profile, options, defaults)
    if missing:
        raise BeamArgsError(f"the {profile.name} profile needs {', '.join(missing)}: "
                            f"add {' '.join(f'--beam-arg={m}=...' for m in missing)}")
    no_image = [_name(template) for template in profile.image_args if not options.get(_name(template).lstrip("-"))]
    if no_image:
        raise BeamArgsError(f"the {profile.name} profile runs its workers in the pipeline image "
                            f"(docker/pipeline/Dockerfile): pass --image, or {' and '.join(no_image)}")
    if profile is DATAFLOW:
        # Beam's own PipelineOptionsValidator would do this, but it calls Google Cloud (it creates a
        # default bucket when temp_location is not gs://): the same rules, offline.
        for option in ("temp_location", "staging_location"):
            value = options.get(option)
            if value and not str(value).startswith("gs://"):
                raise BeamArgsError(f"Dataflow needs --{option} on Cloud Storage (gs://...), got {value!r}")
        if not re.fullmatch(r"[a-z][-a-z0-9:.]{4,61}[a-z0-9]", str(options["project"])):
            raise BeamArgsError(f"--project must be a Google Cloud project ID, got {options['project']!r}")


def _check_cluster(profile: BeamProfile, options: dict, defaults: dict) -> None:
    """Flink and Spark: only through a job server the user runs, with the pipeline image as harness."""
    name = profile.name
    from apache_beam.version import __version__ as beam_version

    fix = (f"run Beam's {name} job server next to the cluster ({JOB_SERVER_IMAGES[name]}:{beam_version}) and pass "
           f"--beam-arg=--job_endpoint=HOST:8099")
    for option in JAR_OPTIONS[name]:
        if options.get(option) not in (None, "", False, defaults.get(option)):
            raise BeamArgsError(f"--{option} makes Beam download a {name} job-server jar and start it with java "
                                f"at run time, which the pipeline image and Vertex AI cannot: {fix}")
    endpoint = options.get("job_endpoint")
    if not endpoint:
        raise BeamArgsError(f"the {name} profile needs the Job API endpoint of a {name} job server: {fix} "
                            f"(without one, Beam would download the job-server jar and run it with java)")
    if endpoint == "embed":
        raise BeamArgsError(f"--job_endpoint=embed is Beam's in-process job server, not {name}: "
                            "use --beam-profile portable")
    if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", endpoint):
        raise BeamArgsError(f"--job_endpoint must be HOST:PORT of the {name} job server, got {endpoint!r}")
    harness = str(options.get("environment_type") or "").upper()
    if harness not in CLUSTER_HARNESSES:
        raise BeamArgsError(f"--environment_type={options.get('environment_type')} does not run the pipeline image on "
                            f"the {name} workers: use DOCKER (the image, --image) or EXTERNAL (HOST:PORT of the "
                            "image's worker pool, `--worker_pool`, beside each worker)")
    config = str(options.get("environment_config") or "")
    if harness == "EXTERNAL" and not re.fullmatch(r"[A-Za-z0-9_.\-]+:\d{1,5}", config):
        raise BeamArgsError(f"--environment_type=EXTERNAL needs --environment_config=HOST:PORT of a worker pool "
                            f"(the pipeline image run with --worker_pool, usually localhost:50000), got {config!r}")
