// The digits page: a drawing pad (Pointer Events: mouse, touch and pen), an upload, the model's answer
// and the correction. Everything the model does (normalisation included) happens on the model server;
// the page only sends the image and shows what comes back. No external resource: the CSP forbids it.
"use strict";

(() => {
  const EXPORT_SIZE = 280;        // the drawing is sent as a 280x280 PNG, whatever the screen's pixel ratio
  const STROKE = 0.075;           // pen width as a share of the pad: about MNIST's strokes once normalised
  const REQUEST_TIMEOUT_MS = 20000;
  const MAX_UPLOAD_BYTES = 4 * 1024 * 1024;

  const $ = (id) => document.getElementById(id);
  const pad = $("pad"), hint = $("pad-hint"), undoButton = $("undo"), clearButton = $("clear"), upload = $("upload");
  const announce = $("announce"), errorBox = $("error"), details = $("details"), bars = $("bars");
  const seen = $("seen"), versionText = $("model-version"), elapsedText = $("elapsed");
  const rightButton = $("right"), digitButtons = $("digits"), feedbackStatus = $("feedback-status");

  let strokes = [];               // each a list of [x, y] in 0..1 pad coordinates
  let current = null;             // the stroke being drawn, and its pointer
  let uploaded = null;            // an uploaded image shown on the pad (an ImageBitmap), or null
  let inFlight = null;            // AbortController of the request whose answer the page waits for
  let answer = null;              // the answer shown now
  let pointerUpAt = null;         // for the latency the page reports (pointer up -> answer shown)

  // -- the pad ------------------------------------------------------------------------------------

  const context = pad.getContext("2d");

  function fitToScreen() {
    // A backing store of the pad's CSS size times the pixel ratio: sharp on high-DPI screens.
    const ratio = window.devicePixelRatio || 1;
    const size = Math.round(pad.getBoundingClientRect().width * ratio) || EXPORT_SIZE;
    if (pad.width !== size) { pad.width = size; pad.height = size; }
    render(context, size);
  }

  function render(ctx, size) {
    ctx.save();
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, size, size);
    if (uploaded) {
      const scale = Math.min(size / uploaded.width, size / uploaded.height);
      const w = uploaded.width * scale, h = uploaded.height * scale;
      ctx.drawImage(uploaded, (size - w) / 2, (size - h) / 2, w, h);
    }
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    ctx.lineWidth = STROKE * size;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const stroke of strokes) drawStroke(ctx, stroke, size);
    ctx.restore();
  }

  function drawStroke(ctx, stroke, size) {
    if (stroke.length === 1) {  // a tap is a dot
      ctx.beginPath();
      ctx.arc(stroke[0][0] * size, stroke[0][1] * size, (STROKE * size) / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(stroke[0][0] * size, stroke[0][1] * size);
    for (let i = 1; i < stroke.length; i++) ctx.lineTo(stroke[i][0] * size, stroke[i][1] * size);
    ctx.stroke();
  }

  function point(event) {
    const box = pad.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - box.left) / box.width), clamp((event.clientY - box.top) / box.height)];
  }

  pad.addEventListener("pointerdown", (event) => {
    if (current || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    if (uploaded) { uploaded = null; strokes = []; }   // drawing after an upload starts a new drawing
    pad.setPointerCapture(event.pointerId);
    current = { id: event.pointerId, stroke: [point(event)] };
    strokes.push(current.stroke);
    changed();
  });

  pad.addEventListener("pointermove", (event) => {
    if (!current || event.pointerId !== current.id) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const e of (events.length ? events : [event])) current.stroke.push(point(e));
    render(context, pad.width);
  });

  function endStroke(event) {
    if (!current || event.pointerId !== current.id) return;
    current = null;
    pointerUpAt = performance.now();
    waitForNewAnswer();
    classifyDrawing();
  }

  function waitForNewAnswer() {
    // From now on only the answer to the newest image may be shown.
    if (inFlight) { inFlight.abort(); inFlight = null; }
    document.body.dataset.state = "busy";
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function changed() {
    render(context, pad.width);
    const empty = strokes.length === 0 && !uploaded;
    hint.classList.toggle("hidden", !empty);
    undoButton.disabled = strokes.length === 0;
    clearButton.disabled = empty;
  }

  undoButton.addEventListener("click", () => {
    strokes.pop();
    changed();
    if (strokes.length || uploaded) { pointerUpAt = performance.now(); waitForNewAnswer(); classifyDrawing(); }
    else reset();
  });

  clearButton.addEventListener("click", () => {
    strokes = []; uploaded = null;
    changed();
    reset();
  });

  function exportDrawing() {
    const canvas = document.createElement("canvas");
    canvas.width = EXPORT_SIZE; canvas.height = EXPORT_SIZE;
    render(canvas.getContext("2d"), EXPORT_SIZE);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  async function classifyDrawing() {
    if (uploaded && !strokes.length) return;  // an upload is sent as its file, not as the pad's pixels
    const blob = await exportDrawing();
    classify(blob);
  }

  // -- upload --------------------------------------------------------------------------------------

  upload.addEventListener("change", async () => {
    const file = upload.files && upload.files[0];
    upload.value = "";
    if (!file) return;
    if (!["image/png", "image/jpeg"].includes(file.type)) return showError(`${file.name} is not a PNG or JPEG image.`);
    if (file.size > MAX_UPLOAD_BYTES) return showError(`${file.name} is larger than 4 MB.`);
    try {
      uploaded = await createImageBitmap(file);
    } catch (e) {
      uploaded = null;
      return showError(`${file.name} cannot be read as an image.`);
    }
    strokes = [];
    changed();
    pointerUpAt = performance.now();
    waitForNewAnswer();
    classify(file);  // the file itself, as it is: the model server normalises it
  });

  // -- asking the model ----------------------------------------------------------------------------

  async function classify(blob) {
    if (inFlight) inFlight.abort();   // only the newest drawing's answer is shown
    const controller = new AbortController();
    inFlight = controller;
    const timer = setTimeout(() => controller.abort("timeout"), REQUEST_TIMEOUT_MS);
    document.body.dataset.state = "busy";
    announce.textContent = "Asking the model\u2026";
    try {
      const response = await fetch("/api/predict", {
        method: "POST", body: blob, signal: controller.signal,
        headers: { "Content-Type": blob.type || "application/octet-stream" },
      });
      const body = await response.json().catch(() => ({ error: `HTTP ${response.status} from the web app` }));
      if (controller !== inFlight) return;
      if (!response.ok) return showError(explain(response.status, body.error));
      show(body);
    } catch (e) {
      if (controller !== inFlight) return;
      showError(controller.signal.aborted
        ? "The model took longer than 20 seconds to answer; try again in a moment."
        : "The web app cannot be reached; check your connection and try again.");
    } finally {
      clearTimeout(timer);
      if (controller === inFlight) inFlight = null;
    }
  }

  function explain(status, message) {
    if (status === 503) return `The model server is not answering right now (${message}). Try again in a moment.`;
    if (status === 504) return `The model server is too slow right now (${message}). Try again in a moment.`;
    if (status === 422) return "There is no digit to read: the image has no ink. Draw or upload a digit.";
    return message || `The web app answered HTTP ${status}.`;
  }

  function showError(message) {
    answer = null;
    details.hidden = true;
    errorBox.textContent = message;
    errorBox.hidden = false;
    announce.textContent = "No answer.";
    document.body.dataset.state = "error";
  }

  function reset() {
    if (inFlight) { inFlight.abort(); inFlight = null; }
    answer = null;
    details.hidden = true;
    errorBox.hidden = true;
    announce.textContent = "Draw or upload a digit.";
    document.body.dataset.state = "idle";
  }

  // -- the answer ----------------------------------------------------------------------------------

  const percent = (p) => `${(100 * p).toFixed(1)}%`;
  const a = (digit) => (digit === 8 ? "an" : "a"); // "an 8", "a 3"

  function buildBars() {
    for (let digit = 0; digit < 10; digit++) {
      const item = document.createElement("li");
      item.dataset.digit = String(digit);
      item.innerHTML = '<span class="digit"></span><span class="track"><span class="fill"></span></span>' +
        '<span class="pct"></span><span class="visually-hidden top-note"></span>';
      item.querySelector(".digit").textContent = String(digit);
      bars.appendChild(item);
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = String(digit);
      button.dataset.digit = String(digit);
      button.setAttribute("aria-label", `It is ${a(digit)} ${digit}`);
      button.addEventListener("click", () => sendFeedback(digit));
      digitButtons.appendChild(button);
    }
  }

  function show(body) {
    answer = body;
    errorBox.hidden = true;
    // The model's own verdict (models without one answer everything: "accepted").
    const verdict = body.decision || "accepted";
    document.body.dataset.decision = verdict;
    announce.innerHTML = "";
    const strong = (digit) => {
      const element = document.createElement("strong");
      element.textContent = String(digit);
      return element;
    };
    if (verdict === "not_a_digit") {
      announce.append("That does not look like a digit. If it is one, which is it?");
    } else if (verdict === "unsure") {
      announce.append(`Not sure: is it ${a(body.digit)} `, strong(body.digit), ` or ${a(body.runner_up)} `,
        strong(body.runner_up), "?");
    } else {
      announce.append(`It is ${a(body.digit)} `, strong(body.digit), ` (${percent(body.confidence)} sure).`);
    }
    for (const item of bars.children) {
      const digit = Number(item.dataset.digit), p = body.probabilities[digit];
      item.dataset.probability = String(p);
      item.classList.toggle("top", digit === body.digit);
      item.querySelector(".fill").style.width = `${(100 * p).toFixed(2)}%`;
      item.querySelector(".pct").textContent = percent(p);
      item.querySelector(".top-note").textContent = digit === body.digit ? " (the model's answer)" : "";
    }
    drawSeen(body.normalized_image);
    versionText.textContent = `${body.model_name} version ${body.model_version}`;
    versionText.dataset.version = String(body.model_version);
    document.body.dataset.answerId = body.id;
    elapsedText.textContent = `${Math.round(body.elapsed_ms)} ms`;
    rightButton.textContent = `${verdict === "accepted" ? "Yes, it" : "It"} is ${a(body.digit)} ${body.digit}`;
    rightButton.hidden = verdict === "not_a_digit";
    // The model asked (unsure) or refused: the person is asked for the digit, not told the model was wrong.
    $("wrong-label").textContent = verdict === "accepted" ? "Wrong? It is a:" : "Which digit is it?";
    rightButton.disabled = verdict === "not_a_digit";
    for (const button of digitButtons.children) {
      button.disabled = verdict !== "not_a_digit" && Number(button.dataset.digit) === body.digit;
    }
    feedbackStatus.textContent = "";
    feedbackStatus.className = "small";
    details.hidden = false;
    if (pointerUpAt !== null) document.body.dataset.latencyMs = (performance.now() - pointerUpAt).toFixed(1);
    document.body.dataset.state = "done";
  }

  function drawSeen(rows) {
    const ctx = seen.getContext("2d");
    const image = ctx.createImageData(28, 28);
    rows.forEach((row, y) => row.forEach((value, x) => {
      const i = 4 * (28 * y + x);
      image.data[i] = image.data[i + 1] = image.data[i + 2] = value;
      image.data[i + 3] = 255;
    }));
    ctx.putImageData(image, 0, 0);
  }

  // -- feedback ------------------------------------------------------------------------------------

  async function sendFeedback(digit) {
    if (!answer) return;
    const buttons = [rightButton, ...digitButtons.children];
    const enabled = buttons.map((b) => !b.disabled);
    buttons.forEach((b) => { b.disabled = true; });
    feedbackStatus.className = "small";
    feedbackStatus.textContent = "Saving\u2026";
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort("timeout"), REQUEST_TIMEOUT_MS);
    let final = false;  // judged (or the answer is gone): the buttons stay disabled
    try {
      const response = await fetch("/api/feedback", {
        method: "POST", headers: { "Content-Type": "application/json" }, signal: controller.signal,
        body: JSON.stringify({ id: answer.id, digit }),
      });
      const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      final = response.ok || response.status === 409 || response.status === 410;
      if (!response.ok) throw new Error(body.error);
      feedbackStatus.textContent = body.message;
      feedbackStatus.classList.add("ok");
    } catch (e) {
      const why = controller.signal.aborted ? "the web app did not answer within 20 seconds"
        : e instanceof TypeError ? "the web app cannot be reached" : e.message;
      feedbackStatus.textContent = `Not saved: ${why}.` + (final ? "" : " Try again.");
      feedbackStatus.classList.add("bad");
    } finally {
      clearTimeout(timer);
      if (!final) buttons.forEach((b, i) => { b.disabled = !enabled[i]; });
    }
  }
  rightButton.addEventListener("click", () => answer && sendFeedback(answer.digit));

  // -- start ---------------------------------------------------------------------------------------

  async function modelStatus() {
    const status = $("model-status");
    try {
      const response = await fetch("/api/model");
      const body = await response.json();
      if (!response.ok) throw new Error(body.error);
      status.textContent = body.versions.length
        ? `Model: ${body.model_name}, version ${body.versions[body.versions.length - 1]}.`
        : `Model: ${body.model_name}, no version loaded yet.`;
    } catch (e) {
      status.textContent = "Model server: not answering right now.";
    }
  }

  buildBars();
  window.addEventListener("resize", fitToScreen);
  fitToScreen();
  changed();
  reset();
  modelStatus();
})();
