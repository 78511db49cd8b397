// What the tally-form page (sheet.js) and the sheet reviewers' page (review-sheets.js) both draw: a count's
// boxes, a check, a suggestion, in words and marks that do not rely on colour alone.
"use strict";

window.DigitsSheet = (() => {
  const DECISION_WORDS = { accepted: "sure", unsure: "unsure", not_a_digit: "not a digit" };

  // One box as read: its digit (or empty), marked "look" when a person should check it.
  function box(reading, look) {
    const span = document.createElement("span");
    span.className = "box" + (reading === null ? " blank" : "") + (look ? " look" : "");
    span.textContent = reading === null ? "" : String(reading.digit);
    if (reading === null) {
      span.title = "empty";
    } else {
      const doubt = reading.decision && reading.decision !== "accepted"
        ? `, ${DECISION_WORDS[reading.decision] || reading.decision}: ${reading.digit} or ${reading.runner_up}` : "";
      span.title = `${reading.digit} (${(reading.confidence * 100).toFixed(0)} %${doubt})`;
    }
    span.setAttribute("aria-label", (reading === null ? "empty" : span.title) + (look ? ", check it" : ""));
    return span;
  }

  function checkItem(check) {
    const li = document.createElement("li");
    li.className = check.holds === true ? "holds" : check.holds === false ? "fails" : "unknown";
    const mark = check.holds === true ? "\u2713" : check.holds === false ? "\u2717" : "?";
    const figures = check.holds === null || check.holds === undefined ? "cannot be checked: a count is not read"
      : `${check.sum} ${check.holds ? "=" : "\u2260"} ${check.total}`;
    li.textContent = `${mark} ${check.name} (${check.equation}): ${figures}`;
    return li;
  }

  function suggestionText(suggestion, labels) {
    const changes = Object.entries(suggestion.changes)
      .map(([id, [read, suggested]]) => `${labels[id] || id}: ${suggested} instead of ${read === null ? "unread" : read}`);
    return `${changes.join("; ")} (${(suggestion.probability * 100).toFixed(0)} %)`;
  }

  return { box, checkItem, suggestionText, DECISION_WORDS };
})();
