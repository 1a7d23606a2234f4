// The conversational search page: plain JS, no build step, nothing loaded from outside this server.
// Every text from the server is set as textContent, never parsed as HTML: passages are data.
"use strict";

const SNIPPET_CHARS = 320;
const state = { turns: [], conversationId: newConversationId(), auth: false };
const $ = (id) => document.getElementById(id);

function newConversationId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim() || sessionStorage.getItem("chatretriever-key") || "";
  if (key) {
    sessionStorage.setItem("chatretriever-key", key);
    h.Authorization = "Bearer " + key;
  }
  return h;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

function shorten(text) {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length <= SNIPPET_CHARS ? flat : flat.slice(0, SNIPPET_CHARS).replace(/\s\S*$/, "") + " ...";
}

function renderTurns() {
  const list = $("turns");
  list.replaceChildren(...state.turns.map((t) => {
    const li = document.createElement("li");
    li.textContent = t.content;
    return li;
  }));
}

function renderResults(hits) {
  const list = $("results");
  list.replaceChildren(...hits.map((hit) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = hit.id;
    const title = document.createElement("span");
    title.className = "hit-title";
    title.textContent = hit.title || hit.id;
    const meta = document.createElement("span");
    meta.className = "hit-meta";
    meta.textContent = `${hit.id} · ${hit.score.toFixed(3)}`;
    const text = document.createElement("p");
    text.className = "hit-text";
    text.textContent = shorten(hit.text || "");
    li.append(title, meta, text);
    return li;
  }));
  $("results-for").textContent = state.turns.length ? `(after turn ${state.turns.length})` : "";
}

async function search(event) {
  event.preventDefault();
  const input = $("turn-input");
  const content = input.value.trim();
  if (!content) return;
  const turns = [...state.turns, { role: "user", content }];
  const body = { messages: turns, k: Number($("k").value), conversation_id: state.conversationId };
  $("send").disabled = true;
  setStatus("searching...");
  try {
    const response = await fetch("/v1/search", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      if (response.status === 401) $("key-row").hidden = false;
      setStatus(`error ${response.status}: ${await errorText(response)}`, true);
      return;
    }
    const result = await response.json();
    state.turns = turns;
    input.value = "";
    renderTurns();
    renderResults(result.data);
    setStatus(`${result.data.length} passages for ${turns.length} turn(s)`);
  } catch (e) {
    setStatus(`cannot reach the server: ${e}`, true);
  } finally {
    $("send").disabled = false;
    input.focus();
  }
}

async function reset() {
  const old = state.conversationId;
  state.turns = [];
  state.conversationId = newConversationId();
  renderTurns();
  renderResults([]);
  setStatus("new conversation");
  fetch(`/v1/conversations/${encodeURIComponent(old)}`, { method: "DELETE", headers: headers() })
    .catch(() => {});  // forgetting the cache is best effort
  $("turn-input").focus();
}

async function loadInfo() {
  try {
    const response = await fetch("/healthz");
    const info = await response.json();
    state.auth = info.auth;
    $("key-row").hidden = !info.auth;
    $("server-info").textContent = `${info.passages} passages · model ${info.model}`;
  } catch (e) {
    $("server-info").textContent = "the server does not answer";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("turn-form").addEventListener("submit", search);
  $("reset").addEventListener("click", reset);
  loadInfo();
});
