// A small WebGL mesh viewer for isosurfaces of cryo-EM maps (no libraries, no build step).
//
//   const view = createMeshView(container, { width: 360, height: 360 });
//   view.setMesh({ positions, normals, indices, colors }, frame);  // Float32Array [V*3] ×2,
//                                                                  // Uint32Array [F*3], Float32Array [V*3] | null
//   view.setFrame(frame);   // draw that frame's mesh (meshes of a series stay on the GPU)
//   view.clear();           // forget every frame (a new series)
//   view.destroy();
//
// Coordinates are those of cryoformer_widgets.trajectory_view.Mesh: (x, y, z) in the unit cube
// centred on the box centre, so every frame of a series shares one scale. Drag rotates
// (trackball: about the screen axis perpendicular to the drag), the wheel zooms. Shading is
// Lambert under a headlight plus ambient, two-sided (the inside of a clipped surface stays lit).
// Without WebGL the container shows a message and `available` is false.
//
// unpackMesh(bytes) reads the wire format that Mesh.to_bytes() writes (see trajectory_view.py).
// This file is an ES module on its own and is also prepended to trajectory_view.js and
// latent_explorer.js, because an anywidget front end is one module and cannot import a sibling
// file; it also holds the small DOM helpers those share (bytesOf, h).

// DOM and binary-trait helpers of every cryoformer front end (they all start with this file).
function bytesOf(v) {
  if (!v) return new Uint8Array(0);
  if (v instanceof DataView || ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  return new Uint8Array(0);
}

function h(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.appendChild(c);
  return e;
}

const MESH_MAGIC = "CFM1";
const SURFACE_RGB = [0.55, 0.72, 0.95]; // cryoformer.analysis.render.SURFACE_RGB

export function unpackMesh(data) {
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data)
    : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const copy = bytes.slice(); // aligned for the typed views
  const head = new DataView(copy.buffer, 0, 24);
  const magic = String.fromCharCode(copy[0], copy[1], copy[2], copy[3]);
  if (magic !== MESH_MAGIC) throw new Error("not a cryoformer mesh (magic " + magic + ")");
  const V = head.getUint32(4, true), F = head.getUint32(8, true), flags = head.getUint32(12, true);
  let offset = 24;
  const take = (Type, n) => { const a = new Type(copy.buffer, offset, n); offset += n * 4; return a; };
  const positions = take(Float32Array, 3 * V), normals = take(Float32Array, 3 * V);
  const indices = take(Uint32Array, 3 * F);
  const colors = flags & 1 ? take(Float32Array, 3 * V) : null;
  return { frame: head.getInt32(16, true), series: head.getUint32(20, true), positions, normals, indices, colors };
}

const VERTEX_SHADER = `
attribute vec3 aPosition;
attribute vec3 aNormal;
attribute vec3 aColor;
uniform mat4 uModelViewProjection;
uniform mat3 uRotation;
varying vec3 vNormal;
varying vec3 vColor;
void main() {
  gl_Position = uModelViewProjection * vec4(aPosition, 1.0);
  vNormal = uRotation * aNormal;
  vColor = aColor;
}`;

const FRAGMENT_SHADER = `
precision mediump float;
varying vec3 vNormal;
varying vec3 vColor;
uniform vec3 uLight;
void main() {
  vec3 n = normalize(vNormal);
  float lambert = abs(dot(n, uLight));   // two-sided
  gl_FragColor = vec4(vColor * (0.22 + 0.78 * lambert), 1.0);
}`;

// 3×3 matrices as row-major arrays of 9; 4×4 as column-major Float32Array(16) (WebGL's order).
function mat3Mul(a, b) {
  const out = new Array(9);
  for (let i = 0; i < 3; i++)
    for (let j = 0; j < 3; j++) out[3 * i + j] = a[3 * i] * b[j] + a[3 * i + 1] * b[3 + j] + a[3 * i + 2] * b[6 + j];
  return out;
}

function axisAngle(x, y, z, angle) {
  const c = Math.cos(angle), s = Math.sin(angle), t = 1 - c;
  return [t * x * x + c, t * x * y - s * z, t * x * z + s * y,
          t * x * y + s * z, t * y * y + c, t * y * z - s * x,
          t * x * z - s * y, t * y * z + s * x, t * z * z + c];
}

function orthonormalise(r) {
  // Gram–Schmidt on the rows: thousands of small drags must not shear the view.
  const a = r.slice(0, 3), b = r.slice(3, 6);
  const na = Math.hypot(...a); for (let i = 0; i < 3; i++) a[i] /= na;
  const d = a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; for (let i = 0; i < 3; i++) b[i] -= d * a[i];
  const nb = Math.hypot(...b); for (let i = 0; i < 3; i++) b[i] /= nb;
  const c = [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]];
  return [...a, ...b, ...c];
}

function modelViewProjection(rot, zoom, aspect) {
  // perspective(fov 30°) · translate(0, 0, −distance) · scale(zoom) · rotation
  const fov = Math.PI / 6, near = 0.1, far = 10, distance = 2.4;
  const f = 1 / Math.tan(fov / 2);
  const m = new Float32Array(16);
  for (let col = 0; col < 3; col++) {
    const rx = rot[col] * zoom, ry = rot[3 + col] * zoom, rz = rot[6 + col] * zoom;
    m[4 * col] = (f / aspect) * rx;
    m[4 * col + 1] = f * ry;
    m[4 * col + 2] = ((far + near) / (near - far)) * rz;
    m[4 * col + 3] = -rz;
  }
  m[12] = 0; m[13] = 0;
  m[14] = ((far + near) / (near - far)) * -distance + (2 * far * near) / (near - far);
  m[15] = distance;
  return m;
}

function compile(gl, type, source) {
  const shader = gl.createShader(type);
  gl.shaderSource(shader, source);
  gl.compileShader(shader);
  if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
  return shader;
}

function program(gl) {
  const p = gl.createProgram();
  gl.attachShader(p, compile(gl, gl.VERTEX_SHADER, VERTEX_SHADER));
  gl.attachShader(p, compile(gl, gl.FRAGMENT_SHADER, FRAGMENT_SHADER));
  gl.linkProgram(p);
  if (!gl.getProgramParameter(p, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(p));
  return p;
}

function openContext(canvas) {
  const options = { antialias: true, preserveDrawingBuffer: true, alpha: false };
  let gl = null;
  try { gl = canvas.getContext("webgl2", options); } catch (e) { gl = null; }
  if (gl) return { gl, api: "webgl2", uint32: true };
  try { gl = canvas.getContext("webgl", options) || canvas.getContext("experimental-webgl", options); } catch (e) { gl = null; }
  if (gl) return { gl, api: "webgl", uint32: !!gl.getExtension("OES_element_index_uint") };
  return { gl: null, api: "none", uint32: false };
}

function noWebGL(container, canvas) {
  canvas.dataset.webgl = "none";
  canvas.style.display = "none";
  const note = document.createElement("div");
  note.className = "cfm-nogl";
  note.textContent = "WebGL is not available in this browser, so the 3D view is off; the slices show the maps.";
  container.appendChild(note);
  const nothing = () => false;
  return { available: false, api: "none", canvas, setMesh: nothing, setFrame: nothing, hasFrame: nothing,
           clear() {}, draw() {}, destroy() { note.remove(); canvas.remove(); } };
}

export function createMeshView(container, { width = 360, height = 360, background = [0.125, 0.125, 0.125],
                                             azimuthDeg = 30, elevationDeg = 20 } = {}) {
  const canvas = document.createElement("canvas");
  canvas.className = "cfm-canvas";
  canvas.width = width; canvas.height = height;
  canvas.style.width = width + "px"; canvas.style.height = height + "px";
  canvas.style.touchAction = "none";
  canvas.dataset.frame = "-1";
  container.appendChild(canvas);
  const { gl, api, uint32 } = openContext(canvas);
  if (!gl) return noWebGL(container, canvas);
  canvas.dataset.webgl = api;
  const prog = program(gl);
  const loc = {
    position: gl.getAttribLocation(prog, "aPosition"), normal: gl.getAttribLocation(prog, "aNormal"),
    color: gl.getAttribLocation(prog, "aColor"), mvp: gl.getUniformLocation(prog, "uModelViewProjection"),
    rotation: gl.getUniformLocation(prog, "uRotation"), light: gl.getUniformLocation(prog, "uLight"),
  };
  const frames = new Map(); // frame → { position, normal, color, index, count, type, vertices }
  let current = -1, zoom = 1.0;
  // The movie's view of cryoformer traverse: azimuth about y, then elevation about x.
  let rot = mat3Mul(axisAngle(1, 0, 0, (elevationDeg * Math.PI) / 180), axisAngle(0, 1, 0, (azimuthDeg * Math.PI) / 180));

  function buffer(target, data) {
    const b = gl.createBuffer();
    gl.bindBuffer(target, b);
    gl.bufferData(target, data, gl.STATIC_DRAW);
    return b;
  }

  function release(entry) {
    for (const b of [entry.position, entry.normal, entry.color, entry.index]) if (b) gl.deleteBuffer(b);
  }

  function setMesh(mesh, frame = 0) {
    const V = mesh.positions.length / 3;
    let indices = mesh.indices, type = gl.UNSIGNED_INT;
    if (!uint32) { // WebGL1 without 32-bit indices: 16 bits are enough for small meshes only
      if (V > 65535) throw new Error("this browser's WebGL cannot draw meshes of more than 65535 vertices");
      indices = Uint16Array.from(indices); type = gl.UNSIGNED_SHORT;
    }
    if (frames.has(frame)) release(frames.get(frame));
    frames.set(frame, {
      position: buffer(gl.ARRAY_BUFFER, mesh.positions), normal: buffer(gl.ARRAY_BUFFER, mesh.normals),
      color: mesh.colors ? buffer(gl.ARRAY_BUFFER, mesh.colors) : null,
      index: buffer(gl.ELEMENT_ARRAY_BUFFER, indices), count: indices.length, type, vertices: V,
    });
    if (frame === current) draw();
    return true;
  }

  function attribute(location, buf) {
    gl.bindBuffer(gl.ARRAY_BUFFER, buf);
    gl.enableVertexAttribArray(location);
    gl.vertexAttribPointer(location, 3, gl.FLOAT, false, 0, 0);
  }

  function draw() {
    gl.viewport(0, 0, canvas.width, canvas.height);
    gl.clearColor(background[0], background[1], background[2], 1);
    gl.enable(gl.DEPTH_TEST);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    const entry = frames.get(current);
    canvas.dataset.frame = entry ? String(current) : "-1";
    canvas.dataset.vertices = entry ? String(entry.vertices) : "0";
    if (!entry || entry.count === 0) return;
    gl.useProgram(prog);
    gl.uniformMatrix4fv(loc.mvp, false, modelViewProjection(rot, zoom, canvas.width / canvas.height));
    // uniformMatrix3fv wants column-major: the transpose of the row-major rotation
    gl.uniformMatrix3fv(loc.rotation, false, new Float32Array([rot[0], rot[3], rot[6], rot[1], rot[4], rot[7], rot[2], rot[5], rot[8]]));
    const l = [0.35, 0.45, 1.0], n = Math.hypot(...l);
    gl.uniform3f(loc.light, l[0] / n, l[1] / n, l[2] / n);
    attribute(loc.position, entry.position);
    attribute(loc.normal, entry.normal);
    if (entry.color) attribute(loc.color, entry.color);
    else { gl.disableVertexAttribArray(loc.color); gl.vertexAttrib3f(loc.color, ...SURFACE_RGB); }
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, entry.index);
    gl.drawElements(gl.TRIANGLES, entry.count, entry.type, 0);
  }

  function setFrame(frame) {
    current = frame;
    draw();
    return frames.has(frame);
  }

  function clear() {
    for (const entry of frames.values()) release(entry);
    frames.clear();
    draw();
  }

  // Trackball: a drag by (dx, dy) px turns about the screen axis (dy, dx, 0), 0.01 rad per px.
  let last = null;
  const onDown = (e) => { last = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); };
  const onMove = (e) => {
    if (!last) return;
    const dx = e.clientX - last[0], dy = e.clientY - last[1];
    last = [e.clientX, e.clientY];
    const len = Math.hypot(dx, dy);
    if (len === 0) return;
    rot = orthonormalise(mat3Mul(axisAngle(dy / len, dx / len, 0, 0.01 * len), rot));
    draw();
  };
  const onUp = (e) => { last = null; if (canvas.hasPointerCapture(e.pointerId)) canvas.releasePointerCapture(e.pointerId); };
  const onWheel = (e) => {
    e.preventDefault(); // zoom the map, not scroll the notebook
    zoom = Math.min(8, Math.max(0.2, zoom * Math.exp(-0.0015 * e.deltaY)));
    draw();
  };
  canvas.addEventListener("pointerdown", onDown);
  canvas.addEventListener("pointermove", onMove);
  canvas.addEventListener("pointerup", onUp);
  canvas.addEventListener("pointercancel", onUp);
  canvas.addEventListener("wheel", onWheel, { passive: false });

  function destroy() {
    clear();
    canvas.removeEventListener("pointerdown", onDown);
    canvas.removeEventListener("pointermove", onMove);
    canvas.removeEventListener("pointerup", onUp);
    canvas.removeEventListener("pointercancel", onUp);
    canvas.removeEventListener("wheel", onWheel);
    const lose = gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext(); // browsers allow only a few live contexts per page
    canvas.remove();
  }

  draw();
  return { available: true, api, canvas, setMesh, setFrame, hasFrame: (k) => frames.has(k), clear, draw, destroy };
}
