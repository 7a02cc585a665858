// The page of `mmlm serve`: text or image in, a grid of the nearest items out. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "mmlm-api-key";
const params = new URLSearchParams(location.search);
let apiKey = params.get("api_key") || sessionStorage.getItem(KEY) || "";
let lastText = null; // the text the results answer, for "where?" heatmaps
let picture = null; // the query picture's term ({image} or {item}) while it is shown: typed text adds to it

if (params.has("api_key")) { // keep the key out of the address bar and the history
  sessionStorage.setItem(KEY, apiKey);
  history.replaceState(null, "", location.pathname);
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function api(path, body) {
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  const init = body === undefined ? { headers }
    : { method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("key").focus();
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new Error(typeof data.detail === "string" ? data.detail : `HTTP ${response.status}`);
  }
  return response;
}

function withKey(url) {
  if (!apiKey) return url;
  const out = new URL(url, location.href);
  out.searchParams.set("api_key", apiKey); // an <img> cannot send a header
  return out.href;
}

function caption(meta) {
  return (meta.captions && meta.captions[0]) || meta.caption || meta.filepath || meta.url || "";
}

async function loadIndices() {
  try {
    const list = await (await api("indices")).json();
    $("index").replaceChildren(...list.map((ix) => new Option(`${ix.name} (${ix.items} images)`, ix.name)));
    status(`ready: ${list.map((ix) => ix.name).join(", ")}`);
  } catch (e) {
    status(e.message, true);
  }
}

// A typed query in rclip's syntax, as `mmlm search` reads it: terms joined by " + " / " - ", a weight as
// "2:golden retriever", quotes kept out; "#12" is stored item 12 ("more like this"). Returns /search's terms.
const SIGN = /(?<!\S)([+-])(?!\S)/;
const WEIGHT = /^(\d+(?:\.\d*)?|\.\d+):(.+)$/s;
function unquote(text) {
  text = text.trim();
  return text.length >= 2 && text[0] === text.at(-1) && `"'`.includes(text[0]) ? text.slice(1, -1).trim() : text;
}
function parseQuery(query) {
  let parts = query.trim().split(SIGN);
  parts = parts[0].trim() === "" && parts.length > 1 ? parts.slice(1) : ["+", ...parts];
  const terms = [];
  for (let i = 0; i < parts.length; i += 2) {
    let text = unquote(parts[i + 1] ?? "");
    let weight = 1;
    const found = WEIGHT.exec(text);
    if (found) { weight = Number(found[1]); text = unquote(found[2]); }
    if (!text) throw new Error(`query "${query}": an empty term (a + or - with nothing after it?)`);
    const item = /^#(\d+)$/.exec(text);
    terms.push({ ...(item ? { item: Number(item[1]) } : { text }), weight: parts[i] === "-" ? -weight : weight });
  }
  return terms;
}

// the filter and threshold boxes, as /search's where and min_score (an error names the bad box)
function filters() {
  const out = {};
  const where = $("where").value.trim();
  if (where) {
    try { out.where = JSON.parse(where); } catch (e) { throw new Error(`filter: not JSON (${e.message})`); }
  }
  const minScore = $("min-score").value.trim();
  if (minScore) out.min_score = Number(minScore);
  return out;
}

async function search(query, label) {
  status(`searching ${label}…`);
  let body;
  try {
    body = { index: $("index").value || null, modality: $("modality").value, k: Number($("k").value) || 24, ...filters(),
      ...query };
  } catch (e) {
    status(e.message, true);
    return;
  }
  const start = performance.now();
  try {
    const data = await (await api("search", body)).json();
    render(data.hits, data.index);
    status(`${data.hits.length} results for ${label} in ${Math.round(performance.now() - start)} ms`);
  } catch (e) {
    status(e.message, true);
  }
}

// "where?" toggles a result between its picture and its heatmap (fetched once), with the heatmap's legend
async function toggleHeat(hit, index, card, img, button) {
  if (!card.classList.contains("heat") && !img.dataset.heat) {
    try {
      const png = await (await api("explain", { text: lastText, item: hit.id, index })).blob();
      img.dataset.heat = URL.createObjectURL(png);
    } catch (e) {
      status(e.message, true);
      return;
    }
  }
  const heat = card.classList.toggle("heat");
  img.src = heat ? img.dataset.heat : img.dataset.picture;
  button.textContent = heat ? "picture" : "where?";
}

function legend() {
  const box = document.createElement("div");
  box.className = "legend";
  box.title = "where the picture matches the text: blue least, red most";
  const bar = document.createElement("span");
  bar.className = "bar";
  box.append("less", bar, "more");
  return box;
}

// the query picture beside the results: the dropped file, or the result a click searched by (none for a text)
function showQuery(src, label, term = null) {
  picture = src ? term : null;
  $("query-image").hidden = !src;
  if (!src) return;
  $("query-image").querySelector("img").src = src;
  $("query-image").querySelector("figcaption").textContent = label;
}

function noImage() {
  const none = document.createElement("div");
  none.className = "no-image";
  none.textContent = "no image";
  return none;
}

function render(hits, index) {
  const cards = hits.map((hit) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.tabIndex = 0;
    card.title = "search by this image";
    card.dataset.id = hit.id;
    // an item without an image file may still have pixels the server renders (a digits index): ask for them
    const img = document.createElement("img");
    img.src = img.dataset.picture = withKey(hit.image || `items/${encodeURIComponent(index)}/${hit.id}/image`);
    img.alt = caption(hit.metadata);
    img.loading = "lazy";
    img.addEventListener("error", () => img.replaceWith(noImage()), { once: true });
    card.append(img);
    const text = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    text.append(score, " ", caption(hit.metadata));
    card.append(text);
    if (hit.image && lastText) { // /explain reads the item's image file
      const where = document.createElement("button");
      where.className = "where";
      where.textContent = "where?";
      where.title = `where the picture matches "${lastText}"`;
      where.addEventListener("click", (e) => { e.stopPropagation(); toggleHeat(hit, index, card, img, where); });
      card.append(where, legend());
    }
    const go = () => {
      lastText = null;
      showQuery(img.isConnected ? img.dataset.picture : "", `image #${hit.id}`, { item: hit.id });
      search({ item: hit.id, index }, `image #${hit.id}`);
    };
    card.addEventListener("click", go);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    return card;
  });
  $("results").replaceChildren(...cards);
}

function searchFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    lastText = null;
    showQuery(reader.result, file.name, { image: reader.result });
    search({ image: reader.result }, file.name);
  };
  reader.readAsDataURL(file);
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("query").value.trim();
  if (!text) return;
  let terms;
  try {
    terms = parseQuery(text);
  } catch (err) {
    status(err.message, true);
    return;
  }
  const label = picture ? `${$("query-image").querySelector("figcaption").textContent} + "${text}"` : `"${text}"`;
  if (picture) terms.unshift({ ...picture, weight: 1 }); // the shown picture plus the typed terms
  const plain = terms.length === 1 && terms[0].text !== undefined && terms[0].weight === 1;
  lastText = plain ? terms[0].text : null; // a heatmap explains one text
  search(plain ? { text: terms[0].text } : { terms }, label);
});
$("clear-image").addEventListener("click", () => showQuery("", ""));
const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  searchFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
$("key").addEventListener("change", (e) => {
  apiKey = e.target.value;
  sessionStorage.setItem(KEY, apiKey);
  $("key-box").hidden = true;
  loadIndices();
});
loadIndices();
