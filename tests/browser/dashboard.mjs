// Browser tests of GET /dashboard: the page asks for the API key when the
// broker has one (kept in sessionStorage, sent as a Bearer header), and the
// numbers it shows match the broker's own /v1/stats while it updates live.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { ROOT, api, holdSocket, publish, startBroker, until } from "./harness.mjs";

const text = (page, id) => page.$eval(`#${id}`, (e) => e.textContent);
const num = async (page, id) => Number((await text(page, id)).replace(/,/g, ""));

export const dashboardTests = {
  async "the dashboard asks for the key and shows the broker's numbers, live"({ page }) {
    const b = await startBroker(["--api-key", "dash-key", "--shards", "2"]);
    const held = [];
    try {
      for (const u of ["d1", "d2", "d3"]) held.push(await holdSocket(b.client, u));
      for (let i = 0; i < 30; i++) await publish2(b, `d${(i % 3) + 1}`, i);
      await page.goto(`http://${b.api}/dashboard?interval=200`);
      await page.waitForSelector("#key-form.shown");
      await page.fill("#key", "dash-key");
      await page.click("#key-form button");
      const [, stats] = await api(b, "GET", "/v1/stats", undefined, "dash-key");
      await until("the page shows the broker's figures", async () =>
        (await num(page, "connections")) === stats.connections && (await num(page, "published")) === stats.events.published);
      assert.equal(await num(page, "connections"), 3);
      assert.equal(await num(page, "users"), stats.users);
      assert.equal(await num(page, "delivered"), stats.events.delivered);
      assert.equal(await num(page, "shed"), stats.events.shed);
      assert.equal(await page.$$eval("#shards tbody tr", (rows) => rows.length), 2);
      const shardConns = await page.$$eval("#shards tbody tr", (rows) => rows.map((r) => Number(r.children[1].textContent)));
      assert.deepEqual(shardConns, stats.shards.map((s) => s.connections));
      assert.equal(await num(page, "lat-p99"), stats.latency_us.p99);
      // It updates while open.
      for (let i = 0; i < 12; i++) await publish2(b, "d1", i);
      await until("the new publishes show", async () => (await num(page, "published")) === stats.events.published + 12);
      // The key stays out of URLs and in this tab's sessionStorage only.
      assert.equal(page.url(), `http://${b.api}/dashboard?interval=200`);
      assert.equal(await page.evaluate(() => sessionStorage.getItem("switchyard-api-key")), "dash-key");
      const dir = path.join(ROOT, "results", "browser");
      fs.mkdirSync(dir, { recursive: true });
      await page.screenshot({ path: path.join(dir, "dashboard.png"), fullPage: true });
      assert.ok(fs.statSync(path.join(dir, "dashboard.png")).size > 10_000, "a screenshot was taken");
    } finally {
      held.forEach((s) => s.destroy());
      await b.stop();
    }
  },

  async "without an API key the dashboard needs none and loads nothing from elsewhere"({ page }) {
    const b = await startBroker();
    try {
      const foreign = [];
      page.on("request", (r) => {
        if (!r.url().startsWith(`http://${b.api}/`)) foreign.push(r.url());
      });
      await page.goto(`http://${b.api}/dashboard?interval=200`);
      await until("figures", async () => (await text(page, "published")) === "0");
      assert.equal(await page.$eval("#key-form", (e) => e.classList.contains("shown")), false);
      assert.deepEqual(foreign, [], "no CDN, fonts or scripts from elsewhere");
    } finally {
      await b.stop();
    }
  },
};

async function publish2(b, user, i) {
  const [status] = await api(b, "POST", "/v1/publish", { user, event: "dash", data: { i } }, "dash-key");
  assert.equal(status, 200);
}

export { publish };
