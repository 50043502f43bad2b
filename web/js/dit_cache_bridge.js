// DiT Cache Bridge — frontend extension.
//
// Two things, both small:
//   1. A pack colour scheme: every node of the pack gets the pack's colours when it is created
//      (colours a workflow saved for a node win, since LiteGraph applies them afterwards).
//   2. The fusion inspector: after each bridged sampling run the backend sends
//      `dit_cache_bridge.report` {node, report}; the FuseCaches / BridgedKSampler node it names
//      keeps the report and draws a per-layer bar chart below its widgets (classic canvas renderer).
//
// Plain ES module, loaded by ComfyUI from WEB_DIRECTORY; no build step.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "dit_cache_bridge";
export const REPORT_EVENT = "dit_cache_bridge.report";

// Every node id of the pack starts with PREFIX (ComfyUI asks custom nodes to prefix their ids);
// the rest of the id says the node's role.
export const PREFIX = "DiTCacheBridge_";
const ROLES = {
  projector: ["LoadC2CProjector", "CreateC2CProjector", "TrainC2CProjector", "SaveC2CTrainingSample"],
  source: ["CaptureKVCache", "RecordKVCache", "SaveKVCache", "LoadKVCache"],
  fusion: ["FuseCaches", "BridgedKSampler"],
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
  const report = normaliseReport(detail.report);
  node.dcbFusionReport = report; // read by the inspector (and the browser test)
  if (report) {
    const min = node.computeSize();
    if (node.size[0] < min[0] || node.size[1] < min[1]) {
      node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    }
  }
  node.setDirtyCanvas?.(true, true);
}

// ---------------------------------------------------------------------------------------------
// Inspector drawing
// ---------------------------------------------------------------------------------------------
const CHART = { height: 112, minWidth: 260, pad: 8, text: 11 };
const BAR = { strength: "#e0b84c", k: "#5aa9e6", v: "#e5735c" };

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

  // Line 1: what the run did.
  ctx.fillStyle = "#ddd";
  ctx.textAlign = "left";
  ctx.fillText(
    `fused ${n} layer${n === 1 ? "" : "s"} · sharer ${report.sharerForwards} fwd / ${report.modelCalls} model calls`,
    x + pad, y + 4, w - 2 * pad);

  // Line 2: legend with each series' full scale.
  const sMax = Math.max(1, ...report.strength);
  const cMax = Math.max(...report.k, ...report.v) || 1;
  let lx = x + pad;
  const ly = y + 6 + text;
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

function installInspector(nodeType) {
  const computeSize = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function (out) {
    const size = computeSize.call(this, out);
    if (this.dcbFusionReport) {
      size[0] = Math.max(size[0], CHART.minWidth);
      size[1] += CHART.height;
    }
    return size;
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
    const result = onDrawForeground?.call(this, ctx, ...rest);
    const report = this.dcbFusionReport;
    if (report && !this.flags?.collapsed) {
      try {
        const { pad } = CHART;
        drawInspector(ctx, report, pad, this.size[1] - CHART.height + 4, this.size[0] - 2 * pad, CHART.height - 8);
      } catch (error) {
        console.warn(`${EXTENSION}: could not draw the fusion report`, error);
        this.dcbFusionReport = null;
      }
    }
    return result;
  };
}

app.registerExtension({
  name: EXTENSION,

  setup() {
    api.addEventListener(REPORT_EVENT, onReport);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (roleOf(nodeData?.name) === "fusion") installInspector(nodeType);
  },

  nodeCreated(node) {
    const role = roleOf(node.comfyClass);
    if (!role) return;
    node.color ??= COLOURS[role].color;
    node.bgcolor ??= COLOURS[role].bgcolor;
  },
});
