// The tally-form page: a photo in, POST /api/read-sheet, every count shown with the boxes to check.
// No external resource: the CSP forbids it.
"use strict";

(() => {
  const REQUEST_TIMEOUT_MS = 120000;
  const $ = (id) => document.getElementById(id);
  const upload = $("upload"), announce = $("announce"), errorBox = $("error"), result = $("result");
  const VERDICTS = {
    accepted: "Every count is read and every sum holds: no person needs to check this sheet.",
    needs_review: "A person must check the boxes marked in red before these counts are used.",
    inconsistent: "The counts as read do not add up: a person must check the boxes marked in red.",
  };

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  function show(answer) {
    const view = window.DigitsSheet;
    document.body.dataset.verdict = answer.verdict;
    announce.textContent = VERDICTS[answer.verdict] || answer.verdict;
    announce.className = "verdict " + answer.verdict;
    const labels = {};
    const rows = Object.entries(answer.counts).map(([id, count]) => {
      labels[id] = count.label;
      const tr = document.createElement("tr");
      tr.dataset.count = id;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = count.label;
      const boxes = document.createElement("td");
      boxes.className = "boxes";
      count.boxes.forEach((reading, index) => boxes.append(view.box(reading, count.review_boxes.includes(index + 1))));
      const value = document.createElement("td");
      value.className = "value" + (count.accepted ? "" : " look");
      value.textContent = count.value === null ? "?" : String(count.value);
      if (count.problems.length) value.title = count.problems.join("; ");
      tr.append(name, boxes, value);
      return tr;
    });
    $("counts").tBodies[0].replaceChildren(...rows);
    $("checks").replaceChildren(...answer.checks.map(view.checkItem));
    $("suggestions").replaceChildren(...answer.suggestions.map((suggestion) => {
      const li = document.createElement("li");
      li.textContent = view.suggestionText(suggestion, labels);
      return li;
    }));
    $("suggestions-block").hidden = answer.suggestions.length === 0;
    const note = $("review-note");
    note.hidden = answer.review === null;
    if (answer.review) {
      note.className = "small " + (answer.review.queued ? "ok" : "bad");
      note.textContent = answer.review.queued
        ? `Sent to a person for review (sheet ${answer.review.id.slice(0, 8)}).`
        : `Not sent for review: ${answer.review.reason}.`;
    }
    $("marked").src = answer.marked;
    if (answer.turned) announce.textContent += ` (The photo lay turned ${answer.turned}\u00b0; it was read upright.)`;
    result.hidden = false;
  }

  async function read(file) {
    showError("");
    document.body.dataset.state = "reading";
    announce.textContent = "Reading the sheet\u2026";
    try {
      const response = await fetch("/api/read-sheet", {
        method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
      let answer = null;
      try { answer = await response.json(); } catch (_) { /* not JSON: said below */ }
      if (!response.ok) throw new Error((answer && answer.error) || `the app answered ${response.status}`);
      show(answer);
      document.body.dataset.state = "done";
    } catch (error) {
      result.hidden = true;
      announce.textContent = "No sheet read.";
      showError(error.name === "TimeoutError" ? "The app took too long to answer: try again." : error.message);
      document.body.dataset.state = "error";
    }
  }

  upload.addEventListener("change", () => {
    if (upload.files.length) read(upload.files[0]);
    upload.value = "";
  });
})();
