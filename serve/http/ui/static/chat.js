// The feedback chat page (served at / by serve/ui.py).
//
// Owns: the conversation in this tab, streaming answers from
// POST /v1/chat/completions (SSE), the demo tools, and turning every feedback
// click into POST /v1/feedback under the user's API key.
// Invariants: only the public API is used; model output is inserted as text
// (textContent), never as markup; a regenerated answer is asked with exactly
// the same messages and tools as the first, so the pair is a valid pairwise
// preference (the gateway checks they answer the same conversation).
"use strict";

const STORE = {apiKey: "agentloop.apiKey", model: "agentloop.model", temperature: "agentloop.temperature",
  thinking: "agentloop.thinking", tools: "agentloop.tools"};
const MAX_TOOL_ROUNDS = 4; // a model stuck calling tools must not loop forever

// The demo tools, defined exactly as the project's test model learned them
// (tests/data/tiny_conversations.py), so its scripted tool use works here.
const DEMO_TOOLS = [
  {type: "function", function: {name: "get_weather", description: "Get the current weather in a city.",
    parameters: {type: "object", properties: {
      city: {type: "string", description: "The city name, e.g. Paris"},
      unit: {type: "string", enum: ["celsius", "fahrenheit"]}}, required: ["city"]}}},
  {type: "function", function: {name: "calculator", description: "Evaluate an arithmetic expression.",
    parameters: {type: "object", properties: {expression: {type: "string", description: "e.g. 2*(3+4)"}},
      required: ["expression"]}}},
];

const $ = (sel, root = document) => root.querySelector(sel);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

// JSON as Python's json.dumps writes it (", " and ": "): the tool-result text
// the models here were trained on.
function pyJson(v) {
  if (Array.isArray(v)) return "[" + v.map(pyJson).join(", ") + "]";
  if (v && typeof v === "object") {
    return "{" + Object.entries(v).map(([k, x]) => JSON.stringify(k) + ": " + pyJson(x)).join(", ") + "}";
  }
  return JSON.stringify(v);
}

// Thumb icons drawn inline (Feather icons, MIT): emoji fonts are not on every
// machine, and the page loads nothing from outside the gateway.
const THUMB_PATHS = {
  up: "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3",
  down: "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17",
};

function thumbIcon(which) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  for (const [k, v] of Object.entries({viewBox: "0 0 24 24", width: "16", height: "16", fill: "none",
    stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round", "stroke-linejoin": "round",
    "aria-hidden": "true"})) svg.setAttribute(k, v);
  const path = document.createElementNS(NS, "path");
  path.setAttribute("d", THUMB_PATHS[which]);
  svg.append(path);
  return svg;
}

function prettyArgs(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
}

// ------------------------------------------------------------------ demo tools

const WEATHER = {paris: [18, "sunny"], london: [14, "cloudy"], berlin: [16, "rainy"], tokyo: [22, "clear"]};

function getWeather(args) {
  const city = String(args.city || "").trim();
  if (!city) return pyJson({error: "'city' is required"});
  let known = WEATHER[city.toLowerCase()];
  if (!known) { // made-up but stable weather for any other city
    const h = [...city.toLowerCase()].reduce((a, c) => (a * 31 + c.charCodeAt(0)) % 9973, 7);
    known = [5 + (h % 25), ["sunny", "cloudy", "rainy", "windy"][h % 4]];
  }
  const temp = args.unit === "fahrenheit" ? Math.round(known[0] * 9 / 5 + 32) : known[0];
  return pyJson({temperature: temp, condition: known[1]});
}

// A small arithmetic parser (numbers, + - * / % ^, parentheses): the calculator
// must not eval() text a model wrote.
function evalArithmetic(src) {
  const toks = String(src).match(/\d+(?:\.\d+)?(?:e[+-]?\d+)?|\*\*|[-+*/%^()]|\S/gi) || [];
  let i = 0;
  const peek = () => toks[i];
  const take = (t) => { if (toks[i] !== t) throw new Error(`expected ${t}`); i++; };
  const atom = () => {
    const t = toks[i++];
    if (t === "(") { const v = sum(); take(")"); return v; }
    if (t === "-") return -power();
    if (t === "+") return power();
    if (t !== undefined && /^\d/.test(t)) return parseFloat(t);
    throw new Error(t === undefined ? "unexpected end" : `unexpected '${t}'`);
  };
  const power = () => { const b = atom(); return (peek() === "^" || peek() === "**") ? (i++, b ** power()) : b; };
  const product = () => {
    let v = power();
    while (["*", "/", "%"].includes(peek())) {
      const op = toks[i++], r = power();
      if (op !== "*" && r === 0) throw new Error("division by zero");
      v = op === "*" ? v * r : op === "/" ? v / r : v % r;
    }
    return v;
  };
  const sum = () => {
    let v = product();
    while (peek() === "+" || peek() === "-") v = toks[i++] === "+" ? v + product() : v - product();
    return v;
  };
  const v = sum();
  if (i !== toks.length) throw new Error(`unexpected '${toks[i]}'`);
  return Number.isInteger(v) ? v : Number(v.toPrecision(12));
}

function runTool(name, argText) {
  let args;
  try { args = JSON.parse(argText || "{}"); } catch { return pyJson({error: "arguments are not valid JSON"}); }
  try {
    if (name === "get_weather") return getWeather(args);
    if (name === "calculator") return String(evalArithmetic(args.expression));
  } catch (e) { return pyJson({error: e.message}); }
  return pyJson({error: `unknown tool '${name}'`});
}

// ------------------------------------------------------------------ settings

const ui = {
  apiKey: $("#api-key"), model: $("#model"), temperature: $("#temperature"), thinking: $("#thinking"),
  tools: $("#tools"), conversation: $("#conversation"), prompt: $("#prompt"), send: $("#send"),
  notice: $("#notice"),
};

function loadSettings() {
  ui.apiKey.value = localStorage.getItem(STORE.apiKey) || "";
  ui.temperature.value = localStorage.getItem(STORE.temperature) || "";
  ui.thinking.checked = localStorage.getItem(STORE.thinking) === "1";
  ui.tools.checked = localStorage.getItem(STORE.tools) === "1";
  ui.apiKey.addEventListener("change", () => {
    localStorage.setItem(STORE.apiKey, ui.apiKey.value.trim());
    loadModels();
  });
  ui.temperature.addEventListener("change", () => localStorage.setItem(STORE.temperature, ui.temperature.value));
  ui.thinking.addEventListener("change", () => localStorage.setItem(STORE.thinking, ui.thinking.checked ? "1" : "0"));
  ui.tools.addEventListener("change", () => localStorage.setItem(STORE.tools, ui.tools.checked ? "1" : "0"));
  ui.model.addEventListener("change", () => localStorage.setItem(STORE.model, ui.model.value));
}

function notify(text, kind = "info") {
  ui.notice.hidden = !text;
  ui.notice.textContent = text || "";
  ui.notice.className = `banner ${kind}`;
}

function headers(extra = {}) {
  const key = ui.apiKey.value.trim();
  return {"Content-Type": "application/json", ...(key ? {Authorization: `Bearer ${key}`} : {}), ...extra};
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    return body.error?.message || `HTTP ${resp.status}`;
  } catch { return `HTTP ${resp.status}`; }
}

async function loadModels() {
  // With API keys in use, listing models needs the key too.
  const resp = await fetch("/v1/models", {headers: headers()});
  if (!resp.ok) { notify(`Could not list models: ${await errorOf(resp)}`, "error"); return; }
  const {data} = await resp.json();
  const wanted = localStorage.getItem(STORE.model) || ui.model.dataset.alias;
  ui.model.replaceChildren(...data.map((m) => {
    const label = m.parent ? `${m.id}${m.live ? " (live)" : ""}`
      : `${m.id} → ${m.version}${m.canary ? ` (canary ${m.canary.version} ${Math.round(m.canary.share * 100)}%)` : ""}`;
    return el("option", {value: m.id, text: label});
  }));
  if (data.some((m) => m.id === wanted)) ui.model.value = wanted;
  if (!data.length) notify("No model is served yet; the engine may still be starting.", "error");
}

function requestBody(messages) {
  const body = {model: ui.model.value, messages, stream: true};
  const t = ui.temperature.value.trim();
  if (t !== "") body.temperature = Number(t);
  body.reasoning_effort = ui.thinking.checked ? "medium" : "none";
  if (ui.tools.checked) body.tools = DEMO_TOOLS;
  return body;
}

// ------------------------------------------------------------------ feedback

async function sendFeedback(body, status, what) {
  status.className = "fb-status pending";
  status.textContent = `Sending ${what}…`;
  let resp;
  try {
    resp = await fetch("/v1/feedback", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  } catch (e) {
    status.className = "fb-status error";
    status.textContent = `Feedback not stored: ${e.message}`;
    return null;
  }
  if (!resp.ok) {
    status.className = "fb-status error";
    status.textContent = `Feedback not stored: ${await errorOf(resp)}`;
    return null;
  }
  const fb = await resp.json();
  status.className = "fb-status ok";
  status.dataset.feedbackId = fb.id;
  status.textContent = `Stored ${what} as feedback ${fb.id}.`;
  return fb;
}

// ------------------------------------------------------------------ answers

class Answer {
  constructor(turn) {
    this.turn = turn;
    this.id = null;
    this.model = null;
    this.content = "";
    this.reasoning = "";
    this.calls = [];
    this.finish = null;
    this.chunks = 0;
    this.vote = 0; // the last thumbs stored, to keep it marked when the buttons are redrawn
    this.thinking = el("details", {class: "thinking", hidden: true},
      el("summary", {text: "Thinking"}), this.reasoningNode = el("div", {class: "reasoning"}));
    this.callsNode = el("div", {class: "tool-calls"});
    this.contentNode = el("div", {class: "content"});
    this.meta = el("div", {class: "meta", text: "…"});
    this.actions = el("div", {class: "actions"});
    this.status = el("p", {class: "fb-status", role: "status"});
    this.correction = el("form", {class: "correction", hidden: true});
    this.node = el("article", {class: "answer streaming"}, this.thinking, this.callsNode, this.contentNode,
      this.meta, this.actions, this.correction, this.status);
  }

  add(chunk) {
    this.chunks += 1;
    this.node.dataset.chunks = String(this.chunks);
    this.id = this.id || chunk.id;
    this.model = this.model || chunk.model;
    for (const ch of chunk.choices || []) {
      if ((ch.index || 0) !== 0) continue;
      const d = ch.delta || {};
      const r = d.reasoning_content ?? d.reasoning; // the gateway sends both names for one text
      if (r) {
        this.reasoning += r;
        this.thinking.hidden = false;
        this.reasoningNode.textContent = this.reasoning;
      }
      if (d.content) {
        this.content += d.content;
        this.contentNode.textContent = this.content;
      }
      for (const tc of d.tool_calls || []) {
        const c = this.calls[tc.index ?? 0] ||= {id: "", name: "", arguments: "", node: null};
        if (tc.id) c.id = tc.id;
        if (tc.function?.name) c.name += tc.function.name;
        if (tc.function?.arguments) c.arguments += tc.function.arguments;
        this.renderCall(c);
      }
      if (ch.finish_reason) this.finish = ch.finish_reason;
    }
  }

  renderCall(c) {
    if (!c.node) {
      c.head = el("div", {class: "tc-head"});
      c.args = el("pre", {class: "tc-args"});
      c.result = el("pre", {class: "tc-result", hidden: true});
      c.node = el("div", {class: "tool-call"}, c.head, c.args, c.result);
      this.callsNode.append(c.node);
    }
    c.node.dataset.name = c.name;
    c.head.textContent = `Tool call: ${c.name}`;
    c.args.textContent = prettyArgs(c.arguments);
  }

  setResult(c, text) {
    c.result.hidden = false;
    c.result.textContent = `Result: ${text}`;
  }

  done(error) {
    this.node.classList.remove("streaming");
    this.node.dataset.completionId = this.id || "";
    if (error) {
      this.node.classList.add("failed");
      this.meta.textContent = `Error: ${error}`;
      return;
    }
    if (!this.content && !this.calls.length) this.contentNode.textContent = "(empty answer)";
    this.meta.textContent = [this.id, this.model, this.finish && `finish: ${this.finish}`].filter(Boolean).join(" · ");
    this.renderActions();
  }

  // The model's turn as it goes back into the conversation.
  message() {
    const m = {role: "assistant", content: this.content || null};
    if (this.reasoning) m.reasoning_content = this.reasoning;
    if (this.calls.length) {
      m.tool_calls = this.calls.map((c) => ({id: c.id, type: "function",
        function: {name: c.name, arguments: c.arguments}}));
    }
    return m;
  }

  renderActions() {
    const thumb = (value, label, title) => el("button", {type: "button", title, "aria-label": title,
      class: `thumb${this.vote === value ? " chosen" : ""}`, dataset: {value: String(value)},
      onclick: async () => {
        const fb = await sendFeedback({type: "thumbs", completion_id: this.id, value}, this.status,
          value > 0 ? "thumbs up" : "thumbs down");
        if (fb) {
          this.vote = value;
          this.renderActions();
        }
      }}, thumbIcon(value > 0 ? "up" : "down"), label);
    const buttons = [thumb(1, "Good", "Thumbs up: a good answer"), thumb(-1, "Bad", "Thumbs down: a bad answer"),
      el("button", {type: "button", class: "correct", text: "Correct…", title: "Write the answer it should have given",
        onclick: () => this.toggleCorrection()})];
    if (this.turn.answers.length === 2) {
      buttons.push(el("button", {type: "button", class: "prefer", text: "This one is better",
        onclick: () => this.turn.prefer(this)}));
    } else if (this.turn.isLast() && !chat.busy) {
      buttons.push(el("button", {type: "button", class: "regenerate", text: "Regenerate",
        title: "Ask again and pick the better of two answers", onclick: () => this.turn.regenerate()}));
    }
    this.actions.replaceChildren(...buttons);
  }

  toggleCorrection() {
    if (!this.correction.hidden) { this.correction.hidden = true; return; }
    const text = el("textarea", {rows: "4", class: "correction-text", required: true});
    text.value = this.content;
    this.correction.replaceChildren(
      el("label", {text: "The answer it should have given:"}), text,
      el("button", {type: "submit", text: "Send correction"}));
    this.correction.onsubmit = async (ev) => {
      ev.preventDefault();
      const fb = await sendFeedback({type: "correction", completion_id: this.id,
        correction: {role: "assistant", content: text.value}}, this.status, "correction");
      if (fb) this.correction.hidden = true;
    };
    this.correction.hidden = false;
    text.focus();
  }
}

class Turn {
  constructor(body) {
    this.body = body; // the exact request: a regenerate re-sends it unchanged
    this.answers = [];
    this.answersNode = el("div", {class: "answers"});
    this.node = el("div", {class: "turn assistant"}, this.answersNode);
  }

  isLast() { return chat.turns[chat.turns.length - 1] === this; }

  async ask() {
    const a = new Answer(this);
    this.answers.push(a);
    this.answersNode.append(a.node);
    this.node.classList.toggle("pair", this.answers.length === 2);
    a.node.scrollIntoView({block: "nearest"});
    await streamInto(this.body, a);
    return a;
  }

  async regenerate() {
    if (chat.busy) return;
    chat.setBusy(true);
    const second = await this.ask();
    chat.setBusy(false);
    if (second.node.classList.contains("failed")) { // nothing to compare: back to one answer
      this.answers.pop();
      second.node.remove();
      this.node.classList.remove("pair");
      notify(`Regenerating failed: ${second.meta.textContent.replace(/^Error: /, "")}`, "error");
    } else {
      notify("Two answers: pick the better one — that choice is stored as a pairwise preference.");
    }
    for (const a of this.answers) a.renderActions();
  }

  async prefer(chosen) {
    const rejected = this.answers.find((a) => a !== chosen);
    const fb = await sendFeedback({type: "pairwise", chosen_id: chosen.id, rejected_id: rejected.id},
      chosen.status, "your preference");
    if (!fb) return;
    chosen.node.classList.add("preferred");
    rejected.node.classList.remove("preferred");
    if (!this.isLast()) return; // the conversation already went on from an earlier pick
    // The conversation continues from the answer the user picked.
    chat.history[chat.history.length - 1] = chosen.message();
    if (chosen.calls.length) await chat.continueWithTools(chosen);
  }
}

async function streamInto(body, answer) {
  chat.abort = new AbortController();
  let error = null;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: chat.abort.signal});
    if (!resp.ok) throw new Error(await errorOf(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    outer: for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) { // one SSE event per blank-line-terminated block
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") break outer;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
          answer.add(chunk);
        }
      }
    }
  } catch (e) {
    error = e.name === "AbortError" ? "stopped" : e.message;
  }
  answer.done(error);
}

// ------------------------------------------------------------------ the conversation

const chat = {
  history: [],
  turns: [],
  busy: false,
  abort: null,

  setBusy(busy) {
    this.busy = busy;
    ui.send.textContent = busy ? "Stop" : "Send";
    ui.send.classList.toggle("stop", busy);
    document.body.classList.toggle("busy", busy);
  },

  reset() {
    if (this.busy) this.abort?.abort();
    this.history = [];
    this.turns = [];
    ui.conversation.replaceChildren();
    notify("");
  },

  async send(text) {
    this.history.push({role: "user", content: text});
    ui.conversation.append(el("div", {class: "turn user"}, el("div", {class: "bubble", text})));
    this.setBusy(true);
    try {
      const answer = await this.ask();
      if (answer && answer.calls.length) await this.continueWithTools(answer);
    } finally {
      this.setBusy(false);
      this.refreshActions();
    }
  },

  async ask() {
    const turn = new Turn(requestBody(structuredClone(this.history)));
    this.turns.push(turn);
    ui.conversation.append(turn.node);
    const answer = await turn.ask();
    if (answer.node.classList.contains("failed")) return null;
    this.history.push(answer.message());
    return answer;
  },

  // Run the demo tools the answer called, show their results in its call
  // cards, send them back, and repeat while the model keeps calling tools.
  async continueWithTools(answer) {
    const wasBusy = this.busy;
    this.setBusy(true);
    try {
      for (let round = 0; answer && answer.calls.length && round < MAX_TOOL_ROUNDS; round++) {
        if (!ui.tools.checked) { notify("The model called tools, but demo tools are off.", "error"); return; }
        for (const c of answer.calls) {
          const result = runTool(c.name, c.arguments);
          answer.setResult(c, result);
          this.history.push({role: "tool", tool_call_id: c.id || c.name, name: c.name, content: result});
        }
        answer = await this.ask();
      }
    } finally {
      if (!wasBusy) { this.setBusy(false); this.refreshActions(); }
    }
  },

  refreshActions() {
    for (const t of this.turns) for (const a of t.answers) if (a.id) a.renderActions();
  },
};

// ------------------------------------------------------------------ wiring

loadSettings();
loadModels();
$("#reload-models").addEventListener("click", loadModels);
$("#new-chat").addEventListener("click", () => chat.reset());
$("#composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (chat.busy) { chat.abort?.abort(); return; }
  const text = ui.prompt.value.trim();
  if (!text) return;
  if (!ui.apiKey.value.trim()) {
    notify("Enter your API key first: feedback belongs to the key that asked.", "error");
    ui.apiKey.focus();
    return;
  }
  ui.prompt.value = "";
  notify("");
  chat.send(text);
});
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("#composer").requestSubmit(); }
});
