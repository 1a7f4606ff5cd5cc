// The inferd playground: chat, embeddings and rerank against this server's own API.
// Everything the server or a model returns is written with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "inferd.apiKey";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- notices, API key and requests ------------------------------------------------------------

function showNotice(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = !message;
}

function showError(error) {
  if (error.name === "AbortError") return;
  showNotice(error.message || String(error));
  if (error.status === 401) $("api-key").focus();
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// The server answers in OpenAI's shape ({error: {message}}), Cohere's ({message}) or TEI's ({error}).
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const tei = typeof body?.error === "string" ? body.error : undefined;
    message = body?.error?.message ?? body?.message ?? tei ?? message;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) {
    message = $("api-key").value.trim()
      ? `The server refused this API key: check the "API key" field at the top. (${message})`
      : 'This server needs an API key: enter it in the "API key" field at the top.';
  }
  return new ApiError(response.status, message);
}

// Relative paths, so the page also works behind a proxy that serves inferd under a prefix.
async function api(path, body, signal) {
  const init = { method: body === undefined ? "GET" : "POST", headers: headers(), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

// ---- tabs and models ------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
}

// models: the server's list, or null when it could not be read (the notice says why).
function fillModels(select, models) {
  const previous = select.value;
  const names = (models ?? []).filter((m) => m.kind === select.dataset.kind).map((m) => m.id);
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (!names.length) select.append(new Option(models ? `no ${select.dataset.kind} model served` : "—", ""));
  if (names.includes(previous)) select.value = previous;
  select.disabled = !names.length;
  select.form?.querySelector('[type="submit"]')?.toggleAttribute("disabled", !names.length);
}

async function loadModels() {
  let models = null;
  try {
    models = (await (await api("v1/models")).json()).data;
    showNotice("");
  } catch (error) {
    showError(error);
  }
  for (const select of document.querySelectorAll("select[data-kind]")) fillModels(select, models);
  $("chat-send").disabled = $("chat-model").disabled;
}

// ---- chat -----------------------------------------------------------------------------------

const chat = { messages: [], controller: null };

// The log follows a streaming reply only while the reader is at its end (not scrolled back to read).
function isAtEnd(log) {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
}

function scrollToEnd() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

function bubble(role, text) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  node.append(content);
  $("chat-log").append(node);
  scrollToEnd();
  return node;
}

function assistantBubble() {
  const node = bubble("assistant", "");
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.open = true;
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "reasoning";
  const text = document.createElement("div");
  reasoning.append(summary, text);
  const stats = document.createElement("div");
  stats.className = "stats";
  node.prepend(reasoning);
  node.append(stats);
  return { node, reasoning, reasoningText: text, content: node.querySelector(".content"), stats };
}

// Yields the data of each server-sent event; a line-based parser, as the SSE format defines.
async function* serverSentData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "" && data.length) {
        yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
}

function chatRequest(messages) {
  const body = {
    model: $("chat-model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = $("chat-temperature").value;
  const maxTokens = $("chat-max-tokens").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

function formatStats(timing, usage, stopped) {
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  const total = (timing.end - timing.start) / 1000;
  if (usage && timing.first !== null) {
    // Decode speed: the tokens after the first over the time after it (the first is the TTFT).
    const decode = (timing.end - timing.first) / 1000;
    const count = usage.completion_tokens;
    const rate = count > 1 && decode > 0 ? (count - 1) / decode : count / total;
    parts.push(`${rate.toFixed(1)} tok/s`);
  }
  if (timing.first !== null) parts.push(`TTFT ${Math.round(timing.first - timing.start)} ms`);
  parts.push(`${total.toFixed(2)} s`);
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

async function streamReply(view, messages, signal) {
  const timing = { start: performance.now(), first: null, end: null };
  let usage = null;
  let reply = "";
  let thoughts = "";
  // The text goes on the page once per frame, not once per token: a fast model sends a thousand
  // deltas a second, and laying out the growing reply for each kept the page (and its Stop
  // button) from answering until the stream ended.
  let frame = null;
  const show = () => {
    frame = null;
    const follow = isAtEnd($("chat-log"));
    if (thoughts) {
      view.reasoning.hidden = false;
      view.reasoningText.textContent = thoughts;
    }
    view.content.textContent = reply;
    if (follow) scrollToEnd();
  };
  try {
    const response = await api("v1/chat/completions", chatRequest(messages), signal);
    for await (const data of serverSentData(response)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(0, event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      const reasoning = delta?.reasoning_content ?? delta?.reasoning;
      if (!reasoning && !delta?.content) continue;
      timing.first ??= performance.now();
      if (reasoning) thoughts += reasoning;
      if (delta.content) reply += delta.content;
      frame ??= requestAnimationFrame(show);
    }
  } finally {
    timing.end = performance.now();
    if (frame !== null) cancelAnimationFrame(frame);
    show(); // everything that arrived, before the caller reads it back from the page
    const follow = isAtEnd($("chat-log"));
    view.stats.textContent = formatStats(timing, usage, signal.aborted);
    if (follow) scrollToEnd();
  }
  return reply;
}

async function sendChat() {
  const input = $("chat-input");
  const text = input.value;
  if (!text.trim() || chat.controller || !$("chat-model").value) return;
  input.value = "";
  const messages = chat.messages; // "New chat" mid-reply must not receive this turn's ending
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const view = assistantBubble();
  view.node.classList.add("streaming");
  chat.controller = new AbortController();
  $("chat-stop").disabled = false;
  $("chat-send").disabled = true;
  try {
    const reply = await streamReply(view, messages, chat.controller.signal);
    messages.push({ role: "assistant", content: reply });
    showNotice("");
  } catch (error) {
    if (error.name === "AbortError") {
      // Stopped: what arrived so far stays in the conversation.
      messages.push({ role: "assistant", content: view.content.textContent });
    } else {
      messages.pop(); // the failed turn is not part of the conversation: it can be resent
      input.value ||= text;
      view.node.classList.add("failed");
      view.content.textContent = error.message;
      showError(error);
    }
  } finally {
    view.node.classList.remove("streaming");
    chat.controller = null;
    $("chat-stop").disabled = true;
    $("chat-send").disabled = $("chat-model").disabled;
  }
}

function clearChat() {
  chat.controller?.abort();
  chat.messages = [];
  $("chat-log").replaceChildren();
}

// ---- embeddings and rerank ------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0;
  let normA = 0;
  let normB = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    normA += a[i] * a[i];
    normB += b[i] * b[i];
  }
  return dot / Math.sqrt(normA * normB);
}

async function compareTexts() {
  const body = { model: $("embed-model").value, input: [$("embed-a").value, $("embed-b").value] };
  const { data, usage } = await (await api("v1/embeddings", body)).json();
  const [a, b] = data.map((d) => d.embedding);
  $("embed-similarity").textContent = cosine(a, b).toFixed(4);
  $("embed-detail").textContent = `${a.length} dimensions · ${usage?.prompt_tokens ?? "?"} tokens`;
  $("embed-result").hidden = false;
}

async function rankDocuments() {
  const documents = $("rerank-documents").value.split("\n").map((d) => d.trim()).filter(Boolean);
  const body = { model: $("rerank-model").value, query: $("rerank-query").value, documents };
  const { results } = await (await api("v1/rerank", body)).json();
  $("rerank-results").replaceChildren(
    ...results.map(({ index, relevance_score: score }) => {
      const item = document.createElement("li");
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = score.toFixed(4);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
      const text = document.createElement("span");
      text.className = "document";
      text.textContent = documents[index];
      item.append(value, text, bar);
      return item;
    }),
  );
}

// Runs a form's action with its submit button disabled, showing any error.
function onSubmit(form, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector('[type="submit"]');
    button.disabled = true;
    try {
      await action();
      showNotice("");
    } catch (error) {
      showError(error);
    } finally {
      button.disabled = form.querySelector("select").disabled;
    }
  });
}

// ---- wiring ---------------------------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) ?? "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab.id.slice(4)));
  }
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sendChat();
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendChat();
    }
  });
  $("chat-stop").addEventListener("click", () => chat.controller?.abort());
  $("chat-clear").addEventListener("click", clearChat);
  onSubmit($("embed-form"), compareTexts);
  onSubmit($("rerank-form"), rankDocuments);
  loadModels();
}

start();
