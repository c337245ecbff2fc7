// switchyard browser client: one logical connection to a user's event
// stream that survives drops. Dependency-free ES module (contract §12).
//
// - Reconnects with exponential backoff and full jitter between minDelayMs
//   and maxDelayMs; the backoff resets once a connection is welcomed.
// - Resumes with since/epoch by itself; a resume the broker cannot honour
//   (welcome.recovered === false) is reported as "resync".
// - Hands the app every event once, in the order the broker sent it (seq
//   order within a priority): duplicates from a replay are dropped, and a
//   hole that stays open (an event shed by the broker) is never passed over
//   silently: the client reconnects to have it replayed, or resyncs.
// - Detects dead WebSockets with application pings ({"type":"ping"}); a
//   browser cannot see a half-open TCP connection otherwise.
// - Falls back to Server-Sent Events (GET /sse, read with fetch so headers
//   and every event name work) when WebSocket upgrades keep failing.
// - Calls getToken() before every (re)connect, so a refused upgrade (401/403,
//   which browsers do not expose) is retried with a fresh token.

const DEFAULTS = {
  minDelayMs: 250,
  maxDelayMs: 15000,
  pingIntervalMs: 15000,
  transports: ["websocket", "sse"],
  // WebSocket attempts that fail before any welcome, in a row, before the
  // client falls back to SSE (when "sse" is among the transports).
  fallbackAfter: 2,
};

/** Opens a logical connection; see switchyard.d.ts for the surface. */
export function connect(url, options = {}) {
  return new Connection(url, { ...DEFAULTS, ...options });
}

class Connection {
  constructor(url, opts) {
    this.url = url;
    this.opts = opts;
    this.lastSeq = null; // highest seq with every event up to it handed over
    this.epoch = null;
    this.state = "connecting";
    this.transport = opts.transports[0] === "sse" ? "sse" : "websocket";
    this.attempts = 0; // connection attempts made (for backoff and tests)
    this._handlers = new Map();
    this._ahead = new Set(); // seqs above lastSeq already handed over
    this._failures = 0; // attempts in a row that ended before a welcome
    this._wsFailures = 0;
    this._closed = false;
    this._timer = null;
    this._socket = null; // WebSocket, or { abort } for SSE
    this._gapTimer = null;
    this._start(0);
  }

  /** Registers a callback for "open" | "event" | "resync" | "state" | "error". */
  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, []);
    this._handlers.get(name).push(fn);
    return this;
  }

  /** Closes for good: no reconnect after this. */
  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._clearGap();
    this._teardown();
    this._setState("closed");
  }

  _emit(name, value) {
    for (const fn of this._handlers.get(name) || []) {
      try {
        fn(value);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  _setState(s) {
    if (this.state === s) return;
    this.state = s;
    this._emit("state", s);
  }

  _start(delay) {
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._attempt(), delay);
  }

  async _attempt() {
    if (this._closed) return;
    this.attempts += 1;
    let token = this.opts.token;
    if (this.opts.getToken) {
      try {
        token = await this.opts.getToken();
      } catch (e) {
        this._emit("error", e);
        return this._retry();
      }
    }
    if (this._closed) return;
    const query = new URLSearchParams();
    if (token) query.set("token", token);
    else if (this.opts.user) query.set("user", this.opts.user);
    if (this.epoch !== null && this.lastSeq !== null) {
      query.set("since", String(this.lastSeq));
      query.set("epoch", this.epoch);
    }
    if (this.transport === "sse") this._openSse(query);
    else this._openWs(query);
  }

  // One connection attempt ended (or failed): reconnect after a backoff.
  _retry() {
    if (this._closed) return;
    this._teardown();
    this._clearGap();
    this._setState("reconnecting");
    const { minDelayMs, maxDelayMs } = this.opts;
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(this._failures, 30));
    this._failures += 1;
    // Full jitter: anywhere between the floor and the current cap.
    this._start(minDelayMs + Math.random() * Math.max(0, cap - minDelayMs));
  }

  _teardown() {
    const s = this._socket;
    this._socket = null;
    if (!s) return;
    clearInterval(s._pinger);
    clearTimeout(s._deadline);
    try {
      if (s.abort) s.abort();
      else s.close();
    } catch (_) {
      // already closed
    }
  }

  _openWs(query) {
    const ws = new WebSocket(`${this.url}?${query}`);
    this._socket = ws;
    let welcomed = false;
    let pingId = 0;
    let awaiting = null; // the ping id we wait a pong for
    ws.onmessage = (m) => {
      if (this._socket !== ws) return;
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      if (msg.type === "welcome") {
        welcomed = true;
        this._wsFailures = 0;
        this._welcome(msg);
        ws._pinger = setInterval(() => {
          if (awaiting !== null) {
            // No pong within a whole interval: the socket is dead.
            this._retry();
            return;
          }
          awaiting = ++pingId;
          ws.send(JSON.stringify({ type: "ping", id: awaiting }));
        }, this.opts.pingIntervalMs);
      } else if (msg.type === "pong") {
        if (msg.id === awaiting) awaiting = null;
      } else if (msg.type === "event") {
        this._event(msg);
      }
    };
    ws.onclose = () => {
      if (this._socket !== ws) return;
      if (!welcomed) {
        this._wsFailures += 1;
        if (this._wsFailures >= this.opts.fallbackAfter && this.opts.transports.includes("sse")) {
          this.transport = "sse";
        }
      }
      this._retry();
    };
    ws.onerror = () => {}; // onclose follows
  }

  _openSse(query) {
    const controller = new AbortController();
    const handle = { abort: () => controller.abort() };
    this._socket = handle;
    const base = this.url.replace(/^ws/, "http").replace(/\/ws$/, "/sse");
    const alive = (ms) => {
      // No byte (event or ping comment) for this long: the stream is dead.
      clearTimeout(handle._deadline);
      handle._deadline = setTimeout(() => this._socket === handle && this._retry(), ms);
    };
    fetch(`${base}?${query}`, { headers: { Accept: "text/event-stream" }, signal: controller.signal, cache: "no-store" })
      .then(async (resp) => {
        if (!resp.ok || !resp.body) throw new Error(`SSE refused: ${resp.status}`);
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buf = "";
        let quiet = 2 * (this.opts.pingIntervalMs || 15000);
        alive(quiet);
        for (;;) {
          const { value, done } = await reader.read();
          if (done || this._socket !== handle) break;
          buf += decoder.decode(value, { stream: true });
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let event = null;
            let data = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data = line.slice(6);
            }
            if (data === null) continue;
            const msg = JSON.parse(data);
            if (event === "welcome") {
              quiet = 2 * msg.ping_ms + 5000;
              this._welcome(msg);
            } else if (event === "close") {
              throw new Error(`closed by the broker: ${msg.code}`);
            } else if (msg.type === "event") {
              this._event(msg);
            }
          }
          alive(quiet);
        }
        throw new Error("stream ended");
      })
      .catch(() => {
        if (this._socket === handle) this._retry();
      });
  }

  _welcome(w) {
    const resumed = this.epoch !== null && this.lastSeq !== null;
    this._failures = 0;
    if (!resumed || w.recovered === false) {
      this.lastSeq = w.seq;
      this.epoch = w.epoch;
      this._ahead.clear();
      this._setState("open");
      if (resumed) this._emit("resync", w);
    } else {
      this._setState("open");
    }
    this._emit("open", w);
  }

  _event(msg) {
    const seq = msg.seq;
    if (seq <= this.lastSeq || this._ahead.has(seq)) return; // already handed over
    this._ahead.add(seq);
    while (this._ahead.has(this.lastSeq + 1)) {
      this._ahead.delete(this.lastSeq + 1);
      this.lastSeq += 1;
    }
    const { type, ...ev } = msg;
    this._emit("event", ev);
    // Events ahead of a hole: lower lanes may still fill it; if it is still
    // open after a ping interval, the broker shed it: reconnect so it is
    // replayed from history (or a resync says it cannot be).
    if (this._ahead.size > 0 && this._gapTimer === null) {
      const watermark = this.lastSeq;
      this._gapTimer = setTimeout(() => {
        this._gapTimer = null;
        if (this._ahead.size > 0 && this.lastSeq === watermark) this._retry();
      }, this.opts.pingIntervalMs);
    } else if (this._ahead.size === 0) {
      this._clearGap();
    }
  }

  _clearGap() {
    clearTimeout(this._gapTimer);
    this._gapTimer = null;
  }
}
