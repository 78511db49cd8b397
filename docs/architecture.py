"""The architecture picture (docs/assets/architecture.svg) as code: boxes, wires and bands, laid out by hand.

An SVG renders wherever the README is read (GitHub, PyPI-style viewers, the MkDocs site) without
a script from elsewhere, which a Mermaid diagram needs outside GitHub. Edit this file, never the SVG:

    .venv/bin/python docs/architecture.py           # rewrites docs/assets/architecture.svg
    .venv/bin/python docs/architecture.py --check   # exit 1 if the committed SVG is stale

tests/test_docs.py renders the SVG in Chromium and checks what is painted: every label inside its
box, no two boxes overlapping, every wire ending on a box.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "assets" / "architecture.svg"
WIDTH, HEIGHT = 1160, 630

# kind -> (fill, stroke)
COLOURS = {
    "data": ("#e8f1fb", "#2f6db5"),
    "pipeline": ("#e9f6ec", "#2e7d32"),
    "serve": ("#fff3e0", "#c66a00"),
    "watch": ("#f3e8fb", "#7b3fb5"),
    "person": ("#f5f5f5", "#555555"),
}
FEEDBACK = "#c62828"


@dataclass(frozen=True)
class Box:
    id: str
    x: float
    y: float
    w: float
    h: float
    title: str
    lines: tuple[str, ...] = ()
    kind: str = "data"

    def at(self, side: str, t: float = 0.5) -> tuple[float, float]:
        """A point on one side: t runs left to right (top, bottom) or top to bottom (left, right)."""
        return {"top": (self.x + t * self.w, self.y), "bottom": (self.x + t * self.w, self.y + self.h),
                "left": (self.x, self.y + t * self.h), "right": (self.x + self.w, self.y + t * self.h)}[side]


@dataclass(frozen=True)
class Wire:
    source: str
    target: str
    points: tuple[tuple[float, float], ...]  # from a point on the source's border to one on the target's
    label: str = ""
    label_at: tuple[float, float] | None = None
    style: str = "flow"  # flow | feedback


@dataclass(frozen=True)
class Band:
    x: float
    y: float
    w: float
    h: float
    label: str
    label_below: bool = False  # at the bottom-left corner, out of the way of wires entering at the top


BANDS = (
    Band(10, 10, 1140, 262, "Train: offline, on a schedule (digits pipeline run, or compiled for Vertex AI)"),
    Band(10, 284, 1140, 290, "Serve and watch: online", label_below=True),
)

COMPONENT_W, COMPONENT_H = 140, 48
ROW1_Y, ROW2_Y = 86, 180
COLUMN_X = (356, 508, 660, 812)

BOXES = (
    Box("png", 30, 62, 130, 58, "PNG digits", ("mnist-png tree",)),
    Box("feedback", 30, 180, 130, 58, "Corrections", ("data/feedback",)),
    Box("builder", 184, 116, 136, 66, "TFRecord builder", ("digits data build", "shards + manifest")),
    Box("tfx", 344, 44, 620, 214, "TFX pipeline (TFX 1.16)", kind="pipeline"),
    *(Box(name.lower(), x, ROW1_Y, COMPONENT_W, COMPONENT_H, name, (what,), "pipeline")
      for x, (name, what) in zip(COLUMN_X, (("ImportExampleGen", "PNG + label"), ("StatisticsGen", "TFDV"),
                                            ("SchemaGen", "curated schema"),
                                            ("ExampleValidator", "stops on anomalies")))),
    *(Box(name.lower(), x, ROW2_Y, COMPONENT_W, COMPONENT_H, name, (what,), "pipeline")
      for x, (name, what) in zip(COLUMN_X, (("Transform", "normalise, 75x75"), ("Trainer", "InceptionV3"),
                                            ("Evaluator", "TFMA, 4 gates"), ("Pusher", "blessed only")))),
    Box("report", 988, 86, 150, 48, "Run report", ("HTML, per run",)),
    Box("model", 988, 180, 150, 48, "Model versions", ("serving_model/digits/N",), "serve"),
    Box("person", 30, 350, 140, 58, "A person", ("draws or uploads,", "corrects answers"), "person"),
    Box("web", 200, 350, 150, 58, "Web app", ("digits web :8080",), "serve"),
    Box("server", 440, 340, 290, 84, "Model server",
        ("TF Serving 2.16 image or digits serve", "REST :8501, gRPC :8500, metrics"), "serve"),
    Box("clients", 200, 470, 150, 58, "Client code", ("digits predict, Python,", "REST and gRPC")),
    Box("prometheus", 790, 350, 150, 58, "Prometheus", ("SLO + drift rules",), "watch"),
    Box("grafana", 988, 350, 150, 58, "Grafana", ("dashboards",), "watch"),
    Box("alertmanager", 790, 470, 150, 58, "Alertmanager", ("routes, inhibits",), "watch"),
    Box("oncall", 988, 470, 150, 58, "On call", ("pages, tickets,", "runbook"), "person"),
)
_BY_ID = {box.id: box for box in BOXES}


def _box(box_id: str) -> Box:
    return _BY_ID[box_id]


def _chain(names: tuple[str, ...]) -> tuple[Wire, ...]:
    return tuple(Wire(a, b, (_box(a).at("right"), _box(b).at("left"))) for a, b in zip(names, names[1:]))


def _wires() -> tuple[Wire, ...]:
    png, feedback, builder = _box("png"), _box("feedback"), _box("builder")
    validator, transform = _box("examplevalidator"), _box("transform")
    model, server, web = _box("model"), _box("server"), _box("web")
    clients, prometheus = _box("clients"), _box("prometheus")
    bridge_y = 300  # where wires cross from one band to the other
    return (
        Wire("png", "builder", (png.at("right"), (252, png.at("right")[1]), builder.at("top"))),
        Wire("feedback", "builder", (feedback.at("right"), (252, feedback.at("right")[1]), builder.at("bottom")),
             "--extra-source", (206, 228), "feedback"),
        Wire("builder", "importexamplegen", (builder.at("right"), (332, builder.at("right")[1]), (332, 110),
                                             _box("importexamplegen").at("left"))),
        *_chain(("importexamplegen", "statisticsgen", "schemagen", "examplevalidator")),
        Wire("examplevalidator", "transform", (validator.at("bottom"), (validator.at("bottom")[0], 157),
                                               (transform.at("top")[0], 157), transform.at("top"))),
        *_chain(("transform", "trainer", "evaluator", "pusher")),
        Wire("pusher", "model", (_box("pusher").at("right"), model.at("left"))),
        Wire("tfx", "report", (_box("tfx").at("right", 0.308), _box("report").at("left"))),
        Wire("model", "server", (model.at("bottom"), (model.at("bottom")[0], bridge_y + 12),
                                 (585, bridge_y + 12), server.at("top")), "loads each new version", (840, 306)),
        Wire("person", "web", (_box("person").at("right"), web.at("left"))),
        Wire("web", "server", (web.at("right"), server.at("left", 0.46)), "predict", (395, 368)),
        Wire("web", "feedback", (web.at("top", 0.27), (web.at("top", 0.27)[0], bridge_y),
                                 (feedback.at("bottom")[0], bridge_y), feedback.at("bottom")),
             "reviewed corrections", (172, 294), "feedback"),
        Wire("clients", "server", (clients.at("right"), (480, clients.at("right")[1]), (480, server.y + server.h)),
             "REST / gRPC", (415, 490)),
        Wire("server", "prometheus", (server.at("right", 0.5), (prometheus.x, server.y + 0.5 * server.h)),
             "metrics", (760, 372)),
        Wire("prometheus", "grafana", (prometheus.at("right"), _box("grafana").at("left"))),
        Wire("prometheus", "alertmanager", (prometheus.at("bottom"), _box("alertmanager").at("top")),
             "alerts", (888, 444)),
        Wire("alertmanager", "oncall", (_box("alertmanager").at("right"), _box("oncall").at("left"))),
    )


WIRES = _wires()

STYLE = """
  .band rect { fill: #fafafa; stroke: #d0d0d0; stroke-dasharray: 6 4; }
  .band text { font: 600 13px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #555; }
  .box text.title { font: 600 13px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #1f1f1f; }
  .box text.line { font: 11px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #333; }
  .box.container text.title { font-size: 14px; }
  .box.component text.title { font-size: 12px; }
  .wire path { fill: none; stroke: #555; stroke-width: 1.6; }
  .wire.feedback path { stroke: #c62828; stroke-dasharray: 6 4; stroke-width: 2; }
  .wire text { font: 11px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #333;
               paint-order: stroke; stroke: #ffffff; stroke-width: 4px; stroke-linejoin: round; }
  .wire.feedback text { fill: #c62828; font-weight: 600; }
  .legend text { font: 11px system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; fill: #333; }
"""


def _number(value: float) -> str:
    return f"{value:g}"


def _box_svg(box: Box) -> str:
    fill, stroke = COLOURS[box.kind]
    container = box.id == "tfx"
    kind = " container" if container else " component" if box.kind == "pipeline" else ""
    parts = [f'<g class="box{kind}" id="box-{box.id}">',
             f'<rect x="{_number(box.x)}" y="{_number(box.y)}" width="{_number(box.w)}" height="{_number(box.h)}" '
             f'rx="8" fill="{fill if not container else "#f4fbf5"}" stroke="{stroke}" stroke-width="1.5"/>']
    centre = box.x + box.w / 2
    if container:  # the title sits at the top, the components inside
        parts.append(f'<text class="title" x="{_number(box.x + 12)}" y="{_number(box.y + 22)}">'
                     f'{escape(box.title)}</text>')
    else:
        line_height = 15
        total = 17 + line_height * len(box.lines)
        top = box.y + (box.h - total) / 2 + 13
        parts.append(f'<text class="title" x="{_number(centre)}" y="{_number(top)}" text-anchor="middle">'
                     f'{escape(box.title)}</text>')
        for index, line in enumerate(box.lines):
            parts.append(f'<text class="line" x="{_number(centre)}" y="{_number(top + 17 + line_height * index)}" '
                         f'text-anchor="middle">{escape(line)}</text>')
    parts.append("</g>")
    return "\n".join(parts)


def _wire_svg(wire: Wire) -> str:
    path = "M " + " L ".join(f"{_number(x)} {_number(y)}" for x, y in wire.points)
    marker = "arrow-feedback" if wire.style == "feedback" else "arrow"
    parts = [f'<g class="wire {wire.style}" data-from="{wire.source}" data-to="{wire.target}">',
             f'<path d="{path}" marker-end="url(#{marker})"/>']
    if wire.label:
        x, y = wire.label_at
        parts.append(f'<text x="{_number(x)}" y="{_number(y)}" text-anchor="middle">{escape(wire.label)}</text>')
    parts.append("</g>")
    return "\n".join(parts)


def render() -> str:
    markers = "".join(
        f'<marker id="{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{colour}"/></marker>'
        for name, colour in (("arrow", "#555"), ("arrow-feedback", FEEDBACK)))
    bands = "\n".join(
        f'<g class="band"><rect x="{_number(b.x)}" y="{_number(b.y)}" width="{_number(b.w)}" height="{_number(b.h)}" '
        f'rx="12"/><text x="{_number(b.x + 14)}" y="{_number(b.y + b.h - 12 if b.label_below else b.y + 22)}">'
        f'{escape(b.label)}</text></g>'
        for b in BANDS)
    legend_y = HEIGHT - 28
    legend = (
        f'<g class="legend"><path d="M 30 {legend_y} L 70 {legend_y}" stroke="#555" stroke-width="1.6" '
        f'marker-end="url(#arrow)"/><text x="78" y="{legend_y + 4}">data, requests, metrics</text>'
        f'<path d="M 250 {legend_y} L 290 {legend_y}" stroke="{FEEDBACK}" stroke-width="2" stroke-dasharray="6 4" '
        f'marker-end="url(#arrow-feedback)"/><text x="298" y="{legend_y + 4}">people\'s corrections become '
        f'training data for the next run</text></g>')
    # Containers first, so the components inside paint over them; wires last, over the boxes' edges.
    boxes = sorted(BOXES, key=lambda box: box.id != "tfx")
    body = "\n".join([bands, *map(_box_svg, boxes), *map(_wire_svg, WIRES), legend])
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-labelledby="title">\n'
            '<title id="title">digits-mlops architecture: PNG digits and people\'s corrections become '
            'TFRecords; a TFX pipeline validates, transforms, trains, evaluates and pushes a model; TF Serving '
            'or digits serve answers the web app and client code; Prometheus, Alertmanager and Grafana watch '
            'it</title>\n'
            f'<defs>{markers}<style>{STYLE}</style></defs>\n'
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>\n{body}\n</svg>\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed SVG differs from the code")
    args = parser.parse_args(argv)
    svg = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != svg:
            print(f"{OUTPUT} is stale: run `python docs/architecture.py` and commit it", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(svg)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
