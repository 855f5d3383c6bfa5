// A stand-in for WebXR hand tracking, for the browser test: navigator.xr whose immersive
// session has a left and a right hand and replays window.__xrFrames ([T][50][3], null =
// joint not tracked; WebXR joint order, left hand then right) at 30 frames a second.
// Only what clients/web/static/xr_hands.js calls is there.
(() => {
  const JOINTS = window.__xrJointNames; // the 25 names, set before this script
  const frames = window.__xrFrames;
  const t0 = performance.now();
  const index = () => Math.floor((performance.now() - t0) * 30 / 1000) % frames.length;
  const hand = (offset) => new Map(JOINTS.map((name, i) => [name, { offset: offset + i }]));
  const frame = {
    getJointPose(space) {
      const p = frames[index()][space.offset];
      return p && p[0] !== null ? { transform: { position: { x: p[0], y: p[1], z: p[2] } } } : null;
    },
  };
  const session = {
    inputSources: [{ handedness: "left", hand: hand(0) }, { handedness: "right", hand: hand(25) }],
    renderState: {},
    updateRenderState(state) { this.renderState = state; },
    async requestReferenceSpace() { return {}; },
    requestAnimationFrame(callback) { setTimeout(() => callback(performance.now(), frame), 11); },
    addEventListener() {},
    end() {},
  };
  window.XRWebGLLayer = class { constructor() { this.framebuffer = null; } };
  Object.defineProperty(navigator, "xr", { configurable: true, value: {
    async isSessionSupported(mode) { return mode === "immersive-vr"; },
    async requestSession() { return session; },
  } });
})();
