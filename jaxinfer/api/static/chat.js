// The chat page: a conversation with this server's /v1/chat/completions, streamed as server-sent
// events over fetch(), with the sampling settings beside it. Stop aborts the fetch; the server sees
// the connection close and aborts the request. The API key, when the server asks for one (401), is
// kept in localStorage.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const API_KEY = "jaxinfer.apiKey";  // the localStorage entry
const messages = [];  // the conversation so far, {role, content}, without the system prompt
let model = null;  // the served model's name, from /v1/models
let controller = null;  // the AbortController of the answer being streamed

// fetch() with the API key; on 401, asks for a key and tries again.
async function api(path, init = {}) {
  for (;;) {
    const key = localStorage.getItem(API_KEY);
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await askForKey(key ? "The server refused this API key." : "This server needs an API key.");
  }
}

function askForKey(reason) {
  $("key-reason").textContent = reason;
  $("api-key").value = "";
  $("key-dialog").showModal();
  return new Promise((resolve, reject) => {
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      localStorage.setItem(API_KEY, $("api-key").value.trim());
      $("key-dialog").close();
      resolve();
    };
    $("key-dialog").oncancel = () => reject(new Error("no API key given"));
  });
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await api("v1/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  const card = (await response.json()).data[0];
  model = card.id;
  $("model").textContent = `${card.id} · context ${card.max_model_len} tokens`;
}

// The JSON objects of an event stream's `data:` lines, up to [DONE].
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function settings() {
  const body = { temperature: Number($("temperature").value), top_p: Number($("top-p").value) };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  return body;
}

function conversation() {
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : [...messages];
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user").body.textContent = text;
  const answer = addAnswer();
  const body = { model, messages: conversation(), stream: true, stream_options: { include_usage: true }, ...settings() };
  controller = new AbortController();
  setStreaming(true);
  const started = performance.now();
  let content = "", firstToken = null, usage = null;
  try {
    const response = await api("v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices[0]?.delta?.content;
      if (delta) {
        firstToken ??= performance.now();
        content += delta;
        showAnswer(answer, content);
      }
    }
    answer.meta.textContent = usage ? statistics(usage, started, firstToken, performance.now()) : "";
  } catch (error) {
    answer.meta.textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
    answer.element.classList.toggle("failed", error.name !== "AbortError");
  } finally {
    if (content) messages.push({ role: "assistant", content });
    else messages.pop();  // no answer: the question is not part of the conversation either
    controller = null;
    setStreaming(false);
  }
}

function statistics(usage, started, firstToken, finished) {
  const counts = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens`;
  if (firstToken === null) return counts;
  const rate = usage.completion_tokens > 1 ? (usage.completion_tokens - 1) / ((finished - firstToken) / 1000) : null;
  const first = `first token after ${((firstToken - started) / 1000).toFixed(2)} s`;
  return `${counts} · ${first}` + (rate ? ` · ${rate.toFixed(1)} tokens/s` : "");
}

function showAnswer(answer, content) {
  answer.text = content;
  answer.body.replaceChildren(renderMarkdown(content));
  for (const pre of answer.body.querySelectorAll("pre")) {
    pre.prepend(copyButton(() => pre.querySelector("code").textContent));
  }
  answer.element.scrollIntoView({ block: "end" });
}

function addMessage(role) {
  const element = document.createElement("article");
  element.className = role;
  const body = document.createElement("div");
  body.className = "body";
  element.append(body);
  $("messages").append(element);
  element.scrollIntoView({ block: "end" });
  return { element, body };
}

// An empty answer, with a line for its statistics and a Copy button for its text (the markdown as written).
function addAnswer() {
  const answer = { ...addMessage("assistant"), text: "", meta: document.createElement("span") };
  const footer = document.createElement("div");
  footer.className = "footer";
  answer.meta.className = "meta";
  footer.append(answer.meta, copyButton(() => answer.text));
  answer.element.append(footer);
  return answer;
}

function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.onclick = () => copy(text(), button);
  return button;
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API outside a secure context (plain http to another host): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

function setStreaming(streaming) {
  $("send").hidden = streaming;
  $("stop").hidden = !streaming;
  $("prompt").disabled = streaming;
  $("new-chat").disabled = streaming;
  if (!streaming) $("prompt").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  messages.length = 0;
  $("messages").replaceChildren();
});
loadModel().catch((error) => ($("model").textContent = `error: ${error.message}`));
