// The playground's script (proxy/playground/routes.py): plain JavaScript, no build step, no
// library. It talks to this proxy's own API, as any client does:
//   GET v1/models            the model list, and whether the server needs a key
//   POST tokenize            the prompt's token count (images and video included) before sending
//   POST v1/chat/completions streamed (SSE read from fetch's body), with usage and timings
// Paths are relative to the page, so the playground works behind a path prefix too.
//
// The API key: a browser cannot send an Authorization header when it opens a page, so the page
// is served without the key and holds no data; this script asks for the key when the API
// answers 401 and sends it as a Bearer token on every call. It is kept in sessionStorage: this
// tab only, gone when the tab closes, never sent by the browser on its own (as a cookie would
// be, which other sites could make it send).
//
// Model output is untrusted text: it is only ever set with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "qwen-vl-playground.api-key";
const COUNT_DELAY_MS = 300; // the draft is counted once typing pauses this long
const EVENT_END = /\r\n\r\n|\n\n|\r\r/; // the blank line that ends a server-sent event

const ui = Object.fromEntries(
  [
    "model", "connection", "new-conversation", "key-panel", "key-form", "api-key", "forget-key",
    "key-why", "transcript", "composer", "system", "max-tokens", "temperature", "detail",
    "media", "attachments", "message", "token-count", "send", "stop", "error",
  ].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]),
);

const state = {
  conversation: [], // the messages of earlier turns, as sent (the system prompt apart)
  attachments: [], // chosen files: {kind: "image" | "video", name, url (a data: URL)}
  controller: null, // the AbortController of the chat request in flight
  countTimer: 0,
  countSeq: 0, // only the newest draft's count is shown
  counted: null, // {body, result}: the last count, reused when the same prompt is sent
};

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- the API -------------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

// `body`: a JSON value, or JSON text already serialised; none for a GET.
async function api(path, body, signal) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined || typeof body === "string" ? body : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// The OpenAI error envelope's message, which names the parameter at fault.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const error = (await response.json()).error;
    if (error && error.message) message = error.message;
  } catch {
    // not JSON: the status line says it
  }
  if (response.status === 401) {
    askForKey(apiKey() ? "The server refused this API key." : "This server needs an API key.");
  }
  return new APIError(response.status, message);
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = EVENT_END.exec(buffer))) {
        const block = buffer.slice(0, end.index);
        buffer = buffer.slice(end.index + end[0].length);
        const data = block
          .split(/\r\n|\r|\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- the key and the models ----------------------------------------------------------------

function askForKey(why) {
  ui.keyWhy.textContent = why;
  ui.keyPanel.hidden = false;
  ui.connection.textContent = "needs an API key";
  ui.apiKey.focus();
}

async function loadModels() {
  ui.connection.textContent = "connecting…";
  try {
    const models = (await (await api("v1/models")).json()).data;
    const chosen = ui.model.value;
    ui.model.replaceChildren(...models.map((model) => new Option(model.id, model.id)));
    if (models.some((model) => model.id === chosen)) ui.model.value = chosen;
    ui.keyPanel.hidden = true;
    ui.connection.textContent = apiKey() ? "connected, with the API key of this tab" : "connected";
    scheduleCount();
  } catch (error) {
    if (error.status !== 401) ui.connection.textContent = `cannot list models: ${error.message}`;
  }
}

// ---- the draft -----------------------------------------------------------------------------

function draftMessage() {
  const text = ui.message.value;
  if (!state.attachments.length) return { role: "user", content: text };
  const detail = ui.detail.value;
  const content = state.attachments.map((file) =>
    file.kind === "image"
      ? { type: "image_url", image_url: { url: file.url, detail } }
      : { type: "video_url", video_url: { url: file.url } },
  );
  if (text) content.push({ type: "text", text });
  return { role: "user", content };
}

function isEmpty(message) {
  return message.content === "" || (Array.isArray(message.content) && !message.content.length);
}

// The messages of a request: the system prompt, the conversation so far, then `draft`.
function requestMessages(draft, conversation = state.conversation) {
  const system = ui.system.value;
  const head = system.trim() ? [{ role: "system", content: system }] : [];
  return [...head, ...conversation, draft];
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  clearError();
  for (const file of files) {
    const kind = file.type.split("/")[0];
    if (kind !== "image" && kind !== "video") {
      showError(`${file.name}: neither an image nor a video (${file.type || "unknown type"})`);
      continue;
    }
    state.attachments.push({ kind, name: file.name, url: await readAsDataURL(file) });
  }
  ui.media.value = ""; // so the same file can be chosen again
  renderAttachments();
  scheduleCount();
}

function renderAttachments() {
  ui.attachments.replaceChildren(
    ...state.attachments.map((file, index) => {
      const item = element("li", { className: "attachment" }, mediaPreview(file));
      const remove = element("button", { type: "button", textContent: "×" });
      remove.setAttribute("aria-label", `remove ${file.name}`);
      remove.addEventListener("click", () => {
        state.attachments.splice(index, 1);
        renderAttachments();
        scheduleCount();
      });
      item.append(remove);
      return item;
    }),
  );
}

function mediaPreview(file) {
  if (file.kind === "image") return element("img", { src: file.url, alt: file.name, title: file.name });
  return element("span", { className: "chip", textContent: `video: ${file.name}` });
}

// ---- the token count -----------------------------------------------------------------------

// A count shown is always the current draft's: an edit marks it stale at once (and drops a
// count still on its way), and the new draft is counted once typing pauses.
function scheduleCount() {
  clearTimeout(state.countTimer);
  state.countSeq += 1;
  delete ui.tokenCount.dataset.count;
  ui.tokenCount.classList.add("stale");
  state.countTimer = setTimeout(() => countTokens().catch(() => {}), COUNT_DELAY_MS);
}

// Counts the draft's prompt with POST /tokenize (the model's own count: images and video after
// their pixel budgets, the chat template included): what the request will report as
// prompt_tokens. The result, or null when there is nothing to send.
async function countTokens() {
  clearTimeout(state.countTimer);
  const seq = ++state.countSeq;
  const draft = draftMessage();
  if (isEmpty(draft)) {
    showCount("", null);
    return null;
  }
  const body = JSON.stringify({ model: ui.model.value || undefined, messages: requestMessages(draft) });
  if (state.counted && state.counted.body === body) {
    showCount(describeCount(state.counted.result), state.counted.result.count);
    return state.counted.result;
  }
  showCount("counting…", null);
  try {
    const result = await (await api("tokenize", body)).json();
    state.counted = { body, result };
    if (seq === state.countSeq) showCount(describeCount(result), result.count);
    return result;
  } catch (error) {
    if (seq === state.countSeq) showCount(`cannot count: ${error.message}`, null);
    throw error;
  }
}

function showCount(text, count) {
  ui.tokenCount.textContent = text;
  ui.tokenCount.classList.remove("stale");
  if (count === null) delete ui.tokenCount.dataset.count;
  else ui.tokenCount.dataset.count = String(count);
}

function describeCount(result) {
  let text = 0;
  const media = [];
  for (const part of result.parts || []) {
    if (part.type === "text") {
      text += part.tokens;
    } else {
      const frames = part.frames ? `, ${part.frames} frames` : "";
      media.push(`${part.type} ${part.tokens} at ${part.width}×${part.height}${frames}`);
    }
  }
  const limit = result.max_model_len ? ` of ${result.max_model_len}` : "";
  return `Prompt: ${result.count} tokens${limit} (text ${[text, ...media].join(", ")})`;
}

// ---- sending -------------------------------------------------------------------------------

function chatBody(messages) {
  const body = {
    model: ui.model.value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    timings: true, // the request's stage timings on the last chunk (an extension of this server)
  };
  if (ui.maxTokens.value !== "") body.max_tokens = Number(ui.maxTokens.value);
  if (ui.temperature.value !== "") body.temperature = Number(ui.temperature.value);
  return body;
}

async function send(event) {
  event.preventDefault();
  if (state.controller) return;
  const draft = draftMessage();
  if (isEmpty(draft)) return;
  clearError();
  const saved = { text: ui.message.value, attachments: [...state.attachments] };
  // This turn's conversation: "New conversation" while it runs replaces state.conversation,
  // and this turn then ends in the old one.
  const conversation = state.conversation;
  state.controller = new AbortController();
  setBusy(true);
  let counted;
  try {
    counted = await countTokens(); // shown before the request goes out
  } catch (error) {
    showError(error.message);
    finishRequest();
    return;
  }
  const userTurn = renderUserTurn(draft, saved);
  const answer = renderAssistantTurn();
  let accepted = false;
  let text = "";
  let chunks = 0;
  let finish = null;
  let usage = null;
  let timings = null;
  let problem = null;
  try {
    const response = await api(
      "v1/chat/completions",
      chatBody(requestMessages(draft, conversation)),
      state.controller.signal,
    );
    accepted = true;
    conversation.push(draft);
    ui.message.value = "";
    state.attachments = [];
    renderAttachments();
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(0, chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          text += delta;
          chunks += 1;
          answer.text.textContent = text;
          answer.turn.dataset.chunks = String(chunks);
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) timings = chunk.timings;
    }
  } catch (error) {
    problem = error.name === "AbortError" ? "stopped" : error.message;
  }
  answer.turn.classList.remove("streaming");
  if (!accepted) {
    // Refused before it started (a 4xx names the parameter): the draft stays to be fixed.
    userTurn.remove();
    answer.turn.remove();
    if (problem !== "stopped") showError(problem);
  } else if (!text && problem) {
    // Nothing came back: the turn is taken out of the conversation and the draft restored.
    conversation.pop();
    userTurn.remove();
    answer.turn.remove();
    ui.message.value = saved.text;
    state.attachments = saved.attachments;
    renderAttachments();
    if (problem !== "stopped") showError(problem);
  } else {
    conversation.push({ role: "assistant", content: text });
    renderMeta(answer, { usage, timings, finish, counted, problem });
    if (problem && problem !== "stopped") showError(problem);
  }
  finishRequest();
  scheduleCount();
}

function finishRequest() {
  state.controller = null;
  setBusy(false);
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.conversation = [];
  ui.transcript.replaceChildren();
  clearError();
  scheduleCount();
}

// ---- the transcript ------------------------------------------------------------------------

function element(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function renderUserTurn(draft, saved) {
  const turn = element("li", { className: "turn user" }, element("div", { className: "role", textContent: "user" }));
  if (saved.attachments.length) {
    turn.append(element("div", { className: "media" }, ...saved.attachments.map(mediaPreview)));
  }
  turn.append(element("div", { className: "text", textContent: saved.text }));
  ui.transcript.append(turn);
  return turn;
}

function renderAssistantTurn() {
  const text = element("div", { className: "text" });
  const turn = element(
    "li",
    { className: "turn assistant streaming" },
    element("div", { className: "role", textContent: "assistant" }),
    text,
  );
  ui.transcript.append(turn);
  turn.scrollIntoView({ block: "end" });
  return { turn, text };
}

function renderMeta(answer, { usage, timings, finish, counted, problem }) {
  const meta = element("div", { className: "meta" });
  const facts = [];
  if (usage) {
    const details = usage.prompt_tokens_details || {};
    const media = ["image_tokens", "video_tokens"]
      .filter((name) => details[name])
      .map((name) => `${details[name]} ${name.replace("_tokens", "")}`);
    const prompt = media.length ? `${usage.prompt_tokens} (${media.join(", ")})` : `${usage.prompt_tokens}`;
    facts.push(`prompt ${prompt}`, `completion ${usage.completion_tokens}`, `total ${usage.total_tokens} tokens`);
    answer.turn.dataset.promptTokens = String(usage.prompt_tokens);
    answer.turn.dataset.completionTokens = String(usage.completion_tokens);
    if (counted && counted.count !== usage.prompt_tokens) {
      facts.push(`counted ${counted.count} before sending`);
    }
  }
  if (finish) facts.push(`finish: ${finish}`);
  if (problem) facts.push(problem);
  meta.append(element("div", { className: "usage", textContent: facts.join(" · ") }));
  if (timings) meta.append(timingsTable(timings));
  answer.turn.append(meta);
  answer.turn.dataset.state = "done";
}

// The server's stage timings ({stage}_ms: milliseconds), in its order.
function timingsTable(timings) {
  const rows = Object.entries(timings).map(([name, value]) => {
    const ms = name.endsWith("_ms") && typeof value === "number";
    const label = name.replace(/_ms$/, "").replaceAll("_", " ");
    return element(
      "tr",
      {},
      element("td", { textContent: label }),
      element("td", { textContent: ms ? `${value.toFixed(1)} ms` : String(value) }),
    );
  });
  return element("table", { className: "timings" }, element("tbody", {}, ...rows));
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// ---- wiring --------------------------------------------------------------------------------

ui.composer.addEventListener("submit", send);
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.newConversation.addEventListener("click", newConversation);
ui.media.addEventListener("change", () => addFiles([...ui.media.files]));
for (const input of [ui.message, ui.system]) input.addEventListener("input", scheduleCount);
for (const input of [ui.model, ui.detail]) input.addEventListener("change", scheduleCount);
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) ui.composer.requestSubmit();
});
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
  ui.apiKey.value = "";
  state.counted = null;
  loadModels();
});
ui.forgetKey.addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  askForKey("The key is forgotten.");
});
loadModels();
