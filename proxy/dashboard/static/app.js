// The dashboard's page (browser -> the proxy's /v1/dashboard/ endpoints -> the store).
//
// One page, four views chosen by the URL's fragment: #/funnel, #/curves, #/sessions
// (#/sessions/<id> for one), #/adapters. Every datum comes from the proxy as JSON, asked
// with the key the user gave (kept in this tab's sessionStorage; "#key=..." in the URL
// signs in and is removed at once). Text is always set as text, never as HTML; the only
// markup inserted is the SVG of the charts, which the proxy draws and escapes.
"use strict";

const KEY = "nextstate.key";
const API = "/v1/dashboard";
const REFRESH_MS = 5000;
let refreshTimer = null;
let viewer = null;

class SignInNeeded extends Error {}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "onclick" || name === "onsubmit") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  return append(node, children);
}

// Children are nodes, text or (nested) arrays of them; null, undefined and false are skipped.
function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Number(value.toPrecision(digits)).toString();
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
}

function scoreClass(score) {
  return score > 0 ? "plus" : score < 0 ? "minus" : "";
}

function notice(text, bad = false) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = bad ? "bad" : "";
  box.hidden = !text;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  const answer = await fetch(path, Object.assign({}, options, { headers }));
  if (answer.status === 401) throw new SignInNeeded(key ? "That key was not accepted." : "");
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    throw new Error((body.error && body.error.message) || `${answer.status} ${answer.statusText}`);
  }
  return body;
}

// -- signing in ----------------------------------------------------------------------

function takeKeyFromUrl() {
  const hash = location.hash.slice(1);
  const [path, query] = hash.startsWith("key=") ? ["", hash] : hash.split("?");
  const params = new URLSearchParams(query || "");
  if (!params.has("key")) return;
  sessionStorage.setItem(KEY, params.get("key"));
  params.delete("key");
  const rest = params.toString();
  history.replaceState(null, "", `${location.pathname}#${path || "/funnel"}${rest ? `?${rest}` : ""}`);
}

function showLogin(message) {
  const main = document.getElementById("main");
  fill(main, document.getElementById("login").content.cloneNode(true));
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key").value);
    viewer = null;
    render();
  });
}

async function who() {
  if (viewer) return viewer;
  viewer = await api(`${API}/me`);
  const label = viewer.admin ? "admin" : `tenant ${viewer.tenant}`;
  document.getElementById("who").textContent = viewer.keys ? label : "open proxy (no keys)";
  document.getElementById("sign-out").hidden = !viewer.keys;
  return viewer;
}

// -- the funnel -----------------------------------------------------------------------

async function funnelPage(main) {
  const data = await api(`${API}/funnel`);
  const top = Math.max(1, ...data.stages.map((s) => s.count));
  const learner = data.learner;
  const health = learner && learner.health;
  const progress = data.progress;
  fill(main,
    el("h1", { text: data.tenant ? `Funnel: tenant ${data.tenant}` : "Funnel: every tenant" }),
    el("div", { class: "card", id: "learner" },
      learner
        ? [el("span", { class: `pill ${health ? health.state : ""}`, id: "health",
                        text: health ? health.state : learner.state }),
           ` learner ${learner.state}, reported ${fmt(learner.age_seconds, 2)} s ago; serving `,
           el("b", { text: learner.adapter ? learner.adapter.name : "the base model" }),
           health && health.why.length ? el("div", { class: "muted", text: health.why.join("; ") }) : null]
        : el("span", { class: "muted", text: "No learner has reported to this store yet." }),
      el("div", { class: "section-title", text: "progress toward the next step" }),
      el("div", { class: "progress" },
        (() => { const bar = el("div", { class: "fill" }); bar.style.width = `${100 * progress.fraction}%`; return bar; })()),
      el("span", { id: "progress", "data-ready": progress.ready, "data-batch": progress.batch_turns,
                   text: `${progress.ready} of ${progress.batch_turns} turns ready (${progress.method})` }),
      progress.lanes.length > 1
        ? el("ul", { id: "lanes" }, progress.lanes.map((lane) => el("li", {
            "data-lane": lane.user || "shared", "data-ready": lane.ready,
            text: `${lane.user ? `${lane.user}'s own adapter` : "the shared adapter"}: ${lane.ready} of ${progress.batch_turns}` })))
        : null),
    el("div", { class: "card", id: "funnel" }, data.stages.map((stage) => stageRow(stage, top))));
}

function stageRow(stage, top) {
  const fill = el("div", { class: "fill" });
  fill.style.width = `${(100 * stage.count) / top}%`;
  const drops = stage.drops.filter((d) => d.count > 0);
  return el("div", { class: "stage", "data-stage": stage.key, "data-count": stage.count },
    el("div", { class: "name", text: stage.label }),
    el("div", { class: "bar" }, fill, el("span", { class: "count", text: stage.count })),
    stage.waiting && stage.waiting.count
      ? el("div", { class: "waiting", "data-waiting": stage.waiting.count,
                    text: `${stage.waiting.count} ${stage.waiting.label}` }) : null,
    stage.scores
      ? el("div", { class: "scores" },
          Object.entries(stage.scores).map(([score, n]) => el("span", {
            class: `pill ${scoreClass(Number(score))}`, "data-score": score, "data-count": n,
            text: `${score}: ${n}` })),
          ` with hints ${stage.with_hints}, from feedback ${stage.from_feedback}`) : null,
    drops.length
      ? el("ul", {}, drops.map((d) => el("li", { "data-drop": d.reason, "data-count": d.count,
                                                 text: `dropped ${d.count}: ${d.reason}` },
          Object.keys(d.detail).length
            ? el("div", { class: "muted", text: Object.entries(d.detail).map(([k, n]) => `${k} (${n})`).join("; ") })
            : null))) : null,
    stage.note ? el("div", { class: "muted waiting", text: stage.note }) : null);
}

// -- learning curves ----------------------------------------------------------------------

function svgNode(markup) {
  const doc = new DOMParser().parseFromString(markup, "image/svg+xml");
  return document.importNode(doc.documentElement, true);
}

async function curvesPage(main) {
  const data = await api(`${API}/curves`);
  const gate = data.gate;
  fill(main,
    el("h1", { text: "Learning curves" }),
    el("p", { class: "muted" },
      data.policies.length
        ? data.policies.map((p) => `${p.policy} (${p.kind}): ${p.versions} versions`).join(" · ")
        : "No adapter version has been published yet.",
      data.base && data.base.reward_mean !== null
        ? ` · the base model's traffic: mean reward ${fmt(data.base.reward_mean)} over ${data.base.judged} judged turns` : ""),
    el("div", { class: "charts" }, data.charts.map((chart) =>
      el("figure", { class: "card", "data-chart": chart.key }, svgNode(chart.svg)))),
    el("h2", { text: "Publish gate" }),
    el("div", { class: "card", id: "gate" },
      `${gate.refused_total} steps refused` + (gate.bound ? ` (bound ${fmt(gate.bound)} nats/token)` : ""),
      gate.slowed.length ? `; taken at a smaller learning rate: ${gate.slowed.join(", ")}` : "",
      gate.refusals.length
        ? el("ul", {}, gate.refusals.map((r) => el("li", { text: `${when(r.at)} ${r.policy || ""}: ${r.error}` })))
        : null),
    el("h2", { text: "Versions" }),
    versionsTable(data.versions, data.scores));
}

function versionsTable(rows, scores) {
  const scored = {};
  for (const s of scores) scored[s.adapter] = `${s.benchmark} ${fmt(s.score)}`;
  const head = ["version", "policy", "status", "turns", "loss", "KL", "clip", "tokens/s",
                "served", "reward served", "score"];
  return el("table", { id: "versions" },
    el("tr", {}, head.map((h) => el("th", { text: h }))),
    rows.slice().reverse().map((r) => el("tr", { "data-version": r.version },
      el("td", { text: r.name }), el("td", { text: r.policy }),
      el("td", {}, el("span", { class: `pill ${r.status}`, text: r.status })),
      el("td", { class: "num", text: fmt(r.stats.turns) }), el("td", { class: "num", text: fmt(r.stats.loss) }),
      el("td", { class: "num", text: fmt(r.stats.kl) }), el("td", { class: "num", text: fmt(r.stats.clip_fraction) }),
      el("td", { class: "num", text: fmt(r.stats.tokens_per_second, 4) }),
      el("td", { class: "num", text: r.served.turns }), el("td", { class: "num", text: fmt(r.served.reward_mean) }),
      el("td", { text: scored[r.name] || "" }))));
}

// -- sessions --------------------------------------------------------------------------------

async function sessionsPage(main, params) {
  const q = params.get("q") || "";
  const offset = Number(params.get("offset") || 0);
  const data = await api(`${API}/sessions?q=${encodeURIComponent(q)}&offset=${offset}`);
  const input = el("input", { id: "search", type: "search", value: q,
                              placeholder: "search ids, users, models and text" });
  const go = (to) => { location.hash = `#/sessions?q=${encodeURIComponent(input.value)}&offset=${to}`; };
  fill(main,
    el("h1", { text: "Sessions" }),
    el("form", { class: "search", onsubmit: (e) => { e.preventDefault(); go(0); } },
      input, el("button", { type: "submit", text: "Search" })),
    el("p", { class: "muted" }, el("span", { id: "session-total", text: data.total }),
      q ? ` sessions match “${q}”` : " sessions"),
    el("table", { id: "sessions" },
      el("tr", {}, ["session", "opened with", "user", "turns", "judged", "mean reward", "served by", "last turn"]
        .map((h) => el("th", { text: h }))),
      data.sessions.map((s) => el("tr", { "data-session": s.id },
        el("td", {}, el("a", { href: `#/sessions/${encodeURIComponent(s.id)}`, text: s.id.length > 14 ? `${s.id.slice(0, 12)}…` : s.id, title: s.id })),
        el("td", { class: "opening", text: s.opening }),
        el("td", { text: s.user || "–" }), el("td", { class: "num", text: s.turns }),
        el("td", { class: "num", text: s.judged }), el("td", { class: "num", text: fmt(s.reward_mean) }),
        el("td", { text: s.served_model || "–" }), el("td", { text: when(s.last_at) })))),
    el("div", { class: "pager" },
      offset > 0 ? el("button", { type: "button", text: "Newer", onclick: () => go(Math.max(0, offset - data.limit)) }) : null,
      offset + data.sessions.length < data.total
        ? el("button", { type: "button", text: "Older", onclick: () => go(offset + data.limit) }) : null));
}

function contentText(content) {
  if (content === null || content === undefined) return "";
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.filter((part) => !(part && part.type === "image_url"))  // (shown as images)
      .map((part) => (part && part.type === "text" ? part.text : `[${part && part.type}]`)).join("\n");
  }
  return JSON.stringify(content);
}

// A screenshot the store keeps once, by hash, is fetched with the key (an <img> cannot
// send one) and shown from memory; a remote URL is only named, never fetched from here.
const IMAGE_REF = /^nextstate-image:sha256:([0-9a-f]{64})$/;

function imagePart(part) {
  const source = part.image_url;
  const url = String((source && typeof source === "object" ? source.url : source) || "");
  const match = url.match(IMAGE_REF);
  if (!match) return el("span", { class: "muted", text: `[image: ${url.slice(0, 100)}]` });
  const img = el("img", { class: "screen", alt: "screenshot", "data-image": match[1] });
  loadImage(img, match[1]);
  return img;
}

async function loadImage(img, digest) {
  const key = sessionStorage.getItem(KEY);
  try {
    const answer = await fetch(`${API}/images/${digest}`, { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (!answer.ok) throw new Error(`${answer.status} ${answer.statusText}`);
    img.src = URL.createObjectURL(await answer.blob());
  } catch (error) {
    img.replaceWith(el("span", { class: "muted error", text: `[image not shown: ${error.message}]` }));
  }
}

function message(m) {
  const calls = (m.tool_calls || []).map((c) => `→ ${c.function ? c.function.name : "tool"}(${c.function ? c.function.arguments : ""})`);
  const images = Array.isArray(m.content) ? m.content.filter((p) => p && p.type === "image_url").map(imagePart) : [];
  return el("div", { class: `msg ${m.role}` }, el("span", { class: "role", text: m.role }),
    [contentText(m.content), ...calls].filter(Boolean).join("\n"),
    images.length ? el("div", { class: "screens" }, images) : null);
}

function asked(turn) {
  const messages = (turn.request && turn.request.messages) || [];
  if (!messages.length) return [{ role: "user", content: (turn.request && turn.request.prompt) || "" }];
  let last = -1;
  messages.forEach((m, i) => { if (m.role === "assistant") last = i; });
  return messages.slice(last + 1);
}

function reply(turn) {
  const choice = ((turn.response && turn.response.choices) || [])[0];
  if (!choice) return { role: "assistant", content: turn.error || "(no answer)" };
  return choice.message || { role: "assistant", content: choice.text || "" };
}

function judgmentBlock(j, teacherHints) {
  if (!j) return el("div", { class: "judgment muted", text: "not judged yet" });
  if (j.status !== "ok") return el("div", { class: "judgment error", "data-status": j.status, text: `judge error: ${j.error}` });
  return el("div", { class: "judgment", "data-score": j.score },
    el("span", { class: `pill ${scoreClass(j.score)}`, text: `${j.score > 0 ? "+" : ""}${j.score}` }),
    ` from ${j.source} (${j.judge || ""})`,
    j.votes && j.votes.length ? `, votes ${j.votes.map((v) => (v === null ? "–" : v)).join(" ")}` : "",
    j.trained_version ? `; trained in version ${j.trained_version}` : "",
    j.trained_version === -1 ? `; skipped: ${j.error}` : "",
    j.hints && j.hints.length
      ? el("ul", { class: "hints" }, j.hints.map((h) => el("li", { text: h })))
      : null,
    teacherHints ? el("div", { class: "muted", text: `teacher logprobs for ${teacherHints} hint(s)` }) : null);
}

async function sessionPage(main, id) {
  const data = await api(`${API}/sessions/${encodeURIComponent(id)}`);
  fill(main,
    el("h1", {}, el("a", { href: "#/sessions", text: "Sessions" }), " / ", el("span", { id: "session-id", text: id })),
    data.turns.map((turn) => turnCard(turn)));
}

function turnCard(turn) {
  const usage = (turn.response && turn.response.usage) || {};
  const tokensBox = el("div", { class: "tokens-box" });
  const nextState = turn.next_state && turn.next_state.length
    ? turn.next_state.map(message)
    : [el("span", { class: "muted", text: { pending: "waiting for the next request", none: "the session ended here", "n/a": "none (a side turn, or no answer)" }[turn.next_state_status] || turn.next_state_status })];
  return el("article", { class: "card turn", "data-turn": turn.turn_id },
    el("header", {}, el("h3", { text: `turn ${turn.turn_index}` }),
      el("span", { class: "pill", text: turn.turn_type }), el("span", { class: "pill", text: turn.endpoint }),
      turn.status !== "ok" ? el("span", { class: "pill failed", text: turn.status }) : null),
    el("div", { class: "section-title", text: "asked" }), asked(turn).map(message),
    el("div", { class: "section-title", text: "reply" }), el("div", { class: "reply" }, message(reply(turn))),
    el("div", { class: "section-title", text: `next state${turn.next_state_kind ? ` (${turn.next_state_kind})` : ""}` }),
    el("div", { class: "next-state", "data-status": turn.next_state_status }, nextState),
    el("div", { class: "section-title", text: "judgment" }), judgmentBlock(turn.judgment, turn.teacher_hints),
    turn.feedback.length
      ? [el("div", { class: "section-title", text: "feedback" }),
         el("ul", { class: "feedback" }, turn.feedback.map((f) => el("li", { text: `${f.score > 0 ? "+" : ""}${f.score} from ${f.source}${f.hint ? `: ${f.hint}` : ""}${f.comment ? ` (${f.comment})` : ""}` })))]
      : null,
    el("div", { class: "meta" },
      el("span", { class: "served", text: `served by ${turn.served_model || "–"}` }),
      el("span", { text: `latency ${fmt(turn.latency_ms, 4)} ms` }),
      turn.ttft_ms ? el("span", { text: `first token ${fmt(turn.ttft_ms, 4)} ms` }) : null,
      el("span", { class: "token-count", text: `tokens: ${usage.prompt_tokens ?? turn.prompt_tokens} prompt, ${usage.completion_tokens ?? turn.completion_tokens} completion` }),
      turn.user ? el("span", { text: `user ${turn.user}` }) : null,
      turn.untrainable ? el("span", { class: "error", text: `untrainable: ${turn.untrainable}` }) : null,
      turn.completion_tokens
        ? el("button", { type: "button", class: "show-tokens", text: "tokens and logprobs",
                         onclick: () => showTokens(turn.turn_id, tokensBox) }) : null),
    tokensBox);
}

async function showTokens(turnId, box) {
  const data = await api(`${API}/turns/${encodeURIComponent(turnId)}/tokens`);
  const hints = data.hints.length ? data.hints : [];
  const teachers = data.tokens.length ? data.tokens[0].teacher.length : 0;
  const head = ["#", "token", "id", "logprob", ...Array.from({ length: teachers }, (_, k) => `teacher ${k + 1}`)];
  fill(box,
    hints.length ? el("ol", { class: "muted" }, hints.map((h) => el("li", { text: `hint: ${h}` }))) : null,
    el("table", { class: "tokens" },
      el("tr", {}, head.map((h) => el("th", { text: h }))),
      data.tokens.map((t, i) => el("tr", { "data-token": t.id },
        el("td", { class: "num", text: i }), el("td", { class: "text", text: t.text === null ? "" : JSON.stringify(t.text) }),
        el("td", { class: "num", text: t.id }),
        el("td", { class: `num ${t.logprob !== null && t.logprob < -2 ? "low" : ""}`, text: fmt(t.logprob) }),
        t.teacher.map((v) => el("td", { class: `num ${v !== null && t.logprob !== null ? (v > t.logprob ? "high" : "low") : ""}`, text: fmt(v) }))))),
    data.total > data.tokens.length ? el("p", { class: "muted", text: `first ${data.tokens.length} of ${data.total} tokens` }) : null);
}

// -- adapters -------------------------------------------------------------------------------

async function adaptersPage(main) {
  const data = await api(`${API}/adapters`);
  fill(main,
    el("h1", { text: "Adapters" }),
    el("p", { class: "muted", id: "replicas" }, "replicas: ",
      data.replicas.map((r) => el("span", { class: `pill ${r.up ? "current" : "failed"}`, text: `${r.url} ${r.up ? "up" : "down"}` }))),
    el("table", { id: "adapters" },
      el("tr", {}, ["version", "policy", "status", "published", "learned from", "loss", "KL", "loaded on", ""]
        .map((h) => el("th", { text: h }))),
      data.data.map((a) => el("tr", { "data-adapter": a.name, "data-status": a.status },
        el("td", { text: a.name }), el("td", { text: a.policy }),
        el("td", {}, el("span", { class: `pill ${a.status}`, text: a.status }),
          a.error ? el("div", { class: "muted", text: a.error }) : null),
        el("td", { text: when(a.published_at) }),
        el("td", { class: "num", text: `${a.trained_turns} turns` }),
        el("td", { class: "num", text: fmt(a.stats.loss) }), el("td", { class: "num", text: fmt(a.stats.kl) }),
        el("td", { class: "replicas", text: a.replicas.join(", ") || "–" }),
        el("td", {}, data.can_rollback && a.can_serve_again
          ? el("button", { type: "button", class: "rollback danger", "data-version": a.version,
                           text: "Roll back to this", onclick: () => rollback(a) }) : null)))));
}

async function rollback(adapter) {
  const sure = window.confirm(`Serve ${adapter.name} again? Every request for ${adapter.policy} ` +
                              "goes to it from now on, until the learner publishes a newer version.");
  if (!sure) return;
  try {
    await api("/v1/adapters/rollback", { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify({ version: adapter.version }) });
    notice(`${adapter.name} is current again.`);
  } catch (error) {
    notice(`Rollback failed: ${error.message}`, true);
  }
  render(true);  // (keeps the notice)
}

// -- the router ---------------------------------------------------------------------------------

async function render(quiet = false) {
  clearInterval(refreshTimer);
  const [path, query] = (location.hash.slice(1) || "/funnel").split("?");
  const parts = path.split("/").filter(Boolean);
  const page = parts[0] || "funnel";
  const params = new URLSearchParams(query || "");
  const main = document.getElementById("main");
  delete main.dataset.page;
  delete main.dataset.view;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  if (!quiet) notice("");
  try {
    await who();
    if (page === "curves") await curvesPage(main);
    else if (page === "sessions" && parts[1]) await sessionPage(main, decodeURIComponent(parts.slice(1).join("/")));
    else if (page === "sessions") await sessionsPage(main, params);
    else if (page === "adapters") await adaptersPage(main);
    else {
      await funnelPage(main);
      refreshTimer = setInterval(() => funnelPage(main).catch(() => {}), REFRESH_MS);
    }
    main.dataset.page = page;
  } catch (error) {
    if (error instanceof SignInNeeded) {
      viewer = null;
      showLogin(error.message);
    } else {
      fill(main, el("p", { class: "error", id: "error", text: error.message }));
    }
  }
  main.dataset.view = location.hash;  // this view is drawn (what tests wait for)
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  viewer = null;
  showLogin("");
});
window.addEventListener("hashchange", () => render());
takeKeyFromUrl();
render();
