// Takes docs/dashboard.png: the dashboard of a broker under load.
//   node tests/browser/screenshot.mjs API_ADDR OUT.png [wait-ms]
import { launchBrowser, sleep } from "./harness.mjs";

const [apiAddr, out, wait = "6000"] = process.argv.slice(2);
const browser = await launchBrowser();
const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
await page.goto(`http://${apiAddr}/dashboard`);
await sleep(Number(wait));
await page.screenshot({ path: out, fullPage: true });
await browser.close();
