// Dictionary viewer page. Every piece of data is put on the page with textContent or
// createTextNode (never innerHTML), so a token such as "<script>" is shown, not run.
"use strict";

const ROW_HEIGHT = 24;      // px, must match .row in style.css
const OVERSCAN = 8;         // rows rendered above and below the visible ones
const SVG_NS = "http://www.w3.org/2000/svg";  // a namespace name, not fetched

const state = {
  metadata: null, metric: null, ranking: [], rankOf: new Map(), selected: null,
  request: 0, listReadyMs: null, info: null, steer: null, steerPrompt: "",
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "className") node.className = value;
    else if (key === "title") node.title = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  const a = Math.abs(value);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return value.toExponential(3);
  return value.toPrecision(4).replace(/\.?0+$/, "");
}

// A token as it is shown: newlines, tabs and all-space tokens made visible.
function visibleToken(token) {
  const text = String(token);
  if (text === "") return { text: "∅", ws: true };
  const shown = text.replace(/\r/g, "␍").replace(/\n/g, "↵").replace(/\t/g, "⇥");
  if (/^\s+$/.test(text)) return { text: shown.replace(/ /g, "␣"), ws: true };
  return { text: shown, ws: shown !== text };
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function getJSON(url, options) {
  const response = await fetch(url, { ...(options || {}),
                                      headers: { Accept: "application/json",
                                                 ...((options && options.headers) || {}) } });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ---- feature list (virtualised: only the visible rows exist in the DOM) ----

function renderList() {
  const list = $("list");
  const spacer = $("list-spacer");
  spacer.style.height = `${state.ranking.length * ROW_HEIGHT}px`;
  const first = Math.max(0, Math.floor(list.scrollTop / ROW_HEIGHT) - OVERSCAN);
  const count = Math.ceil(list.clientHeight / ROW_HEIGHT) + 2 * OVERSCAN;
  const rows = [];
  for (let r = first; r < Math.min(state.ranking.length, first + count); r++) {
    const f = state.ranking[r];
    const row = el("div", { className: "row" + (f.id === state.selected ? " selected" : ""),
                            "data-id": String(f.id) },
      el("span", { className: "c-rank" }, String(r + 1)),
      el("span", { className: "c-id" }, String(f.id)),
      el("span", { className: "c-value" }, fmt(f.value)));
    row.style.top = `${r * ROW_HEIGHT}px`;
    rows.push(row);
  }
  spacer.replaceChildren(...rows);
}

function scrollToFeature(id) {
  const rank = state.rankOf.get(id);
  if (rank === undefined) return;
  const list = $("list");
  const top = rank * ROW_HEIGHT;
  if (top < list.scrollTop || top + ROW_HEIGHT > list.scrollTop + list.clientHeight) {
    list.scrollTop = Math.max(0, top - list.clientHeight / 2);
  }
  renderList();
}

async function loadRanking(metric) {
  const data = await getJSON(`/api/features?metric=${encodeURIComponent(metric)}`);
  state.metric = metric;
  state.ranking = data.features;
  state.rankOf = new Map(data.features.map((f, r) => [f.id, r]));
  $("value-head").textContent = metric;
  renderList();
  if (state.selected !== null) scrollToFeature(state.selected);
  if (state.info) renderFeature(state.info);  // its rank under the new metric
  updateHash();
}

// ---- feature detail ----

function histogram(hist) {
  const counts = hist.counts || [];
  const width = 520, height = 160, left = 44, bottom = 22, top = 8;
  const plotW = width - left - 8, plotH = height - top - bottom;
  const peak = Math.max(1, ...counts);
  const box = svg("svg", { class: "hist", width, height, viewBox: `0 0 ${width} ${height}`,
                           role: "img", "aria-label": "activation histogram" });
  const barW = plotW / Math.max(1, counts.length);
  const upper = hist.upper || 0;
  counts.forEach((c, b) => {
    const h = (c / peak) * plotH;
    const bar = svg("rect", { class: "bar", x: left + b * barW + 0.5, y: top + plotH - h,
                              width: Math.max(1, barW - 1), height: h });
    const tip = svg("title");
    tip.textContent = `${fmt((b * upper) / counts.length)} – ${fmt(((b + 1) * upper) / counts.length)}: ${c}`;
    bar.appendChild(tip);
    box.appendChild(bar);
  });
  box.appendChild(svg("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
  box.appendChild(svg("line", { x1: left, y1: top, x2: left, y2: top + plotH }));
  const labels = [[left, height - 6, "start", "0"], [left + plotW, height - 6, "end", fmt(upper)],
                  [left - 4, top + 10, "end", fmt(peak)], [left - 4, top + plotH, "end", "0"],
                  [left + plotW / 2, height - 6, "middle", "activation"]];
  for (const [x, y, anchor, text] of labels) {
    const t = svg("text", { x, y, "text-anchor": anchor });
    t.textContent = text;
    box.appendChild(t);
  }
  return box;
}

function contextRow(ctx, scale) {
  const row = el("div", { className: "context" },
    el("span", { className: "ctx-max", title: "largest activation in this context" },
       fmt(ctx.max)));
  ctx.tokens.forEach((token, i) => {
    const act = ctx.acts[i] || 0;
    const shown = visibleToken(token);
    const span = el("span", { className: "tok" + (shown.ws ? " ws" : "") +
                                          (i === ctx.pos ? " peak" : ""),
                              title: `${JSON.stringify(String(token))}  activation ${fmt(act)}` },
                    shown.text);
    const alpha = scale > 0 ? Math.min(1, Math.max(0, act / scale)) : 0;
    if (alpha > 0) span.style.backgroundColor = `rgba(255, 120, 20, ${alpha.toFixed(3)})`;
    row.appendChild(span);
  });
  return row;
}

function contextsBlock(title, contexts, scale, cls) {
  const block = el("div", { className: `contexts ${cls}` });
  if (!contexts.length) block.appendChild(el("p", { className: "muted" }, "none (the feature never fired)"));
  contexts.forEach((ctx) => block.appendChild(contextRow(ctx, scale)));
  return [el("h3", {}, `${title} (${contexts.length})`), block];
}

function effectsTable(title, pairs, cls) {
  const table = el("table", { className: cls }, el("tr", {}, el("th", { colspan: "2" }, title)));
  for (const [token, value] of pairs || []) {
    table.appendChild(el("tr", {}, el("td", { className: "tokcell" }, visibleToken(token).text),
                         el("td", { className: value >= 0 ? "pos" : "neg" }, fmt(value))));
  }
  if (!pairs || !pairs.length) table.appendChild(el("tr", {}, el("td", { className: "muted" }, "–")));
  return table;
}

function logitBlock(effects) {
  const lens = (state.metadata && state.metadata.logit_lens) || {};
  const parts = [el("h3", {}, "Logit effects"),
    el("p", { className: "note" }, `Decoder direction read through the unembedding ` +
       `(final layer norm ${lens.final_norm_applied ? "applied" : "not applied"}). ${lens.note || ""}`),
    el("div", { className: "logits lens" }, effectsTable("promoted", effects.promoted, "promoted"),
       effectsTable("suppressed", effects.suppressed, "suppressed"))];
  if (effects.ablation) {
    const ab = effects.ablation;
    const about = (state.metadata && state.metadata.ablation_note) ||
      "log p(clean) − log p(ablated) of the next token; positive: the feature raises it";
    parts.push(el("h3", {}, `Ablation over ${fmt(ab.n_contexts)} contexts`),
      el("p", { className: "note" }, about),
      el("div", { className: "logits ablation" },
         effectsTable("raised by the feature", ab.promoted, "promoted"),
         effectsTable("lowered by the feature", ab.suppressed, "suppressed")));
  }
  return parts;
}

// ---- steer box (only when the server was started with the model: --steer) ----

function numberField(label, name, value, attrs) {
  return el("label", { className: "steer-field" }, label,
            el("input", { name, type: "number", value: String(value), ...(attrs || {}) }));
}

function steerChanges(changes) {
  const rows = (list) => (list || []).map((c) => [c.token, c.p_intervened - c.p_clean, c]);
  const table = (title, list, cls) => {
    const t = el("table", { className: cls }, el("tr", {}, el("th", { colspan: "3" }, title)));
    for (const [token, change, c] of rows(list)) {
      t.appendChild(el("tr", {}, el("td", { className: "tokcell" }, visibleToken(token).text),
                       el("td", {}, `${fmt(c.p_clean)} → ${fmt(c.p_intervened)}`),
                       el("td", { className: change >= 0 ? "pos" : "neg" }, fmt(change))));
    }
    return t;
  };
  return el("div", { className: "logits steer-changes" },
            table("raised most", changes.raised, "promoted"),
            table("lowered most", changes.lowered, "suppressed"));
}

function steerResult(answer) {
  const column = (title, side) => el("div", { className: "steer-col" }, el("h4", {}, title),
    el("div", { className: "steer-text" }, answer.prompt,
       el("span", { className: "steer-new" }, side.text)));
  return [el("p", { className: "note" }, `Intervention: ${answer.interventions}`),
          el("div", { className: "steer-cols" }, column("baseline", answer.baseline),
             column("intervened", answer.intervened)),
          el("h4", {}, "Next token after the prompt: probability clean → intervened"),
          steerChanges(answer.changes)];
}

async function onSteer(event, id) {
  event.preventDefault();
  const form = event.target;
  const out = form.parentNode.querySelector(".steer-result");
  const value = (name) => form.elements[name].value;
  state.steerPrompt = value("prompt");
  const kind = value("kind");
  const edit = { kind, features: [id] };
  if (kind !== "ablate") edit.value = Number(value("value"));
  const body = { prompt: state.steerPrompt, edits: [edit],
                 max_new_tokens: Number(value("max_new_tokens")),
                 temperature: Number(value("temperature")), seed: Number(value("seed")),
                 from_position: Number(value("from_position")) };
  out.replaceChildren(el("p", { className: "muted" }, "generating…"));
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const answer = await getJSON("/api/steer", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    if (state.selected === id) out.replaceChildren(...steerResult(answer));
  } catch (e) {
    out.replaceChildren(el("p", { className: "error" }, `Steering failed: ${e.message}`));
  } finally {
    button.disabled = false;
  }
}

function steerBlock(info) {
  const steer = state.steer;
  if (!steer || !steer.available) return [];
  const kinds = el("select", { name: "kind", "aria-label": "edit" },
                   ...["add", "clamp", "scale", "ablate"].map((k) => el("option", { value: k }, k)));
  const prompt = el("textarea", { name: "prompt", rows: "2", maxlength: String(steer.max_prompt_chars),
                                  placeholder: "a prompt to continue", "aria-label": "prompt" });
  prompt.value = state.steerPrompt;
  prompt.addEventListener("input", () => { state.steerPrompt = prompt.value; });
  const form = el("form", { className: "steer", autocomplete: "off" }, prompt,
    el("div", { className: "steer-row" },
       el("label", { className: "steer-field" }, `feature ${info.id}:`, kinds),
       numberField("value", "value", 8, { step: "any" }),
       numberField("new tokens", "max_new_tokens", 30, { min: "1", max: String(steer.max_new_tokens) }),
       numberField("temperature", "temperature", 0, { min: "0", step: "any" }),
       numberField("seed", "seed", 0, { min: "0" }),
       numberField("from position", "from_position", 0, { min: "0" }),
       el("button", { type: "submit" }, "Generate")));
  form.addEventListener("submit", (event) => onSteer(event, info.id));
  return [el("h3", {}, "Steer"),
          el("p", { className: "note" }, `Generate with feature ${info.id} edited at every token ` +
             `(add: value × its decoder direction; clamp: set to value; scale: multiply by value; ` +
             `ablate: set to 0) in ${steer.submodule} (${steer.io}), beside the clean model.`),
          form, el("div", { className: "steer-result" })];
}

function note(text) {
  return text ? el("p", { className: "note" }, String(text)) : null;
}

function renderFeature(info) {
  const metrics = (state.metadata && state.metadata.metrics) || [];
  const stats = el("table", { className: "stats" });
  for (const name of metrics) stats.appendChild(el("tr", {}, el("td", {}, name), el("td", {}, fmt(info[name]))));
  const rank = state.rankOf.get(info.id);
  if (rank !== undefined) {
    stats.appendChild(el("tr", {}, el("td", {}, `rank by ${state.metric}`),
                         el("td", {}, `${rank + 1} of ${fmt(state.ranking.length)}`)));
  }
  const tops = info.top_contexts || [];
  const scale = info.max_activation || Math.max(0, ...tops.map((c) => c.max || 0));
  const hist = info.histogram;
  const detail = $("detail");
  detail.replaceChildren(...[
    el("h2", {}, `Feature ${info.id}`), stats,
    note("Token colour: activation / the feature's max; outlined: the context's peak; hover " +
         "a token for its value."),
    el("h3", {}, "Activation histogram"),
    hist ? histogram(hist) : el("p", { className: "muted" }, "no histogram in this run"),
    note(state.metadata && state.metadata.histogram_note),
    ...contextsBlock("Top contexts", tops, scale, "top"),
    ...contextsBlock("Random contexts", info.random_contexts || [], scale, "random"),
    ...logitBlock(info.logit_effects || {}),
    ...steerBlock(info)].filter(Boolean));
  detail.dataset.feature = String(info.id);
}

async function selectFeature(id) {
  const ticket = ++state.request;
  state.selected = id;
  scrollToFeature(id);
  updateHash();
  try {
    const info = await getJSON(`/api/feature_info?id=${id}`);
    if (ticket !== state.request) return;  // a later click won
    state.info = info;
    renderFeature(info);
    showError("");
  } catch (e) {
    if (ticket === state.request) showError(`Feature ${id}: ${e.message}`);
  }
}

function updateHash() {
  const params = new URLSearchParams();
  if (state.metric) params.set("metric", state.metric);
  if (state.selected !== null) params.set("id", String(state.selected));
  history.replaceState(null, "", `#${params}`);
}

// ---- wiring ----

function onSearch(event) {
  event.preventDefault();
  const text = $("search-id").value.trim();
  const size = state.metadata.dict_size;
  const msg = $("search-msg");
  if (!/^[0-9]+$/.test(text) || Number(text) >= size) {
    msg.textContent = `Type a feature id from 0 to ${size - 1}.`;
    return;
  }
  msg.textContent = "";
  selectFeature(Number(text));
}

function onKey(event) {
  if (state.selected === null || !["ArrowDown", "ArrowUp"].includes(event.key)) return;
  const rank = state.rankOf.get(state.selected);
  const next = state.ranking[rank + (event.key === "ArrowDown" ? 1 : -1)];
  if (next) { event.preventDefault(); selectFeature(next.id); }
}

async function init() {
  const list = $("list");
  let pending = false;
  list.addEventListener("scroll", () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; renderList(); });
  });
  list.addEventListener("click", (event) => {
    const row = event.target.closest(".row");
    if (row) selectFeature(Number(row.dataset.id));
  });
  list.addEventListener("keydown", onKey);
  $("search").addEventListener("submit", onSearch);
  $("metric").addEventListener("change", (event) => {
    loadRanking(event.target.value).catch((e) => showError(e.message));
  });
  window.addEventListener("resize", renderList);
  try {
    const meta = await getJSON("/api/metadata");
    state.metadata = meta;
    state.steer = await getJSON("/api/steer").catch(() => null);
    $("run-info").textContent = `${meta.run} · ${meta.dictionary} (${meta.dict_class}, ` +
      `${fmt(meta.activation_dim)} → ${fmt(meta.dict_size)}) on ${meta.model} ${meta.submodule}` +
      ` (${meta.io}) · ${fmt(meta.n_tokens)} tokens`;
    $("run-info").title = $("run-info").textContent;  // the whole line, when it is cut short
    const hash = new URLSearchParams(location.hash.slice(1));
    const metric = meta.metrics.includes(hash.get("metric")) ? hash.get("metric") : meta.metrics[0];
    $("metric").replaceChildren(...meta.metrics.map((m) => el("option", { value: m }, m)));
    $("metric").value = metric;
    await loadRanking(metric);
    state.listReadyMs = performance.now();
    $("list-status").textContent = `${fmt(meta.dict_size)} features · list ready in ` +
      `${Math.round(state.listReadyMs)} ms`;
    document.body.dataset.listReady = state.listReadyMs.toFixed(1);
    const id = Number(hash.get("id"));
    if (hash.get("id") !== null && Number.isInteger(id) && id >= 0 && id < meta.dict_size) selectFeature(id);
  } catch (e) {
    showError(`Could not load the run: ${e.message}`);
  }
}

document.addEventListener("DOMContentLoaded", init);
