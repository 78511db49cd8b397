// The reviewers' pages (review.js, review-sheets.js): every call carries the token the reviewer typed, kept
// for this tab only (sessionStorage), one token for both pages. A 401 forgets it and shows the login again.
"use strict";

window.DigitsReview = (() => {
  const REQUEST_TIMEOUT_MS = 20000;
  const TOKEN_KEY = "digits-review-token";

  async function call(method, path, body, login) {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const response = await fetch(path, {
      method,
      headers: Object.assign({ "Authorization": "Bearer " + token },
                             body ? { "Content-Type": "application/json" } : {}),
      body: body ? JSON.stringify(body) : undefined,
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
    });
    let document_ = null;
    try { document_ = await response.json(); } catch (_) { /* not JSON: said below */ }
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      login.hidden = false;
      throw new Error("that token is not the review token");
    }
    if (!response.ok) throw new Error((document_ && document_.error) || `the app answered ${response.status}`);
    return document_;
  }

  // The login form: on submit, keeps the token and calls `load`; calls it at once if a token is kept.
  function start(login, tokenInput, load) {
    login.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
      tokenInput.value = "";
      load();
    });
    if (sessionStorage.getItem(TOKEN_KEY)) load();
  }

  // A 28x28 image as rows of 8-bit gray, painted on its canvas.
  function paint(canvas, pixels) {
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(28, 28);
    pixels.forEach((row, y) => row.forEach((value, x) => {
      const at = (y * 28 + x) * 4;
      image.data[at] = image.data[at + 1] = image.data[at + 2] = value;
      image.data[at + 3] = 255;
    }));
    ctx.putImageData(image, 0, 0);
  }

  return { call, start, paint };
})();
