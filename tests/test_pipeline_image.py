"""The pipeline image (docker/pipeline/), checked without a Docker engine: pins, boot binary, user, context, install."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli

from conftest import REPO
from test_docker import DOCKER, copies, instructions

IMAGE_DIR = DOCKER / "pipeline"
DOCKERFILE = IMAGE_DIR / "Dockerfile"
RUNTIME_LOCK = IMAGE_DIR / "requirements.lock"
GPU_LOCK = IMAGE_DIR / "requirements-gpu.lock"
SITE_PACKAGES = "/opt/venv/lib/python3.10/site-packages"
ROOT_LOCK = REPO / "requirements.lock"
PYPROJECT = tomli.loads((REPO / "pyproject.toml").read_text())

DEV_EXTRA = {re.split(r"[=<>\[ ]", requirement)[0].lower()
             for requirement in PYPROJECT["project"]["optional-dependencies"]["dev"]}
# What must never reach the build context: environments, outputs and generated data.
NOT_SENT = [".git", ".venv", ".venv-tools", "build", "pipeline_root", "serving_model", "data/tfrecords",
            "data/mnist-png", "data/feedback"]
# The functions and classes the compiled pipeline names by dotted path; the container imports them.
DOTTED_PATHS = ["components.transform.preprocessing_fn", "components.trainer.run_fn",
                "pipeline.anomalies_gate.AnomaliesGate", "pipeline.pusher.DeduplicatingPusherExecutor"]
# Installed with its package, but run only by the tool environment (.venv-tools, Python 3.11).
TOOL_SCRIPTS = {"monitoring/grafana/generate.py"}
BUILD_TOOLS = re.compile(r"^(gcc|g\+\+|cpp|clang.*|make|cmake|build-essential|.*-dev)(=.*)?$")


# --- Reading the stages --------------------------------------------------------------------------

def stages(dockerfile: Path) -> list[dict]:
    """Each stage: its name, what it is FROM (an image or an earlier stage) and its instructions."""
    result = []
    for name, arguments in instructions(dockerfile):
        if name == "FROM":
            words = arguments.split()
            result.append({"base": words[0], "name": words[2] if len(words) == 3 else str(len(result)),
                           "steps": []})
        elif result:
            result[-1]["steps"].append((name, arguments))
    return result


def lineage(dockerfile: Path, target: str | None = None) -> list[dict]:
    """The stages an image is made of, base image first; the default target is the last stage."""
    by_name = {stage["name"]: stage for stage in stages(dockerfile)}
    stage = by_name[target] if target else stages(dockerfile)[-1]
    chain = [stage]
    while chain[0]["base"] in by_name:
        chain.insert(0, by_name[chain[0]["base"]])
    return chain


def steps(chain: list[dict], kind: str) -> list[str]:
    """The arguments of every `kind` instruction in the chain, each stage's ARG defaults substituted."""
    found = []
    for stage in chain:
        variables = {}
        for name, arguments in stage["steps"]:
            if name == "ARG" and "=" in arguments:
                key, value = arguments.split("=", 1)
                variables[key] = value
            elif name == kind:
                found.append(re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), arguments))
    return found


def env(chain: list[dict]) -> dict[str, str]:
    return dict(word.split("=", 1) for arguments in steps(chain, "ENV") for word in shlex.split(arguments))


def copies_from(chain: list[dict]) -> list[tuple[str, str, str]]:
    """(stage or image, source, destination) of every COPY --from in the chain."""
    found = []
    for arguments in steps(chain, "COPY"):
        words = shlex.split(arguments)
        origin = next((word.split("=", 1)[1] for word in words if word.startswith("--from=")), None)
        if origin:
            source, destination = [word for word in words if not word.startswith("--")]
            found.append((origin, source, destination))
    return found


def python_version(image: str) -> str:
    """'3.10.13' from python:3.10.13-slim-bookworm."""
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-(slim-)?bookworm", image)
    assert match, f"not an official Python bookworm image with a full version: {image}"
    return match.group(1)


# --- Reading the locks ---------------------------------------------------------------------------

def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            found[name.lower()] = version.strip()
    return found


def required_by(lock: Path) -> dict[str, set[str]]:
    """Package -> the names in its `# via` annotation (uv writes one per line or inline)."""
    found, current = {}, None
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            current = line.split("==")[0].lower()
            found[current] = set()
        elif current and line.strip().startswith("# via"):
            if line.strip() != "# via":
                found[current].add(line.strip().removeprefix("# via").strip())
        elif current and line.startswith("    #   "):
            found[current].add(line.strip().removeprefix("#").strip())
    return found


def lock_command(lock: Path) -> list[str]:
    """The uv command recorded in the header, as words."""
    [command] = [line.removeprefix("#").strip() for line in lock.read_text().splitlines()[:3]
                 if line.startswith("#    uv ")]
    return shlex.split(command)


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def without(words: list[str], *names: str) -> list[str]:
    """The command without these options and their values."""
    for name in names:
        index = words.index(name)
        words = words[:index] + words[index + 2:]
    return words


# --- The build context ---------------------------------------------------------------------------

def dockerignore_in_effect(dockerfile: Path) -> Path | None:
    """BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile first, then the context's .dockerignore."""
    for candidate in (dockerfile.with_name(dockerfile.name + ".dockerignore"), REPO / ".dockerignore"):
        if candidate.is_file():
            return candidate
    return None


def _pattern(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    translated = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(translated.get(part, re.escape(part)) for part in parts))


def ignored(relative: str, dockerignore: Path | None) -> bool:
    """Docker's rules: the last matching line wins, `!` re-includes, a matched directory excludes its contents."""
    if dockerignore is None:
        return False
    rules = [line.strip() for line in dockerignore.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    parts = relative.split("/")
    verdict = False
    for rule in rules:
        exception = rule.startswith("!")
        pattern = _pattern(rule.removeprefix("!"))
        if any(pattern.fullmatch("/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            verdict = not exception
    return verdict


def context_sources(dockerfile: Path) -> list[tuple[str, list[Path], str]]:
    """(source as written, the repository paths it matches, destination) of every COPY from the context."""
    return [(source, sorted(REPO.glob(source.rstrip("/"))), destination)
            for sources, destination in copies(dockerfile) for source in sources]


def make_context(dockerfile: Path, out: Path) -> Path:
    """What the builder stage's COPYs put under its WORKDIR, made from the repository (no Docker)."""
    dockerignore = dockerignore_in_effect(dockerfile)
    skip = shutil.ignore_patterns("__pycache__")
    for source, matches, destination in context_sources(dockerfile):
        assert not destination.startswith("/"), f"COPY {source} {destination}: write it relative to WORKDIR"
        into_dir = destination.endswith("/") or "*" in source or len(matches) > 1
        target = out / destination
        for path in matches:
            relative = path.relative_to(REPO).as_posix()
            if ignored(relative, dockerignore):
                continue
            if path.is_dir():
                shutil.copytree(path, target, ignore=skip, dirs_exist_ok=True)
            else:
                (target if into_dir else target.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name if into_dir else target)
    return out


def packages() -> set[str]:
    """The top-level packages pyproject.toml installs (its find `include` patterns, each `name*`)."""
    return {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}


def project_modules() -> list[str]:
    """Every .py under the packages that git tracks or would track (untracked new modules count)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--",
                             *[f"{package}/*.py" for package in sorted(packages())]],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return sorted(path for path in set(listed) if (REPO / path).is_file())


# --- The project as the image installs it --------------------------------------------------------

@pytest.fixture(scope="module")
def installed_project(tmp_path_factory) -> Path:
    """The project installed as the image installs it, into a directory of its own (returned).

    The builder's COPYs are replayed into a fresh context, a wheel is built from it offline with the
    locked setuptools (`--no-build-isolation`, as in the image) and installed with `--target`: not
    the editable install of the development venv, and nothing from the repository itself.
    """
    root = tmp_path_factory.mktemp("pipeline-image")
    context = make_context(DOCKERFILE, root / "context")
    wheels, target = root / "wheels", root / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

    def run(*arguments: str) -> None:
        result = subprocess.run([*pip, *arguments], cwd=context, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    run("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), ".")
    [wheel] = wheels.glob("digits_mlops-*.whl")
    run("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    return target


def _find_specs(target: Path, modules: list[str], cwd: Path) -> dict[str, str | None]:
    """Where a Python that sees only `target` and the venv's site-packages finds each module."""
    probe = ("import importlib.util, json, sys\n"
             "found = {}\n"
             f"for name in {modules!r}:\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    found[name] = spec.origin if spec else None\n"
             "print(json.dumps({'found': found, 'path': sys.path}))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)
    assert not [entry for entry in answer["path"] if entry.startswith(str(REPO)) and "/.venv" not in entry]
    return answer["found"]


# --- The runtime lock ----------------------------------------------------------------------------

def test_runtime_lock_pins_exactly_what_ci_tests_without_the_dev_tools():
    runtime, root = pins(RUNTIME_LOCK), pins(ROOT_LOCK)
    assert {name: root.get(name) for name in runtime} == runtime
    assert {"apache-beam", "tfx", "kfp-pipeline-spec", "tensorflow", "dill", "setuptools", "wheel"} <= set(runtime)
    assert {"pytest", "playwright"} <= DEV_EXTRA and not DEV_EXTRA & set(runtime)
    # Each package left out is a dev extra or needed only by what was left out: no runtime need lost.
    dropped, project = set(root) - set(runtime), "digits-mlops (pyproject.toml)"
    for name in sorted(dropped):
        parents = required_by(ROOT_LOCK)[name]
        assert name in DEV_EXTRA or project not in parents, name
        assert parents - {project} <= dropped, (name, parents - dropped)


def test_runtime_lock_records_the_root_command_without_the_dev_extra():
    runtime, root = lock_command(RUNTIME_LOCK), lock_command(ROOT_LOCK)
    assert option(runtime, "-o") == RUNTIME_LOCK.relative_to(REPO).as_posix()
    assert option(runtime, "-c") == "requirements.lock"  # pins what requirements.lock pins, by construction
    assert option(root, "--extra") == "dev" and "--extra" not in runtime
    assert without(runtime, "-c", "-o") == without(root, "--extra", "-o")


def test_the_builder_installs_the_runtime_lock_then_the_project_non_editable():
    [builder] = [stage for stage in stages(DOCKERFILE) if stage["name"] == "builder"]
    runs = [arguments for name, arguments in builder["steps"] if name == "RUN"]
    lock = RUNTIME_LOCK.relative_to(REPO).as_posix()
    assert any(re.search(rf"pip install --no-cache-dir --no-deps -r {re.escape(lock)}\b", run) for run in runs)
    [project] = [run for run in runs if re.search(r"pip install .*--no-deps .*\s\.(\s|$)", run)]
    assert "-e" not in project.split() and "--editable" not in project
    assert "pip check" in project  # the lock holds every dependency of everything it installs
    assert "python -m venv /opt/venv" in runs
    assert [lock] in [sources for sources, _ in copies(DOCKERFILE)]


# --- The final image -----------------------------------------------------------------------------

def test_beam_boot_comes_from_the_sdk_image_of_the_locked_beam_and_python():
    chain = lineage(DOCKERFILE)
    [(image, source, destination)] = [copy for copy in copies_from(chain) if "beam" in copy[0]]
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(.+)", image)
    assert match and (source, destination) == ("/opt/apache/beam", "/opt/apache/beam")
    python, beam = match.groups()
    assert beam == pins(RUNTIME_LOCK)["apache-beam"] == pins(ROOT_LOCK)["apache-beam"]
    assert python == option(lock_command(RUNTIME_LOCK), "--python-version") == \
           option(lock_command(ROOT_LOCK), "--python-version")
    assert python_version(chain[0]["base"]).rsplit(".", 1)[0] == python
    assert PYPROJECT["project"]["requires-python"] == f">={python},<3.{int(python.split('.')[1]) + 1}"


def test_the_final_image_is_slim_and_gets_only_the_venv_and_boot():
    chain = lineage(DOCKERFILE)
    [builder] = [stage for stage in stages(DOCKERFILE) if stage["name"] == "builder"]
    assert re.fullmatch(r"python:[\d.]+-slim-bookworm", chain[0]["base"])
    # The venv's interpreter links point at /usr/local/bin/python3.X of the image it was made in.
    assert python_version(chain[0]["base"]) == python_version(builder["base"])
    assert "builder" not in [stage["name"] for stage in chain]
    beam_sdk = f"apache/beam_python3.10_sdk:{pins(RUNTIME_LOCK)['apache-beam']}"
    assert {(origin, source) for origin, source, _ in copies_from(chain)} == {
        ("builder", "/opt/venv"), (beam_sdk, "/opt/apache/beam")}
    assert not [name for stage in chain for name, arguments in stage["steps"]
                if name in ("COPY", "ADD") and "--from=" not in arguments]
    for run in steps(chain, "RUN"):
        assert "pip install" not in run, run
        for install in re.findall(r"apt-get install ([^&;|]*)", run):
            tools = [word for word in install.split() if BUILD_TOOLS.fullmatch(word)]
            assert not tools, run


def test_the_final_image_runs_boot_as_a_fixed_non_root_user_with_its_own_home():
    chain = lineage(DOCKERFILE)
    user = steps(chain, "USER")[-1]
    uid, gid = user.split(":")
    assert uid == gid and uid.isdigit() and int(uid) >= 10000, user
    [useradd] = [run for run in steps(chain, "RUN") if "useradd" in run]
    home = option(useradd.split(), "--home-dir")
    assert f'--uid "{uid}"' in useradd and f'--gid "{uid}"' in useradd and "--create-home" in useradd
    assert env(chain)["HOME"] == home
    [entrypoint] = steps(chain, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/opt/apache/beam/boot"]
    assert steps(chain, "CMD") == []


def test_the_final_image_environment():
    variables = env(lineage(DOCKERFILE))
    assert variables["PATH"].split(":")[0] == "/opt/venv/bin"  # boot and the Vertex command run `python`
    assert variables["TF_USE_LEGACY_KERAS"] == "1"
    # Beam's boot would otherwise make a venv that cannot see /opt/venv's packages.
    assert variables["RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT"] == "1"
    for name in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR"):
        assert variables[name] == "1", name


def test_the_dataflow_target_is_the_same_image_run_as_root():
    dataflow, default = lineage(DOCKERFILE, "dataflow"), lineage(DOCKERFILE)
    assert [stage["name"] for stage in dataflow] == [stage["name"] for stage in default][:-1] + ["dataflow"]
    assert dataflow[-1]["steps"] == [] and steps(dataflow, "USER") == []


def test_the_gpu_lock_is_the_runtime_lock_plus_exactly_tensorflows_cuda_pins():
    """tensorflow 2.16.2's and-cuda extra pins each CUDA wheel exactly: the GPU lock has those pins and
    nothing else new, and every other pin equal to the CPU image's."""
    import importlib.metadata

    from packaging.requirements import Requirement

    cuda = {}
    for text in importlib.metadata.requires("tensorflow"):
        requirement = Requirement(text)
        if requirement.marker and requirement.marker.evaluate({"extra": "and-cuda"}) and \
                not requirement.marker.evaluate({"extra": ""}):
            [specifier] = requirement.specifier
            assert specifier.operator == "==", text
            cuda[requirement.name.lower()] = specifier.version
    gpu, runtime = pins(GPU_LOCK), pins(RUNTIME_LOCK)
    assert len(cuda) == 12 and all(name.startswith("nvidia-") for name in cuda)
    assert gpu == {**runtime, **cuda} and not set(cuda) & set(runtime)
    assert PYPROJECT["project"]["optional-dependencies"]["gpu"] == [f"tensorflow[and-cuda]=={runtime['tensorflow']}"]
    command = lock_command(GPU_LOCK)
    assert option(command, "--extra") == "gpu" and option(command, "-c") == RUNTIME_LOCK.relative_to(REPO).as_posix()
    assert option(command, "-o") == GPU_LOCK.relative_to(REPO).as_posix()


def test_the_gpu_target_is_the_same_system_with_the_cuda_venv_and_finds_its_libraries():
    chain, default = lineage(DOCKERFILE, "gpu"), lineage(DOCKERFILE)
    assert [stage["name"] for stage in chain] == ["system", "gpu"] and default[0]["name"] == "system"
    beam_sdk = f"apache/beam_python3.10_sdk:{pins(RUNTIME_LOCK)['apache-beam']}"
    assert {(origin, source) for origin, source, _ in copies_from(chain)} == {
        ("builder-gpu", "/opt/venv"), (beam_sdk, "/opt/apache/beam")}
    [builder_gpu] = [stage for stage in stages(DOCKERFILE) if stage["name"] == "builder-gpu"]
    assert builder_gpu["base"] == "builder"
    [install] = [run for name, run in builder_gpu["steps"] if name == "RUN"]
    assert f"pip install --no-cache-dir --no-deps -r {GPU_LOCK.relative_to(REPO).as_posix()}" in install
    assert "pip check" in install
    variables = env(chain)
    cuda = sorted(name for name in pins(GPU_LOCK) if name.startswith("nvidia-"))
    # nvidia-cuda-runtime-cu12 installs nvidia/cuda_runtime/lib; nvcc brings ptxas (bin), for XLA.
    directories = {name.removeprefix("nvidia-").removesuffix("-cu12").replace("-", "_") for name in cuda}
    assert variables["LD_LIBRARY_PATH"].split(":") == [f"{SITE_PACKAGES}/nvidia/{directory}/lib"
                                                       for directory in sorted(directories - {"cuda_nvcc"})]
    assert variables["PATH"].split(":")[0] == f"{SITE_PACKAGES}/nvidia/cuda_nvcc/bin"
    assert variables["PATH"].split(":")[1:] == ["${PATH}"] and env(default)["PATH"].startswith("/opt/venv/bin:")
    user = steps(chain, "USER")[-1]
    assert user == steps(default, "USER")[-1]
    assert json.loads(steps(chain, "ENTRYPOINT")[-1]) == ["/opt/apache/beam/boot"]


def test_the_header_says_how_to_build_and_push_and_the_labels_name_the_image():
    text = DOCKERFILE.read_text()
    image = "REGION-docker.pkg.dev/PROJECT/REPO/digits-pipeline:TAG"
    assert f"docker build -f docker/pipeline/Dockerfile -t {image} ." in text
    assert f"docker push {image}" in text
    labels = dict(word.split("=", 1) for arguments in steps(lineage(DOCKERFILE), "LABEL")
                  for word in shlex.split(arguments))
    assert labels["org.opencontainers.image.title"] == "digits-pipeline"
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.base.name"].endswith(lineage(DOCKERFILE)[0]["base"])


def test_hadolint_passes_and_test_docker_lints_this_dockerfile_once():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # tests/test_docker.py lints every docker/**/Dockerfile*; nothing else here may match that glob.
    assert [path for path in sorted(DOCKER.rglob("Dockerfile*")) if path.parent == IMAGE_DIR] == [DOCKERFILE]


# --- The build context ---------------------------------------------------------------------------

def test_every_copied_path_exists_is_sent_and_nothing_generated_is():
    dockerignore = dockerignore_in_effect(DOCKERFILE)
    for source, matches, _ in context_sources(DOCKERFILE):
        assert source.strip("./") and matches, f"COPY {source}: nothing in the repository matches"
        for path in matches:
            relative = path.relative_to(REPO).as_posix()
            assert not ignored(relative, dockerignore), f"{relative} is excluded by {dockerignore}"
            for generated in NOT_SENT:
                assert not (REPO / generated).is_relative_to(path) and not path.is_relative_to(REPO / generated), \
                    (relative, generated)


def test_the_image_copies_every_package_pyproject_installs_and_the_readme_it_reads():
    copied = {path.relative_to(REPO).parts[0] for _, matches, _ in context_sources(DOCKERFILE) for path in matches}
    assert packages() <= copied
    assert copied - packages() == {"pyproject.toml", PYPROJECT["project"]["readme"], "docker"}
    assert set(PYPROJECT["tool"]["setuptools"]["package-data"]) <= copied


# --- The installed copy --------------------------------------------------------------------------

def test_the_installed_copy_has_every_module_and_the_package_data(installed_project):
    installed = {path.name for path in installed_project.iterdir()} - {"bin"}
    [dist_info] = [name for name in installed if name.endswith(".dist-info")]
    assert installed - {dist_info} == packages()  # nothing else (pipeline_root/, serving_model/) slips in
    missing = [module for module in project_modules() if not (installed_project / module).is_file()]
    assert missing == []
    schema = installed_project / "pipeline" / "schema" / "schema.pbtxt"
    assert schema.read_bytes() == (REPO / "pipeline" / "schema" / "schema.pbtxt").read_bytes()
    for package, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            expected = sorted(path.relative_to(REPO / package) for path in (REPO / package).glob(pattern))
            assert expected and expected == sorted(path.relative_to(installed_project / package)
                                                   for path in (installed_project / package).glob(pattern))
    entry_points = (installed_project / dist_info / "entry_points.txt").read_text()
    assert "digits = digits.cli:main" in entry_points


def test_the_vertex_compiler_points_at_the_schema_where_the_image_installs_it(installed_project):
    """`digits pipeline compile --target vertex` writes this path into every component's config."""
    from pipeline import kubeflow

    [(_, venv, _)] = [copy for copy in copies_from(lineage(DOCKERFILE)) if copy[0] == "builder"]
    python = python_version(lineage(DOCKERFILE)[0]["base"]).rsplit(".", 1)[0]
    schema = installed_project / "pipeline" / "schema" / "schema.pbtxt"
    assert schema.is_file()
    assert kubeflow.IMAGE_VENV == venv
    assert kubeflow.IMAGE_SCHEMA_FILE == f"{venv}/lib/python{python}/site-packages/" \
                                         f"{schema.relative_to(installed_project).as_posix()}"


def test_dotted_paths_resolve_in_the_installed_copy_not_the_repository(installed_project, tmp_path):
    found = _find_specs(installed_project, [path.rsplit(".", 1)[0] for path in DOTTED_PATHS], tmp_path)
    for dotted in DOTTED_PATHS:
        module, name = dotted.rsplit(".", 1)
        origin = found[module]
        assert origin and origin.startswith(f"{installed_project}/"), (module, origin)
        tree = ast.parse(Path(origin).read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert name in defined, dotted


def _imports(root: Path, module: str) -> set[str]:
    """Absolute names of everything a module (path under root) imports, lazy imports included: for
    `from a.b import c` both a.b and a.b.c (c may be a module or a name in a.b)."""
    package = Path(module).parent.parts  # what a relative import starts from, for __init__.py too
    names = set()
    for node in ast.walk(ast.parse((root / module).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            anchor = package[:len(package) - node.level + 1] if node.level else ()
            base = ".".join([*anchor, *([node.module] if node.module else [])])
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_every_project_import_resolves_in_the_installed_copy(installed_project, tmp_path):
    """The import closure of the installed modules stays inside the installed copy (a lazy import too)."""
    wanted = set()
    for module in project_modules():
        for name in _imports(installed_project, module):
            if name.split(".")[0] in packages():
                path = installed_project / name.replace(".", "/")
                wanted.add(name if path.with_suffix(".py").is_file() or path.is_dir() else name.rsplit(".", 1)[0])
    assert "components.transform" in wanted and "data.contract" in wanted
    found = _find_specs(installed_project, sorted(wanted), tmp_path)
    outside = {name: origin for name, origin in found.items()
               if not (origin and origin.startswith(f"{installed_project}/"))}
    assert outside == {}


def _providers() -> dict[str, set[str]]:
    """Top-level import name -> distributions whose RECORD installs it (Python 3.10's
    packages_distributions() reads only top_level.txt, which many wheels no longer ship)."""
    found = {}
    for distribution in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", distribution.metadata["Name"]).lower()
        for file in distribution.files or []:
            if len(file.parts) > 1 or file.suffix == ".py" or ".cpython-" in file.name:
                found.setdefault(file.parts[0].split(".")[0], set()).add(name)
    return found


def test_every_third_party_import_comes_from_a_distribution_in_the_runtime_lock(installed_project):
    """So the image, which has only the runtime lock, can import what the development venv can."""
    providers = _providers()
    runtime = set(pins(RUNTIME_LOCK))
    missing = {}
    for module in sorted(set(project_modules()) - TOOL_SCRIPTS):
        for name in _imports(installed_project, module):
            top = name.split(".")[0]
            if not top or top in packages() or top in sys.stdlib_module_names or top == "__future__":
                continue
            if not providers.get(top, set()) & runtime:
                missing.setdefault(top, set()).add(module)
    assert missing == {}
