// Browser driver for tests/web/test_browser.py: scenarios run one after another in one page of a fresh
// headless Chromium (starting Chromium and loading the app is most of a short scenario's cost).
//
//   node driver.mjs <job.json>
//
// job.json: {url, chromium, profile, artifacts, steps: [{scenario, workflows: {name: ui_workflow}, ...options}]}.
// Prints one JSON line, the list of the steps' results (each a result or {"error": ...}, with the page errors
// raised during its step), as the last line of stdout; the Python tests assert on them. A step that fails
// does not stop the next. Scenarios only observe and report; assertions live in the tests.
import fs from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";

const [jobPath] = process.argv.slice(2);
const base = JSON.parse(fs.readFileSync(jobPath, "utf8"));
let job = base;               // the running step's options over the job's own
const CHROMIUM_FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

const reports = [];

async function openApp(context) {
  const page = context.pages()[0] ?? await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e.stack ?? e.message)));
  page.on("console", (m) => {
    if (m.type() === "error" && m.text().includes("dit_cache_bridge")) errors.push(m.text());
    if (m.type() === "warning" && m.text().includes("dit_cache_bridge")) errors.push(m.text());
  });
  // The backend's fusion reports, for the live scenario (registered once: a page exposes a name only once).
  await page.exposeFunction("__dcbEvent", (e) => reports.push(e));
  await page.goto(job.url);
  await page.waitForFunction(
    () => window.app?.graph && window.app.vueAppReady && window.app.extensions?.some((e) => e.name === "dit_cache_bridge"),
    null, { timeout: 60_000 });
  await page.evaluate(() => window.comfyAPI.api.api.addEventListener("dit_cache_bridge.report", (e) => window.__dcbEvent(e.detail)));
  // Record the load warnings where the app raises them, not only through the dialogs' markup. Newer
  // frontends (1.49) moved these out of `app`; there the unregistered node types stand in for them.
  await page.evaluate(() => {
    window.__dcbWarnings = { nodes: [], models: [], hooked: typeof app.showMissingNodesError === "function" };
    if (window.__dcbWarnings.hooked) {
      const showNodes = app.showMissingNodesError.bind(app);
      app.showMissingNodesError = (types) => {
        window.__dcbWarnings.nodes.push(...types.map((t) => t?.type ?? t));
        return showNodes(types);
      };
    }
    if (typeof app.showMissingModelsError === "function") {
      const showModels = app.showMissingModelsError.bind(app);
      app.showMissingModelsError = (models, paths) => {
        window.__dcbWarnings.models.push(...models.map((m) => `${m.directory}/${m.name}`));
        return showModels(models, paths);
      };
    }
  });
  return { page, errors };
}

/** Load a workflow as the app does; report its warnings and open dialogs, then close the dialogs. */
async function loadWorkflow(page, workflow) {
  const result = await page.evaluate(async (wf) => {
    const hooked = window.__dcbWarnings.hooked;
    window.__dcbWarnings = { nodes: [], models: [], hooked };
    await app.loadGraphData(structuredClone(wf), true, true, null);
    await new Promise((r) => setTimeout(r, 300));
    // Load warnings: a dialog (frontend 1.32) or the error overlay (newer frontends show missing nodes there).
    const dialogs = [...document.querySelectorAll(".p-dialog, [data-testid='error-overlay']")]
      .map((d) => d.innerText.replace(/\s+/g, " ").slice(0, 120));
    const types = app.graph.nodes.map((n) => n.type);
    const unregistered = types.filter((t) => !LiteGraph.registered_node_types[t]);
    const widgets = Object.fromEntries(app.graph.nodes.map((n) => [n.id, Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value]))]));
    // The server's node list decides, as the frontend's own missing-node check does (newer frontends no
    // longer call app.showMissingNodesError); what that hook saw is added where it is still called.
    const known = await (await fetch("/object_info")).json();
    const editorOnly = new Set(["Note", "MarkdownNote", "Reroute", "PrimitiveNode"]);
    const missing = [...new Set([...window.__dcbWarnings.nodes,
                                 ...types.filter((t) => !(t in known) && !editorOnly.has(t))])];
    // Where the saved view puts each note (title corner, screen px): left of or above the view it is hidden,
    // since nobody pans there; further right or down is where a reader goes next.
    const ds = app.canvas.ds, el = app.canvas.canvas;
    const notes = app.graph.nodes.filter((n) => ["Note", "MarkdownNote"].includes(n.type)).map((n) => {
      const x = (n.pos[0] + ds.offset[0]) * ds.scale, y = (n.pos[1] - 30 + ds.offset[1]) * ds.scale;
      return { id: n.id, title: n.title, x, y, hidden: x < 0 || y < 0,
               onScreen: x >= 0 && y >= 0 && x < el.clientWidth && y < el.clientHeight };
    });
    const view = { scale: ds.scale, notes };
    return { missing, missingModels: window.__dcbWarnings.models, dialogs, types, unregistered, widgets, view };
  }, workflow);
  for (let i = 0; i < 3 && await page.locator(".p-dialog").count(); i++) {
    await page.keyboard.press("Escape");
    await page.waitForTimeout(200);
  }
  for (const dismiss of await page.locator("[data-testid='error-overlay-dismiss']").all()) {
    await dismiss.click({ timeout: 1000 }).catch(() => {});
  }
  return result;
}

const shot = (page, name) => {
  const file = path.join(job.artifacts, `${name}.png`);
  return page.screenshot({ path: file }).then(() => file);
};

/** Switch the renderer: "vue" = "Nodes 2.0" (Comfy.VueNodes.Enabled), "canvas" = the classic LiteGraph canvas. */
async function useRenderer(page, renderer) {
  const vue = renderer === "vue";
  await page.evaluate(async (on) => {
    const settings = window.app.extensionManager?.setting;
    if (!settings?.set) throw new Error("this frontend has no settings store");
    await settings.set("Comfy.VueNodes.Enabled", on);
  }, vue);
  await page.waitForTimeout(300);
  // Announcement toasts and banners about the renderer are not part of what is tested: close them.
  for (const selector of [".p-toast-close-button", "[aria-label='Close']"]) {
    for (const button of await page.locator(selector).all()) await button.click({ timeout: 1000 }).catch(() => {});
  }
  return page.evaluate(() => document.querySelectorAll("[data-node-id]").length);
}

/**
 * Bring the node into view at scale 1 and read its inspector widget: the bar pixels it drew (strength,
 * K, V colours), where it is on screen, and which other nodes' bounds it meets (in graph units).
 */
async function inspectNode(page, nodeId) {
  await page.evaluate((id) => {
    const node = app.graph.getNodeById(id);
    const ds = app.canvas.ds;
    ds.scale = 1;
    ds.offset[0] = 420 - node.pos[0];
    ds.offset[1] = 120 - node.pos[1];
    app.canvas.setDirty(true, true);
    app.canvas.draw?.(true, true);
  }, nodeId);
  await page.waitForTimeout(400);
  return page.evaluate((id) => {
    const node = app.graph.getNodeById(id);
    if (!node) return null;
    const widget = (node.widgets ?? []).find((w) => w.name === "fusion_inspector");
    const canvas = widget?.element?.querySelector("canvas");
    const result = { id: node.id, type: node.type, color: node.color, bgcolor: node.bgcolor, size: [...node.size],
                     minSize: node.computeSize ? [...node.computeSize()] : null,
                     report: node.dcbFusionReport ?? null, widget: Boolean(widget), barPixels: { strength: 0, k: 0, v: 0 },
                     warningPixels: 0, visible: false, overlaps: [] };
    if (!canvas) return result;
    const rect = canvas.getBoundingClientRect();
    const style = getComputedStyle(widget.element);
    result.visible = canvas.isConnected && rect.width > 20 && rect.height > 20 && style.display !== "none"
      && style.visibility !== "hidden";
    result.rect = [rect.left, rect.top, rect.width, rect.height];
    if (canvas.width && canvas.height) {
      const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      const near = (i, [r, g, b]) => Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 40;
      for (let i = 0; i < data.length; i += 4) {
        if (near(i, [0xe0, 0xb8, 0x4c])) result.barPixels.strength++;
        else if (near(i, [0x5a, 0xa9, 0xe6])) result.barPixels.k++;
        else if (near(i, [0xe5, 0x73, 0x5c])) result.barPixels.v++;
        else if (near(i, [0xff, 0x9f, 0x43])) result.warningPixels++;
      }
    }
    // The inspector's screen rectangle in graph units, against every other node's bounds.
    const origin = app.canvas.canvas.getBoundingClientRect();
    const ds = app.canvas.ds;
    const toGraph = (x, y) => [(x - origin.left) / ds.scale - ds.offset[0], (y - origin.top) / ds.scale - ds.offset[1]];
    const [gx0, gy0] = toGraph(rect.left, rect.top);
    const [gx1, gy1] = toGraph(rect.right, rect.bottom);
    result.graphRect = [gx0, gy0, gx1 - gx0, gy1 - gy0];
    for (const other of app.graph.nodes) {
      if (other === node) continue;
      const b = other.getBounding?.() ?? [other.pos[0], other.pos[1] - 30, other.size[0], other.size[1] + 30];
      if (b[0] < gx1 && gx0 < b[0] + b[2] && b[1] < gy1 && gy0 < b[1] + b[3]) result.overlaps.push(other.id);
    }
    return result;
  }, nodeId);
}

/** What the workflow would save for these nodes: size and widgets_values. */
function savedNodes(page, ids) {
  return page.evaluate((wanted) => {
    const saved = app.graph.serialize();
    return Object.fromEntries(saved.nodes.filter((n) => wanted.includes(n.id))
      .map((n) => [n.id, { size: [...n.size], widgets_values: n.widgets_values }]));
  }, ids);
}

/**
 * Where the workflow puts things in the editor: groups, every node's size against the size its widgets
 * need, and each note's screen rectangle with whether something of the page (the sidebar, the
 * workflow-name pill, a toolbar) covers it there.
 */
function readGeometry() {
  const ds = app.canvas.ds, origin = app.canvas.canvas.getBoundingClientRect();
  const toScreen = (x, y) => [origin.left + (x + ds.offset[0]) * ds.scale, origin.top + (y + ds.offset[1]) * ds.scale];
  const groups = app.graph.groups.map((g) => {
    g.recomputeInsideNodes();
    return { title: g.title, bounding: [...g._bounding], nodes: [...(g._nodes ?? g.nodes ?? [])].map((n) => n.id) };
  });
  const nodes = app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title, mode: n.mode, size: [...n.size],
    minSize: n.computeSize ? [...n.computeSize()] : null, bounding: [...n.boundingRect],
    widgets: (n.widgets ?? []).filter((w) => !w.hidden && w.type !== "hidden" && !w.options?.hidden).map((w) => w.name),
    // Nodes 2.0: widget and input labels the node's own element cuts short: the label's own text is wider
    // than its box (a row may overflow by its toggle; a value such as a long file name may be shortened)
    cut: ((labels) => [...(document.querySelector(`[data-node-id="${n.id}"]`)?.querySelectorAll("*") ?? [])]
      .filter((e) => labels.has(e.textContent.trim()) && e.clientWidth > 1)
      .filter((e) => {
        const zoom = e.getBoundingClientRect().width / (e.offsetWidth || 1);   // the graph's scale on screen
        const range = document.createRange();
        return [...e.childNodes].filter((c) => c.nodeType === 3 && c.textContent.trim()).some((c) => {
          range.selectNodeContents(c);
          return range.getBoundingClientRect().width / zoom > e.clientWidth + 1;
        });
      })
      .map((e) => e.textContent.trim()))(new Set([...(n.widgets ?? []).map((w) => w.label ?? w.name),
                                                   ...(n.inputs ?? []).map((i) => i.label ?? i.localized_name ?? i.name)]
      // an output's label overflows its own zero-width box by design; a widget of the same name is not told apart
      .filter((label) => !(n.outputs ?? []).some((o) => [o.label, o.localized_name, o.name].includes(label))))),
  }));
  const width = window.innerWidth, height = window.innerHeight;
  const notes = app.graph.nodes.filter((n) => ["Note", "MarkdownNote"].includes(n.type)).map((n) => {
    // Nodes 2.0 draws a node as its own element, whose box is what the reader sees
    const box = document.querySelector(`[data-node-id="${n.id}"]`)?.getBoundingClientRect();
    const [x0, y0, w, h] = n.boundingRect;
    const [left, top] = box ? [box.left, box.top] : toScreen(x0, y0);
    const [right, bottom] = box ? [box.right, box.bottom] : toScreen(x0 + w, y0 + h);
    // Points along the title bar and the left edge: the topmost element there must be the graph itself.
    const points = [];
    for (let i = 0; i <= 8; i++) points.push([left + 4 + (right - left - 8) * i / 8, top + 6]);
    for (let i = 1; i <= 6; i++) points.push([left + 6, top + (bottom - top - 8) * i / 6]);
    const covered = [];
    for (const [x, y] of points) {
      if (x < 0 || y < 0 || x >= width || y >= height) continue;
      const hit = document.elementFromPoint(x, y);
      // a toast (the renderer's announcement) is transient: not a panel that hides the note
      const ok = hit === app.canvas.canvas || hit?.closest?.("[data-node-id], .comfy-multiline-input, .dom-widget, .lg-node, .p-toast");
      if (!ok) covered.push(hit ? `${hit.tagName.toLowerCase()}.${[...hit.classList].slice(0, 3).join(".")}` : "nothing");
    }
    return { id: n.id, title: n.title, rect: [left, top, right, bottom], covered: [...new Set(covered)],
             onScreen: left >= 0 && top >= 0 && right <= width && bottom <= height };
  });
  return { scale: ds.scale, viewport: [width, height], groups, nodes, notes };
}

const scenarios = {
  /** (a) Double-click the canvas, type the query, read the result list; Enter adds the node. */
  async search(page) {
    await page.evaluate(() => app.graph.clear());
    await page.mouse.dblclick(700, 500);
    // the visible node search input: "Search Nodes..." (1.32), "Add a node..." (1.49); hidden panels have inputs too
    const input = page.getByPlaceholder(/search nodes|add a node/i).filter({ visible: true }).first();
    const opened = await input.waitFor({ timeout: 3_000 }).then(() => true, () => false);
    if (!opened) {   // frontends where a double-click does not open it: the command behind its keybinding
      await page.evaluate(() => window.app.extensionManager?.command?.execute?.("Workspace.SearchBox.Toggle"));
    }
    await input.waitFor({ timeout: 10_000 }).catch(async (e) => {
      await shot(page, "search-failed");
      const inputs = await page.evaluate(() => [...document.querySelectorAll("input")]
        .filter((i) => i.offsetParent !== null).map((i) => `${i.placeholder}|${i.getAttribute("aria-label")}|${i.className}`));
      throw new Error(`${e.message}\nvisible inputs: ${JSON.stringify(inputs)}`);
    });
    await input.fill(job.query);
    // result rows: PrimeVue autocomplete options (1.32) or the newer search box's role=option items
    const rows = ".p-autocomplete-option, [role='option'][data-testid='result-item']";
    const option = page.locator(rows, { hasText: job.expect });
    await option.first().waitFor({ timeout: 10_000 });
    const options = await page.locator(rows).allInnerTexts();
    const screenshot = await shot(page, "search");
    await page.keyboard.press("Enter");
    await page.waitForFunction(() => app.graph.nodes.length > 0, null, { timeout: 10_000 });
    await page.waitForTimeout(400);
    const added = await page.evaluate(() => app.graph.nodes.map((n) => ({
      type: n.type, color: n.color, bgcolor: n.bgcolor, size: [...n.size], minSize: n.computeSize ? [...n.computeSize()] : null,
      widgets: (n.widgets ?? []).filter((w) => !w.hidden).map((w) => w.name) })));
    return { options: options.map((t) => t.replace(/\s+/g, " ").trim()), added, screenshot };
  },

  /** (b) Load each workflow; report the missing-node warnings it raised. */
  async load(page) {
    const results = {};
    for (const [name, workflow] of Object.entries(job.workflows)) {
      results[name] = await loadWorkflow(page, workflow);
      if (name === "pack_workflow") results.screenshot = await shot(page, "load");
      else if (name.endsWith(".json")) await shot(page, `load-${name.replace(/\.json$/, "")}`);
    }
    return results;
  },

  /** (c) Queue the workflow from the UI and wait for the backend's report on the inspected nodes. */
  async live(page) {
    reports.length = 0;
    const vueNodes = await useRenderer(page, job.renderer);
    const loaded = await loadWorkflow(page, job.workflows.run);
    const savedBefore = await savedNodes(page, job.inspect);
    await page.evaluate(() => app.queuePrompt(0, 1));
    const ids = job.inspect;
    const reported = await page.waitForFunction(
      (wanted) => wanted.every((id) => app.graph.getNodeById(id)?.dcbFusionReport),
      ids, { timeout: job.timeout_ms }).then(() => true, () => false);
    const nodes = [];
    for (const id of ids) nodes.push(await inspectNode(page, id));
    const screenshots = [];
    for (const id of ids) {
      await inspectNode(page, id);
      screenshots.push(await shot(page, `inspector-live-${job.renderer}-${id}`));
    }
    const savedAfter = await savedNodes(page, ids);
    return { renderer: job.renderer, vueNodes, loaded, reported, events: [...reports], nodes, screenshots, savedBefore,
             savedAfter };
  },

  /** (c') The same inspector fed by a synthetic event, dispatched the way the websocket does. */
  async synthetic(page) {
    const vueNodes = await useRenderer(page, job.renderer);
    const loaded = await loadWorkflow(page, job.workflows.run);
    const before = await page.evaluate((ids) => ids.map((id) => [...app.graph.getNodeById(id).size]), job.inspect);
    const nodes = [];
    const screenshots = [];
    const toasts = [];   // the toasts on screen after each event
    for (const [id, payload] of job.events) {
      await page.evaluate(([nodeId, report]) => {
        window.comfyAPI.api.api.dispatchCustomEvent("dit_cache_bridge.report", { node: String(nodeId), report });
      }, [id, payload]);
      nodes.push(await inspectNode(page, id));
      screenshots.push(await shot(page, `inspector-synthetic-${job.renderer}-${id}-${nodes.length}`));
      toasts.push(await page.evaluate(() => [...document.querySelectorAll(".p-toast-message")]
        .map((t) => t.innerText.replace(/\s+/g, " ").trim())));
    }
    return { renderer: job.renderer, vueNodes, loaded, before, nodes, screenshots, toasts };
  },

  /** (e) Each workflow as it opens: groups, node sizes against their widgets, notes against the page's panels. */
  async geometry(page) {
    const vueNodes = await useRenderer(page, job.renderer);
    const results = {};
    for (const [name, workflow] of Object.entries(job.workflows)) {
      await loadWorkflow(page, workflow);
      await page.waitForTimeout(300);
      results[name] = await page.evaluate(readGeometry);
      await shot(page, `geometry-${job.renderer}-${name.replace(/\.json$/, "")}`);
    }
    return { renderer: job.renderer, vueNodes, results };
  },

  /** (f) Do what a note says: mute and unmute the numbered groups in the editor; return the graph it would queue. */
  async follow(page) {
    await loadWorkflow(page, job.workflows.run);
    const groups = await page.evaluate((steps) => {
      const members = {};
      for (const [number, mode] of [...steps.mute.map((g) => [g, 2]), ...steps.unmute.map((g) => [g, 0])]) {
        // the workflows number their groups ("6 · Run 1: …") and their notes name them by number
        const group = app.graph.groups.find((g) => g.title.trim().startsWith(`${number} ·`));
        if (!group) throw new Error(`no group titled "${number} · …"`);
        group.recomputeInsideNodes();
        members[number] = [...group._nodes].map((n) => n.id);
        for (const node of group._nodes) node.mode = mode;
      }
      return members;
    }, { mute: job.mute, unmute: job.unmute });
    const workflow = await page.evaluate(() => app.graph.serialize());
    return { groups, workflow };
  },

  /** (d) Each shipped workflow as saved: every fusion node's inspector is on screen and meets no other node. */
  async layout(page) {
    const vueNodes = await useRenderer(page, job.renderer);
    const results = {};
    for (const [name, workflow] of Object.entries(job.workflows)) {
      await loadWorkflow(page, workflow);
      const ids = await page.evaluate(() => app.graph.nodes
        .filter((n) => ["DiTCacheBridge_FuseCaches", "DiTCacheBridge_BridgedKSampler"].includes(n.type)).map((n) => n.id));
      results[name] = [];
      for (const id of ids) {
        results[name].push(await inspectNode(page, id));
        await shot(page, `layout-${job.renderer}-${name.replace(/\.json$/, "")}-${id}`);
      }
    }
    return { renderer: job.renderer, vueNodes, results };
  },
};

const failed = (error) => ({ error: String(error?.stack ?? error) });
let context;
let results = [];
try {
  fs.mkdirSync(base.artifacts, { recursive: true });
  // A fresh profile per run (the test passes an empty folder); playwright adds --headless itself.
  context = await chromium.launchPersistentContext(base.profile, {
    executablePath: base.chromium, headless: true, viewport: { width: 1400, height: 1100 },
    args: CHROMIUM_FLAGS.filter((f) => f !== "--headless"),
  });
  const { page, errors } = await openApp(context);
  for (const step of base.steps) {
    job = { ...base, ...step };
    const seen = errors.length;
    const result = await scenarios[step.scenario](page).catch(failed);
    result.pageErrors = errors.slice(seen);
    results.push(result);
  }
} catch (error) {
  results = base.steps.map((_, i) => results[i] ?? failed(error));
} finally {
  await context?.close().catch(() => {});
}
console.log(JSON.stringify(results));
