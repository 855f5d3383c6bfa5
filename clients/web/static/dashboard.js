// Operator dashboard: draws the gateway's snapshots (clients/web/board.py) a few times a
// second: one row per live session, with a progress bar split into the reference's
// phases as the gateway has located them from the estimates.
import { connect, esc, phaseColour, setText } from "./gateway.js";

const rows = new Map(); // session -> <tr>

function cell(tr, cls, numeric = false) {
  const td = document.createElement("td");
  td.className = cls + (numeric ? " num" : "");
  tr.appendChild(td);
  return td;
}

function rowFor(session) {
  let tr = rows.get(session);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.session = session;
    for (const [cls, num] of [["session"], ["activity"], ["phase"], ["bar-cell"], ["progress", true],
                              ["confidence", true], ["state"], ["latency", true]]) cell(tr, cls, num);
    tr.querySelector(".bar-cell").innerHTML = '<div class="bar"></div>';
    document.getElementById("sessions").appendChild(tr);
    rows.set(session, tr);
  }
  return tr;
}

const pct = (x) => `${Math.round(100 * Math.min(Math.max(x || 0, 0), 1))}%`;

function drawBar(bar, segments, s) {
  const parts = segments.map((seg) => {
    const current = seg.id === s.phase_id ? " current" : "";
    const name = esc(seg.name);
    return `<div class="seg${current}" title="${name}" data-phase="${name}" style="left:${seg.start * 100}%;` +
      `width:${(seg.end - seg.start) * 100}%;background:${phaseColour(seg.id)}"><span>${name}</span></div>`;
  });
  parts.push(`<div class="marker" style="left:calc(${pct(s.progress)} - 1px)"></div>`);
  const html = parts.join("");
  if (bar.innerHTML !== html) bar.innerHTML = html;
}

function drawSession(s, phases) {
  const tr = rowFor(s.session);
  const q = (cls) => tr.querySelector(`.${cls}`);
  q("session").textContent = s.session;
  q("activity").textContent = s.activity ?? "–";
  q("phase").textContent = s.phase_name ? `${s.phase_name} ${pct(s.phase_progress)}` : "–";
  q("progress").textContent = pct(s.progress);
  q("confidence").textContent = (s.confidence ?? 0).toFixed(2);
  q("state").textContent = s.state;
  q("latency").textContent = s.server_ms.toFixed(2);
  drawBar(q("bar"), phases[s.activity] || [], s);
}

function drawCounters(snap) {
  const c = (snap.server && snap.server.counters) || {};
  const lat = (snap.server && snap.server.latency) || {};
  const rejected = Object.entries(c).filter(([k]) => k.startsWith("rejected.")).reduce((a, [, v]) => a + v, 0);
  const refused = Object.entries(snap.gateway).filter(([k]) => k.startsWith("refused.") || k.startsWith("rejected."))
    .map(([k, v]) => `${k} <b>${v}</b>`).join(" · ");
  const ms = (us) => (us === undefined ? "–" : (us / 1000).toFixed(2));
  document.getElementById("counters").innerHTML = [
    `server: sessions <b>${c.sessions_active ?? "–"}</b>`, `frames in <b>${c.frames_in ?? "–"}</b>`,
    `estimates out <b>${c.estimates_out ?? "–"}</b>`, `rejected <b>${rejected}</b>`,
    `server latency p50/p99 <b>${ms(lat.p50_us)} / ${ms(lat.p99_us)} ms</b>`,
    `gateway: pages <b>${(snap.gateway["pages.headset"] || 0) + (snap.gateway["pages.dashboard"] || 0)}</b>`,
    refused || "no refusals",
  ].map((s) => `<span>${s}</span>`).join("");
}

function draw(snap) {
  if (snap.type !== "dashboard") return;
  const live = new Set(snap.sessions.map((s) => s.session));
  for (const [session, tr] of rows) if (!live.has(session)) { tr.remove(); rows.delete(session); }
  for (const s of snap.sessions) drawSession(s, snap.phases);
  document.getElementById("empty").hidden = snap.sessions.length > 0;
  const note = document.getElementById("server-note");
  note.textContent = snap.server_note;
  note.classList.toggle("bad", Boolean(snap.server_note));
  drawCounters(snap);
}

connect("/ws/dashboard", draw, (why) => {
  setText("status", `disconnected: ${why}`);
  document.getElementById("status").classList.add("bad");
}).then(({ auth }) => {
  setText("status", `live from ${auth.server}${auth.name ? ` as ${auth.name}` : ""}`);
}).catch((err) => {
  setText("status", `refused: ${err.message}`);
  document.getElementById("status").classList.add("bad");
});
