// Browser tests: clients/js/switchyard.js and the /dashboard page in
// Debian's chromium (headless, driven by playwright-core), against real
// broker processes. Every failure mode of the client is asserted, not just
// exercised: what the app was handed (each event once, in order), which
// states it went through, and how often it tried.
//
//   node tests/browser/run.mjs [name-filter]

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import {
  ROOT,
  api,
  holdSocket,
  launchBrowser,
  mintToken,
  openClient,
  publish,
  record,
  sleep,
  startBroker,
  startStatic,
  startUpgradeRefusingProxy,
  until,
} from "./harness.mjs";
import { dashboardTests } from "./dashboard.mjs";

/** Asserts the app was handed exactly seqs from..to, once each, in order. */
function assertSeqs(events, from, to) {
  const seqs = events.map((e) => e.seq);
  const want = Array.from({ length: to - from + 1 }, (_, i) => from + i);
  assert.deepEqual(seqs, want);
}

const tests = {
  async "events arrive once, in order, across a delete (4000) and its reconnect"({ page, site }) {
    const b = await startBroker();
    try {
      await openClient(page, `ws://${b.client}/ws`, { user: "u1", minDelayMs: 50, maxDelayMs: 200 });
      await until("open", async () => (await record(page)).state === "open");
      for (let i = 1; i <= 20; i++) await publish(b, "u1", { i });
      await until("20 events", async () => (await record(page)).events.length === 20);
      const [status, closed] = await api(b, "DELETE", "/v1/users/u1");
      assert.equal(status, 200);
      assert.equal(closed.closed, 1);
      // Publish while the client is away and after it is back.
      for (let i = 21; i <= 30; i++) await publish(b, "u1", { i });
      await until("reopened", async () => (await record(page)).opens.length === 2);
      for (let i = 31; i <= 40; i++) await publish(b, "u1", { i });
      await until("40 events", async () => (await record(page)).events.length >= 40);
      await sleep(200);
      const r = await record(page);
      assertSeqs(r.events, 1, 40);
      assert.deepEqual(r.events.map((e) => e.data.i), Array.from({ length: 40 }, (_, i) => i + 1));
      assert.ok(r.states.includes("reconnecting"), `states: ${r.states}`);
      assert.equal(r.opens[1].recovered, true, "the reconnect resumed");
      assert.equal(r.resyncs.length, 0);
      assert.equal(r.lastSeq, 40);
    } finally {
      await b.stop();
    }
  },

  async "a broker paused past the ping interval is detected and resumed from"({ page }) {
    const b = await startBroker();
    try {
      await openClient(page, `ws://${b.client}/ws`, { user: "u2", pingIntervalMs: 300, minDelayMs: 50, maxDelayMs: 200 });
      await until("open", async () => (await record(page)).state === "open");
      for (let i = 1; i <= 5; i++) await publish(b, "u2", { i });
      await until("5 events", async () => (await record(page)).events.length === 5);
      b.pause();
      // No pong within an interval: the client declares the socket dead.
      await until("reconnecting while paused", async () => (await record(page)).state === "reconnecting", 5000);
      await sleep(500);
      b.resume();
      await until("reopened", async () => (await record(page)).opens.length >= 2);
      for (let i = 6; i <= 10; i++) await publish(b, "u2", { i });
      await until("10 events", async () => (await record(page)).events.length >= 10);
      await sleep(200);
      const r = await record(page);
      assertSeqs(r.events, 1, 10);
      assert.equal(r.opens.at(-1).recovered, true);
      assert.equal(r.resyncs.length, 0);
    } finally {
      b.resume();
      await b.stop();
    }
  },

  async "a broker restart is a resync: new epoch, then events from its seq 1"({ page }) {
    const b1 = await startBroker();
    let b2 = null;
    try {
      await openClient(page, `ws://${b1.client}/ws`, { user: "u3", minDelayMs: 50, maxDelayMs: 200 });
      await until("open", async () => (await record(page)).state === "open");
      for (let i = 1; i <= 3; i++) await publish(b1, "u3", { i });
      await until("3 events", async () => (await record(page)).events.length === 3);
      const oldEpoch = (await record(page)).opens[0].epoch;
      await b1.stop();
      b2 = await startBroker([], { listen: b1.client, api: b1.api });
      await until("resync", async () => (await record(page)).resyncs.length === 1);
      await publish(b2, "u3", { i: "after" });
      await until("the new event", async () => (await record(page)).events.length === 4);
      const r = await record(page);
      assert.notEqual(r.resyncs[0].epoch, oldEpoch);
      assert.equal(r.resyncs[0].recovered, false);
      assert.equal(r.events[3].seq, 1, "seq starts again in the new epoch");
      assert.equal(r.events[3].data.i, "after");
      assert.equal(r.lastSeq, 1);
    } finally {
      await b1.stop();
      if (b2) await b2.stop();
    }
  },

  async "refused upgrades back off between minDelayMs and maxDelayMs"({ page }) {
    const b = await startBroker(["--max-connections", "1"]);
    const held = await holdSocket(b.client, "holder");
    try {
      const t0 = Date.now();
      await openClient(page, `ws://${b.client}/ws`, { user: "u4", minDelayMs: 100, maxDelayMs: 400, transports: ["websocket"] });
      await sleep(2500);
      const r = await record(page);
      const elapsed = Date.now() - t0;
      // Every wait is at least minDelayMs, so at most elapsed/min + 1 tries;
      // without backoff a refused socket retries hundreds of times.
      assert.ok(r.attempts >= 3, `retried: ${r.attempts}`);
      assert.ok(r.attempts <= Math.floor(elapsed / 100) + 1, `backed off: ${r.attempts} attempts in ${elapsed} ms`);
      assert.equal(r.opens.length, 0);
      assert.equal(r.state, "reconnecting");
      held.destroy();
      await until("open once the slot is free", async () => (await record(page)).state === "open");
    } finally {
      held.destroy();
      await b.stop();
    }
  },

  async "getToken is called before every attempt, and a refused token is replaced"({ page }) {
    const b = await startBroker(["--jwt-secret", "browser-secret"]);
    try {
      const good = mintToken("browser-secret", "u5");
      const bad = mintToken("another-secret", "u5");
      await openClient(page, `ws://${b.client}/ws`, { tokens: [bad, good], minDelayMs: 50, maxDelayMs: 100, transports: ["websocket"] });
      await until("open", async () => (await record(page)).state === "open");
      await publish(b, "u5", { ok: true });
      await until("the event", async () => (await record(page)).events.length === 1);
      let r = await record(page);
      assert.equal(r.tokens, 2, "one call for the refused attempt, one for the accepted one");
      assert.equal(r.opens[0].user, "u5");
      await api(b, "DELETE", "/v1/users/u5");
      await until("reopened", async () => (await record(page)).opens.length === 2);
      r = await record(page);
      assert.equal(r.tokens, 3, "called again before the reconnect");
    } finally {
      await b.stop();
    }
  },

  async "behind a proxy that refuses upgrades the client falls back to SSE with the same events and resume"({ page }) {
    const b = await startBroker();
    const proxy = await startUpgradeRefusingProxy(b.client);
    try {
      await openClient(page, `ws://${proxy.addr}/ws`, { user: "u6", minDelayMs: 50, maxDelayMs: 200 });
      await until("open over SSE", async () => (await record(page)).state === "open");
      let r = await record(page);
      assert.equal(r.transport, "sse");
      assert.ok(proxy.refused() >= 2, `upgrades refused: ${proxy.refused()}`);
      for (let i = 1; i <= 10; i++) await publish(b, "u6", { i }, i % 2 ? "agent_thinking" : "tool_executing");
      await until("10 events", async () => (await record(page)).events.length === 10);
      // The stream is ended by the broker (4000): the client resumes over SSE.
      await api(b, "DELETE", "/v1/users/u6");
      for (let i = 11; i <= 15; i++) await publish(b, "u6", { i });
      await until("reopened", async () => (await record(page)).opens.length === 2);
      for (let i = 16; i <= 20; i++) await publish(b, "u6", { i });
      await until("20 events", async () => (await record(page)).events.length >= 20);
      await sleep(200);
      r = await record(page);
      assertSeqs(r.events, 1, 20);
      assert.equal(r.events[1].event, "tool_executing", "every event name comes through");
      assert.equal(r.opens[1].recovered, true);
      assert.equal(r.transport, "sse");
    } finally {
      proxy.close();
      await b.stop();
    }
  },

  ...dashboardTests,
};

async function main() {
  const filter = process.argv[2] || "";
  const browser = await launchBrowser();
  const site = await startStatic();
  let failed = 0;
  let ran = 0;
  for (const [name, fn] of Object.entries(tests)) {
    if (!name.includes(filter)) continue;
    ran += 1;
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(site.url);
    await page.waitForFunction(() => window.ready === true);
    const t0 = Date.now();
    try {
      await fn({ page, site, context });
      console.log(`ok   ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      failed += 1;
      console.log(`FAIL ${name}\n${e.stack || e}`);
    }
    await context.close();
  }
  await browser.close();
  site.close();
  console.log(`browser tests: ${ran - failed} passed, ${failed} failed`);
  fs.mkdirSync(path.join(ROOT, "results"), { recursive: true });
  process.exit(failed || ran === 0 ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
