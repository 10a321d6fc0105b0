// The live chart of one symbol: history from GET /ticks/{symbol}, then every new
// tick from GET /ticks/stream (Server-Sent Events read with fetch(), because
// EventSource cannot send an Authorization header). No build step, no library.
//
// Prices stay the exact decimal strings the API sends: they become Numbers only
// to place pixels; every label shows the string itself.
(() => {
  "use strict";

  const HISTORY_LIMIT = 1000; // ticks loaded at start (and after a gap)
  const MAX_POINTS = 5000; // the oldest are dropped beyond this
  // The first event stream starts this long before the history was read, so that
  // ticks accepted but not yet flushed to Postgres at that moment are drawn too.
  const REPLAY_MS = 10000;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 30000;
  // Not a byte, not even a heartbeat, for this long: the connection is dead.
  const IDLE_TIMEOUT_MS = 60000;
  const TOKEN_KEY = "tickpipe.readToken";

  const LINE_COLOUR = "#0a63d6";
  const AXIS_COLOUR = "#c7c7cc";
  const LABEL_COLOUR = "#3a3a3c";
  const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif';

  const body = document.body;
  const symbol = body.dataset.symbol;
  const canvas = document.getElementById("chart");
  const statusLine = document.getElementById("status");
  const latestPrice = document.getElementById("latest");
  const latestTs = document.getElementById("latest-ts");
  const count = document.getElementById("count");
  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token-input");

  // Relative URLs: the page also works behind a proxy that adds a path prefix.
  const historyUrl = new URL(`../ticks/${encodeURIComponent(symbol)}?limit=${HISTORY_LIMIT}`, location.href);
  const streamUrl = new URL(`../ticks/stream?symbols=${encodeURIComponent(symbol)}`, location.href);

  /** Points sorted by ts; a tick with the same ts replaces the point (last write wins). */
  let points = [];
  let lastEventId = null;
  let run = null; // the current connection loop; replaced when the token changes
  let drawPending = false;

  class AuthError extends Error {}
  class FatalError extends Error {}
  class RetryableError extends Error {
    constructor(message, retryAfterMs) {
      super(message);
      this.retryAfterMs = retryAfterMs;
    }
  }

  // -- status and token --------------------------------------------------------------

  function setStatus(state, text) {
    body.dataset.state = state;
    statusLine.textContent = text;
  }

  /** The read token: from the URL fragment (then moved out of it), else this tab's storage. */
  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      fragment.delete("token");
      const rest = fragment.toString();
      // Out of the address bar and the session history.
      history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function askForToken(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    setStatus("token", reason);
    tokenForm.hidden = false;
    tokenInput.focus();
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenInput.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    tokenInput.value = "";
    tokenForm.hidden = true;
    start();
  });

  // -- points ------------------------------------------------------------------------

  /** Epoch milliseconds (with the microseconds as a fraction) of an API timestamp. */
  function parseTs(ts) {
    // The API writes "YYYY-MM-DDTHH:MM:SS.ffffffZ"; Date.parse takes milliseconds only.
    return Date.parse(`${ts.slice(0, 23)}Z`) + Number(ts.slice(23, 26)) / 1000;
  }

  function toPoint(tick) {
    return { ts: tick.ts, t: parseTs(tick.ts), price: tick.price, p: Number(tick.price) };
  }

  /** Insert by ts; the fixed-width RFC 3339 strings sort as the times they name. */
  function addPoint(point) {
    const last = points[points.length - 1];
    if (!last || point.ts > last.ts) {
      points.push(point);
    } else {
      let lo = 0;
      let hi = points.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (points[mid].ts < point.ts) lo = mid + 1;
        else hi = mid;
      }
      if (points[lo].ts === point.ts) points[lo] = point;
      else points.splice(lo, 0, point);
    }
    if (points.length > MAX_POINTS) points.splice(0, points.length - MAX_POINTS);
  }

  // -- requests ----------------------------------------------------------------------

  function headers(token, extra) {
    return { Authorization: `Bearer ${token}`, ...extra };
  }

  /** Turn a refused request into the error that says what to do next. */
  async function refusal(response) {
    let detail = response.statusText;
    try {
      const answer = await response.json();
      detail = answer.detail || answer.error || detail;
    } catch (_) {
      // not JSON: keep the status text
    }
    if (response.status === 401 || response.status === 403) {
      return new AuthError(`token refused (${response.status}): ${detail}`);
    }
    if (response.status === 429 || response.status >= 500) {
      const seconds = Number(response.headers.get("Retry-After"));
      return new RetryableError(`${response.status}: ${detail}`, seconds > 0 ? seconds * 1000 : null);
    }
    return new FatalError(`${response.status}: ${detail}`);
  }

  /** Merge the newest ticks from Postgres; the server's clock (ms) at that moment. */
  async function loadHistory(token, signal) {
    const response = await fetch(historyUrl, { headers: headers(token), signal, cache: "no-store" });
    if (!response.ok) throw await refusal(response);
    const page = await response.json();
    for (const tick of page.ticks) addPoint(toPoint(tick));
    scheduleDraw();
    const serverNow = Date.parse(response.headers.get("Date") || "");
    return Number.isNaN(serverNow) ? Date.now() : serverNow;
  }

  /** Server-Sent Events parsing (the WHATWG rules) of a text stream fed in chunks. */
  class EventParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buffer = "";
      this.skipLf = false; // a chunk ended in "\r": a "\n" opening the next one belongs to it
      this.reset();
    }

    reset() {
      this.type = "";
      this.data = [];
      this.id = null;
    }

    feed(chunk) {
      if (this.skipLf && chunk.startsWith("\n")) chunk = chunk.slice(1);
      this.skipLf = chunk.endsWith("\r");
      const lines = (this.buffer + chunk).split(/\r\n|\r|\n/);
      this.buffer = lines.pop();
      for (const line of lines) this.line(line);
    }

    line(line) {
      if (line === "") {
        this.dispatch();
        return;
      }
      if (line.startsWith(":")) return; // a comment: the server's heartbeat
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.type = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id" && !value.includes("\0")) this.id = value;
    }

    dispatch() {
      const { type, data, id } = this;
      this.reset();
      if (data.length) this.onEvent(type || "message", data.join("\n"), id);
    }
  }

  /** Sleep for ``ms`` unless ``signal`` aborts first. */
  function pause(ms, signal) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done);
    });
  }

  function backoffMs(attempt) {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    return ceiling / 2 + Math.random() * (ceiling / 2); // jitter: clients do not return in step
  }

  /** One event-stream connection, until it ends; resolves when it ends cleanly. */
  async function followOnce(token, signal, onConnected) {
    const connection = new AbortController();
    const abort = () => connection.abort();
    signal.addEventListener("abort", abort);
    let idle = null;
    let silent = false;
    const touch = () => {
      clearTimeout(idle);
      idle = setTimeout(() => {
        silent = true;
        abort();
      }, IDLE_TIMEOUT_MS);
    };
    try {
      touch();
      const extra = { Accept: "text/event-stream" };
      if (lastEventId) extra["Last-Event-ID"] = lastEventId;
      const response = await fetch(streamUrl, {
        headers: headers(token, extra),
        signal: connection.signal,
        cache: "no-store",
      });
      if (!response.ok) throw await refusal(response);
      onConnected();
      const parser = new EventParser(onEvent);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        touch();
        parser.feed(value);
      }
    } catch (error) {
      if (silent) throw new RetryableError(`no heartbeat for ${IDLE_TIMEOUT_MS / 1000} s`, null);
      throw error;
    } finally {
      clearTimeout(idle);
      signal.removeEventListener("abort", abort);
    }
  }

  function onEvent(type, data, id) {
    if (type === "tick") {
      let tick = null;
      try {
        tick = JSON.parse(data);
      } catch (_) {
        console.warn("skipping an event that is not JSON:", id); // resuming would not help
      }
      if (tick && tick.symbol === symbol) addPoint(toPoint(tick));
      scheduleDraw();
    } else if (type === "gap") {
      // The stream no longer holds every tick after our position: Postgres does.
      body.dataset.gaps = String(Number(body.dataset.gaps || 0) + 1);
      reloadAfterGap();
    }
    if (id !== null) lastEventId = id;
  }

  async function reloadAfterGap() {
    const current = run;
    try {
      await loadHistory(current.token, current.controller.signal);
      if (run === current && body.dataset.state === "connected") {
        setStatus("connected", "connected (history reloaded after a gap)");
      }
    } catch (error) {
      if (run === current && !current.controller.signal.aborted) {
        setStatus("error", `could not reload history after a gap: ${error.message}`);
      }
    }
  }

  /** Load history, then follow the stream: reconnect with backoff, resume by event id. */
  async function connect(current) {
    const { token, controller } = current;
    const signal = controller.signal;
    let attempt = 0;
    let loaded = false;
    while (!signal.aborted) {
      let wait = null;
      try {
        if (!loaded) {
          setStatus(attempt ? "reconnecting" : "loading", "loading history…");
          const serverNow = await loadHistory(token, signal);
          loaded = true;
          lastEventId = lastEventId || `${Math.max(0, serverNow - REPLAY_MS)}-0`;
        }
        await followOnce(token, signal, () => {
          attempt = 0;
          setStatus("connected", "connected");
        });
        if (signal.aborted) return;
        wait = backoffMs(attempt);
        setStatus("reconnecting", "stream ended; reconnecting…");
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof AuthError) {
          askForToken(error.message);
          return;
        }
        if (error instanceof FatalError) {
          setStatus("error", `error: ${error.message}`);
          return;
        }
        wait = (error instanceof RetryableError && error.retryAfterMs) || backoffMs(attempt);
        setStatus("reconnecting", `${error.message}; retrying in ${Math.ceil(wait / 1000)} s…`);
      }
      attempt += 1;
      await pause(wait, signal);
    }
  }

  function start() {
    if (run) run.controller.abort();
    run = null;
    const token = takeToken();
    if (!token) {
      askForToken("a read token is needed");
      return;
    }
    run = { token, controller: new AbortController() };
    connect(run);
  }

  // -- drawing -----------------------------------------------------------------------

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      draw();
    });
  }

  /** "2024-05-01T12:00:00.000000Z" as "2024-05-01 12:00:00.000000 UTC". */
  function timeLabel(ts) {
    return `${ts.slice(0, 10)} ${ts.slice(11, -1)} UTC`;
  }

  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = FONT;
    ctx.fillStyle = LABEL_COLOUR;
    canvas.dataset.points = String(points.length);
    if (!points.length) {
      ctx.textAlign = "center";
      ctx.fillText("no ticks yet", width / 2, height / 2);
      return;
    }

    let low = points[0];
    let high = points[0];
    for (const point of points) {
      if (point.p < low.p) low = point;
      if (point.p > high.p) high = point;
    }
    const first = points[0];
    const last = points[points.length - 1];

    const left = Math.ceil(Math.max(ctx.measureText(high.price).width, ctx.measureText(low.price).width)) + 16;
    const right = 16;
    const top = 12;
    const bottom = 28;
    const plotWidth = Math.max(1, width - left - right);
    const plotHeight = Math.max(1, height - top - bottom);
    const span = last.t - first.t;
    const range = high.p - low.p;
    const x = (point) => left + (span > 0 ? ((point.t - first.t) / span) * plotWidth : plotWidth / 2);
    const y = (point) => top + (range > 0 ? ((high.p - point.p) / range) * plotHeight : plotHeight / 2);

    // Frame, then the exact strings of the lowest and highest price and the time range.
    ctx.strokeStyle = AXIS_COLOUR;
    ctx.lineWidth = 1;
    ctx.strokeRect(left - 0.5, top - 0.5, plotWidth + 1, plotHeight + 1);
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(high.price, left - 8, top);
    ctx.fillText(low.price, left - 8, top + plotHeight);
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.fillText(timeLabel(first.ts), left, top + plotHeight + 8);
    ctx.textAlign = "right";
    ctx.fillText(timeLabel(last.ts), left + plotWidth, top + plotHeight + 8);

    ctx.strokeStyle = LINE_COLOUR;
    ctx.fillStyle = LINE_COLOUR;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    points.forEach((point, i) => (i ? ctx.lineTo(x(point), y(point)) : ctx.moveTo(x(point), y(point))));
    ctx.stroke();
    // A dot per tick while there is room for it, and always one on the latest.
    const dots = points.length * 6 <= plotWidth ? points : [last];
    for (const point of dots) {
      ctx.beginPath();
      ctx.arc(x(point), y(point), point === last ? 4 : 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }

    latestPrice.textContent = last.price;
    latestTs.textContent = timeLabel(last.ts);
    count.textContent = `· ${points.length} ${points.length === 1 ? "tick" : "ticks"}`;
    document.title = `${symbol} ${last.price} · tickpipe`;
    Object.assign(canvas.dataset, { low: low.price, high: high.price, first: first.ts, last: last.ts });
    canvas.setAttribute(
      "aria-label",
      `price of ${symbol}: ${points.length} ticks from ${timeLabel(first.ts)} to ${timeLabel(last.ts)},` +
        ` low ${low.price}, high ${high.price}, latest ${last.price}`,
    );
  }

  window.addEventListener("resize", scheduleDraw);
  scheduleDraw();
  start();
})();
