// nanochat-jax chat page. The conversation lives in `messages`; each reply streams from POST chat/completions
// (Server-Sent Events: {"token": text} ... {"done": true}). Slash commands are handled here, never sent.
// Settings are the server's defaults (from GET health: max_tokens already cut to the model's context), overridden
// by what the user set with a command (kept in localStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  scroller: $("scroller"), messages: $("messages"), empty: $("empty"), form: $("form"), input: $("input"),
  send: $("send"), settings: $("settings"), status: $("status"), newChat: $("new-chat"),
};

const server = { defaults: { temperature: 0.8, topK: 50, maxTokens: 512 }, maxContext: 4096 };  // until health
const SETTINGS_KEY = "nanochat-jax.chosen";
const chosen = loadChosen();  // {temperature?, topK?, maxTokens?}: set by the user

function setting(name) {
  const v = name in chosen ? chosen[name] : server.defaults[name];
  return name === "maxTokens" ? Math.min(v, server.maxContext) : v;  // a reply never outgrows the context
}

let messages = [];       // {role: "user" | "assistant" | "notice", content, error?, finish?}
let controller = null;   // AbortController of the reply being streamed (null: idle)

const HELP = [
  "Commands:",
  "  /temperature [t]   show or set the sampling temperature (0 to 2; 0 = always the most likely token)",
  "  /topk [k]          show or set top-k (1 to 200; 0 = off)",
  "  /maxtokens [n]     show or set the longest reply in tokens (up to the model's context)",
  "  /clear             start a new chat",
  "  /help              this list",
  "Enter sends, Shift+Enter adds a line. Edit a message of yours to rewrite the chat from there;",
  "Regenerate samples a reply again. Stop (or Esc) ends a reply early.",
].join("\n");

function loadChosen() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch (e) {
    return {};
  }
}

function saveChosen() {
  try { localStorage.setItem(SETTINGS_KEY, JSON.stringify(chosen)); } catch (e) { /* private mode */ }
}

// -- rendering ---------------------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, title, onClick) {
  const b = el("button", "", label);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function typingDots() {
  const dots = el("span", "typing");
  dots.append(el("i"), el("i"), el("i"));
  return dots;
}

function renderMessage(m, i) {
  const row = el("div", `msg ${m.role}`);
  row.dataset.index = i;
  if (m.pieces) row.dataset.pieces = String(m.pieces);  // how many stream events built the reply
  const bubble = el("div", "bubble", m.content);
  if (m.role === "assistant" && m.pending && !m.content) bubble.append(typingDots());
  row.append(bubble);
  if (m.error) row.append(el("div", "error", m.error));
  if (m.role === "assistant" && !m.pending && m.finish === "length") row.append(el("div", "meta", "(reply cut at max tokens)"));
  if (m.role === "assistant" && !m.pending && m.stopped) row.append(el("div", "meta", "(stopped)"));
  if (controller === null && m.role !== "notice") {
    const actions = el("div", "actions");
    if (m.role === "user") actions.append(button("Edit", "Edit this message and continue from it", () => startEdit(row, i)));
    else actions.append(button("Regenerate", "Sample this reply again", () => regenerate(i)));
    row.append(actions);
  }
  return row;
}

function render() {
  ui.messages.replaceChildren(...messages.map(renderMessage));
  ui.empty.hidden = messages.length > 0;
  renderSettings();
  ui.send.textContent = controller ? "Stop" : "Send";
  ui.send.classList.toggle("stop", controller !== null);
  ui.send.title = controller ? "Stop the reply (Esc)" : "Send (Enter)";
  scrollToEnd();
}

function renderSettings() {
  ui.settings.textContent = `temperature ${setting("temperature")} · top-k ${setting("topK") || "off"} · ` +
    `max ${setting("maxTokens")} tokens`;
}

function scrollToEnd() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function notice(text) {
  messages.push({ role: "notice", content: text });
  render();
}

function autoGrow(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

// -- conversation ------------------------------------------------------------------------------------

function newChat() {
  if (controller) controller.abort();  // the server sees the disconnect and frees its worker
  controller = null;
  messages = [];
  render();
  ui.input.focus();
}

function sendUserMessage(text) {
  messages.push({ role: "user", content: text });
  generate();
}

function regenerate(i) {
  messages = messages.slice(0, i);  // this reply and everything after it
  generate();
}

function startEdit(row, i) {
  const editor = el("div", "editor");
  const area = el("textarea");
  area.value = messages[i].content;
  const submit = () => {
    const text = area.value.trim();
    if (!text) return;
    messages = messages.slice(0, i);
    sendUserMessage(text);
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
    if (e.key === "Escape") render();
  });
  area.addEventListener("input", () => autoGrow(area));
  const buttons = el("div", "row");
  const save = button("Send", "Send the edited message", submit);
  save.className = "send";
  buttons.append(button("Cancel", "Keep the message as it was", render), save);
  buttons.firstChild.className = "ghost";
  editor.append(area, buttons);
  row.replaceChildren(editor);
  area.focus();
  autoGrow(area);
}

// The request sent: user and assistant turns only (notices and failed empty replies stay on the page).
function conversation() {
  return messages
    .filter((m) => (m.role === "user" || m.role === "assistant") && m.content)
    .map((m) => ({ role: m.role, content: m.content }));
}

async function generate() {
  const body = {
    messages: conversation(), temperature: setting("temperature"), top_k: setting("topK"),
    max_tokens: setting("maxTokens"),
  };
  const reply = { role: "assistant", content: "", pending: true };
  messages.push(reply);
  const ctrl = new AbortController();
  controller = ctrl;
  render();
  const row = ui.messages.lastElementChild;
  const bubble = row.querySelector(".bubble");
  reply.pieces = 0;
  try {
    const res = await fetch("chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: ctrl.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => null);
      throw new Error((err && err.error && err.error.message) || `HTTP ${res.status}`);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = JSON.parse(line.slice(5));
          if (data.error) throw new Error(data.error);
          if (typeof data.token === "string") {
            reply.content += data.token;
            bubble.textContent = reply.content;
            row.dataset.pieces = String(++reply.pieces);
            scrollToEnd();
          }
          if (data.done) reply.finish = data.finish_reason;
        }
      }
    }
    if (!reply.finish) throw new Error("the connection closed before the reply finished");
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else reply.error = e.message;
  } finally {
    reply.pending = false;
    if (controller === ctrl) {  // not already replaced by a new chat
      controller = null;
      render();
      ui.input.focus();
    }
  }
}

// -- slash commands ----------------------------------------------------------------------------------

function setNumber(name, label, arg, lo, hi, integer) {
  if (arg === undefined) return notice(`${label} is ${setting(name)}`);
  const v = Number(arg);
  if (arg === "" || !Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    return notice(`${label} must be ${integer ? "an integer" : "a number"} from ${lo} to ${hi}, got "${arg}"`);
  }
  chosen[name] = v;
  saveChosen();
  notice(`${label} set to ${v}`);
}

function command(text) {
  const [name, arg] = text.trim().split(/\s+/);
  switch (name.toLowerCase()) {
    case "/temperature": case "/temp": return setNumber("temperature", "temperature", arg, 0, 2, false);
    case "/topk": case "/top_k": return setNumber("topK", "top-k", arg, 0, 200, true);
    case "/maxtokens": case "/max_tokens":
      return setNumber("maxTokens", "max tokens", arg, 1, Math.min(4096, server.maxContext), true);
    case "/clear": case "/new": return newChat();
    case "/help": return notice(HELP);
    default: return notice(`unknown command ${name}; /help lists the commands`);
  }
}

// -- input -------------------------------------------------------------------------------------------

function submit() {
  if (controller) { controller.abort(); return; }  // the button is "Stop" while a reply streams
  const text = ui.input.value.trim();
  if (!text) return;
  ui.input.value = "";
  autoGrow(ui.input);
  if (text.startsWith("/")) command(text);
  else sendUserMessage(text);
}

ui.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!controller) submit();
  }
});
ui.input.addEventListener("input", () => autoGrow(ui.input));
ui.newChat.addEventListener("click", newChat);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && controller) controller.abort();
});

async function checkHealth() {
  try {
    const res = await fetch("health");
    const h = await res.json();
    if (h.defaults) {
      const d = h.defaults;
      server.defaults = { temperature: d.temperature, topK: d.top_k, maxTokens: d.max_tokens };
    }
    if (h.max_context) server.maxContext = h.max_context;
    renderSettings();
    ui.status.className = "status ok";
    ui.status.title = `${h.model}: ${h.available_workers} of ${h.num_workers} workers free; ` +
      `context ${server.maxContext} tokens`;
  } catch (e) {
    ui.status.className = "status down";
    ui.status.title = "the server is not answering";
  }
}

render();
checkHealth();
