// The search page of `embedstore serve`: plain JavaScript over the JSON API (/api/...).
// Text from the store or the server is only ever inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token") || "";

const state = {
  info: null,
  query: null,      // the query on screen: {kind: "image", file, url} | {kind: "row", row, path, label} | {kind: "text", text}
  offset: 0,
  latest: 0,        // id of the newest request: answers to older ones are dropped
  searches: 0,      // searches answered and shown (the browser test waits on it)
};

// ---------------------------------------------------------------- API

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

function detailMessage(detail, status) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {  // FastAPI's validation errors: [{loc, msg, ...}]
    return detail.map((d) => {
      const loc = (d.loc || []).filter((p) => p !== "body" && p !== "query").join(".");
      return (loc ? loc + ": " : "") + (d.msg || JSON.stringify(d));
    }).join("; ");
  }
  return detail ? JSON.stringify(detail) : "the server answered " + status;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  let res;
  try {
    res = await fetch("api/" + path, Object.assign({}, options, { headers }));
  } catch (e) {
    throw new Error("cannot reach the server (" + e.message + "): is `embedstore serve` still running?");
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!res.ok) {
    const msg = body && "detail" in body ? detailMessage(body.detail, res.status)
      : (text.trim().slice(0, 300) || res.statusText || "");
    throw new Error(msg + " (HTTP " + res.status + ")");
  }
  if (body === null) throw new Error("the server sent no JSON (HTTP " + res.status + ")");
  return body;
}

function rowImageURL(row, kind, size) {
  return withToken("api/rows/" + row + "/" + kind + (size ? "?size=" + size : ""));
}

// ---------------------------------------------------------------- page state

function currentSpace() {
  const name = $("space").value;
  return (state.info && state.info.spaces.find((s) => s.name === name)) || null;
}

function pageSize() { return parseInt($("k").value, 10) || 24; }

function where() {
  // option 0 is "all"; the others carry the name as is ("" is the unlabelled images' option)
  const w = {};
  if ($("label").selectedIndex > 0) w.label = $("label").value;
  if ($("split").selectedIndex > 0) w.split = $("split").value;
  return w;
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

function fillFilter(select, counts) {
  const keep = select.selectedIndex > 0 ? select.value : null;
  select.replaceChildren(option("", "all"));
  for (const [name, n] of Object.entries(counts || {})) {
    select.append(option(name, (name === "" ? "(none)" : name) + " (" + n + ")"));
  }
  const again = keep === null ? -1 : [...select.options].findIndex((o, i) => i > 0 && o.value === keep);
  select.selectedIndex = Math.max(0, again);
}

function fmtIndex(index, exact) {
  if (!index) return exact ? "none: exact search" : "–";
  const parts = [index.factory || index.kind || "index"];
  for (const [k, v] of Object.entries(index.params || {})) parts.push(k + "=" + v);
  if (typeof index.recall_at_10 === "number") parts.push("recall@10 " + index.recall_at_10.toFixed(2));
  return parts.join(" · ");
}

function fmtSeconds(s) {
  return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms" : s.toFixed(2) + " s";
}

function applySpace() {
  const sp = currentSpace();
  const images = !sp || sp.image_queries;
  $("text-box").hidden = !(sp && sp.text_queries);
  $("file").disabled = !images;
  $("file").closest("label").classList.toggle("disabled", !images);
  $("drop").classList.toggle("disabled", !images);
  $("drop-hint").replaceChildren();
  const strong = document.createElement("strong");
  const span = document.createElement("span");
  if (images) {
    strong.textContent = "Drop an image here";
    span.textContent = sp && sp.text_queries ? "or click to choose one, or type text above" : "or click to choose one";
  } else {
    strong.textContent = "This space takes no image queries";
    span.textContent = "its vectors were imported: " + (sp.text_queries ? "type text, or " : "") + "try a random image";
  }
  $("drop-hint").append(strong, span);
  if (sp) {
    $("index").textContent = sp.index_building ? "being brought up to date…" : fmtIndex(sp.index, true);
    $("backbone").textContent = sp.backbone + ", " + sp.dim + "\u00a0dims, " + sp.rows + "\u00a0rows";
  }
}

async function loadInfo() {
  const info = await api("info");
  state.info = info;
  const name = (info.store || "").split(/[\\/]/).pop();
  $("store").textContent = name + " · " + info.images + " images";
  $("store").title = info.store + (info.root ? "\nimages under " + info.root : "");
  const keep = $("space").value;
  $("space").replaceChildren(...info.spaces.map((s) => option(s.name, s.name)));
  $("space").value = info.spaces.some((s) => s.name === keep) ? keep : (info.default_space || "");
  fillFilter($("label"), info.labels);
  fillFilter($("split"), info.splits);
  $("random").disabled = !info.images;
  applySpace();
  if (!info.spaces.length) showError(info.store + " has no embedding space yet: run `embedstore embed` first");
}

// ---------------------------------------------------------------- searching

async function request(query, offset, k) {
  const sp = currentSpace();
  const w = where();
  if (query.kind === "image") {
    const params = new URLSearchParams({ k, offset });
    if (sp) params.set("space", sp.name);
    for (const [key, v] of Object.entries(w)) params.set(key, v);
    const form = new FormData();
    form.append("file", query.file, query.file.name || "upload");
    return api("search/image?" + params, { method: "POST", body: form });
  }
  const body = { k, offset, where: w };
  if (sp) body.space = sp.name;
  if (query.kind === "row") Object.assign(body, { rows: [query.row], exclude_self: true });
  else body.texts = [query.text];
  return api("search", { method: "POST", headers: { "Content-Type": "application/json" },
                         body: JSON.stringify(body) });
}

async function search(query, offset = 0) {
  const id = ++state.latest;
  const k = pageSize();
  $("results").dataset.state = "loading";
  document.body.classList.add("busy");
  try {
    const res = await request(query, offset, k);
    if (id !== state.latest) return;
    clearError();
    showQuery(query);
    state.offset = offset;
    render(res, query, offset, k);
    state.searches += 1;
    $("results").dataset.searches = String(state.searches);
    $("results").dataset.state = "done";
  } catch (e) {
    if (query.kind === "image" && query !== state.query) URL.revokeObjectURL(query.url);
    if (id !== state.latest) return;
    showError(e.message);
    $("results").dataset.state = "error";
  } finally {
    if (id === state.latest) document.body.classList.remove("busy");
  }
}

function showQuery(query) {
  const prev = state.query;
  if (prev && prev.kind === "image" && prev !== query) URL.revokeObjectURL(prev.url);
  state.query = query;
  const img = $("query-img");
  const caption = $("query-caption");
  $("drop-hint").hidden = true;
  $("query-text").hidden = query.kind !== "text";
  img.hidden = query.kind === "text";
  caption.replaceChildren();
  if (query.kind === "text") {
    $("query-text").textContent = "“" + query.text + "”";
    caption.textContent = "text query";
  } else if (query.kind === "image") {
    img.src = query.url;
    caption.textContent = "uploaded: " + (query.file.name || "image");
  } else {
    img.src = rowImageURL(query.row, "thumbnail", 256);
    const link = document.createElement("a");
    link.href = rowImageURL(query.row, "image");
    link.target = "_blank";
    link.textContent = query.path || "row " + query.row;
    const label = document.createElement("span");
    label.className = "tag";
    label.textContent = query.label || "";
    label.hidden = !query.label;
    caption.append("row " + query.row + ": ", link, " ", label);
  }
  $("drop").dataset.query = query.kind === "row" ? "row:" + query.row : query.kind;
}

function labelHue(label) {
  let h = 0;
  for (const c of label) h = (h * 31 + c.codePointAt(0)) % 360;
  return h;
}

function hitElement(hit, rank) {
  const el = document.createElement("div");
  el.className = "hit";
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.dataset.row = String(hit.row);
  el.dataset.label = hit.label;
  el.dataset.split = hit.split || "";
  el.dataset.score = String(hit.score);
  el.title = "Search from this image" + (hit.split ? " (split: " + hit.split + ")" : "");

  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.loading = "lazy";
  img.draggable = false;  // a thumbnail dragged onto the page is not a file to search with
  img.alt = hit.path;
  img.src = rowImageURL(hit.row, "thumbnail", 256);
  img.addEventListener("error", () => thumb.classList.add("broken"));
  const num = document.createElement("span");
  num.className = "rank";
  num.textContent = String(rank);
  num.title = "rank";
  thumb.append(img, num);

  const line = document.createElement("div");
  line.className = "line";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  score.title = "cosine similarity";
  line.append(score);
  if (hit.label) {
    const tag = document.createElement("span");
    tag.className = "tag label";
    tag.textContent = hit.label;
    tag.title = "label: " + hit.label;
    tag.style.setProperty("--hue", labelHue(hit.label));
    line.append(tag);
  }

  const path = document.createElement("a");
  path.className = "path";
  path.href = rowImageURL(hit.row, "image");
  path.target = "_blank";
  const text = document.createElement("span");
  text.dir = "ltr";  // the link is right-to-left to cut long paths at their start; the path itself reads left to right
  text.textContent = hit.path;
  path.append(text);
  path.title = hit.path + " (open the image)";
  path.addEventListener("click", (e) => e.stopPropagation());

  el.append(thumb, line, path);
  const go = () => search({ kind: "row", row: hit.row, path: hit.path, label: hit.label });
  el.addEventListener("click", go);
  el.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); go(); }
  });
  return el;
}

function render(res, query, offset, k) {
  const hits = (res.results && res.results[0]) || [];
  const shown = hits.slice(0, k);
  // the server says whether the next page has hits; it must also stay within the server's max_k
  const limit = state.info ? state.info.limits.max_k : Infinity;
  const more = Boolean(res.more) && offset + 2 * k <= limit;
  const grid = $("results");
  grid.replaceChildren(...shown.map((h, i) => hitElement(h, offset + i + 1)));
  if (!shown.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = offset ? "No more hits." : "No hits" + (Object.keys(res.where || {}).length
      ? " pass the filters." : ".");
    grid.append(empty);
  }
  const w = Object.entries(res.where || {}).map(([key, v]) => key + " " + (v === "" ? "(none)" : v));
  $("summary").textContent = (shown.length ? "Hits " + (offset + 1) + "–" + (offset + shown.length) : "No hits")
    + " for " + (res.queries && res.queries[0] ? res.queries[0].query : "the query")
    + (w.length ? " · " + w.join(" · ") : "") + " · " + res.space;
  $("page").textContent = "page " + (Math.floor(offset / k) + 1);
  $("prev").disabled = offset === 0;
  $("next").disabled = !more;
  $("index").textContent = fmtIndex(res.index, res.exact);
  const stages = res.stages || {};
  const total = Object.values(stages).reduce((a, b) => a + b, 0);
  $("time").textContent = fmtSeconds(total);
  $("time").title = Object.entries(stages).map(([key, v]) => key + ": " + fmtSeconds(v)).join("\n");
  $("notes").replaceChildren(...(res.notes || []).map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    return li;
  }));
}

function searchFile(file) {
  if (!file) return;
  const sp = currentSpace();
  if (sp && !sp.image_queries) {
    showError("space " + sp.name + " takes no image queries (its vectors were imported): choose another space");
    return;
  }
  search({ kind: "image", file, url: URL.createObjectURL(file) });
}

function rerun() {
  if (state.query) search(state.query, 0);
}

// ---------------------------------------------------------------- wiring

function init() {
  const controls = $("controls");
  $("random").addEventListener("click", () => {
    const row = Math.floor(Math.random() * state.info.images);
    api("rows/" + row).then((r) => search({ kind: "row", row, path: r.path, label: r.label }),
                              (e) => showError(e.message));
  });

  $("file").addEventListener("change", (e) => {
    searchFile(e.target.files[0]);
    e.target.value = "";  // choosing the same file again searches again
  });
  $("drop").addEventListener("click", () => { if (!$("file").disabled) $("file").click(); });
  $("drop").addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && !$("file").disabled) { e.preventDefault(); $("file").click(); }
  });

  controls.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("text").value.trim();
    if (!$("text-box").hidden && text) search({ kind: "text", text });
  });
  $("space").addEventListener("change", () => { applySpace(); rerun(); });
  for (const id of ["label", "split", "k"]) $(id).addEventListener("change", rerun);
  $("prev").addEventListener("click", () => {
    if (state.query) search(state.query, Math.max(0, state.offset - pageSize()));
  });
  $("next").addEventListener("click", () => {
    if (state.query) search(state.query, state.offset + pageSize());
  });
  $("error-close").addEventListener("click", clearError);

  // drop an image anywhere on the page; paste one, too
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth += 1;
    $("drag-cover").hidden = false;
  });
  document.addEventListener("dragleave", (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (!depth) $("drag-cover").hidden = true;
  });
  document.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $("drag-cover").hidden = true;
    searchFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    if (e.target === $("text")) return;
    const file = [...(e.clipboardData ? e.clipboardData.files : [])][0];
    if (file) searchFile(file);
  });

  loadInfo().catch((e) => {
    $("store").textContent = "not connected";
    showError(e.message);
  });
}

init();
