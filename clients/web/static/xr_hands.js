// WebXR hand tracking as a pose source: an immersive session with 'hand-tracking', whose
// every animation frame yields both hands' 25 joint positions (metres, reference space)
// in the webxr_hands25 layout: left hand then right, NaN where a joint is not tracked.
import { WEBXR_JOINTS } from "./webxr_joints.js";

export async function xrHandsSupported() {
  if (!navigator.xr) return false;
  try { return await navigator.xr.isSessionSupported("immersive-vr"); } catch { return false; }
}

// Calls onJoints(Uint8Array of 50*3 float32) at most `rate` times a second until the
// session ends; resolves to a stop() function.
export async function startXrHands(rate, onJoints, onEnd) {
  const session = await navigator.xr.requestSession("immersive-vr", {
    requiredFeatures: ["hand-tracking"], optionalFeatures: ["local-floor"] });
  const gl = document.createElement("canvas").getContext("webgl", { xrCompatible: true });
  await session.updateRenderState({ baseLayer: new XRWebGLLayer(session, gl) });
  let space;
  try { space = await session.requestReferenceSpace("local-floor"); } catch { space = await session.requestReferenceSpace("local"); }
  const joints = new Float32Array(2 * WEBXR_JOINTS.length * 3);
  let last = -Infinity;
  const onFrame = (time, frame) => {
    session.requestAnimationFrame(onFrame);
    const layer = session.renderState.baseLayer;
    gl.bindFramebuffer(gl.FRAMEBUFFER, layer.framebuffer);
    gl.clearColor(0.07, 0.08, 0.1, 1); gl.clear(gl.COLOR_BUFFER_BIT);
    if (time - last < 1000 / rate) return;
    last = time;
    joints.fill(NaN);
    for (const source of session.inputSources) {
      if (!source.hand || (source.handedness !== "left" && source.handedness !== "right")) continue;
      const base = source.handedness === "left" ? 0 : WEBXR_JOINTS.length;
      WEBXR_JOINTS.forEach((name, i) => {
        const jointSpace = source.hand.get(name);
        const pose = jointSpace && frame.getJointPose(jointSpace, space);
        if (!pose) return;
        const p = pose.transform.position;
        joints.set([p.x, p.y, p.z], (base + i) * 3);
      });
    }
    onJoints(new Uint8Array(joints.buffer.slice(0)));
  };
  session.requestAnimationFrame(onFrame);
  session.addEventListener("end", () => onEnd());
  return () => session.end();
}
