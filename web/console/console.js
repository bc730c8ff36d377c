// The cc-docker console: paste a token, list your sessions, follow one live, send prompts,
// answer a turn's tool approvals, cancel a turn, stop a session. It uses only the public API and WebSocket, like any client.
// Event data is only ever put into the page as text (textContent / text nodes), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);

const state = {
  token: localStorage.getItem("ccd.token") || "",
  session: null,        // the open session's id
  socket: null,         // its WebSocket
  lastId: null,         // the last event id received: where a new socket resumes
  retries: 0,
  timer: null,
  prompts: new Map(),   // turn id → prompt (events do not carry it)
  turns: new Map(),     // turn id → its view in the log
  tools: new Map(),     // tool_use id → its <details>
  approvals: new Map(), // "turn id/request id" → its view
  waiting: new Map(),   // turn id → pending approvals the API listed, shown once the turn's view exists
};
window.ccdConsole = { state };  // for debugging from the browser's console

// ---- helpers ----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);  // strings become text nodes
  return node;
}

function badge(status) {
  return el("span", { class: `status status-${status}` }, status);
}

const turns = (n) => `${n} turn${n === 1 ? "" : "s"}`;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`api/v1${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`, error.message || response.statusText);
  }
  return data;
}

function showError(error) {
  $("error").textContent = error.code ? `${error.code}: ${error.message}` : String(error.message || error);
  $("error").hidden = false;
}

// Wraps a UI action: clears the last error, shows this one's.
function action(fn) {
  return async (...args) => {
    $("error").hidden = true;
    try {
      await fn(...args);
    } catch (error) {
      showError(error);
    }
  };
}

// ---- sessions ---------------------------------------------------------------------------

async function loadSessions() {
  const page = await api("GET", "/sessions?limit=100");
  const items = page.items.map((session) => {
    const open = el("button", { type: "button" }, el("code", {}, session.id.slice(0, 8)), badge(session.status),
                    el("span", { class: "muted turns" }, turns(session.turn_count)));
    open.addEventListener("click", action(() => openSession(session.id)));
    return el("li", { "data-id": session.id, class: session.id === state.session ? "current" : "" }, open);
  });
  $("sessions").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "no sessions yet")]));
}

async function createSession() {
  const session = await api("POST", "/sessions", {});
  await loadSessions();
  await openSession(session.id);
}

// The open session's entry in the list, kept current from its events.
function listed(selector) {
  const item = [...$("sessions").children].find((li) => li.dataset.id === state.session);
  return item && item.querySelector(selector);
}

function showSessionStatus(status) {
  $("session-status").replaceChildren(badge(status));
  const old = listed(".status");
  if (old) old.replaceWith(badge(status));
}

async function openSession(id) {
  closeSocket();
  Object.assign(state, { session: id, lastId: null, retries: 0 });
  for (const map of [state.prompts, state.turns, state.tools, state.approvals, state.waiting]) map.clear();
  $("log").replaceChildren();
  $("session-id").textContent = id;
  $("session").hidden = false;
  $("empty").hidden = true;
  for (const li of $("sessions").children) li.classList.toggle("current", li.dataset.id === id);
  updateCancel();
  const session = await api("GET", `/sessions/${id}`);
  showSessionStatus(session.status);
  const sent = await api("GET", `/sessions/${id}/turns?limit=200`);
  for (const turn of sent.items) {
    state.prompts.set(turn.id, turn.prompt);
    // Pending approvals come from the API too: their approval.requested may be older than the events kept.
    if (turn.pending_approvals && turn.pending_approvals.length) state.waiting.set(turn.id, turn.pending_approvals);
  }
  connect();
}

async function stopSession() {
  const session = await api("POST", `/sessions/${state.session}/stop`);
  showSessionStatus(session.status);
}

// ---- turns ------------------------------------------------------------------------------

async function sendPrompt(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || !state.session) return;
  const turn = await api("POST", `/sessions/${state.session}/chat`, { prompt });
  $("prompt").value = "";
  state.prompts.set(turn.id, prompt);
  const view = state.turns.get(turn.id);
  if (view) view.user.textContent = prompt;
}

function activeTurn() {
  const active = [...state.turns.entries()].filter(([, view]) => ACTIVE.has(view.status));
  const running = active.find(([, view]) => view.status === "running");
  return (running || active[0] || [null])[0];
}

function updateCancel() {
  $("cancel").disabled = activeTurn() === null;
}

async function cancelTurn() {
  const id = activeTurn();
  if (id === null) return;
  const turn = await api("POST", `/turns/${id}/cancel`);
  note(state.turns.get(id).body, turn.status === "cancelled" ? "cancelled" : "cancel requested");
}

// ---- the event stream -------------------------------------------------------------------

function connect() {
  const id = state.session;
  const url = new URL(`api/v1/sessions/${encodeURIComponent(id)}/stream`, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", state.token);
  if (state.lastId) url.searchParams.set("since", state.lastId);
  const socket = new WebSocket(url);
  let opened = false;
  state.socket = socket;
  $("connection").textContent = "connecting…";
  socket.onopen = () => {
    opened = true;
    state.retries = 0;
    $("connection").textContent = "live";
  };
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.type === "reply") return;  // answers to socket commands; this page uses HTTP for those
    if (frame.id) state.lastId = frame.id;
    render(frame);
  };
  socket.onclose = async (close) => {
    if (state.socket !== socket) return;  // closed on purpose: another session was opened
    state.socket = null;
    if (close.code === 1000) {  // the server's normal close: the session was deleted
      $("connection").textContent = `closed (${close.reason || "session ended"})`;
      return;
    }
    if (!opened) {  // the handshake was refused: ask the API why (a bad token or session is not retried)
      try {
        await api("GET", `/sessions/${id}`);
      } catch (error) {
        if (error.status && error.status < 500) {
          showError(error);
          $("connection").textContent = "disconnected";
          return;
        }
      }
    }
    const delay = Math.min(30, 2 ** state.retries++);
    $("connection").textContent = `reconnecting in ${delay} s`;
    state.timer = setTimeout(() => state.session === id && connect(), delay * 1000);
  };
}

function closeSocket() {
  clearTimeout(state.timer);
  const socket = state.socket;
  state.socket = null;
  if (socket) socket.close();
}

function render(event) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const data = event.data || {};
  switch (event.type) {
    case "session.status":
      showSessionStatus(data.status);
      note(log, `session ${data.status}${data.error ? `: ${data.error}` : ""}`);
      break;
    case "turn.queued":
    case "turn.started":
      setTurnStatus(turnView(event), event.type === "turn.queued" ? "queued" : "running");
      break;
    case "turn.completed":
    case "turn.failed":
    case "turn.cancelled":
      finishTurn(turnView(event), data);
      break;
    case "claude.stream_event":
      streamEvent(turnView(event), data);
      break;
    case "claude.assistant":
      assistantMessage(turnView(event), data.message || {});
      break;
    case "claude.user":
      toolResults(turnView(event), data.message || {});
      break;
    case "approval.requested":
      showApproval(turnView(event), event.turn_id, data);
      break;
    case "approval.resolved":
      resolveApproval(turnView(event), event.turn_id, data);
      break;
    case "stream.gap":
      note(log, "older events are no longer kept; the log starts later");
      break;
    default:  // system lines; claude.result (the turn's final event carries the same figures)
  }
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function note(parent, text) {
  parent.append(el("div", { class: "note" }, text));
}

function turnView(event) {
  let view = state.turns.get(event.turn_id);
  if (view) {
    // A turn another client sent: ask for its prompt once it is past turn.queued, which is published
    // before the turn's row is committed (so a fetch on turn.queued itself could meet a 404).
    if (!state.prompts.has(event.turn_id) && !view.promptAsked && event.type !== "turn.queued") {
      view.promptAsked = true;
      api("GET", `/turns/${event.turn_id}`).then((turn) => { view.user.textContent = turn.prompt; }, () => {});
    }
    return view;
  }
  view = {
    status: null, text: null, message: null, streamed: new Set(),
    badge: el("span", {}), user: el("div", { class: "user" }, state.prompts.get(event.turn_id) || ""),
    body: el("div", { class: "body" }), footer: el("footer", {}),
  };
  view.section = el("section", { class: "turn", "data-turn-id": event.turn_id },
                    el("header", {}, `Turn ${event.seq ?? ""}`, view.badge), view.user, view.body, view.footer);
  $("log").append(view.section);
  state.turns.set(event.turn_id, view);
  for (const approval of state.waiting.get(event.turn_id) || []) showApproval(view, event.turn_id, approval);
  state.waiting.delete(event.turn_id);
  const count = listed(".turns");
  if (count && event.seq > parseInt(count.textContent, 10)) count.textContent = turns(event.seq);
  return view;
}

function setTurnStatus(view, status) {
  view.status = status;
  view.section.dataset.status = status;
  view.badge.replaceChildren(badge(status));
  updateCancel();
}

// Partial messages: text deltas are appended as they arrive.
function streamEvent(view, data) {
  const inner = data.event || {};
  if (inner.type === "message_start") {
    view.message = inner.message && inner.message.id;
  } else if (inner.type === "content_block_delta" && inner.delta && inner.delta.type === "text_delta") {
    if (!view.text) {
      view.text = el("div", { class: "assistant" });
      view.body.append(view.text);
    }
    view.text.append(inner.delta.text);
    view.streamed.add(view.message || data.api_message_id);
  } else if (["content_block_start", "content_block_stop", "message_stop"].includes(inner.type)) {
    view.text = null;
  }
}

// Whole messages: text only when it was not streamed; tool calls always (they carry the full input).
function assistantMessage(view, message) {
  for (const block of message.content || []) {
    if (block.type === "text" && !view.streamed.has(message.id)) {
      view.body.append(el("div", { class: "assistant" }, block.text));
    } else if (block.type === "tool_use" && !state.tools.has(block.id)) {
      const input = block.input || {};
      const hint = String(input.command || input.description || input.file_path || input.pattern || "").slice(0, 100);
      const details = el("details", { class: "tool" },
                         el("summary", {}, el("span", { class: "tool-name" }, block.name), " ", hint),
                         el("pre", {}, JSON.stringify(input, null, 2)));
      state.tools.set(block.id, details);
      view.body.append(details);
      view.text = null;
    }
  }
}

// Tool results are folded into their call's <details>.
function toolResults(view, message) {
  if (!Array.isArray(message.content)) return;
  for (const block of message.content) {
    if (block.type !== "tool_result") continue;
    const text = typeof block.content === "string" ? block.content
      : (block.content || []).map((part) => part.text || "").join("\n");
    const result = el("pre", { class: block.is_error ? "result is-error" : "result" }, text);
    const call = state.tools.get(block.tool_use_id);
    if (call) call.append(result);
    else view.body.append(el("details", { class: "tool" }, el("summary", {}, "tool result"), result));
  }
}

function finishTurn(view, data) {
  setTurnStatus(view, data.status);
  // The server cancels what the ended turn still waited for; its approval.resolved may not follow.
  for (const approval of view.section.querySelectorAll('.approval[data-status="pending"]')) {
    settleApproval(approval, "cancelled", "the turn ended first");
  }
  const parts = [el("span", { class: "turn-status" }, data.status)];
  if (data.cost_usd != null) parts.push(el("span", { class: "cost" }, `$${data.cost_usd.toFixed(data.cost_usd < 0.01 ? 6 : 4)}`));
  if (data.duration_ms != null) parts.push(el("span", { class: "duration" }, `${(data.duration_ms / 1000).toFixed(1)} s`));
  if (data.usage) {
    parts.push(el("span", { class: "tokens" }, `${data.usage.input_tokens ?? 0} in / ${data.usage.output_tokens ?? 0} out tokens`));
  }
  if (data.error) parts.push(el("span", { class: "error-text" }, `${data.error}${data.reason ? ` (${data.reason})` : ""}`));
  view.footer.replaceChildren(...parts);
}

// ---- tool approvals ---------------------------------------------------------------------

// A permission prompt of Claude Code's: the tool and its input, and buttons that answer it.
function showApproval(view, turnId, approval) {
  const key = `${turnId}/${approval.request_id}`;
  if (state.approvals.has(key)) return;
  const input = approval.input || {};
  const hint = String(input.command || input.file_path || input.url || input.pattern || "").slice(0, 100);
  const actions = el("div", { class: "approval-actions" });
  const node = el("div", { class: "approval", "data-request-id": approval.request_id, "data-status": "pending" },
                  el("div", { class: "approval-head" }, el("span", { class: "tool-name" }, approval.tool_name),
                     " ", hint, el("span", { class: "approval-state" }, "waiting for approval")),
                  el("pre", { class: "approval-input" }, JSON.stringify(input, null, 2)), actions);
  for (const [label, body] of [["Allow", { behavior: "allow" }], ["Always allow", { behavior: "allow", remember: true }],
                               ["Deny", { behavior: "deny" }]]) {
    const button = el("button", { type: "button", class: label.toLowerCase().replace(" ", "-") }, label);
    button.addEventListener("click", action(() => answerApproval(node, turnId, approval.request_id, body)));
    actions.append(button);
  }
  state.approvals.set(key, node);
  view.body.append(node);
  view.text = null;
  if (approval.status && approval.status !== "pending") settleApproval(node, approval.status, answeredBy(approval));
}

async function answerApproval(node, turnId, requestId, body) {
  for (const button of node.querySelectorAll("button")) button.disabled = true;
  try {
    const approval = await api("POST", `/turns/${turnId}/approvals/${encodeURIComponent(requestId)}`, body);
    // Its approval.resolved may have come first over the socket, and says more (how it was answered).
    if (node.dataset.status === "pending") settleApproval(node, approval.status, answeredBy(approval));
  } catch (error) {
    if (error.code === "approval_resolved") {  // answered elsewhere or timed out: show how, from the API
      const { approvals } = await api("GET", `/turns/${turnId}/approvals`);
      const now = approvals.find((a) => a.request_id === requestId);
      if (now && node.dataset.status === "pending") settleApproval(node, now.status, answeredBy(now));
    }
    if (node.dataset.status === "pending") for (const button of node.querySelectorAll("button")) button.disabled = false;
    throw error;
  }
}

function resolveApproval(view, turnId, data) {
  const node = state.approvals.get(`${turnId}/${data.request_id}`);
  const who = decidedText(data.decided_by, data.via);
  const said = data.message ? `: ${data.message}` : "";
  if (node) settleApproval(node, data.status, who + said);
  else note(view.body, `approval ${data.request_id} ${data.status} ${who}${said}`);
}

function decidedText(decidedBy, via) {
  return [decidedBy && `by ${decidedBy}`, via && `via ${via}`].filter(Boolean).join(" ");
}

// Who answered an approval resource, and how when its decision says.
function answeredBy(approval) {
  return decidedText(approval.decided_by, approval.decision && approval.decision.via);
}

// Shows how an approval was answered; its buttons go.
function settleApproval(node, status, detail) {
  node.dataset.status = status;
  node.querySelector(".approval-state").textContent = detail ? `${status} ${detail}` : status;
  node.querySelector(".approval-actions").replaceChildren();
}

// ---- wiring -----------------------------------------------------------------------------

$("token-form").addEventListener("submit", action(async (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  localStorage.setItem("ccd.token", state.token);
  await loadSessions();
}));
$("refresh").addEventListener("click", action(loadSessions));
$("create").addEventListener("click", action(createSession));
$("stop").addEventListener("click", action(stopSession));
$("cancel").addEventListener("click", action(cancelTurn));
$("prompt-form").addEventListener("submit", action(sendPrompt));
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("prompt-form").requestSubmit();
});
if (state.token) {
  $("token").value = state.token;
  action(loadSessions)();
}
