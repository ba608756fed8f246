// Front end of cryoformer_widgets.LatentExplorer (anywidget ES module, no build step).
//
// Draws the latent scatter (every particle up to max_drawn, chosen in Python; axes axis_x / axis_y,
// any of axis_names: PCs, UMAP1/UMAP2, latent dimensions z0 …) by rasterising the points into one
// ImageData per frame: each pixel shows the mean colour of its points, more opaque where more
// points fall (density). The wheel zooms about the cursor; "pan" mode, a right/middle drag or a
// drag in "pick" mode pans; "reset" returns to home_view. Clicks, lasso and box drags become
// trait changes / messages in data coordinates; Python decodes, renders and selects. Binary
// traits arrive as DataViews: points float32 [M, 2], point_rows int32 [M], point_colors uint8 [M]
// (index into palette), point_selected uint8 [M]; slices_png / iso_png are PNG bytes.
//
// Python prepends static/mesh_view.js (createMeshView, unpackMesh): the volume panel's 3D view
// is one WebGL mesh view holding the shown volume's mesh (key "volume", from the volume_mesh
// trait) and the frames 0 … n−1 of the trajectory (asked for one by one with
// {type: "trajectory_frame", frame, series}; the answer carries the mesh and the slices PNG).
// A new trajectory_series drops the frames. "path" mode picks a trajectory's two particles.

function typed(v, Type) {
  const b = bytesOf(v).slice(); // copy: aligned for the typed view
  return new Type(b.buffer, 0, Math.floor(b.byteLength / Type.BYTES_PER_ELEMENT));
}

function throttle(fn, ms) {
  let last = 0, timer = null, args = null;
  return (...a) => {
    args = a;
    const now = Date.now();
    if (now - last >= ms) { last = now; fn(...args); return; }
    clearTimeout(timer);
    timer = setTimeout(() => { last = Date.now(); fn(...args); }, ms - (now - last));
  };
}

// Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `want` of them.
function niceTicks(lo, hi, want) {
  const span = hi - lo;
  if (!(span > 0) || !isFinite(span)) return [];
  const raw = span / want, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * span; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

function tickText(v, span) {
  const digits = Math.max(0, -Math.floor(Math.log10(span / 5)));
  return Math.abs(v) >= 1e5 || (v !== 0 && Math.abs(v) < 1e-4) ? v.toExponential(1) : v.toFixed(Math.min(digits, 6));
}

function hexToRgb(c) {
  const m = /^#?([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})$/i.exec(c || "");
  return m ? [parseInt(m[1], 16), parseInt(m[2], 16), parseInt(m[3], 16)] : [85, 85, 85];
}

function render({ model, el }) {
  const SIZE = 420, PAD = 40, TOP = 8, RIGHT = 8;
  const PLOT = SIZE - PAD - RIGHT;   // plot edge, CSS px (square)
  const root = h("div", { class: "cfx-root" });
  el.appendChild(root);

  // ---------------------------------------------------------------- left: scatter
  const left = h("div", { class: "cfx-panel" });
  const selX = h("select", { class: "cfx-pcx", title: "horizontal axis: a PC, UMAP (after cryoformer analyze) or a latent dimension" });
  const selY = h("select", { class: "cfx-pcy", title: "vertical axis: a PC, UMAP (after cryoformer analyze) or a latent dimension" });
  const selColor = h("select", { class: "cfx-color", title: "colour particles by a label set or a value (defocus, angles, …)" });
  const modes = {};
  const modeBar = h("span", { class: "cfx-modes" });
  for (const [m, tip] of [["pick", "click a point or a cluster centre to decode its volume; drag to pan"],
                          ["pan", "drag to pan (also: right or middle drag in any mode); wheel: zoom"],
                          ["path", "trajectory: click the start particle, then the end particle; then press build"],
                          ["lasso", "drag a lasso to select particles (shift: add, alt: remove)"],
                          ["box", "drag a box to select particles (shift: add, alt: remove)"]]) {
    modes[m] = h("button", { class: "cfx-mode", title: tip, text: m });
    modeBar.appendChild(modes[m]);
  }
  const bReset = h("button", { class: "cfx-reset", text: "reset", title: "back to the first view (0.5–99.5 % of the particles)" });
  left.appendChild(h("div", { class: "cfx-toolbar" }, [
    h("label", { text: "x " }), selX, h("label", { text: " y " }), selY,
    h("label", { text: " colour " }), selColor, modeBar, bReset]));
  const canvas = h("canvas", { class: "cfx-scatter" });
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(SIZE * dpr); canvas.height = Math.round(SIZE * dpr);
  canvas.style.width = SIZE + "px"; canvas.style.height = SIZE + "px";
  left.appendChild(canvas);
  const readout = h("div", { class: "cfx-readout", text: " " });
  left.appendChild(readout);
  const legend = h("div", { class: "cfx-legend" });
  left.appendChild(legend);
  const cbar = h("div", { class: "cfx-colorbar" });
  left.appendChild(cbar);
  const nSel = h("span", { class: "cfx-nsel" });
  const bClear = h("button", { text: "clear", title: "clear the selection" });
  const bSaveSel = h("button", { text: "save .npy", title: "write the selected rows (cryoformer export --selection)" });
  const selFmt = h("select", { class: "cfx-format", title: "export format" });
  for (const f of ["star", "cs-index", "pkl"]) selFmt.appendChild(h("option", { value: f, text: f }));
  const bExport = h("button", { text: "export", title: "write the selected particles for RELION / cryoSPARC / cryoDRGN" });
  left.appendChild(h("div", { class: "cfx-row" }, [nSel, bClear, bSaveSel, selFmt, bExport]));
  root.appendChild(left);

  // ---------------------------------------------------------------- right: volume
  const right = h("div", { class: "cfx-panel cfx-volume-panel" });
  const title = h("div", { class: "cfx-title" });
  const info = h("div", { class: "cfx-info" });
  const slices = h("img", { class: "cfx-slices", alt: "central slices XY | XZ | YZ" });
  const iso = h("img", { class: "cfx-iso", alt: "isosurface" });
  right.appendChild(title); right.appendChild(info);
  right.appendChild(slices);
  right.appendChild(h("div", { class: "cfx-caption", text: "XY (z = D/2) · XZ (y = D/2) · YZ (x = D/2); orange: threshold outline" }));
  const b3d = h("button", { class: "cfx-v3d", text: "3D", title: "the surface at the threshold as a mesh: drag to rotate, wheel to zoom" });
  const bImg = h("button", { class: "cfx-vimg", text: "image", title: "the ray-cast isosurface (azimuth and elevation sliders)" });
  right.appendChild(h("div", { class: "cfx-row cfx-viewbar" }, [b3d, bImg]));
  const meshBox = h("div", { class: "cfx-mesh" });
  const views = h("div", { class: "cfx-views" }, [meshBox, iso]);
  right.appendChild(views);
  let mview = null;
  try {
    mview = createMeshView(meshBox, { width: 320, height: 320 });
  } catch (e) {
    meshBox.appendChild(h("div", { class: "cfm-nogl", text: "3D view failed: " + e.message }));
  }
  const webgl = mview && mview.available ? mview.api : "none";
  root.dataset.webgl = webgl;
  model.set("webgl", webgl); model.save_changes();
  function slider(label, min, max, step, unit) {
    const input = h("input", { type: "range", min: String(min), max: String(max), step: String(step) });
    const value = h("span", { class: "cfx-value" });
    const row = h("div", { class: "cfx-row" }, [h("label", { text: label }), input, value]);
    return { input, value, row, unit };
  }
  const thr = slider("threshold", 0, 6, 0.1, " σ");
  const az = slider("azimuth", -180, 180, 5, "°");
  const elv = slider("elevation", -90, 90, 5, "°");
  const selTrav = h("select", { class: "cfx-travpc", title: "principal component to walk along" });
  const trav = slider("walk along", 0, 20, 1, "");
  trav.input.classList.add("cfx-trav");
  trav.row.insertBefore(selTrav, trav.input);
  trav.input.title = "decode along the chosen PC, 5th to 95th percentile of the particles";
  for (const s of [thr, az, elv, trav]) right.appendChild(s.row);
  const outDir = h("input", { type: "text", class: "cfx-outdir", title: "folder the buttons write to" });
  const bSaveVol = h("button", { text: "save .mrc", title: "write the volume shown as MRC (voxel size in the header)" });
  right.appendChild(h("div", { class: "cfx-row" }, [bSaveVol, h("label", { text: " to " }), outDir]));
  // trajectory: endpoints, build, player
  const tStart = h("select", { class: "cfx-traj-start", title: "start: a K-means cluster centre" });
  const tEnd = h("select", { class: "cfx-traj-end", title: "end: a K-means cluster centre" });
  const tEnds = h("span", { class: "cfx-traj-ends" });
  const tMode = h("select", { class: "cfx-traj-mode", title: "straight line in latent space, or the shortest path through the particles' nearest-neighbour graph" });
  for (const [v, text] of [["straight", "straight"], ["data", "along the data"]]) tMode.appendChild(h("option", { value: v, text }));
  const tN = h("input", { class: "cfx-traj-n", type: "number", min: "2", max: "200", step: "1", title: "maps along the trajectory" });
  const bBuild = h("button", { class: "cfx-traj-build", text: "build", title: "decode the maps along the trajectory (in the background; a new build stops a running one)" });
  right.appendChild(h("div", { class: "cfx-row cfx-traj" }, [h("label", { text: "trajectory" }), tStart,
    h("span", { text: "→" }), tEnd, tMode, tN, bBuild]));
  const tProgress = h("progress", { class: "cfx-traj-progress", max: "1", value: "0" });
  right.appendChild(h("div", { class: "cfx-row" }, [tEnds, tProgress]));
  const bPlay = h("button", { class: "cfx-traj-play", text: "▶ play" });
  const tFrame = h("input", { class: "cfx-traj-frame", type: "range", min: "0", max: "0", step: "1", value: "0" });
  const tFrameLabel = h("span", { class: "cfx-traj-label" });
  const tFps = h("input", { class: "cfx-traj-fps", type: "number", min: "0.5", max: "30", step: "0.5", title: "frames per second" });
  const bTrajExport = h("button", { class: "cfx-traj-export", text: "export series", title: "write the maps, a ChimeraX script and a movie (a new folder in the output folder)" });
  right.appendChild(h("div", { class: "cfx-row" }, [bPlay, tFrame, tFrameLabel, h("span", { text: "fps" }), tFps, bTrajExport]));
  const tStatus = h("div", { class: "cfx-traj-status" });
  right.appendChild(tStatus);
  const status = h("div", { class: "cfx-status" });
  right.appendChild(status);
  root.appendChild(right);

  // ---------------------------------------------------------------- scatter state
  let pts = new Float32Array(0), rows = new Int32Array(0), cols = new Uint8Array(0), sel = new Uint8Array(0);
  let nSelDrawn = 0;
  let view = [0, 1, 0, 1];            // x0, x1, y0, y1 shown (data units)
  let rgb = new Uint8Array(0);        // palette as r, g, b per entry
  let mode = "pick", drag = null;
  let pathStart = null;               // "path" mode: {row, x, y} of the start particle picked
  const ctx = canvas.getContext("2d");
  // raster buffers, one per device pixel of the plot area, reused between frames
  const RW = Math.round(PLOT * dpr), RH = RW;
  const count = new Uint32Array(RW * RH), selCount = new Uint32Array(RW * RH);
  const sumR = new Uint32Array(RW * RH), sumG = new Uint32Array(RW * RH), sumB = new Uint32Array(RW * RH);
  const image = ctx.createImageData(RW, RH);

  function validView(v) {
    return Array.isArray(v) && v.length === 4 && v.every(Number.isFinite) && v[1] > v[0] && v[3] > v[2];
  }
  function homeView() { const v = model.get("home_view"); return validView(v) ? v.slice() : [-1, 1, -1, 1]; }
  function loadPoints() {
    pts = typed(model.get("points"), Float32Array);
    rows = typed(model.get("point_rows"), Int32Array);
    const v = model.get("view");
    view = validView(v) ? v.slice() : homeView();
  }
  const toPx = (x, y) => [PAD + (x - view[0]) / (view[1] - view[0]) * PLOT,
                          TOP + PLOT - (y - view[2]) / (view[3] - view[2]) * PLOT];
  const toData = (px, py) => [view[0] + (px - PAD) / PLOT * (view[1] - view[0]),
                              view[2] + (TOP + PLOT - py) / PLOT * (view[3] - view[2])];

  // Every point into the raster: per device pixel, the count and colour sums (and selected count).
  function rasterise() {
    count.fill(0); selCount.fill(0); sumR.fill(0); sumG.fill(0); sumB.fill(0);
    const n = pts.length / 2, sx = RW / (view[1] - view[0]), sy = RH / (view[3] - view[2]);
    const size = n > 20000 ? 1 : n > 2000 ? Math.max(1, Math.round(2 * dpr)) : Math.max(2, Math.round(4 * dpr));
    const half = Math.floor(size / 2), nPal = rgb.length / 3;
    const v0 = view[0], v3 = view[3];
    for (let i = 0; i < n; i++) {
      const ix = Math.floor((pts[2 * i] - v0) * sx) - half, iy = Math.floor((v3 - pts[2 * i + 1]) * sy) - half;
      if (ix + size <= 0 || iy + size <= 0 || ix >= RW || iy >= RH) continue;
      const c = cols[i] < nPal ? 3 * cols[i] : -1;
      const r = c >= 0 ? rgb[c] : 85, g = c >= 0 ? rgb[c + 1] : 85, b = c >= 0 ? rgb[c + 2] : 85, s = sel[i];
      for (let dy = 0; dy < size; dy++) {
        const y = iy + dy;
        if (y < 0 || y >= RH) continue;
        for (let dx = 0; dx < size; dx++) {
          const x = ix + dx;
          if (x < 0 || x >= RW) continue;
          const k = y * RW + x;
          count[k]++; sumR[k] += r; sumG[k] += g; sumB[k] += b;
          if (s) selCount[k]++;
        }
      }
    }
  }
  // Counts → pixels: mean colour, opacity rising with log(count); with a selection, pixels
  // without a selected particle fade to light grey.
  function paint() {
    let maxCount = 1;
    for (let k = 0; k < count.length; k++) if (count[k] > maxCount) maxCount = count[k];
    const norm = 0.55 / Math.log1p(maxCount), data = image.data, anySel = nSelDrawn > 0;
    for (let k = 0, j = 0; k < count.length; k++, j += 4) {
      const c = count[k];
      data[j + 3] = 255;
      if (c === 0) { data[j] = data[j + 1] = data[j + 2] = 255; continue; }
      let a = 0.45 + norm * Math.log1p(c), r = sumR[k] / c, g = sumG[k] / c, b = sumB[k] / c;
      if (anySel && selCount[k] === 0) { r = g = b = 200; a *= 0.5; }
      data[j] = 255 - a * (255 - r); data[j + 1] = 255 - a * (255 - g); data[j + 2] = 255 - a * (255 - b);
    }
    ctx.putImageData(image, Math.round(PAD * dpr), Math.round(TOP * dpr));
  }

  function drawAxes() {
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1;
    ctx.strokeRect(PAD - 0.5, TOP - 0.5, PLOT + 1, PLOT + 1);
    ctx.fillStyle = "#555"; ctx.font = "10px sans-serif";
    const xt = niceTicks(view[0], view[1], 5), yt = niceTicks(view[2], view[3], 5);
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (const v of xt) {
      const [px] = toPx(v, 0);
      ctx.fillRect(px, TOP + PLOT, 1, 4);
      ctx.fillText(tickText(v, view[1] - view[0]), px, TOP + PLOT + 5);
    }
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (const v of yt) {
      const [, py] = toPx(0, v);
      ctx.fillRect(PAD - 4, py, 4, 1);
      ctx.save(); ctx.translate(PAD - 5, py); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
      ctx.textBaseline = "bottom"; ctx.fillText(tickText(v, view[3] - view[2]), 0, 0); ctx.restore();
    }
    canvas.dataset.ticks = JSON.stringify({ x: xt, y: yt });
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "alphabetic";
    ctx.fillText(axisLabel(model.get("axis_x")), PAD + PLOT / 2, SIZE - 4);
    ctx.save(); ctx.translate(11, TOP + PLOT / 2); ctx.rotate(-Math.PI / 2);
    ctx.fillText(axisLabel(model.get("axis_y")), 0, 0); ctx.restore();
  }
  function drawOverlay() {
    ctx.save(); ctx.beginPath(); ctx.rect(PAD, TOP, PLOT, PLOT); ctx.clip();
    const placed = [];
    for (const c of model.get("centers") || []) {
      const [px, py] = toPx(c.x, c.y);
      ctx.beginPath(); ctx.arc(px, py, 8, 0, 2 * Math.PI);
      ctx.fillStyle = c.color; ctx.fill(); ctx.lineWidth = 1.5; ctx.strokeStyle = "#000"; ctx.stroke();
      ctx.fillStyle = "#000"; ctx.font = "10px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText(String(c.cluster), px, py);
      placed.push({ cluster: c.cluster, row: c.row, x: px, y: py });
    }
    canvas.dataset.centers = JSON.stringify(placed); // CSS px of each centre (used by the browser test)
    drawTrajectory();
    const m = model.get("marker") || [];
    if (m.length === 2) {
      const [px, py] = toPx(m[0], m[1]);
      ctx.strokeStyle = "#d00"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(px, py, 11, 0, 2 * Math.PI); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(px - 16, py); ctx.lineTo(px - 6, py); ctx.moveTo(px + 6, py); ctx.lineTo(px + 16, py);
      ctx.moveTo(px, py - 16); ctx.lineTo(px, py - 6); ctx.moveTo(px, py + 6); ctx.lineTo(px, py + 16); ctx.stroke();
    }
    if (drag && drag.path && drag.path.length > 1) {
      ctx.strokeStyle = "#333"; ctx.lineWidth = 1; ctx.setLineDash([4, 3]);
      ctx.beginPath();
      if (drag.mode === "box") {
        const [a, b] = [drag.path[0], drag.path[drag.path.length - 1]];
        ctx.rect(a[0], a[1], b[0] - a[0], b[1] - a[1]);
      } else {
        ctx.moveTo(drag.path[0][0], drag.path[0][1]);
        for (const p of drag.path) ctx.lineTo(p[0], p[1]);
        ctx.closePath();
      }
      ctx.stroke(); ctx.setLineDash([]);
    }
    ctx.restore();
  }
  // The trajectory on the scatter: a polyline through its frames, the frame shown as a ring.
  function drawTrajectory() {
    const path = model.get("trajectory_path") || [];
    canvas.dataset.trajectory = String(path.length);
    if (path.length > 1) {
      ctx.strokeStyle = "#e07000"; ctx.lineWidth = 2.5; ctx.beginPath();
      path.forEach((p, i) => { const [px, py] = toPx(p[0], p[1]); if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py); });
      ctx.stroke();
      ctx.fillStyle = "#e07000";
      for (const p of path) { const [px, py] = toPx(p[0], p[1]); ctx.fillRect(px - 2, py - 2, 4, 4); }
      const k = model.get("trajectory_frame");
      if (model.get("display") === "trajectory" && k >= 0 && k < path.length) {
        const [px, py] = toPx(path[k][0], path[k][1]);
        ctx.strokeStyle = "#000"; ctx.lineWidth = 2; ctx.beginPath(); ctx.arc(px, py, 7, 0, 2 * Math.PI); ctx.stroke();
      }
    }
    if (pathStart) {
      const [px, py] = toPx(pathStart.x, pathStart.y);
      ctx.strokeStyle = "#e07000"; ctx.lineWidth = 2; ctx.strokeRect(px - 6, py - 6, 12, 12);
    }
  }
  function draw() {
    const t0 = performance.now();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    rasterise(); paint();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    drawAxes(); drawOverlay();
    const n = pts.length / 2;
    ctx.textAlign = "right"; ctx.textBaseline = "alphabetic"; ctx.font = "11px sans-serif"; ctx.fillStyle = "#666";
    ctx.fillText(`${n} of ${model.get("n_particles")} particles drawn`, PAD + PLOT - 4, TOP + 14);
    canvas.dataset.nDrawn = String(n);
    canvas.dataset.view = JSON.stringify(view);
    canvas.dataset.drawMs = (performance.now() - t0).toFixed(2);
  }
  // The view shown goes back to Python (for snapshot_png and scripts), at most 5 times a second.
  const syncView = throttle(() => { model.set("view", view.slice()); model.save_changes(); }, 200);
  function setView(v) { view = v; draw(); syncView(); }
  function zoomAt(px, py, factor) {
    const [dx, dy] = toData(px, py);
    setView([dx - (dx - view[0]) * factor, dx + (view[1] - dx) * factor,
             dy - (dy - view[2]) * factor, dy + (view[3] - dy) * factor]);
  }
  function panBy(start, ddx, ddy) {  // ddx, ddy: CSS px moved since the drag began
    const wx = (start[1] - start[0]) / PLOT, wy = (start[3] - start[2]) / PLOT;
    setView([start[0] - ddx * wx, start[1] - ddx * wx, start[2] + ddy * wy, start[3] + ddy * wy]);
  }

  // "PC2 (12.3 %)" for a principal component; other axes (UMAP1, z0) by their name.
  function axisLabel(name) {
    const m = /^PC(\d+)$/.exec(name || "");
    const v = m ? (model.get("pc_variance") || [])[Number(m[1]) - 1] : undefined;
    return (name || "") + (v !== undefined ? ` (${(100 * v).toFixed(1)} %)` : "");
  }
  function fillOptions(select, values, labels, current) {
    select.innerHTML = "";
    values.forEach((v, i) => select.appendChild(h("option", { value: String(v), text: labels[i] })));
    select.value = String(current);
  }
  function updateControls() {
    const n = model.get("n_pcs");
    const pcs = Array.from({ length: n }, (_, i) => i + 1);
    const names = pcs.map((k) => `PC${k}`);
    const axes = model.get("axis_names") || [];
    fillOptions(selX, axes, axes, model.get("axis_x"));
    fillOptions(selY, axes, axes, model.get("axis_y"));
    fillOptions(selTrav, pcs, names, model.get("traversal_pc"));
    const sets = model.get("label_sets") || [];
    fillOptions(selColor, sets, sets, model.get("color_by"));
  }
  function updateLegend() {
    legend.innerHTML = "";
    for (const item of model.get("legend") || []) {
      const chip = h("span", { class: "cfx-chip", title: `select ${model.get("color_by")} = ${item.name} (shift: add)` }, [
        h("span", { class: "cfx-swatch" }), h("span", { text: `${item.name}: ${item.count}` })]);
      chip.firstChild.style.background = item.color;
      chip.addEventListener("click", (ev) => model.send({ type: "clusters", clusters: [Number(item.name)],
                                                          mode: ev.shiftKey ? "add" : "replace" }));
      legend.appendChild(chip);
    }
  }
  // A continuous colouring: gradient from the 1st to the 99th percentile, ticks at both ends.
  function updateColorbar() {
    cbar.innerHTML = "";
    const cb = model.get("colorbar") || {};
    cbar.style.display = cb.name ? "" : "none";
    if (!cb.name) return;
    const bar = h("span", { class: "cfx-cbar-ramp" });
    bar.style.background = `linear-gradient(to right, ${(cb.stops || []).join(", ")})`;
    const span = Math.abs(cb.vmax - cb.vmin) || 1;
    cbar.appendChild(h("span", { class: "cfx-cbar-name", text: cb.name }));
    cbar.appendChild(h("span", { class: "cfx-cbar-min", text: tickText(cb.vmin, span) }));
    cbar.appendChild(bar);
    cbar.appendChild(h("span", { class: "cfx-cbar-max", text: tickText(cb.vmax, span) }));
    if (cb.n_missing) {
      const sw = h("span", { class: "cfx-swatch" });
      sw.style.background = cb.missing;
      cbar.appendChild(h("span", { class: "cfx-cbar-missing", title: "particles without a value" },
                         [sw, h("span", { text: ` ${cb.n_missing} unknown` })]));
    }
  }
  function setImage(img, key) {
    const b = bytesOf(model.get(key));
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    if (!b.length) { img.removeAttribute("src"); img.dataset.url = ""; return; }
    const url = URL.createObjectURL(new Blob([b.slice()], { type: "image/png" }));
    img.dataset.url = url; img.src = url;
  }
  function updateSliders() {
    for (const [s, key] of [[thr, "threshold"], [az, "azimuth"], [elv, "elevation"]]) {
      s.input.value = String(model.get(key));
      s.value.textContent = Number(model.get(key)).toFixed(key === "threshold" ? 1 : 0) + s.unit;
    }
    const steps = model.get("traversal_steps"), step = model.get("traversal_step");
    trav.input.max = String(steps - 1);
    if (step >= 0) trav.input.value = String(step);
    trav.value.textContent = step >= 0 ? `${step + 1}/${steps}` : "off";
  }
  function updateStatus() {
    status.innerHTML = "";
    if (model.get("busy")) status.appendChild(h("span", { class: "cfx-busy", text: "⏳ " }));
    const err = model.get("error");
    status.appendChild(h("span", { class: err ? "cfx-error" : "cfx-message", text: err || model.get("message") }));
    root.classList.toggle("cfx-is-busy", !!model.get("busy"));
  }

  // ---------------------------------------------------------------- events
  function setMode(m) {
    mode = m;
    for (const [k, b] of Object.entries(modes)) b.classList.toggle("cfx-active", k === m);
    canvas.style.cursor = m === "pick" || m === "path" ? "pointer" : m === "pan" ? "grab" : "crosshair";
  }
  for (const [k, b] of Object.entries(modes)) b.addEventListener("click", () => setMode(k));
  setMode("pick");
  bReset.addEventListener("click", () => setView(homeView()));
  const css = (ev) => { const r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; };

  // {row, x, y (data)} of the nearest cluster centre within 10 px, else of the nearest drawn
  // point within 8 px; null when none is that close.
  function nearest(px, py) {
    let best = null, bestD = 10 * 10;
    for (const c of model.get("centers") || []) {
      const [cx, cy] = toPx(c.x, c.y);
      const d = (cx - px) ** 2 + (cy - py) ** 2;
      if (d <= bestD) { bestD = d; best = { row: c.row, x: c.x, y: c.y }; }
    }
    if (best === null) {
      bestD = 8 * 8;
      const sx = PLOT / (view[1] - view[0]), sy = PLOT / (view[3] - view[2]);
      for (let i = 0; i < pts.length / 2; i++) {
        const dx = PAD + (pts[2 * i] - view[0]) * sx - px, dy = TOP + PLOT - (pts[2 * i + 1] - view[2]) * sy - py;
        const d = dx * dx + dy * dy;
        if (d < bestD) { bestD = d; best = { row: rows[i], x: pts[2 * i], y: pts[2 * i + 1] }; }
      }
    }
    return best;
  }
  function pick(px, py) {
    const best = nearest(px, py);
    if (best !== null) { model.set("selected_index", best.row); model.save_changes(); }
  }
  // "path" mode: the first click picks the start, the second the end of the next trajectory.
  function pickPathEnd(px, py) {
    const best = nearest(px, py);
    if (best === null) return;
    if (!pathStart) {
      pathStart = best;
      tEnds.textContent = `from particle ${best.row}: click the end particle`;
    } else {
      trajEnds = { rows: [pathStart.row, best.row] };
      tEnds.textContent = `particles ${pathStart.row} → ${best.row}: press build`;
      pathStart = null;
    }
    tEnds.dataset.ends = JSON.stringify(trajEnds);
    draw();
  }
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();  // zoom the plot, not scroll the notebook
    const p = css(ev);
    zoomAt(p[0], p[1], Math.exp(Math.max(-300, Math.min(300, ev.deltaY)) * 0.0015));
  }, { passive: false });
  canvas.addEventListener("mousedown", (ev) => {
    const p = css(ev);
    if (ev.button !== 0 || mode === "pan" || mode === "pick" || mode === "path") {
      const clicks = ev.button === 0 && (mode === "pick" || mode === "path");
      drag = { mode: clicks ? "pick" : "pan", start: p, view: view.slice(), moved: false };
      return;
    }
    drag = { mode, path: [p], how: ev.shiftKey ? "add" : ev.altKey ? "remove" : "replace" };
  });
  canvas.addEventListener("mousemove", (ev) => {
    const p = css(ev);
    const d = toData(p[0], p[1]);
    readout.textContent = `${model.get("axis_x")} = ${d[0].toFixed(3)}, ${model.get("axis_y")} = ${d[1].toFixed(3)}`;
    if (!drag) return;
    if (drag.mode === "pan" || drag.mode === "pick") {
      const ddx = p[0] - drag.start[0], ddy = p[1] - drag.start[1];
      if (!drag.moved && ddx * ddx + ddy * ddy < 16) return;  // a click, not yet a drag
      drag.moved = true;
      panBy(drag.view, ddx, ddy);
      return;
    }
    if (drag.mode === "box") drag.path = [drag.path[0], p]; else drag.path.push(p);
    draw();
  });
  function finishDrag(ev) {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.mode === "pick" || d.mode === "pan") {
      if (d.mode === "pick" && !d.moved && ev.type === "mouseup") {
        if (mode === "path") pickPathEnd(d.start[0], d.start[1]); else pick(d.start[0], d.start[1]);
      }
      return;
    }
    let path = d.path;
    if (d.mode === "box" && path.length === 2) {
      const [a, b] = path;
      path = [a, [b[0], a[1]], b, [a[0], b[1]]];
    }
    if (path.length >= 3) {
      const points = path.map((p) => toData(p[0], p[1]));
      canvas.dataset.lastPolygon = JSON.stringify(points);  // what was sent (read by the browser test)
      model.send({ type: "polygon", points, mode: d.how });
    }
    draw();
  }
  canvas.addEventListener("mouseup", finishDrag);
  canvas.addEventListener("mouseleave", finishDrag);

  const setTrait = (key, value) => { model.set(key, value); model.save_changes(); };
  selX.addEventListener("change", () => setTrait("axis_x", selX.value));
  selY.addEventListener("change", () => setTrait("axis_y", selY.value));
  selColor.addEventListener("change", () => setTrait("color_by", selColor.value));
  selTrav.addEventListener("change", () => {
    model.set("traversal_pc", Number(selTrav.value));
    model.set("traversal_step", Number(trav.input.value)); model.save_changes();
  });
  for (const [s, key] of [[thr, "threshold"], [az, "azimuth"], [elv, "elevation"]]) {
    const send = throttle((v) => setTrait(key, v), 200);
    s.input.addEventListener("input", () => {
      s.value.textContent = Number(s.input.value).toFixed(key === "threshold" ? 1 : 0) + s.unit;
      send(Number(s.input.value));
    });
  }
  const sendStep = throttle((v) => {
    model.set("traversal_pc", Number(selTrav.value)); model.set("traversal_step", v); model.save_changes();
  }, 150);
  trav.input.addEventListener("input", () => sendStep(Number(trav.input.value)));
  bClear.addEventListener("click", () => model.send({ type: "clear" }));
  bSaveSel.addEventListener("click", () => model.send({ type: "save_selection" }));
  bExport.addEventListener("click", () => model.send({ type: "export", format: selFmt.value }));
  bSaveVol.addEventListener("click", () => model.send({ type: "save_volume" }));
  outDir.addEventListener("change", () => setTrait("output_dir", outDir.value));

  // ---------------------------------------------------------------- 3D view and trajectory
  let trajEnds = { clusters: [0, 0] };  // what "build" sends: {clusters: [a, b]} or {rows: [i, j]}
  let series = model.get("trajectory_series"), requested = new Set(), shownFrame = -1;
  const framePngs = new Map(), frameLabels = new Map();
  function setVolumeMesh() {
    const b = bytesOf(model.get("volume_mesh"));
    if (!mview || !mview.available || !b.length) return;
    try { mview.setMesh(unpackMesh(b), "volume"); } catch (e) { status.textContent = "3D view: " + e.message; }
  }
  function dropFrames() {  // a new series: its frames replace the old ones (the volume's mesh stays)
    for (const url of framePngs.values()) URL.revokeObjectURL(url);
    framePngs.clear(); frameLabels.clear(); requested = new Set(); shownFrame = -1;
    root.dataset.trajReceived = "0";
    if (mview) { mview.clear(); setVolumeMesh(); }
  }
  function requestFrames() {
    const ready = model.get("trajectory_ready");
    for (let k = 0; k < ready; k++) {
      if (requested.has(k)) continue;
      requested.add(k);
      model.send({ type: "trajectory_frame", frame: k, series });
    }
  }
  // What the panel shows: the volume or the trajectory's frame; as a mesh ("3D") or the image.
  function showDisplay() {
    const traj = model.get("display") === "trajectory" && model.get("trajectory_ready") > 0;
    const use3d = model.get("volume_view") === "3d" && mview && mview.available;
    meshBox.style.display = use3d ? "" : "none";
    iso.style.display = use3d ? "none" : "";
    b3d.classList.toggle("cfx-active", use3d); bImg.classList.toggle("cfx-active", !use3d);
    const k = model.get("trajectory_frame");
    if (mview) mview.setFrame(traj ? k : "volume");
    shownFrame = traj ? k : -1;
    root.dataset.trajFrame = String(shownFrame);
    if (traj && framePngs.has(k)) slices.src = framePngs.get(k);
    else if (slices.dataset.url) slices.src = slices.dataset.url;
    const label = traj ? (frameLabels.get(k) || (model.get("trajectory_labels") || [])[k] || "") : "";
    title.textContent = traj ? "trajectory " + label : model.get("volume_label");
    tFrame.value = String(Math.max(0, k));
    tFrameLabel.textContent = model.get("trajectory_ready") ? ` ${k + 1}/${model.get("trajectory_ready")} ` : " – ";
  }
  const onFrameMessage = (msg, buffers) => {
    if (!msg || msg.type !== "trajectory_frame" || msg.series !== series) return;  // an older series
    try {
      if (mview && mview.available) mview.setMesh(unpackMesh(buffers[0]), msg.frame);
      if (framePngs.has(msg.frame)) URL.revokeObjectURL(framePngs.get(msg.frame));
      framePngs.set(msg.frame, URL.createObjectURL(new Blob([bytesOf(buffers[1]).slice()], { type: "image/png" })));
      frameLabels.set(msg.frame, msg.label || "");
      root.dataset.trajReceived = String(framePngs.size);
      if (msg.frame === model.get("trajectory_frame")) showDisplay();
    } catch (e) {
      status.textContent = "trajectory frame " + msg.frame + ": " + e.message;
    }
  };
  model.on("msg:custom", onFrameMessage);
  let timer = null;
  function stepFrame() {
    const ready = model.get("trajectory_ready");
    if (!ready) return;
    model.set("trajectory_frame", (model.get("trajectory_frame") + 1) % ready);
    model.set("display", "trajectory");
    model.save_changes();
    showDisplay(); draw();
  }
  function syncPlaying() {
    if (timer) { clearInterval(timer); timer = null; }
    const playing = model.get("trajectory_playing");
    bPlay.textContent = playing ? "❚❚ pause" : "▶ play";
    if (playing) timer = setInterval(stepFrame, 1000 / Math.max(0.5, model.get("trajectory_fps")));
  }
  function syncSeries() {
    if (model.get("trajectory_series") !== series) { series = model.get("trajectory_series"); dropFrames(); }
    const ready = model.get("trajectory_ready");
    tFrame.max = String(Math.max(0, ready - 1));
    root.dataset.trajReady = String(ready);
    root.dataset.trajSeries = String(series);
    requestFrames(); showDisplay(); draw();
  }
  function syncClusters() {
    const names = model.get("cluster_names") || [];
    for (const sel of [tStart, tEnd]) {
      const was = sel.value;
      sel.innerHTML = "";
      names.forEach((name, i) => sel.appendChild(h("option", { value: String(i), text: name })));
      // first fill: the first and the last cluster (the two ends of PC1)
      sel.value = was !== "" ? was : String(sel === tStart ? 0 : Math.max(0, names.length - 1));
    }
    const ends = model.get("trajectory_ends") || {};
    if (ends.kind === "cluster") { tStart.value = String(ends.a); tEnd.value = String(ends.b); }
    if (!trajEnds.rows) trajEnds = { clusters: [Number(tStart.value), Number(tEnd.value)] };
  }
  function syncTrajText() {
    tStatus.textContent = model.get("trajectory_status") + (model.get("trajectory_busy") ? " …" : "");
    tProgress.value = model.get("trajectory_progress");
    root.dataset.trajBusy = model.get("trajectory_busy") ? "1" : "0";
    tMode.value = model.get("trajectory_mode");
    tN.value = String(model.get("trajectory_n_frames"));
    tFps.value = String(model.get("trajectory_fps"));
  }
  const onEndsChosen = () => {
    trajEnds = { clusters: [Number(tStart.value), Number(tEnd.value)] };
    tEnds.textContent = `clusters ${tStart.value} → ${tEnd.value}`;
    tEnds.dataset.ends = JSON.stringify(trajEnds);
  };
  tStart.addEventListener("change", onEndsChosen);
  tEnd.addEventListener("change", onEndsChosen);
  bBuild.addEventListener("click", () => {
    model.send(Object.assign({ type: "build_trajectory", mode: tMode.value, n_frames: parseInt(tN.value, 10) }, trajEnds));
  });
  bPlay.addEventListener("click", () => setTrait("trajectory_playing", !model.get("trajectory_playing")));
  tFrame.addEventListener("input", () => {
    const k = parseInt(tFrame.value, 10);
    if (k < model.get("trajectory_ready")) {
      model.set("trajectory_frame", k); model.set("display", "trajectory"); model.save_changes(); showDisplay(); draw();
    }
  });
  tFps.addEventListener("change", () => { const f = parseFloat(tFps.value); if (f > 0) setTrait("trajectory_fps", f); });
  bTrajExport.addEventListener("click", () => model.send({ type: "export_trajectory" }));
  b3d.addEventListener("click", () => setTrait("volume_view", "3d"));
  bImg.addEventListener("click", () => setTrait("volume_view", "image"));

  // ---------------------------------------------------------------- model → view
  const onPoints = () => { loadPoints(); draw(); };
  const onView = () => {  // set from Python (or echoed back): redraw only when it differs
    const v = model.get("view");
    if (validView(v) && v.some((x, i) => x !== view[i])) { view = v.slice(); draw(); }
  };
  const onPalette = () => {
    const pal = model.get("palette") || [];
    rgb = new Uint8Array(3 * pal.length);
    pal.forEach((c, i) => rgb.set(hexToRgb(c), 3 * i));
  };
  const onColors = () => {
    onPalette(); cols = bytesOf(model.get("point_colors")).slice(); updateLegend(); updateColorbar(); draw();
  };
  const onSel = () => {
    sel = bytesOf(model.get("point_selected")).slice();
    nSelDrawn = 0;
    for (let i = 0; i < sel.length; i++) nSelDrawn += sel[i];
    nSel.textContent = `${model.get("n_selected")} selected `; draw();
  };
  const onVolume = () => { info.textContent = model.get("volume_info"); showDisplay(); };
  const handlers = [
    ["change:points change:point_rows change:centers", onPoints],
    ["change:view", onView],
    ["change:point_colors change:palette change:legend change:colorbar", onColors],
    ["change:point_selected change:n_selected", onSel],
    ["change:marker change:axis_x change:axis_y", draw],
    ["change:n_pcs change:axis_names change:label_sets change:color_by change:axis_x change:axis_y change:traversal_pc", updateControls],
    ["change:slices_png", () => { setImage(slices, "slices_png"); showDisplay(); }],
    ["change:volume_mesh", () => { setVolumeMesh(); showDisplay(); }],
    ["change:display change:volume_view change:trajectory_frame", () => { showDisplay(); draw(); }],
    ["change:trajectory_series change:trajectory_ready", syncSeries],
    ["change:trajectory_path", draw],
    ["change:trajectory_playing change:trajectory_fps", () => { syncPlaying(); syncTrajText(); }],
    ["change:cluster_names change:trajectory_ends", syncClusters],
    ["change:trajectory_status change:trajectory_busy change:trajectory_progress change:trajectory_mode change:trajectory_n_frames", syncTrajText],
    ["change:iso_png", () => setImage(iso, "iso_png")],
    ["change:volume_label change:volume_info", onVolume],
    ["change:threshold change:azimuth change:elevation change:traversal_step change:traversal_steps", updateSliders],
    ["change:busy change:message change:error", updateStatus],
    ["change:output_dir", () => { outDir.value = model.get("output_dir"); }],
  ];
  for (const [ev, fn] of handlers) for (const name of ev.split(" ")) model.on(name, fn);
  updateControls(); loadPoints(); onPalette(); onSel(); onColors(); onVolume(); updateSliders(); updateStatus();
  outDir.value = model.get("output_dir");
  setImage(slices, "slices_png"); setImage(iso, "iso_png");
  if (webgl === "none" && model.get("volume_view") === "3d") setTrait("volume_view", "image");
  setVolumeMesh(); syncClusters(); onEndsChosen(); syncTrajText(); syncSeries(); syncPlaying();
  draw();
  return () => {
    for (const [ev, fn] of handlers) for (const name of ev.split(" ")) model.off(name, fn);
    for (const img of [slices, iso]) if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    model.off("msg:custom", onFrameMessage);
    if (timer) clearInterval(timer);
    dropFrames();
    if (mview) mview.destroy();
  };
}

export default { render };
