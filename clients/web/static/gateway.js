// What both pages share: the token (from the URL's #fragment, never sent to a server in
// a URL), opening an authenticated WebSocket to the gateway, and authorised fetches.
import { decode, encode } from "./msgpack.js";

export function pageParams() {
  return new URLSearchParams(location.hash.replace(/^#/, ""));
}

export function token() {
  return pageParams().get("token");
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// Open ws(s)://host/PATH and authenticate. Resolves to {ws, welcome: auth_ok}; rejects
// with the gateway's close reason (e.g. "unauthorised: unknown token").
export function connect(path, onMessage, onClose) {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}${path}`);
    ws.binaryType = "arraybuffer";
    let admitted = false;
    ws.onopen = () => ws.send(encode({ v: 1, type: "auth", token: token() }));
    ws.onmessage = (event) => {
      if (typeof event.data === "string") return;
      let msg;
      try { msg = decode(event.data); } catch (err) { console.warn("undecodable", err); return; }
      if (!admitted && msg.type === "auth_ok") { admitted = true; resolve({ ws, auth: msg }); return; }
      onMessage(msg);
    };
    ws.onclose = (event) => {
      const why = event.reason || `closed (code ${event.code})`;
      if (!admitted) reject(new Error(why)); else if (onClose) onClose(why);
    };
  });
}

export function send(ws, msg) {
  if (ws.readyState === WebSocket.OPEN) ws.send(encode(msg));
}

export function setText(id, text) {
  const el = document.getElementById(id);
  if (el.textContent !== text) el.textContent = text;
}

// One colour per phase id, the same on both pages.
export function phaseColour(id) {
  return `hsl(${(id * 67) % 360} 60% 55%)`;
}

// Text from the wire (phase names, reasons) into HTML: escaped.
export function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
