// Shared pieces of the browser tests: real broker processes (started on
// ephemeral loopback ports, stopped by PID), a static server for the client
// module and a blank test page, a proxy that refuses WebSocket upgrades,
// the API calls, and Debian's chromium driven by playwright-core.

import { spawn, execFileSync } from "node:child_process";
import http from "node:http";
import net from "node:net";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const TARGET = process.env.CARGO_TARGET_DIR ? path.resolve(ROOT, process.env.CARGO_TARGET_DIR) : path.join(ROOT, "target");
export const BIN = process.env.SWITCHYARD_BIN || path.join(TARGET, "debug", "switchyard");

/** Upper bound for any single wait. */
export const WAIT_MS = 20000;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` (sync or async) until truthy, bounded by WAIT_MS. */
export async function until(what, f, ms = WAIT_MS) {
  const t0 = Date.now();
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for: ${what}`);
    await sleep(25);
  }
}

/** A broker process: `flags` beyond the loopback listeners and JSON logs. */
export async function startBroker(flags = [], { listen = "127.0.0.1:0", api = "127.0.0.1:0" } = {}) {
  const child = spawn(BIN, ["--listen", listen, "--api-listen", api, "--log-format", "json", ...flags], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = readline.createInterface({ input: child.stderr });
  const addrs = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("broker did not start")), WAIT_MS);
    child.on("exit", (code) => reject(new Error(`broker exited with ${code}`)));
    lines.on("line", (line) => {
      let v;
      try {
        v = JSON.parse(line);
      } catch (_) {
        return;
      }
      if (v.fields && v.fields.message === "switchyard listening") {
        clearTimeout(timer);
        resolve({ client: v.fields.client, api: v.fields.api });
      }
    });
  });
  child.removeAllListeners("exit");
  const exited = new Promise((r) => child.on("exit", r));
  return {
    ...addrs,
    pid: child.pid,
    async stop(signal = "SIGTERM") {
      if (child.exitCode === null) process.kill(child.pid, signal);
      await Promise.race([exited, sleep(WAIT_MS)]);
    },
    pause: () => process.kill(child.pid, "SIGSTOP"),
    resume: () => process.kill(child.pid, "SIGCONT"),
  };
}

/** Calls the broker's API; returns [status, json]. */
export async function api(broker, method, p, body, key) {
  const headers = { "content-type": "application/json" };
  if (key) headers.authorization = `Bearer ${key}`;
  const r = await fetch(`http://${broker.api}${p}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return [r.status, await r.json().catch(() => null)];
}

export async function publish(broker, user, data, event = "e") {
  const [status, v] = await api(broker, "POST", "/v1/publish", { user, event, data });
  if (status !== 200) throw new Error(`publish ${status} ${JSON.stringify(v)}`);
  return v;
}

/** `switchyard token` for a user. */
export function mintToken(secret, user, ttl = "10m") {
  return execFileSync(BIN, ["token", "--user", user, "--ttl", ttl, "--jwt-secret", secret]).toString().trim();
}

/** Serves clients/js and a blank page that exposes `connect` as window.connect. */
export async function startStatic() {
  const page = `<!doctype html><meta charset="utf-8"><title>switchyard client test</title>
<script type="module">import { connect } from "/switchyard.js"; window.connect = connect; window.ready = true;</script>`;
  const server = http.createServer((req, res) => {
    if (req.url === "/switchyard.js") {
      res.writeHead(200, { "content-type": "text/javascript" });
      res.end(fs.readFileSync(path.join(ROOT, "clients/js/switchyard.js")));
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(page);
    }
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => server.close() };
}

/**
 * A proxy in front of the client listener that refuses every WebSocket
 * upgrade (403) and forwards plain HTTP (so /sse passes), as some corporate
 * proxies do.
 */
export async function startUpgradeRefusingProxy(target) {
  const [host, port] = target.split(":");
  let refused = 0;
  const server = http.createServer((req, res) => {
    const up = http.request({ host, port, path: req.url, method: req.method, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    up.on("error", () => res.destroy());
    req.pipe(up);
    res.on("close", () => up.destroy());
  });
  server.on("upgrade", (req, socket) => {
    refused += 1;
    socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    addr: `127.0.0.1:${server.address().port}`,
    refused: () => refused,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

/** Holds one raw WebSocket to the client listener (a slot taken). */
export async function holdSocket(client, user) {
  const [host, port] = client.split(":");
  const s = net.connect(Number(port), host);
  await new Promise((r) => s.on("connect", r));
  s.write(
    `GET /ws?user=${user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n`,
  );
  await new Promise((r) => s.once("data", r));
  return s;
}

/** Debian's chromium, headless, with the flags this machine needs. */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.SWITCHYARD_CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/**
 * Opens a client in `page` and records everything it reports into
 * window.__t (events, states, opens, resyncs); returns nothing.
 */
export async function openClient(page, url, options) {
  await page.evaluate(
    ({ url, options }) => {
      const t = { events: [], states: [], opens: [], resyncs: [], tokens: 0 };
      window.__t = t;
      const opts = { ...options };
      if (options.tokens) {
        // getToken hands out the listed tokens in turn (the last one repeats).
        opts.getToken = async () => options.tokens[Math.min(t.tokens++, options.tokens.length - 1)];
        delete opts.tokens;
      }
      const c = window.connect(url, opts);
      window.__c = c;
      c.on("event", (e) => t.events.push(e));
      c.on("state", (s) => t.states.push(s));
      c.on("open", (w) => t.opens.push(w));
      c.on("resync", (w) => t.resyncs.push(w));
    },
    { url, options },
  );
}

/** The client's record so far, plus its live fields. */
export async function record(page) {
  return page.evaluate(() => ({
    ...window.__t,
    state: window.__c.state,
    transport: window.__c.transport,
    attempts: window.__c.attempts,
    lastSeq: window.__c.lastSeq,
  }));
}
