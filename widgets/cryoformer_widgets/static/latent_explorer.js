// Front end of cryoformer_widgets.LatentExplorer (anywidget ES module, no build step).
//
// Draws the latent scatter (a subsample chosen in Python; axes axis_x / axis_y, any of axis_names:
// PCs, UMAP1/UMAP2, latent dimensions z0 …) on a canvas and turns clicks, lasso and
// box drags into trait changes / messages; Python decodes, renders and selects. Binary traits
// arrive as DataViews: points float32 [M, 2], point_rows int32 [M], point_colors uint8 [M],
// point_selected uint8 [M]; slices_png / iso_png are PNG bytes.

function bytesOf(v) {
  if (!v) return new Uint8Array(0);
  if (v instanceof DataView || ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  return new Uint8Array(0);
}

function typed(v, Type) {
  const b = bytesOf(v).slice(); // copy: aligned for the typed view
  return new Type(b.buffer, 0, Math.floor(b.byteLength / Type.BYTES_PER_ELEMENT));
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

function render({ model, el }) {
  const SIZE = 420, PAD = 36;
  const root = h("div", { class: "cfx-root" });
  el.appendChild(root);

  // ---------------------------------------------------------------- left: scatter
  const left = h("div", { class: "cfx-panel" });
  const selX = h("select", { class: "cfx-pcx", title: "horizontal axis: a PC, UMAP (after cryoformer analyze) or a latent dimension" });
  const selY = h("select", { class: "cfx-pcy", title: "vertical axis: a PC, UMAP (after cryoformer analyze) or a latent dimension" });
  const selColor = h("select", { class: "cfx-color", title: "colour particles by" });
  const modes = {};
  const modeBar = h("span", { class: "cfx-modes" });
  for (const [m, tip] of [["pick", "click a point or a cluster centre to decode its volume"],
                          ["lasso", "drag a lasso to select particles (shift: add, alt: remove)"],
                          ["box", "drag a box to select particles (shift: add, alt: remove)"]]) {
    modes[m] = h("button", { class: "cfx-mode", title: tip, text: m });
    modeBar.appendChild(modes[m]);
  }
  left.appendChild(h("div", { class: "cfx-toolbar" }, [
    h("label", { text: "x " }), selX, h("label", { text: " y " }), selY,
    h("label", { text: " colour " }), selColor, modeBar]));
  const canvas = h("canvas", { class: "cfx-scatter" });
  const dpr = window.devicePixelRatio || 1;
  canvas.width = SIZE * dpr; canvas.height = SIZE * dpr;
  canvas.style.width = SIZE + "px"; canvas.style.height = SIZE + "px";
  left.appendChild(canvas);
  const readout = h("div", { class: "cfx-readout", text: " " });
  left.appendChild(readout);
  const legend = h("div", { class: "cfx-legend" });
  left.appendChild(legend);
  const nSel = h("span", { class: "cfx-nsel" });
  const bClear = h("button", { text: "clear", title: "clear the selection" });
  const bSaveSel = h("button", { text: "save .npy", title: "write the selected rows (cryoformer export --selection)" });
  const selFmt = h("select", { class: "cfx-format", title: "export format" });
  for (const f of ["star", "cs-index", "pkl"]) selFmt.appendChild(h("option", { value: f, text: f }));
  const bExport = h("button", { text: "export", title: "write the selected particles for RELION / cryoSPARC / cryoDRGN" });
  left.appendChild(h("div", { class: "cfx-row" }, [nSel, bClear, bSaveSel, selFmt, bExport]));
  root.appendChild(left);

  // ---------------------------------------------------------------- right: volume
  const right = h("div", { class: "cfx-panel" });
  const title = h("div", { class: "cfx-title" });
  const info = h("div", { class: "cfx-info" });
  const slices = h("img", { class: "cfx-slices", alt: "central slices XY | XZ | YZ" });
  const iso = h("img", { class: "cfx-iso", alt: "isosurface" });
  right.appendChild(title); right.appendChild(info);
  right.appendChild(slices);
  right.appendChild(h("div", { class: "cfx-caption", text: "XY (z = D/2) · XZ (y = D/2) · YZ (x = D/2); orange: threshold outline" }));
  right.appendChild(iso);
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
  const status = h("div", { class: "cfx-status" });
  right.appendChild(status);
  root.appendChild(right);

  // ---------------------------------------------------------------- scatter state
  let pts = new Float32Array(0), rows = new Int32Array(0), cols = new Uint8Array(0), sel = new Uint8Array(0);
  let bounds = [0, 1, 0, 1];
  let mode = "pick", drag = null;
  const ctx = canvas.getContext("2d");

  function loadPoints() {
    pts = typed(model.get("points"), Float32Array);
    rows = typed(model.get("point_rows"), Int32Array);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < pts.length; i += 2) {
      const x = pts[i], y = pts[i + 1];
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    for (const c of model.get("centers") || []) {
      x0 = Math.min(x0, c.x); x1 = Math.max(x1, c.x); y0 = Math.min(y0, c.y); y1 = Math.max(y1, c.y);
    }
    if (!isFinite(x0)) { x0 = -1; x1 = 1; y0 = -1; y1 = 1; }
    const dx = (x1 - x0) || 1, dy = (y1 - y0) || 1;
    bounds = [x0 - 0.05 * dx, x1 + 0.05 * dx, y0 - 0.05 * dy, y1 + 0.05 * dy];
  }
  const toPx = (x, y) => [PAD + (x - bounds[0]) / (bounds[1] - bounds[0]) * (SIZE - PAD - 8),
                          SIZE - PAD - (y - bounds[2]) / (bounds[3] - bounds[2]) * (SIZE - PAD - 8)];
  const toData = (px, py) => [bounds[0] + (px - PAD) / (SIZE - PAD - 8) * (bounds[1] - bounds[0]),
                              bounds[2] + (SIZE - PAD - py) / (SIZE - PAD - 8) * (bounds[3] - bounds[2])];

  function draw() {
    const palette = model.get("palette") || [];
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, SIZE, SIZE);
    ctx.strokeStyle = "#999"; ctx.lineWidth = 1;
    ctx.strokeRect(PAD, 8, SIZE - PAD - 8, SIZE - PAD - 8);
    const n = pts.length / 2;
    const r = n > 5000 ? 1.2 : n > 500 ? 2 : 3.5;
    ctx.globalAlpha = n > 5000 ? 0.5 : 0.8;
    for (let i = 0; i < n; i++) {
      const [px, py] = toPx(pts[2 * i], pts[2 * i + 1]);
      ctx.fillStyle = palette[cols[i]] || "#555";
      ctx.fillRect(px - r, py - r, 2 * r, 2 * r);
    }
    ctx.globalAlpha = 1; ctx.strokeStyle = "#000"; ctx.lineWidth = 1;
    const rs = Math.max(r + 1, 2.5);
    for (let i = 0; i < n; i++) {  // selected particles: a black outline, colour kept
      if (!sel[i]) continue;
      const [px, py] = toPx(pts[2 * i], pts[2 * i + 1]);
      ctx.strokeRect(px - rs, py - rs, 2 * rs, 2 * rs);
    }
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
    canvas.dataset.nDrawn = String(n);
    const m = model.get("marker") || [];
    if (m.length === 2) {
      const [px, py] = toPx(m[0], m[1]);
      ctx.strokeStyle = "#d00"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(px, py, 11, 0, 2 * Math.PI); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(px - 16, py); ctx.lineTo(px - 6, py); ctx.moveTo(px + 6, py); ctx.lineTo(px + 16, py);
      ctx.moveTo(px, py - 16); ctx.lineTo(px, py - 6); ctx.moveTo(px, py + 6); ctx.lineTo(px, py + 16); ctx.stroke();
    }
    if (drag && drag.path.length > 1) {
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
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "alphabetic";
    ctx.fillText(axisLabel(model.get("axis_x")), PAD + (SIZE - PAD) / 2, SIZE - 10);
    ctx.save(); ctx.translate(14, 8 + (SIZE - PAD) / 2); ctx.rotate(-Math.PI / 2);
    ctx.fillText(axisLabel(model.get("axis_y")), 0, 0); ctx.restore();
    ctx.textAlign = "right"; ctx.font = "11px sans-serif"; ctx.fillStyle = "#666";
    ctx.fillText(`${n} of ${model.get("n_particles")} particles drawn`, SIZE - 10, 22);
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
    canvas.style.cursor = m === "pick" ? "pointer" : "crosshair";
  }
  for (const [k, b] of Object.entries(modes)) b.addEventListener("click", () => setMode(k));
  setMode("pick");
  const css = (ev) => { const r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; };

  function pick(px, py) {
    let best = null, bestD = 10 * 10;
    for (const c of model.get("centers") || []) {
      const [cx, cy] = toPx(c.x, c.y);
      const d = (cx - px) ** 2 + (cy - py) ** 2;
      if (d <= bestD) { bestD = d; best = c.row; }
    }
    if (best === null) {
      bestD = 8 * 8;
      for (let i = 0; i < pts.length / 2; i++) {
        const [x, y] = toPx(pts[2 * i], pts[2 * i + 1]);
        const d = (x - px) ** 2 + (y - py) ** 2;
        if (d < bestD) { bestD = d; best = rows[i]; }
      }
    }
    if (best !== null) { model.set("selected_index", best); model.save_changes(); }
  }
  canvas.addEventListener("mousedown", (ev) => {
    const p = css(ev);
    if (mode === "pick") { pick(p[0], p[1]); return; }
    drag = { mode, path: [p], how: ev.shiftKey ? "add" : ev.altKey ? "remove" : "replace" };
  });
  canvas.addEventListener("mousemove", (ev) => {
    const p = css(ev);
    const d = toData(p[0], p[1]);
    readout.textContent = `${model.get("axis_x")} = ${d[0].toFixed(3)}, ${model.get("axis_y")} = ${d[1].toFixed(3)}`;
    if (!drag) return;
    if (drag.mode === "box") drag.path = [drag.path[0], p]; else drag.path.push(p);
    draw();
  });
  function finishDrag(ev) {
    if (!drag) return;
    let path = drag.path;
    if (drag.mode === "box" && path.length === 2) {
      const [a, b] = path;
      path = [a, [b[0], a[1]], b, [a[0], b[1]]];
    }
    const how = drag.how;
    drag = null;
    if (path.length >= 3) model.send({ type: "polygon", points: path.map((p) => toData(p[0], p[1])), mode: how });
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

  // ---------------------------------------------------------------- model → view
  const onPoints = () => { loadPoints(); draw(); };
  const onColors = () => { cols = bytesOf(model.get("point_colors")).slice(); updateLegend(); draw(); };
  const onSel = () => { sel = bytesOf(model.get("point_selected")).slice(); nSel.textContent = `${model.get("n_selected")} selected `; draw(); };
  const onVolume = () => { title.textContent = model.get("volume_label"); info.textContent = model.get("volume_info"); };
  const handlers = [
    ["change:points change:point_rows change:centers", onPoints],
    ["change:point_colors change:palette change:legend", onColors],
    ["change:point_selected change:n_selected", onSel],
    ["change:marker change:axis_x change:axis_y", draw],
    ["change:n_pcs change:axis_names change:label_sets change:color_by change:axis_x change:axis_y change:traversal_pc", updateControls],
    ["change:slices_png", () => setImage(slices, "slices_png")],
    ["change:iso_png", () => setImage(iso, "iso_png")],
    ["change:volume_label change:volume_info", onVolume],
    ["change:threshold change:azimuth change:elevation change:traversal_step change:traversal_steps", updateSliders],
    ["change:busy change:message change:error", updateStatus],
    ["change:output_dir", () => { outDir.value = model.get("output_dir"); }],
  ];
  for (const [ev, fn] of handlers) for (const name of ev.split(" ")) model.on(name, fn);
  updateControls(); loadPoints(); onColors(); onSel(); onVolume(); updateSliders(); updateStatus();
  outDir.value = model.get("output_dir");
  setImage(slices, "slices_png"); setImage(iso, "iso_png");
  draw();
  return () => {
    for (const [ev, fn] of handlers) for (const name of ev.split(" ")) model.off(name, fn);
    for (const img of [slices, iso]) if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
  };
}

export default { render };
