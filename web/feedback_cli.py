"""`digits feedback`: see the corrections people sent through the web page, and review them.

A correction waits in the feedback directory's pending/ until a reviewer accepts it (it moves to
training/, which `digits data build --extra-source` reads) or rejects it (rejected/, never read).
"""

from __future__ import annotations

import getpass
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import click

from web.config import DEFAULT_FEEDBACK_DIR

_DIR_OPTION = click.option("--feedback-dir", type=click.Path(path_type=Path, file_okay=False),
                           default=DEFAULT_FEEDBACK_DIR, show_default=True,
                           help="The web app's --feedback-dir.")


@click.group("feedback")
def feedback_group():
    """People's corrections from the web page: list them, accept or reject them."""


def _store(feedback_dir: Path):
    from web.feedback import FeedbackStore

    if not feedback_dir.is_dir():
        raise click.ClickException(f"{feedback_dir} is not a feedback directory (nothing was ever corrected "
                                   "there, or give --feedback-dir)")
    return FeedbackStore(feedback_dir)


@feedback_group.command("list")
@_DIR_OPTION
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Pending corrections shown, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: counts and the pending corrections.")
def list_command(feedback_dir, limit, as_json):
    """Counts by review state, and the corrections waiting for review."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    store = _store(feedback_dir)
    counts, pending = store.counts(), store.pending()
    if as_json:
        click.echo(json.dumps({"counts": counts, "pending": [asdict(p) for p in pending[:limit]]}, indent=1))
        return
    console = Console()
    click.echo(f"{feedback_dir}: {counts['pending']:,} waiting for review, {counts['accepted']:,} accepted "
               f"(trained on by --extra-source), {counts['rejected']:,} rejected")
    if not pending:
        return
    table = Table(title=f"waiting for review (oldest first, {min(limit, len(pending))} of {len(pending):,})",
                  title_justify="left")
    table.add_column("id", no_wrap=True, min_width=24)
    for column in ("proposed", "model said", "from", "reports", "time"):
        table.add_column(column, justify="right" if column in ("proposed", "reports") else "left")
    for proposal in pending[:limit]:
        proposed = str(proposal.digit) + (f" (also {','.join(map(str, proposal.also))})" if proposal.also else "")
        table.add_row(proposal.id, escape(proposed), escape(_model_said(proposal)), escape(proposal.client or "?"),
                      str(proposal.reports), escape(proposal.time))
    console.print(table)
    senders = Counter(proposal.client or "?" for proposal in pending)
    if len(senders) > 1 or len(pending) > 10:
        click.echo("most pending from: " + ", ".join(f"{client} {n:,}" for client, n in senders.most_common(5)))


# The model's own verdict on its answer, in words that do not read as a reviewer's "accepted".
_DECISION_WORDS = {"accepted": "sure", "unsure": "unsure", "not_a_digit": "not a digit"}


def _model_said(proposal) -> str:
    if proposal.predicted is None:
        return "?"
    notes = [f"{proposal.confidence:.0%}"] if proposal.confidence is not None else []
    if proposal.decision:
        notes.append(_DECISION_WORDS.get(proposal.decision, proposal.decision))
    return f"{proposal.predicted} ({', '.join(notes)})" if notes else str(proposal.predicted)


@feedback_group.command("review")
@_DIR_OPTION
@click.option("--accept", "accepts", multiple=True, metavar="ID[=DIGIT]",
              help="Accept a correction as proposed, or as DIGIT when the person was wrong too. Repeatable.")
@click.option("--reject", "rejects", multiple=True, metavar="ID", help="Reject a correction. Repeatable.")
@click.option("--reject-client", "reject_clients", multiple=True, metavar="ADDRESS",
              help="Reject every pending correction first sent from ADDRESS (a flood). Repeatable.")
@click.option("--reviewer", default=None, help="Your name in the review log [default: the login name].")
def review_command(feedback_dir, accepts, rejects, reject_clients, reviewer):
    """Accept or reject pending corrections: by id, by sender, or one by one in a terminal.

    Without --accept, --reject or --reject-client, and in a terminal, it shows each pending
    correction (the 28x28 image the model saw) and asks. Accepted corrections move to training/,
    which the next `digits data build --extra-source` adds to the train split.
    """
    from web.feedback import ACCEPTED, REJECTED

    store = _store(feedback_dir)
    reviewer = reviewer or _login()
    decisions = [(image_id, ACCEPTED, digit) for image_id, digit in map(_parse_accept, accepts)]
    decisions += [(image_id, REJECTED, None) for image_id in rejects]
    if reject_clients:
        wanted = set(reject_clients)
        decisions += [(p.id, REJECTED, None) for p in store.pending() if p.client in wanted]
    if not (accepts or rejects or reject_clients):
        if not sys.stdin.isatty():
            raise click.UsageError("nothing to do: give --accept, --reject or --reject-client, or run it in a "
                                   "terminal to review one by one")
        _interactive(store, reviewer)
        return
    _apply(store, decisions, reviewer)


def _parse_accept(value: str) -> tuple[str, int | None]:
    image_id, _, digit = value.partition("=")
    if not digit:
        return image_id, None
    if not (digit.isdigit() and len(digit) == 1):
        raise click.BadParameter(f"{value!r}: give ID or ID=DIGIT with a digit 0-9", param_hint="'--accept'")
    return image_id, int(digit)


def _apply(store, decisions, reviewer: str) -> None:
    """All the decisions, or none when one names a correction that is not pending (checked first)."""
    from web.feedback import PENDING, NotPending

    seen = Counter(image_id for image_id, _, _ in decisions)
    twice = [image_id for image_id, n in seen.items() if n > 1]
    if twice:
        raise click.ClickException(f"decided more than once: {', '.join(twice)}")
    for image_id, _, _ in decisions:
        found = store.find(image_id)
        if found is None:
            raise click.ClickException(f"no correction {image_id!r} in {store.root}; nothing was changed "
                                       "(digits feedback list shows the pending ones)")
        if found[0] != PENDING:
            raise click.ClickException(f"correction {image_id} was already reviewed ({found[0]}); nothing was changed")
    done = Counter()
    for image_id, verdict, digit in decisions:
        try:
            review = store.review(image_id, verdict, reviewer=reviewer, digit=digit)
        except NotPending as error:  # reviewed meanwhile, on the review page
            click.echo(f"skipped: {error}", err=True)
            continue
        except (OSError, ValueError) as error:  # the disk, or a symlink refused: say how far it got
            raise click.ClickException(f"stopped at {image_id} after accepting {done['accepted']} and rejecting "
                                       f"{done['rejected']}: {error}") from None
        done[review.verdict] += 1
    counts = store.counts()
    click.echo(f"accepted {done['accepted']}, rejected {done['rejected']}; now {counts['pending']:,} pending, "
               f"{counts['accepted']:,} accepted, {counts['rejected']:,} rejected")


def _interactive(store, reviewer: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    from web.feedback import ACCEPTED, REJECTED, NotPending

    console = Console()
    pending = store.pending()
    if not pending:
        console.print("nothing waits for review")
        return
    done = Counter()
    for index, proposal in enumerate(pending, 1):
        try:
            picture = _picture(store.image(proposal.id))
        except (NotPending, OSError, ValueError):  # reviewed meanwhile, or unreadable: not shown
            continue
        console.print(picture)
        also = f", also proposed: {', '.join(map(str, proposal.also))}" if proposal.also else ""
        console.print(escape(f"[{index}/{len(pending)}] {proposal.id}: ") + f"proposed [bold]{proposal.digit}[/]; "
                      + escape(f"model said {_model_said(proposal)}; from {proposal.client or '?'} "
                               f"({proposal.reports} report(s){also}) at {proposal.time}"))
        answer = click.prompt(f"a = accept as {proposal.digit}, 0-9 = accept as that digit, r = reject, "
                              "s = skip, q = quit", default="s", show_default=False).strip().lower()
        if answer == "q":
            break
        if answer in ("", "s"):
            continue
        if answer == "r":
            verdict, digit = REJECTED, None
        elif answer == "a" or (answer.isdigit() and len(answer) == 1):
            verdict, digit = ACCEPTED, None if answer == "a" else int(answer)
        else:
            console.print(escape(f"not an answer: {answer!r}; skipped"))
            continue
        try:
            done[store.review(proposal.id, verdict, reviewer=reviewer, digit=digit).verdict] += 1
        except (NotPending, OSError, ValueError) as error:
            console.print(escape(f"skipped: {error}"))
    console.print(f"accepted {done['accepted']}, rejected {done['rejected']}")


def _picture(png: bytes) -> str:
    """The 28x28 image as text, two pixel rows per line (upper half block: foreground top, background bottom)."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image.convert("L"))
    lines = []
    for top, bottom in zip(pixels[0::2], pixels[1::2]):
        lines.append("".join(f"[rgb({a},{a},{a}) on rgb({b},{b},{b})]\u2580[/]" for a, b in zip(top, bottom)))
    return "\n".join(lines)


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container with an unnamed uid)
        return "unknown"
