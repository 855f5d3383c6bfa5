// One headset session over the gateway's /ws/headset, speaking protocol v1 as
// clients/outlet.py does: hello -> welcome, one frame per message, estimates back,
// per-frame errors counted, an unknown_session answered with a resume hello, a
// heartbeat ping. Capture stamps come from performance.now(), a monotonic clock.
import { send } from "./gateway.js";

export const now = () => performance.now() / 1000;
const CLIENT = "masa-rt-web/1";

export class Outlet {
  constructor(ws, { layout, fps, reference = null, onEstimate, onEnded }) {
    this.ws = ws;
    this.session = `web-${crypto.getRandomValues(new Uint32Array(2)).reduce((s, x) => s + x.toString(16).padStart(8, "0"), "")}`;
    Object.assign(this, { layout, fps, reference, onEstimate, onEnded });
    this.seq = 0; this.sent = 0; this.answered = 0; this.rejected = {}; this.lastT = -Infinity;
    this.welcome = null; this.waiting = null; this.heartbeat = null;
  }

  // Resolves with the welcome, rejects with the server's refusal or after timeoutS.
  open(timeoutS = 5) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no welcome within ${timeoutS} s: is masa-rt serve running?`)), timeoutS * 1000);
      this.waiting = { resolve: (w) => { clearTimeout(timer); resolve(w); }, reject: (e) => { clearTimeout(timer); reject(e); } };
      this.hello(false);
      this.heartbeat = setInterval(() => send(this.ws, { v: 1, type: "ping", client_time: now(), session: this.session }), 750);
    });
  }

  hello(resume) {
    send(this.ws, { v: 1, type: "hello", session: this.session, layout: this.layout, fps: this.fps,
                    reference: this.reference, client_time: now(), resume, client: CLIENT });
  }

  // joints: Uint8Array of J*C little-endian float32 (NaN = lost joint).
  push(jointBytes, shape) {
    let t = now();
    if (!(t > this.lastT)) t = this.lastT + 1e-6; // capture stamps must increase
    this.lastT = t;
    send(this.ws, { v: 1, type: "frame", session: this.session, seq: this.seq++, t,
                    joints: { dtype: "<f4", shape, data: jointBytes } });
    this.sent++;
  }

  close() {
    clearInterval(this.heartbeat);
    if (this.welcome) send(this.ws, { v: 1, type: "bye", session: this.session });
    this.welcome = null;
  }

  // Every message from the gateway goes through here.
  handle(msg) {
    if (msg.session !== undefined && msg.session !== null && msg.session !== this.session) return;
    if (msg.type === "welcome") {
      this.welcome = msg;
      this.seq = Math.max(this.seq, Number(msg.last_seq) + 1);
      if (this.waiting) { this.waiting.resolve(msg); this.waiting = null; }
    } else if (msg.type === "estimate") {
      this.answered++;
      this.onEstimate(msg, now() - msg.t_capture);
    } else if (msg.type === "error") {
      this.onError(msg);
    }
  }

  onError(msg) {
    if (msg.seq !== null && msg.seq !== undefined) {
      this.rejected[msg.reason] = (this.rejected[msg.reason] || 0) + 1;
    } else if (msg.reason === "unknown_session" && this.welcome) {
      this.hello(true); // the server restarted or expired us: resume
    } else {
      const err = new Error(`server refused: ${msg.reason} (${msg.detail})`);
      if (this.waiting) { this.waiting.reject(err); this.waiting = null; }
      clearInterval(this.heartbeat);
      this.welcome = null;
      if (this.onEnded) this.onEnded(err);
    }
  }
}
