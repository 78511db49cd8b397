"""Corrections are proposals until a reviewer accepts them: the store's review states, its caps, the
reviewers' CLI and API, and a flood of wrong labels through the real app that reaches no training set."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import run_digits
from data import contract
from test_builder import _read_split
from tfrecord_builder.builder import build
from tfrecord_builder.config import BuildConfig
from web.feedback import LOG_NAME, REVIEW_LOG_NAME, FeedbackStore, NotPending, QueueFull
from web.process import start_web

TOKEN = "review-token-for-tests-0123456789"


def _picture(index: int) -> list[list[float]]:
    """A distinct 28x28 image per index (a bar at row index % 28, of a length index // 28 + 4)."""
    row, length = index % 28, index // 28 + 4
    return [[1.0 if y == row and 4 <= x < 4 + length else 0.0 for x in range(28)] for y in range(28)]


def _add(store: FeedbackStore, index: int, corrected: int = 3, client: str = "10.0.0.1"):
    return store.add(_picture(index), predicted=8, corrected=corrected, confidence=0.9, model_name="digits",
                     model_version=1, client=client)


def _files(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*.png"))


def test_a_correction_waits_in_pending_until_a_reviewer_decides(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    first, second, third = (_add(store, index) for index in range(3))
    assert first.state == "pending" and first.image == f"pending/3/{first.id}.png"
    assert not (tmp_path / "fb" / contract.TRAINING_DIR).exists()
    assert store.counts() == {"pending": 3, "accepted": 0, "rejected": 0}
    [logged] = [json.loads(line) for line in (tmp_path / "fb" / LOG_NAME).read_text().splitlines()][:1]
    assert (logged["client"], logged["state"], logged["predicted"]) == ("10.0.0.1", "pending", 8)

    accepted = store.review(first.id, "accepted", reviewer="ana")
    relabelled = store.review(second.id, "accepted", reviewer="ana", digit=8)  # the person was wrong too
    rejected = store.review(third.id, "rejected", reviewer="ana", digit=5)  # a rejection keeps the proposal
    assert (accepted.digit, relabelled.digit, relabelled.proposed, rejected.digit) == (3, 8, 3, 3)
    assert _files(tmp_path / "fb") == sorted([f"training/3/{first.id}.png", f"training/8/{second.id}.png",
                                              f"rejected/3/{third.id}.png"])
    reviews = [json.loads(line) for line in (tmp_path / "fb" / REVIEW_LOG_NAME).read_text().splitlines()]
    assert [(r["id"], r["verdict"], r["reviewer"]) for r in reviews] == [
        (first.id, "accepted", "ana"), (second.id, "accepted", "ana"), (third.id, "rejected", "ana")]
    with pytest.raises(NotPending, match="already reviewed"):
        store.review(first.id, "rejected", reviewer="ana")
    with pytest.raises(NotPending, match="no correction"):
        store.review("0" * 24, "accepted", reviewer="ana")
    with pytest.raises(NotPending, match="no correction"):
        store.review("../../etc/passwd", "accepted", reviewer="ana")
    with pytest.raises(ValueError, match="verdict"):
        store.review(first.id, "maybe", reviewer="ana")

    # Sent again, a reviewed image stays where the reviewer put it: a rejected flood is not re-queued.
    again = _add(store, 2, corrected=7, client="10.0.0.9")
    assert (again.state, again.duplicate, again.image) == ("rejected", True, f"rejected/3/{third.id}.png")
    assert store.counts() == {"pending": 0, "accepted": 2, "rejected": 1}


def test_a_pending_image_corrected_again_stays_as_first_proposed_and_shows_the_other_proposals(tmp_path):
    """Nobody can change what a reviewer is about to accept: a later proposal of another digit is
    logged and shown (`also`), and the image stays where it was first proposed."""
    store = FeedbackStore(tmp_path / "fb")
    record = _add(store, 0, corrected=3, client="10.0.0.1")
    later = _add(store, 0, corrected=5, client="10.0.0.2")
    _add(store, 0, corrected=5, client="10.0.0.2")
    assert later.duplicate and later.image == f"pending/3/{record.id}.png"
    [proposal] = store.pending()
    assert (proposal.id, proposal.digit, proposal.also, proposal.reports, proposal.clients, proposal.client) == (
        record.id, 3, (5,), 3, 2, "10.0.0.1")
    assert _files(tmp_path / "fb") == [f"pending/3/{record.id}.png"]
    assert store.review(record.id, "accepted", reviewer="ana").digit == 3


def test_symlinks_lead_nowhere_outside_the_directory(tmp_path):
    """A symlinked state or digit directory, or a symlink in place of an image: not written through,
    not found, not reviewed (so nothing outside is moved into training/)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    store = FeedbackStore(tmp_path / "fb")
    record = _add(store, 0)
    (tmp_path / "fb" / "pending" / "5").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the feedback directory"):
        _add(store, 1, corrected=5)
    # An image of the id outside, reached through the symlinked digit directory, is not a correction.
    secret = outside / f"{'a' * 24}.png"
    secret.write_bytes(b"not yours")
    with pytest.raises(NotPending):
        store.review("a" * 24, "accepted", reviewer="ana")
    assert secret.read_bytes() == b"not yours"
    (tmp_path / "fb" / "pending" / "7").mkdir()
    (tmp_path / "fb" / "pending" / "7" / f"{'b' * 24}.png").symlink_to(secret)
    assert store.find("b" * 24) is None and [p.id for p in store.pending()] == [record.id]
    # The whole state directory a symlink to training/: a stranger's image is not written there.
    shutil.rmtree(tmp_path / "fb" / "pending")
    (tmp_path / "fb" / "training").mkdir()
    (tmp_path / "fb" / "pending").symlink_to(tmp_path / "fb" / "training")
    with pytest.raises(ValueError, match="symlink"):
        _add(store, 2)
    assert list((tmp_path / "fb" / "training").rglob("*.png")) == []


def test_the_queue_is_capped_per_client_and_in_all(tmp_path):
    store = FeedbackStore(tmp_path / "fb", max_pending=5, pending_per_client=3)
    for index in range(3):
        _add(store, index, client="10.0.0.1")
    with pytest.raises(QueueFull) as mine:
        _add(store, 3, client="10.0.0.1")
    assert mine.value.per_client and "3 corrections from this address" in str(mine.value)
    _add(store, 0, corrected=4, client="10.0.0.1")  # a pending image corrected again adds none: taken
    for index in range(10, 12):
        _add(store, index, client="10.0.0.2")
    with pytest.raises(QueueFull) as full:
        _add(store, 20, client="10.0.0.3")
    assert not full.value.per_client and "full (5 corrections wait" in str(full.value)
    assert store.counts()["pending"] == 5
    # A reviewer in another process (its own store object) makes room; this store sees it.
    other = FeedbackStore(tmp_path / "fb")
    for proposal in other.pending():
        if proposal.client == "10.0.0.1":
            other.review(proposal.id, "rejected", reviewer="ana")
    _add(store, 20, client="10.0.0.3")
    _add(store, 3, client="10.0.0.1")
    # The log is capped too: past it, nothing new is queued.
    capped = FeedbackStore(tmp_path / "fb", max_log_bytes=(tmp_path / "fb" / LOG_NAME).stat().st_size)
    with pytest.raises(QueueFull, match="feedback log has reached its cap"):
        _add(capped, 30, client="10.0.0.4")
    with pytest.raises(QueueFull, match="feedback log has reached its cap"):  # a repeat adds a line too
        _add(capped, 20, client="10.0.0.3")
    # Images removed by hand (or by anyone) free their places at once.
    for path in (tmp_path / "fb" / "pending").rglob("*.png"):
        path.unlink()
    for index in range(40, 45):
        _add(store, index, client=f"10.0.1.{index}")


@pytest.mark.parametrize("step", ["move", "review line"])
def test_a_failed_review_changes_nothing(tmp_path, monkeypatch, step):
    import web.feedback as feedback

    store = FeedbackStore(tmp_path / "fb")
    record = _add(store, 0)
    before = _files(tmp_path / "fb")

    def broken(*_, **__):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(*((feedback.os, "replace") if step == "move" else (feedback.os, "write")), broken)
        with pytest.raises(OSError, match="No space left"):
            store.review(record.id, "accepted", reviewer="ana")
    assert _files(tmp_path / "fb") == before
    assert not (tmp_path / "fb" / REVIEW_LOG_NAME).exists() or \
        (tmp_path / "fb" / REVIEW_LOG_NAME).read_text() == ""
    store.review(record.id, "accepted", reviewer="ana")
    assert _files(tmp_path / "fb") == [f"training/3/{record.id}.png"]


def test_the_review_cli(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    records = [_add(store, index, client="10.0.0.1" if index < 3 else "10.0.0.7") for index in range(5)]
    listed = run_digits("feedback", "list", "--feedback-dir", tmp_path / "fb")
    assert listed.returncode == 0, listed.stderr
    assert "5 waiting for review, 0 accepted" in listed.stdout and records[0].id in listed.stdout
    as_json = json.loads(run_digits("feedback", "list", "--feedback-dir", tmp_path / "fb", "--json").stdout)
    assert as_json["counts"]["pending"] == 5 and as_json["pending"][0]["id"] == records[0].id

    # An unknown id, or one given twice: one line, and nothing changed (not even the valid ones).
    for bad in (["--accept", records[0].id, "--reject", "f" * 24],
                ["--accept", records[0].id, "--reject", records[0].id], ["--accept", f"{records[0].id}=x"]):
        result = run_digits("feedback", "review", "--feedback-dir", tmp_path / "fb", *bad)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert store.counts()["pending"] == 5

    result = run_digits("feedback", "review", "--feedback-dir", tmp_path / "fb", "--reviewer", "ana",
                        "--accept", records[0].id, "--accept", f"{records[1].id}=9", "--reject-client", "10.0.0.7")
    assert result.returncode == 0, result.stderr
    assert "accepted 2, rejected 2; now 1 pending, 2 accepted, 2 rejected" in result.stdout
    assert _files(tmp_path / "fb") == sorted([f"training/3/{records[0].id}.png", f"training/9/{records[1].id}.png",
                                              f"pending/3/{records[2].id}.png", f"rejected/3/{records[3].id}.png",
                                              f"rejected/3/{records[4].id}.png"])
    # Not a terminal and nothing to do: a usage error, not a prompt that waits for ever.
    result = subprocess.run([sys.executable, "-m", "digits", "feedback", "review", "--feedback-dir", tmp_path / "fb"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing to do" in result.stderr
    missing = run_digits("feedback", "list", "--feedback-dir", tmp_path / "nowhere")
    assert missing.returncode == 1 and "is not a feedback directory" in missing.stderr


def _flood(app, images: list[bytes], digit: int) -> list[requests.Response]:
    """Each image classified through the public API, then 'corrected' to `digit` (to `digit` - 1 where
    the model answered `digit`: the tests' tiny model is often wrong, and a wrong label is the point)."""
    responses = []
    for image in images:
        answer = requests.post(f"{app.url}/api/predict", data=image, timeout=60)
        assert answer.status_code == 200, answer.text
        claimed = digit if answer.json()["digit"] != digit else digit - 1
        responses.append(requests.post(f"{app.url}/api/feedback", timeout=30,
                                       data=json.dumps({"id": answer.json()["id"], "digit": claimed}),
                                       headers={"Content-Type": "application/json"}))
    return responses


def _metric(app, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{app.url}/metrics", timeout=10).text
    return next(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == name)


def test_a_flood_of_wrong_labels_reaches_no_training_set_unless_accepted(model_server, small_tree, sample_tree,
                                                                        tmp_path):
    """Every 8 'corrected' to 3 through the public API by one client: the queue takes its share and
    refuses the rest with 429; a build with --extra-source trains on none of it; a reviewer rejects the
    sender's corrections in one command. Without review (everything accepted), the same flood becomes
    3s in the train split: what the gates must then catch (benchmarks/poisoning.py)."""
    tree = small_tree(train_per_class=10, test_per_class=4)
    eights = sorted((sample_tree / contract.TESTING_DIR / "8").iterdir())[:30]
    feedback = tmp_path / "feedback"
    with start_web("--serving-url", model_server.rest_url, "--feedback-dir", feedback,
                   "--pending-per-client", "20") as app:
        responses = _flood(app, [path.read_bytes() for path in eights], digit=3)
        stored = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        assert len(stored) == 20
        assert all(r.json()["message"].endswith("A reviewer checks corrections before the next training run "
                                                "learns from them.") for r in stored)
        assert {r.status_code for r in refused} == {429} and len(refused) == 10
        assert all(int(r.headers["Retry-After"]) > 0 and "wait for a reviewer" in r.json()["error"] for r in refused)
        assert _metric(app, "digits_web_feedback_pending") == 20
        assert _metric(app, "digits_web_requests_total") > 0

        plain = build(BuildConfig(source=tree, output=tmp_path / "plain", workers=1)).manifest
        queued = build(BuildConfig(source=tree, output=tmp_path / "queued", workers=1, extra_sources=(feedback,)))
        assert queued.manifest["extra_sources"][0]["corrections"] == {"accepted": 0, "pending": 20, "rejected": 0}
        assert queued.manifest["counts"]["rejected"] == 0  # the queue is counted, not reported as bad files
        assert _read_split(tmp_path / "queued", contract.TRAIN_SPLIT) == _read_split(tmp_path / "plain",
                                                                                     contract.TRAIN_SPLIT)
        assert queued.manifest["splits"]["train"]["per_class"] == plain["splits"]["train"]["per_class"]

        result = run_digits("feedback", "review", "--feedback-dir", feedback, "--reject-client", "127.0.0.1")
        assert result.returncode == 0 and "rejected 20" in result.stdout, result.stderr
        assert _metric(app, "digits_web_feedback_pending") == 0  # read at scrape: another process's reviews count
        # Sent again, the rejected images are not queued again.
        again = _flood(app, [eights[0].read_bytes()], digit=3)[0]
        assert again.status_code == 200 and again.json()["duplicate"]
        # ... and the answer says nothing of the review: the same words as for a new correction.
        assert again.json()["message"].split(". ", 1)[1] == stored[0].json()["message"].split(". ", 1)[1]
        assert not list((feedback / "pending").rglob("*.png"))

    rejected = build(BuildConfig(source=tree, output=tmp_path / "rejected", workers=1, extra_sources=(feedback,)))
    assert rejected.manifest["extra_sources"][0]["corrections"] == {"accepted": 0, "pending": 0, "rejected": 20}
    assert rejected.manifest["splits"]["train"]["per_class"] == plain["splits"]["train"]["per_class"]

    # Without review: the same flood, all accepted, is 20 more training digits labelled other than 8.
    unreviewed = tmp_path / "unreviewed"
    store = FeedbackStore(unreviewed)
    for path in sorted((feedback / contract.REJECTED_DIR).glob("*/*.png")):
        record = store.add(_normalized(path), predicted=8, corrected=int(path.parent.name), confidence=0.9,
                           model_name="digits", model_version=1, client="127.0.0.1")
        store.review(record.id, "accepted", reviewer="nobody")
    poisoned = build(BuildConfig(source=tree, output=tmp_path / "poisoned", workers=1, extra_sources=(unreviewed,)))
    assert poisoned.manifest["splits"]["train"]["examples"] == plain["splits"]["train"]["examples"] + 20
    assert poisoned.manifest["splits"]["train"]["per_class"]["8"] == plain["splits"]["train"]["per_class"]["8"]


def _normalized(path: Path) -> list[list[float]]:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return (np.asarray(image, dtype=np.float64) / 255.0).tolist()


def _review_api(app, method: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.request(method, f"{app.url}/api/review", headers=headers, timeout=30, **kwargs)


def test_the_review_api_is_behind_the_token(model_server, sample_tree, tmp_path):
    eights = sorted((sample_tree / contract.TESTING_DIR / "8").iterdir())[:3]
    feedback = tmp_path / "feedback"
    # Without a token file there is no review page nor API at all.
    with start_web("--serving-url", model_server.rest_url, "--feedback-dir", feedback) as app:
        assert requests.get(f"{app.url}/review", timeout=10).status_code == 404
        assert _review_api(app, "GET").status_code == 404
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with start_web("--serving-url", model_server.rest_url, "--feedback-dir", feedback,
                   "--review-token-file", token_file) as app:
        assert TOKEN not in "".join(app.output)
        assert requests.get(f"{app.url}/review", timeout=10).status_code == 200
        responses = _flood(app, [path.read_bytes() for path in eights], digit=3)
        assert [r.status_code for r in responses] == [200] * 3
        answered_by = requests.get(f"{app.url}/api/model", timeout=10).json()["versions"][-1]

        for token in (None, "", "wrong-token-wrong-token", TOKEN[:-1], "\xff\xfe-not-utf-8-not-utf-8"):
            refused = _review_api(app, "GET", token=token)
            assert refused.status_code == 401 and refused.json()["error"].startswith("give the review token")
        listed = _review_api(app, "GET", params={"limit": 2})
        assert listed.status_code == 200 and listed.headers["Cache-Control"] == "no-store"
        document = listed.json()
        assert document["counts"] == {"pending": 3, "accepted": 0, "rejected": 0}
        first, second = document["pending"]
        assert first["digit"] in (2, 3) and first["predicted"] != first["digit"]  # the tiny model's answer
        assert (first["client"], first["reports"], first["model_version"]) == ("127.0.0.1", 1, answered_by)
        pixels = first["pixels"]
        assert len(pixels) == 28 and all(len(row) == 28 for row in pixels) and max(map(max, pixels)) > 200
        assert _review_api(app, "GET", params={"limit": "1000"}).status_code == 400

        json_headers = {"Content-Type": "application/json"}
        accepted = _review_api(app, "POST", data=json.dumps({"id": first["id"], "verdict": "accepted", "digit": 8}),
                               headers=dict(json_headers))
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["review"]["digit"] == 8 and accepted.json()["counts"]["accepted"] == 1
        assert (feedback / "training" / "8" / f"{first['id']}.png").is_file()
        again = _review_api(app, "POST", data=json.dumps({"id": first["id"], "verdict": "rejected"}),
                            headers=dict(json_headers))
        assert again.status_code == 409 and "already reviewed" in again.json()["error"]
        unknown = _review_api(app, "POST", data=json.dumps({"id": "a" * 24, "verdict": "rejected"}),
                              headers=dict(json_headers))
        assert unknown.status_code == 404
        for bad in ({"id": second["id"], "verdict": "yes"}, {"id": second["id"], "verdict": "accepted", "digit": 10},
                    ["not", "an", "object"], {"verdict": "accepted"}):
            response = _review_api(app, "POST", data=json.dumps(bad), headers=dict(json_headers))
            assert response.status_code == 400 and "error" in response.json(), (bad, response.text)
        # A state-changing request from another site, or not JSON: refused before the token is looked at.
        cross = _review_api(app, "POST", data=json.dumps({"id": second["id"], "verdict": "accepted"}),
                            headers={**json_headers, "Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        plain = _review_api(app, "POST", data=json.dumps({"id": second["id"], "verdict": "accepted"}),
                            headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert (feedback / "pending" / str(second["digit"]) / f"{second['id']}.png").is_file()
        # Guessing: after 10 wrong tokens a minute, 429 with Retry-After (the right token still works).
        statuses = [_review_api(app, "GET", token=f"guess-{index:02d}-guess-guess").status_code for index in range(12)]
        assert statuses.count(401) >= 1 and statuses[-1] == 429
        assert _review_api(app, "GET").status_code == 200


def test_a_bad_review_token_file_is_one_line(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, words in ((short, "at least 16 characters"), (empty, "is empty"), (tmp_path / "none", "is not a file")):
        result = run_digits("web", "--port", "0", "--review-token-file", path, "--feedback-dir", tmp_path / "fb")
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "abc" not in result.stderr


def test_the_token_can_come_from_the_environment(monkeypatch):
    from web.cli import _review_token

    monkeypatch.delenv("DIGITS_REVIEW_TOKEN", raising=False)
    assert _review_token(None) is None
    monkeypatch.setenv("DIGITS_REVIEW_TOKEN", TOKEN)
    assert _review_token(None) == TOKEN
