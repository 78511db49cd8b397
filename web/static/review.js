// The reviewers' page: the pending corrections, each with the 28x28 image the model saw, accepted
// (as proposed or as another digit) or rejected. The token and the calls: review-auth.js. No external
// resource: the CSP forbids it.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const login = $("login"), tokenInput = $("token"), errorBox = $("error");
  const queue = $("queue"), empty = $("empty"), countsText = $("counts");
  const { paint } = window.DigitsReview;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  const call = (method, body) =>
    window.DigitsReview.call(method, "/api/review" + (method === "GET" ? "?limit=100" : ""), body, login);

  function showCounts(counts) {
    countsText.textContent = `${counts.pending} waiting, ${counts.accepted} accepted, ${counts.rejected} rejected.`;
  }

  // The model's own verdict on its answer, in words that do not read as this page's "accept".
  const DECISION_WORDS = { accepted: "sure", unsure: "unsure", not_a_digit: "not a digit" };

  function modelSaid(item) {
    if (item.predicted === null || item.predicted === undefined) return "the model's answer is not known";
    const notes = [];
    if (item.confidence !== null && item.confidence !== undefined) {
      notes.push(`${(item.confidence * 100).toFixed(0)} %`);
    }
    if (item.decision) notes.push(DECISION_WORDS[item.decision] || item.decision);
    return `model said ${item.predicted}` + (notes.length ? ` (${notes.join(", ")})` : "");
  }

  function card(item) {
    const li = document.createElement("li");
    li.className = "card";
    li.dataset.id = item.id;
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 28;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `the image, proposed as ${item.digit}`);
    paint(canvas, item.pixels);
    const text = document.createElement("div");
    text.className = "card-text";
    const proposed = document.createElement("p");
    proposed.className = "proposed";
    proposed.textContent = `proposed: ${item.digit}`;
    const said = document.createElement("p");
    said.className = "muted small";
    said.textContent = modelSaid(item);
    const who = document.createElement("p");
    who.className = "muted small";
    who.textContent = `from ${item.client || "?"}, ${item.reports} report${item.reports === 1 ? "" : "s"}` +
                      (item.also && item.also.length ? ` (also proposed: ${item.also.join(", ")})` : "") +
                      `, ${item.time.replace("T", " ").slice(0, 19)} UTC`;
    const actions = document.createElement("div");
    actions.className = "actions";
    // The digit to accept it as: the proposal unless the reviewer picks another; the button says which,
    // and nothing is sent until it is pressed.
    const other = document.createElement("select");
    other.setAttribute("aria-label", "The digit it is");
    for (let d = 0; d < 10; d++) other.append(new Option(String(d), String(d), d === item.digit, d === item.digit));
    const accept = document.createElement("button");
    accept.type = "button";
    accept.className = "accept";
    accept.textContent = `Accept as ${item.digit}`;
    other.addEventListener("change", () => { accept.textContent = `Accept as ${other.value}`; });
    const reject = document.createElement("button");
    reject.type = "button";
    reject.className = "reject";
    reject.textContent = "Reject";
    actions.append(other, accept, reject);
    const status = document.createElement("p");
    status.className = "small card-status";
    text.append(proposed, said, who, actions, status);
    li.append(canvas, text);

    async function decide(verdict, digit) {
      for (const control of actions.children) control.disabled = true;
      status.textContent = "";
      try {
        const body = { id: item.id, verdict };
        if (digit !== undefined) body.digit = digit;
        const result = await call("POST", body);
        showCounts(result.counts);
        li.remove();
        empty.hidden = queue.children.length > 0;
      } catch (error) {
        status.textContent = `Not saved: ${error.message}. Try again.`;
        for (const control of actions.children) control.disabled = false;
      }
    }
    accept.addEventListener("click", () => {
      const digit = Number(other.value);
      decide("accepted", digit === item.digit ? undefined : digit);
    });
    reject.addEventListener("click", () => decide("rejected"));
    return li;
  }

  async function load() {
    showError("");
    try {
      const result = await call("GET");
      login.hidden = true;
      showCounts(result.counts);
      queue.replaceChildren(...result.pending.map(card));
      empty.hidden = result.pending.length > 0;
    } catch (error) {
      showError(`Cannot load the queue: ${error.message}.`);
    }
  }

  window.DigitsReview.start(login, tokenInput, load);
})();
