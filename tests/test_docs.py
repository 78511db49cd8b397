"""The README and the documentation site: they build, their links land, and what they name exists.

The site is built by MkDocs in strict mode (every internal link and anchor resolves, every page is in
the navigation), each check also shown to fail on a broken copy; every `digits` command and option
the README and the pages name is checked against the command's own options (what `--help` lists),
and options of the project's scripts against their argparse definitions; the architecture picture
is the code's, and it is checked as Chromium paints it.
"""

from __future__ import annotations

import ast
import functools
import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
MKDOCS_YML = REPO / "mkdocs.yml"
ARTIFACTS = REPO / "build" / "test-artifacts" / "docs"
README_MAX_LINES = 250
MKDOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material 9.7 prints a banner about MkDocs 2.0

# Options of programs other than the project's that the pages mention, by program. Everything else
# that looks like an option must belong to a `digits` command or one of the project's scripts.
FOREIGN_OPTIONS = {
    "check-jsonschema": {"--builtin-schema"},
    "docker (Dockerfile COPY, compose logs)": {"--from", "--tail"},
    "uv pip compile": {"--python-version", "--python-platform"},
    "pip / uv pip install": {"--no-deps"},
    "python -m venv": {"--system-site-packages"},
    "Beam's Dataflow options": {"--project", "--region", "--subnetwork"},
    "Beam's Flink and Spark job servers": {"--flink-master", "--spark-master-url"},
    "prometheus": {"--query.max-samples", "--storage.tsdb.retention.time"},
    "mkdocs": {"--strict"},
}
# The project's own scripts with options, as the pages invoke them (`python X` or `python -m Y`).
SCRIPTS = {
    **{f"benchmarks/{path.name}": path for path in (REPO / "benchmarks").glob("*.py")},
    "monitoring.rules": REPO / "monitoring" / "rules.py",
    "monitoring/grafana/generate.py": REPO / "monitoring" / "grafana" / "generate.py",
    "monitoring/alert_receiver.py": REPO / "monitoring" / "alert_receiver.py",
    "docs/architecture.py": DOCS / "architecture.py",
}
OPTION = re.compile(r"(?<![\w.-])(--[a-z][a-z0-9]*(?:[-.][a-z0-9]+)*)(?![\w])")


# --- the site ------------------------------------------------------------------------------------


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, timeout=300, env=MKDOCS_ENV, cwd=config.parent)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `mkdocs build --strict` makes it from the committed docs."""
    out = tmp_path_factory.mktemp("site")
    result = mkdocs_build(MKDOCS_YML, out)
    assert result.returncode == 0, result.stderr
    return out


def nav_pages() -> list[str]:
    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from (walk(value) if isinstance(value, list) else [value])

    return list(walk(yaml.safe_load(MKDOCS_YML.read_text())["nav"]))


def page_html(site: Path, page: str) -> str:
    """The built HTML of docs/<page> (MkDocs' directory URLs: x.md -> x/index.html)."""
    stem = page.removesuffix(".md")
    return (site / ("index.html" if stem == "index" else f"{stem}/index.html")).read_text()


def test_the_site_builds_in_strict_mode_without_a_warning(site):
    result = mkdocs_build(MKDOCS_YML, site.parent / "again")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert (site / "index.html").is_file() and (site / "search" / "search_index.json").is_file()


def test_every_page_is_in_the_navigation_and_every_nav_entry_is_a_page():
    pages = sorted(path.name for path in DOCS.glob("*.md"))
    assert sorted(nav_pages()) == pages


@pytest.mark.parametrize("breakage, expected", [
    ("orphan", "orphan.md"),
    ("anchor", "#no-such-section"),
    ("link", "no-such-page.md"),
])
def test_the_strict_build_fails_on_a_broken_copy(tmp_path, breakage, expected):
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(MKDOCS_YML, copy / "mkdocs.yml")
    if breakage == "orphan":
        (copy / "docs" / "orphan.md").write_text("# A page nobody links\n")
    else:
        target = "serving.md#no-such-section" if breakage == "anchor" else "no-such-page.md"
        page = copy / "docs" / "clients.md"
        page.write_text(page.read_text() + f"\nSee [this]({target}).\n")
    result = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


# --- the README: a front door --------------------------------------------------------------------


def markdown_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_the_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README has {len(lines)} lines; the reference belongs in docs/"
    assert "bash .ci/tasks.sh run" in text and "bash .ci/tasks.sh test" in text
    assert "docs/assets/architecture.svg" in markdown_links(text), "the architecture picture"
    assert re.search(r"^## Headline figures", text, re.M)
    # One click from the README to every page of the site.
    linked = {link.split("#")[0] for link in markdown_links(text)}
    missing = [page for page in nav_pages() if f"docs/{page}" not in linked]
    assert not missing, f"pages the README does not link: {missing}"


@pytest.mark.parametrize("document", ["README.md", "docker/README.md", "docker/pipeline/README.md",
                                      "deploy/k8s/README.md"])
def test_links_outside_the_site_land(site, document):
    """Markdown files MkDocs does not build: every relative link names a file, every anchor a section."""
    path = REPO / document
    for link in markdown_links(path.read_text()):
        if re.match(r"^[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve()
        assert resolved.exists(), f"{document}: {link} does not exist"
        if anchor:
            assert resolved.parent == DOCS, f"{document}: anchors are checked in docs/ pages only ({link})"
            assert f'id="{anchor}"' in page_html(site, resolved.name), f"{document}: no section {link}"


# --- commands and options the documentation names ------------------------------------------------


def _fenced_lines_and_spans(text: str):
    """('block', a shell line, continuation lines joined) and ('inline', a code span)."""
    in_block, shell, pending = False, False, ""
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            in_block, shell = (not in_block), fence.group(1) in ("bash", "sh", "console", "shell", "")
            continue
        if in_block:
            if shell:
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                yield "block", pending + line
                pending = ""
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            yield "inline", span


def _invocations(text: str):
    """(program, arguments) for each command in a line of shell: digits, or a project script."""
    text = re.sub(r"(^|\s)#.*$", "", text)
    for segment in re.split(r"\s\|\s|&&|;|\s&\s|\$\(|\)", text):
        try:
            tokens = shlex.split(segment)
        except ValueError:
            tokens = segment.split()
        while tokens and (re.match(r"^[A-Z][A-Z0-9_]*=", tokens[0]) or tokens[0] in ("sudo", "time", "exec")):
            tokens = tokens[1:]
        if not tokens:
            continue
        if tokens[0] == "digits" or tokens[0].endswith("/bin/digits"):
            yield "digits", tokens[1:]
        elif re.search(r"(^|/)python[0-9.]*$", tokens[0]) and tokens[1:3] == ["-m", "digits"]:
            yield "digits", tokens[3:]
        elif re.search(r"(^|/)python[0-9.]*$", tokens[0]) and len(tokens) > 1:
            module = tokens[2] if tokens[1] == "-m" and len(tokens) > 2 else None
            script = module or tokens[1]
            if script in SCRIPTS:
                yield script, tokens[3 if module else 2:]


def _option_names(tokens: list[str]) -> list[str]:
    names = []
    for token in tokens:
        for part in token.strip("[]").split("/"):
            if part.startswith("-") and part not in ("-", "--") and not part.startswith("---"):
                names.append(part.split("=", 1)[0])
    return names


def _click_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _all_click_commands(command: click.Command, path: tuple[str, ...] = ("digits",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _all_click_commands(sub, path + (name,))


@functools.cache
def _script_options(path: Path) -> frozenset[str]:
    """Every option string a script's argparse `add_argument` calls declare."""
    names = {"--help", "-h"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    names.add(arg.value)
                    if any(k.arg == "action" and "BooleanOptional" in ast.unparse(k.value) for k in node.keywords):
                        names.add("--no-" + arg.value[2:])
    return frozenset(names)


def _resolve(root: click.Command, args: list[str]) -> tuple[click.Command, list[str], str]:
    """The subcommand `args` name, the arguments left for it, and its path; KeyError if none."""
    command, path = root, ["digits"]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        if args[0] not in command.commands:
            raise KeyError(f"{' '.join(path)} has no command {args[0]!r}")
        command = command.commands[args[0]]
        path.append(args[0])
        args = args[1:]
    return command, args, " ".join(path)


def documentation_problems(files: list[Path]) -> list[str]:
    """Every `digits` command or option, and script option, the files name that does not exist."""
    from digits.cli import cli

    known = set().union(*(_click_names(command) for _, command in _all_click_commands(cli)),
                        *(_script_options(path) for path in SCRIPTS.values()),
                        *FOREIGN_OPTIONS.values())
    problems = []
    for file in files:
        name = file.relative_to(REPO) if file.is_relative_to(REPO) else file.name
        for kind, text in _fenced_lines_and_spans(file.read_text()):
            invocations = list(_invocations(text))
            for program, args in invocations:
                if program == "digits":
                    try:
                        command, rest, path = _resolve(cli, args)
                    except KeyError as error:
                        problems.append(f"{name}: `{text.strip()}`: {error.args[0]}")
                        continue
                    allowed = _click_names(command)
                else:
                    rest, path, allowed = args, program, _script_options(SCRIPTS[program])
                problems += [f"{name}: `{text.strip()}`: {path} has no option {option}"
                             for option in _option_names(rest) if option not in allowed]
            if kind == "inline" and not invocations:  # an option named in prose
                problems += [f"{name}: `{text}`: no command or script of the project has {option}"
                             for option in OPTION.findall(text) if option not in known]
    return problems


def documented_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), *sorted(REPO.glob("docker/**/README.md")),
            *sorted(REPO.glob("deploy/**/README.md"))]


def test_every_command_and_option_the_docs_name_exists():
    problems = documentation_problems(documented_files())
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_what_does_not_exist(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "Run `digits serve --rest-prot 1` and `digits pipeline launch`.",
        "```bash",
        ".venv/bin/digits predict --grpc 127.0.0.1:8500 \\",
        "  --lable stable some.png",
        ".venv/bin/python benchmarks/robustness.py --modle DIR",
        "```",
        "The gate is `--min-acuracy`; `--min-accuracy` is fine, as is `digits serve --onednn/--no-onednn`.",
        "`python -m digits web --prot 1`, and in prose `--warmup/--no-warmpu`.",
    ]))
    problems = documentation_problems([page])
    assert [problem.rsplit(": ", 1)[1] for problem in problems] == [
        "digits serve has no option --rest-prot",
        "digits pipeline has no command 'launch'",
        "digits predict has no option --lable",
        "benchmarks/robustness.py has no option --modle",
        "no command or script of the project has --min-acuracy",
        "digits web has no option --prot",
        "no command or script of the project has --no-warmpu",
    ], problems


# --- the architecture picture --------------------------------------------------------------------


def test_the_architecture_picture_is_what_the_code_draws():
    result = subprocess.run([sys.executable, str(DOCS / "architecture.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


PAINTED_GEOMETRY = """() => {
  const rect = (el) => { const b = el.getBBox(); return {x: b.x, y: b.y, w: b.width, h: b.height}; };
  const boxes = {};
  for (const g of document.querySelectorAll('g.box')) {
    boxes[g.id.slice(4)] = {rect: rect(g.querySelector('rect')), container: g.classList.contains('container'),
                            texts: [...g.querySelectorAll('text')].map((t) => ({text: t.textContent, box: rect(t)}))};
  }
  const wires = [...document.querySelectorAll('g.wire')].map((g) => {
    const path = g.querySelector('path'), length = path.getTotalLength();
    const at = (d) => { const p = path.getPointAtLength(d); return [p.x, p.y]; };
    return {from: g.dataset.from, to: g.dataset.to, start: at(0), end: at(length)};
  });
  return {boxes, wires};
}"""


def _inside(inner: dict, outer: dict, margin: float = 0) -> bool:
    return (inner["x"] >= outer["x"] + margin and inner["y"] >= outer["y"]
            and inner["x"] + inner["w"] <= outer["x"] + outer["w"] - margin
            and inner["y"] + inner["h"] <= outer["y"] + outer["h"])


def _on_border(point, box: dict, tolerance: float = 1.0) -> bool:
    x, y = point
    inside_x = box["x"] - tolerance <= x <= box["x"] + box["w"] + tolerance
    inside_y = box["y"] - tolerance <= y <= box["y"] + box["h"] + tolerance
    on_vertical = min(abs(x - box["x"]), abs(x - box["x"] - box["w"])) <= tolerance
    on_horizontal = min(abs(y - box["y"]), abs(y - box["y"] - box["h"])) <= tolerance
    return inside_x and inside_y and (on_vertical or on_horizontal)


@pytest.mark.slow
def test_the_architecture_picture_as_chromium_paints_it(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 700})
    try:
        page.set_content("<html><body style='margin:0'>" + (DOCS / "assets" / "architecture.svg").read_text()
                         + "</body></html>")
        painted = page.evaluate(PAINTED_GEOMETRY)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "architecture.png"))
    finally:
        page.close()
    boxes, wires = painted["boxes"], painted["wires"]
    assert {"png", "builder", "tfx", "transform", "trainer", "evaluator", "pusher", "server", "web", "prometheus",
            "alertmanager", "grafana", "feedback"} <= set(boxes)
    for name, box in boxes.items():  # every label painted inside its own box (4 px from the sides)
        for text in box["texts"]:
            assert text["box"]["w"] > 0, f"{name}: {text['text']!r} is not painted"
            assert _inside(text["box"], box["rect"], margin=4), f"{name}: {text['text']!r} spills out of its box"
    container = boxes["tfx"]["rect"]
    components = {"importexamplegen", "statisticsgen", "schemagen", "examplevalidator", "transform", "trainer",
                  "evaluator", "pusher"}
    for name in components:
        assert _inside(boxes[name]["rect"], container), f"{name} is outside the TFX pipeline box"
    plain = sorted(name for name, box in boxes.items() if not box["container"])
    for i, first in enumerate(plain):  # no two boxes overlap
        for second in plain[i + 1:]:
            a, b = boxes[first]["rect"], boxes[second]["rect"]
            overlap = (min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"]) > 0
                       and min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"]) > 0)
            assert not overlap, f"{first} and {second} overlap"
    for wire in wires:  # every wire starts on its source's border and ends on its target's
        assert _on_border(wire["start"], boxes[wire["from"]]["rect"]), wire
        assert _on_border(wire["end"], boxes[wire["to"]]["rect"]), wire
    connected = {(wire["from"], wire["to"]) for wire in wires}
    assert {("web", "feedback"), ("feedback", "builder"), ("pusher", "model"), ("model", "server"),
            ("server", "prometheus"), ("prometheus", "alertmanager")} <= connected


# --- the site in a browser -----------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site_url(site):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=site))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_the_home_page_renders_offline_with_its_picture_and_search(browser, site_url):
    from web.browser import LoopbackGuard

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    guard = LoopbackGuard(context)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{site_url}/", wait_until="networkidle")
        picture = page.locator("article img[src$='architecture.svg']")
        geometry = picture.evaluate("(img) => ({natural: img.naturalWidth, width: img.getBoundingClientRect().width})")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "home.png"), full_page=True)
        nav = page.locator("nav.md-nav--primary").inner_text()
        page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
        phone = page.evaluate("""() => ({page: document.documentElement.scrollWidth,
            picture: document.querySelector("article img[src$='architecture.svg']").getBoundingClientRect().right,
            link: document.querySelector("article img[src$='architecture.svg']").closest('a')?.getAttribute('href')})""")
        page.screenshot(path=str(ARTIFACTS / "home-phone.png"))
        page.set_viewport_size({"width": 1280, "height": 900})
        page.keyboard.press("s")  # Material's search shortcut; the offline index is the site's own
        page.keyboard.type("DigitsModelServerDown", delay=20)
        page.locator(".md-search-result__item").first.wait_for(timeout=30_000)
        results = page.locator(".md-search-result__item").all_inner_texts()
    finally:
        context.close()
    assert not guard.blocked, f"the site asked for something off this machine: {guard.blocked}"
    assert not errors, errors
    assert geometry["natural"] > 0, "the architecture picture did not load"
    assert geometry["width"] >= 600, geometry
    assert phone["page"] <= 390 and phone["picture"] <= 390, phone
    assert phone["link"].endswith("architecture.svg"), phone  # full size, a tap away
    for section in ("Getting started", "Build a model", "Serve", "Operate", "Scale out", "Measure",
                    "Troubleshooting"):
        assert section in nav, nav
    assert any("DigitsModelServerDown" in result for result in results), results


def test_every_test_file_is_described_and_every_one_named_exists():
    described = set(re.findall(r"`(tests/test_\w+\.py)`", (DOCS / "tests.md").read_text()))
    files = {f"tests/{path.name}" for path in (REPO / "tests").glob("test_*.py")}
    assert files <= described, f"not described in docs/tests.md: {sorted(files - described)}"
    named = set().union(*(re.findall(r"(tests/test_\w+\.py)", path.read_text()) for path in documented_files()))
    assert named <= files, f"named in the docs but missing: {sorted(named - files)}"


# --- promises and the tests that keep them -------------------------------------------------------
# A test named in the docs as `tests/test_x.py::test_name` (or `::TestClass::test_name`).
TEST_NODE = re.compile(r"tests/(test_\w+\.py)::(\w+(?:::\w+)?)")
PROMISES_HEADING = "## Promises and the tests that keep them"


def defined_tests(test_file: Path) -> set[str]:
    """The test functions pytest collects from a file, as node-id tails (read with `ast`, not imported)."""
    names: set[str] = set()
    for node in ast.parse(test_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names |= {f"{node.name}::{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test_")}
    return names


def unknown_tests(documents: list[Path], tests_dir: Path) -> list[str]:
    """Every `tests/FILE.py::NAME` the documents name that is not a test pytest would collect."""
    problems = []
    for document in documents:
        for file_name, name in TEST_NODE.findall(document.read_text()):
            path = tests_dir / file_name
            if not path.is_file():
                problems.append(f"{document.name}: {file_name} does not exist (named with ::{name})")
            elif name not in defined_tests(path):
                problems.append(f"{document.name}: tests/{file_name}::{name} is not a test in that file")
    return problems


def promises(tests_page: str) -> list[tuple[str, str, list[str]]]:
    """The rows of the promises table in docs/tests.md: (promise, where it is made, tests named)."""
    section = tests_page.split(PROMISES_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| promise")]
    table = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("| ").split(" | ")]
        if set(cells[0]) <= {"-", ":", " "}:
            continue  # the header's separator row
        assert len(cells) == 3, f"a promises row needs 3 cells: {row}"
        table.append((cells[0], cells[1], ["::".join(node) for node in TEST_NODE.findall(cells[2])]))
    return table


def test_every_promise_in_the_table_names_a_test_that_exists_where_the_promise_is_made():
    """docs/tests.md lists the behaviour the README and the pages promise, each with its tests."""
    table = promises((DOCS / "tests.md").read_text())
    assert len(table) >= 40, f"the promises table shrank to {len(table)} rows"
    for promise, where, tests in table:
        assert tests, f"no test named for: {promise}"
        link = re.fullmatch(r"\[[^\]]+\]\(([\w-]+\.md)(#[\w-]+)?\)", where)
        assert link and (DOCS / link.group(1)).is_file(), f"{promise}: where it is made must link a page: {where}"
    assert not unknown_tests(documented_files(), REPO / "tests")


def test_a_page_naming_a_missing_test_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Proven by `tests/test_docs.py::test_no_such_thing` and `tests/test_nothing.py::test_x`;\n"
                    "kept by `tests/test_docs.py::test_a_page_naming_a_missing_test_is_caught`.\n")
    assert unknown_tests([page], REPO / "tests") == [
        "page.md: tests/test_docs.py::test_no_such_thing is not a test in that file",
        "page.md: test_nothing.py does not exist (named with ::test_x)",
    ]
    rows = promises(f"{PROMISES_HEADING}\n\n| promise | where | tests |\n|---|---|---|\n"
                    "| one | [Serving](serving.md#versions) | `tests/test_serving.py::test_a`, `tests/test_web.py::TestX::test_b` |\n"
                    "\n## Next\n| not | a | row |\n")
    assert rows == [("one", "[Serving](serving.md#versions)",
                     ["test_serving.py::test_a", "test_web.py::TestX::test_b"])]
