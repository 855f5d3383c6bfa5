// Headset page: streams poses to the server through the gateway and shows the current
// phase and progress. Sources: WebXR hand tracking (xr_hands.js), or, on a desktop
// without XR, a recording replayed in real time on an absolute schedule (as masa-rt
// replay does): one of the gateway's recordings or an uploaded .npz file.
import { authHeaders, connect, pageParams, setText } from "./gateway.js";
import { decode } from "./msgpack.js";
import { Outlet } from "./outlet.js";
import { startXrHands, xrHandsSupported } from "./xr_hands.js";
import { WEBXR_JOINTS, WEBXR_LAYOUT } from "./webxr_joints.js";

const XR_RATE = 30; // frames per second streamed from XR (the shipped hand model's rate)
let ws = null;
let outlet = null;
let stopSource = null;

const $ = (id) => document.getElementById(id);
const pct = (x) => `${Math.round(100 * Math.min(Math.max(x || 0, 0), 1))}%`;

function status(text, bad = false) {
  setText("status", text);
  $("status").classList.toggle("bad", bad);
}

function showEstimate(est, latencyS) {
  setText("phase", est.phase_name ?? "–");
  $("phase-fill").style.width = pct(est.phase_progress);
  $("progress-fill").style.width = pct(est.progress);
  setText("phase-pct", pct(est.phase_progress));
  setText("progress-pct", pct(est.progress));
  setText("activity", est.activity ?? "–");
  setText("state", est.state);
  setText("confidence", (est.confidence ?? 0).toFixed(2));
  setText("latency", `${(latencyS * 1000).toFixed(1)} ms`);
  showCounts();
}

function showCounts() {
  if (!outlet) return;
  const rejected = Object.values(outlet.rejected).reduce((a, b) => a + b, 0);
  setText("counts", `${outlet.sent} sent · ${outlet.answered} answered · ${rejected} rejected`);
}

function drawJoints(view, j, c) {
  const canvas = $("hands");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  let lo = [Infinity, Infinity], hi = [-Infinity, -Infinity];
  for (let i = 0; i < j; i++) for (let a = 0; a < 2; a++) {
    const v = view[i * c + a];
    if (Number.isFinite(v)) { lo[a] = Math.min(lo[a], v); hi[a] = Math.max(hi[a], v); }
  }
  const scale = 0.8 * Math.min(canvas.width / (hi[0] - lo[0] || 1), canvas.height / (hi[1] - lo[1] || 1));
  for (let i = 0; i < j; i++) {
    const x = view[i * c], y = view[i * c + 1];
    if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
    g.fillStyle = i < j / 2 ? "#4fb3ff" : "#ffb347";
    g.beginPath();
    g.arc(canvas.width / 2 + (x - (lo[0] + hi[0]) / 2) * scale, canvas.height / 2 - (y - (lo[1] + hi[1]) / 2) * scale, 3, 0, 2 * Math.PI);
    g.fill();
  }
}

async function openOutlet(layout, fps) {
  stop();
  outlet = new Outlet(ws, { layout, fps, reference: $("reference").value || null, onEstimate: showEstimate,
    onEnded: (err) => { status(err.message, true); stop(); } });
  const welcome = await outlet.open();
  fillReferences(welcome.references);
  $("stop").disabled = false;
  return welcome;
}

function fillReferences(names) {
  const select = $("reference");
  for (const name of names) {
    if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  }
}

// Replay `rec` (a recording message) in real time; frame k is due at t0 + k / fps.
async function replay(rec) {
  const [frames, j, c] = rec.shape;
  const welcome = await openOutlet(rec.layout, rec.fps);
  if (welcome.shape[0] !== j || welcome.shape[1] !== c) throw new Error(`server expects ${welcome.shape} joints, recording has ${j}x${c}`);
  const data = rec.data; // Uint8Array of (T, J, C) little-endian float32
  const floats = new Float32Array(data.buffer, data.byteOffset, frames * j * c);
  const frameBytes = j * c * 4;
  const mine = outlet;
  let k = 0, t0 = performance.now();
  status(`replaying ${rec.name} as ${mine.session} (${rec.layout}, ${rec.fps} fps)`);
  setText("source", `${rec.name}: ${frames} frames of ${rec.activity ?? "unknown activity"}`);
  const tick = () => {
    if (outlet !== mine) return; // stopped or replaced
    const due = Math.floor((performance.now() - t0) * rec.fps / 1000);
    if (due >= frames && !$("loop").checked) { status(`replayed ${rec.name}: ${mine.sent} frames`); stop(); return; }
    if (due > k) { // only the latest due frame: a late pose is worthless in real time
      const f = due % frames;
      mine.push(data.subarray(f * frameBytes, (f + 1) * frameBytes), [j, c]);
      drawJoints(floats.subarray(f * j * c, (f + 1) * j * c), j, c);
      k = due;
      showCounts();
    }
    setTimeout(tick, Math.max(0, t0 + (k + 1) * 1000 / rec.fps - performance.now()));
  };
  tick();
}

async function enterXr() {
  await openOutlet(WEBXR_LAYOUT, XR_RATE);
  const shape = [2 * WEBXR_JOINTS.length, 3];
  const mine = outlet;
  stopSource = await startXrHands(XR_RATE, (bytes) => {
    if (outlet !== mine) return;
    mine.push(bytes, shape);
    drawJoints(new Float32Array(bytes.buffer), shape[0], 3);
  }, () => stop());
  status(`streaming WebXR hands as ${mine.session}`);
}

function stop() {
  if (stopSource) { const s = stopSource; stopSource = null; s(); }
  if (outlet) { outlet.close(); outlet = null; }
  $("stop").disabled = true;
}

async function fetchRecording(url, init) {
  const response = await fetch(url, { ...init, headers: { ...authHeaders(), ...(init?.headers || {}) } });
  const body = new Uint8Array(await response.arrayBuffer());
  if (!response.ok) throw new Error(JSON.parse(new TextDecoder().decode(body)).error);
  return decode(body);
}

async function run(action) {
  try {
    await action();
  } catch (err) {
    status(err.message, true);
    stop();
  }
}

async function listRecordings() {
  const response = await fetch("/recordings", { headers: authHeaders() });
  const names = response.ok ? await response.json() : [];
  for (const name of names) $("recording").add(new Option(name, name));
  const wanted = pageParams().get("recording");
  if (wanted && names.includes(wanted)) $("recording").value = wanted;
}

async function main() {
  try {
    ({ ws } = await connect("/ws/headset", (msg) => outlet && outlet.handle(msg),
                            (why) => { status(`disconnected: ${why}`, true); stop(); }));
  } catch (err) {
    status(`refused: ${err.message}`, true);
    return;
  }
  status("connected: choose a source");
  await listRecordings();
  $("replay").onclick = () => run(async () => replay(await fetchRecording(`/recordings/${encodeURIComponent($("recording").value)}`)));
  $("upload").onchange = () => run(async () => {
    const file = $("upload").files[0];
    await replay(await fetchRecording(`/recordings?name=${encodeURIComponent(file.name)}`, { method: "POST", body: file }));
  });
  $("stop").onclick = () => { stop(); status("stopped"); };
  $("xr").onclick = () => run(enterXr);
  const xr = await xrHandsSupported();
  $("xr").disabled = !xr;
  setText("xr-note", xr ? "immersive VR with hand tracking available" : "no WebXR here (needs a headset and https or localhost): replay a recording instead");
}

main();
