// The page of `mmlm serve`: text or image in, a grid of the nearest items out. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "mmlm-api-key";
const params = new URLSearchParams(location.search);
let apiKey = params.get("api_key") || sessionStorage.getItem(KEY) || "";
let lastText = null; // the text the results answer, for "where?" heatmaps

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

async function search(query, label) {
  const body = { index: $("index").value || null, modality: $("modality").value, k: Number($("k").value) || 24, ...query };
  status(`searching ${label}…`);
  const start = performance.now();
  try {
    const data = await (await api("search", body)).json();
    render(data.hits, data.index);
    status(`${data.hits.length} results for ${label} in ${Math.round(performance.now() - start)} ms`);
  } catch (e) {
    status(e.message, true);
  }
}

async function explain(hit, index, img) {
  try {
    const png = await (await api("explain", { text: lastText, item: hit.id, index })).blob();
    img.src = URL.createObjectURL(png);
  } catch (e) {
    status(e.message, true);
  }
}

function render(hits, index) {
  const cards = hits.map((hit) => {
    const card = document.createElement("figure");
    card.className = "card";
    card.tabIndex = 0;
    card.title = "search by this image";
    card.dataset.id = hit.id;
    let img = null;
    if (hit.image) {
      img = document.createElement("img");
      img.src = withKey(hit.image);
      img.alt = caption(hit.metadata);
      img.loading = "lazy";
      card.append(img);
    } else {
      const none = document.createElement("div");
      none.className = "no-image";
      none.textContent = "no image";
      card.append(none);
    }
    const text = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    text.append(score, " ", caption(hit.metadata));
    card.append(text);
    if (img && lastText) {
      const where = document.createElement("button");
      where.className = "where";
      where.textContent = "where?";
      where.title = `where the picture matches "${lastText}"`;
      where.addEventListener("click", (e) => { e.stopPropagation(); explain(hit, index, img); });
      card.append(where);
    }
    const go = () => { lastText = null; search({ item: hit.id, index }, `image #${hit.id}`); };
    card.addEventListener("click", go);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    return card;
  });
  $("results").replaceChildren(...cards);
}

function searchFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { lastText = null; search({ image: reader.result }, file.name); };
  reader.readAsDataURL(file);
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("query").value.trim();
  if (text) { lastText = text; search({ text }, `"${text}"`); }
});
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
