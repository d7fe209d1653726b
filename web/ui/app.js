// cairn's dashboard: hash routes (#/, #/op/ID, #/locks) over the API under /api/v1, read with
// the session cookie of /login. Live updates come from /api/v1/changes (which ops moved): a page
// re-reads only what moved, and everything it shows when told to resync.
import { draw } from "./dag.js";

const main = document.getElementById("main");
let me = null;          // { name, role } once logged in
let view = null;        // the page shown: { changed(ids), refresh(), close() }
let feed = null;        // the EventSource of /changes

// --- small helpers ---------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path, { method = "GET", body } = {}) {
  const response = await fetch(`/api/v1${path}`, {
    method,
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-cairn-action": "1" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  if (response.status === 401) throw new Unauthorized(json ? json.message : text);
  if (!response.ok) throw new Error(json && json.message ? json.message : `${response.status}`);
  return json;
}

// Replaces `node`'s children with `children`, leaving out the empty ones.
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

const badge = (status) => h("span", { class: `badge st-${status}`, "data-status": status }, status);
const time = (t) => (t ? t.replace("T", " ").replace(/\.\d+/, "").replace("Z", "") : "");
function duration(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}
const operator = () => me && me.role === "operator";

// Asks for confirmation and a reason; resolves to the reason, or null when backed out.
function confirmAction(title, text, label = "Reason (recorded in the op's events)") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  dialog.querySelector("label").textContent = label;
  const reason = document.getElementById("confirm-reason");
  reason.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" ? reason.value.trim() : null);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    reason.focus();
  });
}

// Re-runs `f` at most once per `ms`, the last call winning.
function throttle(f, ms) {
  let timer = null, again = false;
  return () => {
    if (timer) { again = true; return; }
    f();
    timer = setTimeout(() => { timer = null; if (again) { again = false; f(); } }, ms);
  };
}

// --- pages -----------------------------------------------------------------------------------
function loginPage(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { id: "token", type: "password", autocomplete: "off",
    placeholder: "cairn_…", "aria-label": "token" });
  const error = h("p", { class: "error", id: "login-error" }, message || "");
  const submit = async (e) => {
    e.preventDefault();
    try {
      me = await api("/login", { method: "POST", body: { token: input.value.trim() } });
      input.value = "";
      start();
    } catch (err) {
      error.textContent = err.message;
    }
  };
  main.replaceChildren(h("form", { class: "card login", onsubmit: submit },
    h("h1", {}, "Log in"),
    h("p", { class: "muted" }, "Paste a token made with ", h("code", {}, "cairn token create NAME --role viewer|operator"),
      ". It is kept in a cookie this page's scripts cannot read."),
    input, h("button", { type: "submit", class: "primary", id: "login-button" }, "Log in"), error));
  input.focus();
}

const STATUSES = ["", "queued", "running", "waiting", "canceling", "succeeded", "failed",
  "interrupted", "canceled"];

function opsPage(query) {
  const status = h("select", { id: "filter-status", "aria-label": "status" },
    STATUSES.map((s) => h("option", { value: s, selected: s === (query.get("status") || "") }, s || "any status")));
  const plan = h("input", { id: "filter-plan", placeholder: "plan", value: query.get("plan") || "", "aria-label": "plan" });
  const body = h("tbody");
  const note = h("p", { class: "muted" });
  const filters = () => {
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (plan.value.trim()) q.set("plan", plan.value.trim());
    return q;
  };
  const apply = () => { history.replaceState(null, "", `#/?${filters()}`); load(); };
  status.addEventListener("change", apply);
  plan.addEventListener("change", apply);
  const load = throttle(async () => {
    try {
      const q = filters();
      q.set("limit", "100");
      const page = await api(`/ops?${q}`);
      body.replaceChildren(...page.ops.map((op) => {
        const why = op.status === "queued" && op.current_task ? op.current_task : "";
        const current = op.status === "queued" ? "" : op.current_task || "";
        return h("tr", { class: "link", "data-op": op.id, "data-status": op.status,
          onclick: () => { location.hash = `#/op/${op.id}`; } },
          h("td", {}, h("a", { href: `#/op/${op.id}` }, op.id)),
          h("td", {}, op.plan), h("td", { class: "wide" }, op.name), h("td", {}, badge(op.status)),
          h("td", { class: "wide" }, time(op.started_at || op.created_at)),
          h("td", {}, duration(op.elapsed_ms)), h("td", { class: "wide" }, time(op.ended_at)),
          h("td", { class: "cur" }, current),
          h("td", { class: "why" }, why));
      }));
      note.textContent = page.ops.length ? "" : "No op matches.";
    } catch (err) { fail(err); }
  }, 400);
  main.replaceChildren(h("h1", {}, "Ops"), h("div", { class: "filters" }, status, plan),
    h("div", { class: "scroll" }, h("table", { id: "ops" },
      h("thead", {}, h("tr", {}, ["OP_ID", "TYPE", "NAME", "STATUS", "START_TIME", "EXECUTE_TIME",
        "END_TIME", "CUR_TASK", "WHY WAITING"].map((c, i) => h("th", { class: [2, 4, 6].includes(i) ? "wide" : null }, c)))),
      body)), note);
  load();
  return { changed: load, refresh: load, close() {} };
}

function opPage(id) {
  let record = null, steps = [], picked = null, auto = true, logs = null, logFor = null;
  const title = h("h1", {}, `Op ${id}`);
  const summary = h("div", { class: "card", id: "summary" });
  const actions = h("div", { class: "buttons", id: "actions" });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.id = "dag";
  const tasks = h("tbody");
  const events = h("tbody");
  const logTitle = h("h2", {}, "Log");
  const log = h("pre", { class: "log", id: "log" });
  main.replaceChildren(title, summary, actions, h("div", { class: "card scroll" }, svg),
    h("h2", {}, "Tasks"), h("div", { class: "scroll" }, h("table", { id: "tasks" },
      h("thead", {}, h("tr", {}, ["task", "status", "attempts", "started", "ended", "exit", "outputs / error"].map((c) => h("th", {}, c)))), tasks)),
    logTitle, log,
    h("h2", {}, "Events"), h("div", { class: "scroll" }, h("table", { id: "events" }, events)));

  const pick = (step, byHand) => {
    if (byHand) auto = false;
    picked = step;
    render();
    follow(step);
  };
  function follow(task) {
    if (logFor === task && logs) return;
    if (logs) logs.close();
    logFor = task;
    logTitle.textContent = `Log of ${task}`;
    log.replaceChildren();
    logs = new EventSource(`/api/v1/ops/${id}/tasks/${encodeURIComponent(task)}/logs?follow=1`);
    // Each connection sends every line from the start.
    logs.addEventListener("open", () => log.replaceChildren());
    logs.addEventListener("line", (e) => {
      const line = JSON.parse(e.data);
      const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(h("span", { class: line.stream }, `${line.text}\n`));
      if (stick) log.scrollTop = log.scrollHeight;
    });
    logs.addEventListener("end", () => { logs.close(); });
  }

  async function act(verb, body, okText) {
    try {
      await api(`/ops/${id}/${verb}`, { method: "POST", body });
      flash(okText);
      load();
    } catch (err) { flash(err.message, true); }
  }
  function flash(text, bad) {
    const old = document.getElementById("flash");
    if (old) old.remove();
    actions.after(h("p", { id: "flash", class: bad ? "error" : "muted" }, text));
  }

  function render() {
    if (!record) return;
    const op = record;
    title.replaceChildren(`Op ${op.id} · ${op.plan} `, badge(op.status));
    title.querySelector(".badge").id = "op-status";
    const current = op.current_tasks.map((c) => h("li", {}, `${c.task} (${c.status})`,
      c.progress ? ` · ${c.progress}` : "", c.prompt ? ` · “${c.prompt}”` : ""));
    fill(summary,
      h("div", {}, h("b", {}, op.name), " ", h("span", { class: "muted" }, op.uuid)),
      h("div", {}, "started ", time(op.started_at) || "—", " · elapsed ", duration(op.elapsed_ms),
        op.ended_at ? ` · ended ${time(op.ended_at)}` : ""),
      op.current_task ? h("div", { id: "current" }, op.status === "queued" ? "waiting for: " : "now: ", op.current_task) : null,
      current.length ? h("ul", {}, current) : null,
      op.error ? h("div", { class: "error" }, op.error) : null,
      Object.keys(op.params || {}).length
        ? h("div", { class: "muted" }, "params: ", Object.entries(op.params).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", "))
        : null);
    // The buttons: an operator's only.
    actions.replaceChildren();
    if (operator()) {
      for (const gate of op.tasks.filter((t) => t.status === "waiting")) {
        const prompt = (op.current_tasks.find((c) => c.task === gate.id) || {}).prompt || gate.id;
        actions.append(
          h("button", { class: "primary", "data-action": "approve", "data-task": gate.id, onclick: async () => {
            const reason = await confirmAction(`Approve ${gate.id}?`, prompt, "Comment (recorded in the op's events)");
            if (reason !== null) act("approve", { step: gate.id, comment: reason || null }, `approved ${gate.id}`);
          } }, `Approve ${gate.id}`),
          h("button", { "data-action": "reject", "data-task": gate.id, onclick: async () => {
            const reason = await confirmAction(`Reject ${gate.id}?`, `${prompt} — the gate's task fails.`, "Comment (recorded in the op's events)");
            if (reason !== null) act("reject", { step: gate.id, comment: reason || null }, `rejected ${gate.id}`);
          } }, `Reject ${gate.id}`));
      }
      if (!["succeeded", "failed", "canceled", "interrupted", "canceling"].includes(op.status)) {
        actions.append(h("button", { class: "danger", "data-action": "cancel", onclick: async () => {
          const reason = await confirmAction(`Cancel op ${op.id}?`, "Its running steps are ended and its on_cancel hooks run.");
          if (reason !== null) act("cancel", { reason: reason || null }, "cancel asked");
        } }, "Cancel op"));
      }
      if (["failed", "interrupted"].includes(op.status)) {
        actions.append(h("button", { "data-action": "resume", onclick: async () => {
          const from = await confirmAction(`Resume op ${op.id}?`, "This server resumes it where it stopped.",
            "From step (optional: run it and what follows again)");
          if (from !== null) act("resume", { from: from || null }, "resume started");
        } }, "Resume op"));
      }
    }
    draw(svg, steps, op.tasks, picked, (step) => pick(step, true));
    tasks.replaceChildren(...op.tasks.map((t) => h("tr", {
      class: `link${t.step === picked || t.id === picked ? " selected" : ""}`, "data-task": t.id, "data-status": t.status,
      onclick: () => pick(t.id, true) },
      h("td", {}, t.id), h("td", {}, badge(t.status)), h("td", {}, t.attempts),
      h("td", {}, time(t.started_at)), h("td", {}, time(t.ended_at)), h("td", {}, t.exit_code ?? ""),
      h("td", {}, t.error ? h("span", { class: "error" }, t.error) : "",
        t.outputs && Object.keys(t.outputs).length ? h("code", {}, JSON.stringify(t.outputs)) : "",
        t.history.length > 1 ? h("div", { class: "muted" }, t.history.map((a) => `#${a.attempt} ${a.status}${a.exit_code !== null ? ` (exit ${a.exit_code})` : ""}`).join(" · ")) : ""))));
    events.replaceChildren(...op.events.slice().reverse().map((e) => h("tr", {},
      h("td", { class: "wide" }, time(e.at)), h("td", {}, e.kind), h("td", {}, e.task || ""), h("td", {}, e.message))));
  }

  const load = throttle(async () => {
    try {
      record = await api(`/ops/${id}`);
      if (!steps.length) steps = (await api(`/ops/${id}/graph`)).steps;
      if (auto) {
        // Follows what runs now; when nothing does, the log last shown stays.
        const now = record.current_tasks.find((c) => c.status === "running");
        const ran = record.tasks.filter((t) => t.started_at).pop();
        const want = now ? now.task : picked || (ran ? ran.id : null);
        if (want && want !== picked) { picked = want; follow(want); }
      }
      render();
    } catch (err) { fail(err); }
  }, 300);
  load();
  return {
    changed(ids) { if (ids.has(Number(id))) load(); },
    refresh: load,
    close() { if (logs) logs.close(); },
  };
}

function locksPage() {
  const box = h("div");
  const actions = h("div", { class: "buttons", id: "actions" });
  main.replaceChildren(h("h1", {}, "Locks, cooldowns and pauses"), actions, box);
  const table = (head, rows) => rows.length
    ? h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, head.map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))))
    : h("p", { class: "muted" }, "none");
  // An operator's action on this page: asked, confirmed, then the page is read again.
  const button = (label, action, title, text, body) => h("button", { "data-action": action, onclick: async () => {
    const reason = await confirmAction(title, text);
    if (reason === null) return;
    try {
      await api(`/${action}`, { method: "POST", body: body(reason || null) });
    } catch (err) { fail(err); }
    load();
  } }, label);
  const load = throttle(async () => {
    try {
      const l = await api("/locks");
      const opLink = (op) => h("a", { href: `#/op/${op}` }, op);
      const mine = operator();
      fill(actions, mine && !l.paused
        ? button("Pause everything", "pause", "Pause cairn?", "No new op starts until it is unpaused; running ones go on.", (reason) => ({ reason }))
        : null);
      fill(box,
        h("h2", {}, "Pauses"), table(["scope", "by", "since", "until", "reason", ""], (l.pauses || []).map((p) => [
          [p.plan ? `plan ${p.plan}` : "", p.key_prefix ? `keys ${p.key_prefix}*` : ""].filter(Boolean).join(", ") || "everything",
          p.by || "", time(p.at), time(p.until), p.reason || "",
          mine ? button("Unpause", "unpause", "Lift this pause?", "Ops it held may start.",
            () => ({ plan: p.plan || null, key: p.key_prefix || null })) : ""])),
        h("h2", {}, "Held locks"), table(["key", "op", "since"], l.locks.map((k) => [k.key, opLink(k.op), time(k.since)])),
        h("h2", {}, "Cooldowns"), table(["key", "until", "after op", "acked by", ""], l.cooldowns.map((c) => [
          c.key, time(c.until), opLink(c.after_op), c.acked_by || "",
          mine && !c.acked_by ? button("Ack", "ack", `Acknowledge the cooldown of ${c.key}?`, "A new op on this key may start now.",
            (reason) => ({ key: c.key, reason })) : ""])));
    } catch (err) { fail(err); }
  }, 400);
  load();
  return { changed: load, refresh: load, close() {} };
}

// --- the frame -------------------------------------------------------------------------------
function fail(err) {
  if (err instanceof Unauthorized) { stopFeed(); loginPage(err.message); return; }
  const old = document.getElementById("error");
  if (old) old.remove();
  main.prepend(h("p", { class: "error", id: "error" }, err.message));
}

function route() {
  if (view) view.close();
  const [path, search] = location.hash.replace(/^#/, "").split("?");
  const query = new URLSearchParams(search || "");
  const op = path.match(/^\/op\/(\d+)$/);
  if (op) view = opPage(op[1]);
  else if (path === "/locks") view = locksPage();
  else view = opsPage(query);
}

function stopFeed() {
  if (feed) { feed.close(); feed = null; }
  document.getElementById("live").classList.remove("on");
}

function startFeed() {
  stopFeed();
  feed = new EventSource("/api/v1/changes");
  const live = document.getElementById("live");
  feed.addEventListener("open", () => live.classList.add("on"));
  feed.addEventListener("error", () => live.classList.remove("on"));
  feed.addEventListener("ops", (e) => {
    const ids = new Set(JSON.parse(e.data));
    if (view && ids.size) view.changed(ids);
  });
  feed.addEventListener("resync", () => { if (view) view.refresh(); });
}

async function start() {
  try {
    me = await api("/whoami");
  } catch (err) {
    if (err instanceof Unauthorized) { loginPage(); return; }
    main.replaceChildren(h("p", { class: "error" }, err.message));
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  startFeed();
  route();
}

window.addEventListener("hashchange", () => { if (me) route(); });
document.getElementById("logout").addEventListener("click", async () => {
  try { await api("/logout", { method: "POST", body: {} }); } catch { /* gone anyway */ }
  me = null;
  stopFeed();
  if (view) view.close();
  loginPage("Logged out.");
});
// What no event announces (a lease running out, a task's progress) shows within ten seconds.
setInterval(() => { if (me && view && !document.hidden) view.refresh(); }, 10000);
start();
