// The sheet reviewers' page: the oldest sheet waiting, its marked photo and, for every box, the image the
// model classified and an input holding the model's digit. Boxes to check are marked and focused first; the
// counts and the form's sums are worked out again as the reviewer types. "Confirm" sends every box as read.
// The token and the calls: review-auth.js. No external resource: the CSP forbids it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const login = $("login"), tokenInput = $("token"), errorBox = $("error"), empty = $("empty");
  const sheetView = $("sheet"), status = $("status"), form = $("boxes-form");
  const { paint } = window.DigitsReview;
  const view = window.DigitsSheet;
  let current = null;  // the sheet shown: {id, form, inputs: {countId: [input, ...]}}

  const call = (method, path, body) => window.DigitsReview.call(method, path, body, login);

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  function showCounts(counts) {
    $("counts").textContent = `${counts.pending} waiting, ${counts.confirmed} confirmed, ${counts.rejected} rejected.`;
  }

  // The number a count's boxes spell, as the server will read it: null when nothing is written, NaN when the
  // boxes spell no number (an empty box inside it, or the units box empty).
  function value(digits, emptyBox) {
    if (emptyBox === "zero") return Number(digits.map((d) => d === null ? 0 : d).join(""));
    const written = digits.map((d, i) => d === null ? -1 : i).filter((i) => i >= 0);
    if (!written.length) return null;
    const first = written[0], last = written[written.length - 1];
    if (last !== digits.length - 1 || written.length !== last - first + 1) return NaN;
    return Number(digits.slice(first).join(""));
  }

  function digitsOf(inputs) {
    return inputs.map((input) => input.value === "" ? null : Number(input.value));
  }

  function recompute() {
    const values = {};
    for (const count of current.form.counts) {
      const v = value(digitsOf(current.inputs[count.id]), current.form.empty_box);
      values[count.id] = v;
      const cell = sheetView.querySelector(`tr[data-count="${count.id}"] .value`);
      cell.textContent = v === null ? "none" : Number.isNaN(v) ? "not a number" : String(v);
      cell.classList.toggle("look", Number.isNaN(v));
    }
    const checks = current.form.checks.map((check) => {
      const parts = [...check.terms, check.total].map((id) => values[id]);
      if (parts.some((v) => v === null || Number.isNaN(v))) return { ...check, holds: null };
      const sum = check.terms.reduce((total, id) => total + values[id], 0);
      return { ...check, sum, total: values[check.total], holds: sum === values[check.total] };
    });
    $("checks").replaceChildren(...checks.map(view.checkItem));
    const bad = Object.values(values).some((v) => Number.isNaN(v));
    $("confirm").disabled = bad;
    $("confirm").textContent = checks.every((c) => c.holds !== false) ? "Confirm these counts"
      : "Confirm: the form itself does not add up";
  }

  function boxInput(count, index, reading, look, cells) {
    const wrap = document.createElement("label");
    wrap.className = "box-edit" + (look ? " look" : "") + (reading === null ? " blank" : "");
    const cell = cells[`${count.id}.${index + 1}`];
    if (cell) {
      const canvas = document.createElement("canvas");
      canvas.width = canvas.height = 28;
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", `box ${index + 1} as the model saw it`);
      paint(canvas, cell);
      wrap.append(canvas);
    } else {  // the same room as an image, so that a count's inputs stand in one line as its boxes do
      const none = document.createElement("span");
      none.className = "no-cell small muted";
      none.textContent = "empty";
      wrap.append(none);
    }
    const input = document.createElement("input");
    input.type = "text";
    input.inputMode = "numeric";
    input.maxLength = 1;
    input.pattern = "[0-9]?";
    input.autocomplete = "off";
    input.value = reading === null ? "" : String(reading.digit);
    input.setAttribute("aria-label", `${count.label}, box ${index + 1}` + (look ? " (check it)" : "") +
                       (reading === null ? ", read as empty" : `, read as ${reading.digit}`));
    input.addEventListener("input", () => {
      input.value = input.value.replace(/[^0-9]/g, "").slice(-1);
      recompute();
    });
    wrap.append(input);
    if (reading !== null && (look || reading.decision !== "accepted")) {  // what the model said, where it matters
      const said = document.createElement("span");
      said.className = "said small muted";
      said.textContent = view.box(reading, look).title;
      wrap.append(said);
    }
    return { wrap, input };
  }

  function show(sheet) {
    const reading = sheet.reading;
    current = { id: sheet.id, form: sheet.form, inputs: {} };
    $("sheet-id").textContent = sheet.id.slice(0, 8);
    $("sheet-meta").textContent = `Read ${sheet.time.replace("T", " ").slice(0, 19)} UTC by model version ` +
                                  `${sheet.model_version ?? "?"}: ${reading.verdict.replace("_", " ")}.`;
    const labels = {};
    const rows = sheet.form.counts.map((count) => {
      labels[count.id] = count.label;
      const read = reading.counts[count.id];
      const tr = document.createElement("tr");
      tr.dataset.count = count.id;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = count.label;
      const boxes = document.createElement("td");
      boxes.className = "boxes";
      current.inputs[count.id] = read.boxes.map((box, index) => {
        const { wrap, input } = boxInput(count, index, box, read.review_boxes.includes(index + 1), sheet.cells);
        boxes.append(wrap);
        return input;
      });
      const total = document.createElement("td");
      total.className = "value";
      tr.append(name, boxes, total);
      return tr;
    });
    $("counts-table").tBodies[0].replaceChildren(...rows);
    $("suggestions").replaceChildren(...reading.suggestions.map((suggestion) => {
      const li = document.createElement("li");
      const use = document.createElement("button");
      use.type = "button";
      use.textContent = "Use";
      use.addEventListener("click", () => {
        for (const [id, [, suggested]] of Object.entries(suggestion.changes)) {
          const inputs = current.inputs[id], text = String(suggested);
          inputs.forEach((input, i) => {
            const at = i - (inputs.length - text.length);
            input.value = at >= 0 ? text[at] : "";
          });
        }
        recompute();
      });
      li.append(use, " " + view.suggestionText(suggestion, labels));
      return li;
    }));
    $("suggestions-block").hidden = reading.suggestions.length === 0;
    $("marked").src = sheet.marked;
    status.textContent = "";
    sheetView.hidden = false;
    recompute();
    const first = sheetView.querySelector(".box-edit.look input");
    if (first) first.focus({ preventScroll: true });
  }

  async function load() {
    showError("");
    try {
      const queue = await call("GET", "/api/sheets?limit=1");
      login.hidden = true;
      showCounts(queue.counts);
      empty.hidden = queue.pending.length > 0;
      if (!queue.pending.length) {
        sheetView.hidden = true;
        current = null;
        document.body.dataset.state = "empty";
        return;
      }
      show(await call("GET", `/api/sheets/${queue.pending[0].id}`));
      document.body.dataset.state = "shown";
      document.body.dataset.sheet = current.id;
    } catch (error) {
      showError(`Cannot load the sheets: ${error.message}.`);
      document.body.dataset.state = "error";
    }
  }

  async function decide(verdict) {
    const buttons = [$("confirm"), $("reject")];
    buttons.forEach((button) => { button.disabled = true; });
    status.textContent = "";
    try {
      const body = { id: current.id, verdict };
      if (verdict === "confirmed") {
        body.boxes = Object.fromEntries(Object.entries(current.inputs).map(([id, inputs]) => [id, digitsOf(inputs)]));
      }
      const result = await call("POST", "/api/sheets", body);
      showCounts(result.counts);
      await load();
    } catch (error) {
      status.textContent = `Not saved: ${error.message}. Try again.`;
      status.className = "small bad";
      buttons.forEach((button) => { button.disabled = false; });
      recompute();
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    decide("confirmed");
  });
  $("reject").addEventListener("click", () => decide("rejected"));
  window.DigitsReview.start(login, tokenInput, load);
})();
