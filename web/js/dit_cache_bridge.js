// DiT Cache Bridge — frontend extension.
//
// Two things, both small:
//   1. A pack colour scheme: every node of the pack gets the pack's colours when it is created
//      (colours a workflow saved for a node win, since LiteGraph applies them afterwards).
//   2. The fusion inspector: after each bridged sampling run the backend sends
//      `dit_cache_bridge.report` {node, report}; the Fuse Caches / Bridged KSampler node it names
//      keeps the report and draws a per-layer bar chart in a DOM widget below its other widgets.
//      A DOM widget shows on both renderers (the LiteGraph canvas and the "Nodes 2.0" Vue nodes,
//      which never call onDrawForeground); its height is reserved from the start, so a report
//      never grows the node over its neighbours, and it saves nothing into the workflow.
//
// Plain ES module, loaded by ComfyUI from WEB_DIRECTORY; no build step.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "dit_cache_bridge";
export const REPORT_EVENT = "dit_cache_bridge.report";

// Every node id of the pack starts with PREFIX (ComfyUI asks custom nodes to prefix their ids);
// the rest of the id says the node's role. The Python nodes are the source: tests/web/test_roles.py
// checks that PREFIX + ROLES name each registered node once and REPORT_EVENT is the event they send.
export const PREFIX = "DiTCacheBridge_";
const ROLES = {
  projector: ["LoadC2CProjector", "CreateC2CProjector", "TrainC2CProjector", "SaveC2CTrainingSample",
              "TrainC2CTextProjector", "SaveC2CTextTrainingSample"],
  source: ["CaptureKVCache", "RecordKVCache", "SaveKVCache", "LoadKVCache"],
  fusion: ["FuseCaches", "BridgedKSampler", "BridgedQwenTextEncode"],
};
// One hue family (teal) so the pack reads as one; shades tell the roles apart.
// LiteGraph: `color` is the title bar, `bgcolor` the body.
export const COLOURS = {
  projector: { color: "#1d3f4f", bgcolor: "#2b5566" },
  source: { color: "#1b4744", bgcolor: "#285f5a" },
  fusion: { color: "#1c4a3a", bgcolor: "#2a6350" },
};

export function roleOf(nodeId) {
  if (typeof nodeId !== "string" || !nodeId.startsWith(PREFIX)) return null;
  const name = nodeId.slice(PREFIX.length);
  for (const [role, names] of Object.entries(ROLES)) {
    if (names.includes(name)) return role;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Report: validated once on arrival, so drawing never meets a malformed value.
// ---------------------------------------------------------------------------------------------
const MAX_LAYERS = 512;
const MAX_STEPS = 10000;   // schedule steps the inspector's step strip draws

function finite(value) {
  const x = Number(value);
  return Number.isFinite(x) ? x : 0;
}

function perLayer(map, layer) {
  if (!map || typeof map !== "object") return 0;
  return finite(map[String(layer)] ?? map[layer]);
}

/** The backend's report as arrays aligned on `layers`, or null when it holds no layer. */
export function normaliseReport(report) {
  if (!report || typeof report !== "object") return null;
  let layers = Array.isArray(report.layers) ? report.layers : Object.keys(report.strength ?? {});
  layers = layers.map(Number).filter((x) => Number.isInteger(x) && x >= 0);
  layers = [...new Set(layers)].sort((a, b) => a - b).slice(0, MAX_LAYERS);
  if (!layers.length) return null;
  return {
    layers,
    strength: layers.map((l) => Math.max(0, perLayer(report.strength, l))),
    k: layers.map((l) => Math.max(0, perLayer(report.k_change, l))),
    v: layers.map((l) => Math.max(0, perLayer(report.v_change, l))),
    sharerForwards: Math.max(0, Math.round(finite(report.sharer_forwards))),
    modelCalls: Math.max(0, Math.round(finite(report.model_calls))),
    ...refreshOf(report.refresh),
    warnings: (Array.isArray(report.warnings) ? report.warnings : []).filter((w) => typeof w === "string").slice(0, 4),
  };
}

/** Steps (schedule indices) as a sorted list of small non-negative integers. */
function stepList(steps) {
  if (!Array.isArray(steps)) return [];
  return [...new Set(steps.map(Number).filter((x) => Number.isInteger(x) && x >= 0 && x < MAX_STEPS))].sort((a, b) => a - b);
}

/** What the refresh tracker decided (c2c_core.refresh.RefreshReport): which steps ran the sharer, what was saved. */
function refreshOf(refresh) {
  const r = refresh && typeof refresh === "object" ? refresh : {};
  return {
    sharerSteps: stepList(r.sharer_steps),
    reusedSteps: stepList(r.reused_steps),
    forwardsSaved: Math.max(0, Math.round(finite(r.forwards_saved))),
  };
}

/** The graph node an execution id names: "12" in the root graph, "7:12" inside subgraph node 7. */
function nodeForExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph;
  const path = String(executionId).split(":");
  for (let i = 0; graph && i < path.length; i++) {
    const node = graph.getNodeById(path[i]) ?? graph.getNodeById(Number(path[i]));
    if (!node || i === path.length - 1) return node ?? null;
    graph = node.subgraph;
  }
  return null;
}

function onReport(event) {
  const detail = event?.detail;
  if (!detail || detail.node == null) return;
  const node = nodeForExecutionId(detail.node);
  if (!node || roleOf(node.comfyClass) !== "fusion") return;
  node.dcbFusionReport = normaliseReport(detail.report); // read by the inspector (and the browser test)
  node.dcbInspector?.render();
  node.setDirtyCanvas?.(true, true);
  for (const warning of node.dcbFusionReport?.warnings ?? []) announce(node, warning);
}

/** A warning about a run that "succeeded": a toast as well as the inspector, since nobody reads a chart they did not open. */
function announce(node, warning) {
  const toast = app.extensionManager?.toast;
  if (typeof toast?.add === "function") {
    toast.add({ severity: "warn", summary: `${node.title ?? "DiT Cache Bridge"} (node ${node.id})`, detail: warning, life: 15000 });
  } else {
    console.info(`${EXTENSION}: node ${node.id}: ${warning}`);
  }
}

/** `text` cut into lines of at most `width` pixels; the last kept line ends in "…" when text is left over. */
function wrap(ctx, text, width, maxLines) {
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width <= width || !line) line = next;
    else { lines.push(line); line = word; }
  }
  if (line) lines.push(line);
  if (lines.length > maxLines) {
    lines.length = maxLines;
    lines[maxLines - 1] = `${lines[maxLines - 1].replace(/\s*\S*$/, "")} …`;
  }
  return lines;
}

// ---------------------------------------------------------------------------------------------
// Inspector drawing
// ---------------------------------------------------------------------------------------------
const CHART = { height: 112, minWidth: 300, pad: 8, text: 11, strip: 6 };
export const INSPECTOR_WIDGET = "fusion_inspector";
const WARNING_LINES = 3;   // the rest of a longer warning is in its toast and the server log
const BAR = { strength: "#e0b84c", k: "#5aa9e6", v: "#e5735c", warning: "#ff9f43", ran: "#7bd88f", reused: "rgba(255, 255, 255, 0.2)" };

function fmt(x) {
  return x >= 10 ? x.toFixed(0) : x >= 1 ? x.toFixed(2) : x.toPrecision(2);
}

/** Draws `report` in the rectangle (x, y, w, h) of the node's foreground. */
export function drawInspector(ctx, report, x, y, w, h) {
  const { pad, text } = CHART;
  const n = report.layers.length;
  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.28)";
  ctx.beginPath();
  ctx.roundRect ? ctx.roundRect(x, y, w, h, 4) : ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.font = `${text}px sans-serif`;
  ctx.textBaseline = "top";

  // First: what the user must know about the run (e.g. an untrained projector), wrapped so it can be read
  // (the toast has it too), or else what the run did.
  ctx.textAlign = "left";
  const warning = report.warnings?.[0];
  const lines = warning ? wrap(ctx, `⚠ ${warning}`, w - 2 * pad, WARNING_LINES) :
    [`fused ${n} layer${n === 1 ? "" : "s"} · sharer ${report.sharerForwards} fwd / ${report.modelCalls} model calls` +
      (report.forwardsSaved ? ` · ${report.forwardsSaved} saved` : "")];
  if (warning) {
    ctx.fillStyle = "rgba(255, 159, 67, 0.16)";
    ctx.fillRect(x, y, w, 4 + lines.length * (text + 2));
  }
  ctx.fillStyle = warning ? BAR.warning : "#ddd";
  lines.forEach((line, i) => ctx.fillText(line, x + pad, y + 3 + i * (text + 2), w - 2 * pad));

  // Then which schedule steps ran the sharer (green) and which reused its K/V (grey), one cell per step.
  let stripY = y + 6 + lines.length * (text + 2);
  const ran = report.sharerSteps ?? [], reused = report.reusedSteps ?? [];
  if (ran.length + reused.length) {
    const steps = Math.max(...ran, ...reused) + 1;
    const cell = (w - 2 * pad) / steps;
    for (const [list, colour] of [[reused, BAR.reused], [ran, BAR.ran]]) {
      ctx.fillStyle = colour;
      for (const step of list) ctx.fillRect(x + pad + step * cell, stripY, Math.max(1, cell - (cell > 3 ? 1 : 0)), CHART.strip);
    }
    stripY += CHART.strip + 3;
  }

  // Then the legend with each series' full scale.
  const sMax = Math.max(1, ...report.strength);
  const cMax = Math.max(...report.k, ...report.v) || 1;
  let lx = x + pad;
  const ly = stripY;
  for (const [label, colour] of [[`strength 0–${fmt(sMax)}`, BAR.strength], ["K", BAR.k], [`V change 0–${fmt(cMax)}`, BAR.v]]) {
    ctx.fillStyle = colour;
    ctx.fillRect(lx, ly + 2, 8, 8);
    ctx.fillStyle = "#bbb";
    ctx.fillText(label, lx + 11, ly);
    lx += 11 + ctx.measureText(label).width + 8;
  }

  // Bars: per layer a group of three (strength, K change, V change).
  const top = ly + text + 6;
  const base = y + h - text - 4;
  const chartH = Math.max(4, base - top);
  const chartW = w - 2 * pad;
  const group = chartW / n;
  const bar = Math.max(1, (group * 0.8) / 3);
  ctx.fillStyle = "rgba(255, 255, 255, 0.15)";
  ctx.fillRect(x + pad, base, chartW, 1);
  for (let i = 0; i < n; i++) {
    const gx = x + pad + i * group + group * 0.1;
    const series = [[report.strength[i] / sMax, BAR.strength], [report.k[i] / cMax, BAR.k], [report.v[i] / cMax, BAR.v]];
    series.forEach(([frac, colour], j) => {
      const bh = Math.max(frac > 0 ? 1 : 0, Math.min(1, frac) * chartH);
      ctx.fillStyle = colour;
      ctx.fillRect(gx + j * bar, base - bh, Math.max(1, bar - (bar > 2 ? 0.5 : 0)), bh);
    });
  }

  // Layer labels: as many as fit, always the first and the last.
  ctx.fillStyle = "#999";
  ctx.textAlign = "center";
  const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(chartW / 28))));
  for (let i = 0; i < n; i++) {
    if (i % every !== 0 && i !== n - 1) continue;
    if (i !== n - 1 && n - 1 - i < every) continue; // keep the last label clear of its neighbour
    ctx.fillText(String(report.layers[i]), x + pad + (i + 0.5) * group, base + 2);
  }
  ctx.restore();
}

/** Text shown before the first run, so the reserved space says what it is for. */
function drawPlaceholder(ctx, x, y, w, h) {
  ctx.save();
  ctx.fillStyle = "rgba(0, 0, 0, 0.18)";
  ctx.fillRect(x, y, w, h);
  ctx.fillStyle = "#999";
  ctx.font = `${CHART.text}px sans-serif`;
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  ctx.fillText("fusion inspector: per-layer strength and K/V change", x + w / 2, y + h / 2 - 8, w - 8);
  ctx.fillText("appear here after a run", x + w / 2, y + h / 2 + 8, w - 8);
  ctx.restore();
}

/**
 * The inspector of one node: a <canvas> in a DOM widget of fixed height, added last so the node's
 * saved widgets_values keep their positions; it serialises nothing.
 */
function addInspector(node) {
  if (typeof node.addDOMWidget !== "function") {
    console.info(`${EXTENSION}: this frontend has no DOM widgets; the fusion inspector is not shown`);
    return;
  }
  const element = document.createElement("div");
  element.className = "dcb-inspector";
  element.style.cssText = `width:100%;height:${CHART.height}px;min-height:${CHART.height}px;` +
    `max-height:${CHART.height}px;box-sizing:border-box;overflow:hidden;pointer-events:none;`;
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "display:block;width:100%;height:100%;";
  element.appendChild(canvas);

  const render = () => {
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    const ratio = Math.min(4, window.devicePixelRatio || 1);
    if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const report = node.dcbFusionReport;
    element.title = report?.warnings?.join("\n") ?? "";
    try {
      report ? drawInspector(ctx, report, 0, 0, w, h) : drawPlaceholder(ctx, 0, 0, w, h);
    } catch (error) {
      console.warn(`${EXTENSION}: could not draw the fusion report`, error);
      node.dcbFusionReport = null;
    }
  };
  const widget = node.addDOMWidget(INSPECTOR_WIDGET, "dcb_inspector", element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => CHART.height,
    getMaxHeight: () => CHART.height,
    getValue: () => "",
    setValue: () => {},
  });
  widget.serialize = false; // keeps it out of widgets_values (LiteGraph) as well as the prompt
  if (typeof ResizeObserver === "function") new ResizeObserver(render).observe(canvas);
  node.dcbInspector = { widget, element, render };
  // Room for the chart from the start (a workflow's saved size, applied after this, wins).
  const fit = () => {
    const min = node.computeSize?.();
    if (min && Array.isArray(node.size)) {
      node.setSize?.([Math.max(node.size[0], min[0], CHART.minWidth), Math.max(node.size[1], min[1])]);
    }
  };
  fit();
  // Once more after the frontend has laid out the new node (its widgets are measured by then); a saved
  // workflow's size was set before this frame and is never below what its widgets need.
  requestAnimationFrame(() => {
    fit();
    render();
  });
}

/**
 * The backward_* widgets matter only for direction "bidirectional": hidden otherwise, and the node's height
 * follows, so one-way fusion shows no dead settings.
 */
function showBackwardOnlyWhenBidirectional(node) {
  const direction = node.widgets?.find((w) => w.name === "direction");
  const backward = (node.widgets ?? []).filter((w) => w.name.startsWith("backward_"));
  if (!direction || !backward.length) return;
  const sync = () => {
    const hide = direction.value !== "bidirectional";
    if (backward.every((w) => Boolean(w.hidden) === hide)) return;
    for (const w of backward) {   // the canvas reads widget.hidden, Nodes 2.0 widget.options.hidden
      w.hidden = hide;
      w.options = { ...(w.options ?? {}), hidden: hide };
    }
    const min = node.computeSize?.();
    if (min) node.setSize?.([node.size[0], min[1]]);
    node.setDirtyCanvas?.(true, true);
  };
  const callback = direction.callback;
  direction.callback = function (...args) {
    const result = callback?.apply(this, args);
    sync();
    return result;
  };
  const configure = node.onConfigure;
  node.onConfigure = function (...args) {   // a loaded workflow sets the value after nodeCreated
    const result = configure?.apply(this, args);
    sync();
    return result;
  };
  sync();
}

app.registerExtension({
  name: EXTENSION,

  setup() {
    api.addEventListener(REPORT_EVENT, onReport);
  },

  nodeCreated(node) {
    const role = roleOf(node.comfyClass);
    if (!role) return;
    node.color ??= COLOURS[role].color;
    node.bgcolor ??= COLOURS[role].bgcolor;
    if (role === "fusion") {
      addInspector(node);
      showBackwardOnlyWhenBidirectional(node);
    }
  },
});
