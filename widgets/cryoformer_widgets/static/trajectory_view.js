// Front end of cryoformer_widgets.trajectory_view.TrajectoryView and VolumeView (anywidget).
//
// Python prepends static/mesh_view.js to this file (one module: createMeshView, unpackMesh).
// A series is a set of frames; Python announces it with series_id / frames_ready and sends each
// frame once, on request, as a custom message {type: "frame", frame, series, label} with two
// buffers: the mesh (unpackMesh's format) and the PNG of the three central slices. Frames stay
// here (meshes on the GPU), so playing loops without asking the kernel again; a new series_id
// drops them. kind "volume" hides the trajectory controls and the player.

function render({ model, el }) {
  const SIZE = 380;
  const trajectory = model.get("kind") === "trajectory";
  const root = h("div", { class: "ctv-root" });
  root.style.cssText = "font: 13px sans-serif; display: inline-block; padding: 6px;";
  el.appendChild(root);
  const title = h("div", { class: "ctv-title" });
  title.style.fontWeight = "bold";
  root.appendChild(title);

  // ------------------------------------------------------------ trajectory: endpoints and build
  const startSel = h("select", { class: "ctv-start", title: "start: a K-means cluster centre" });
  const endSel = h("select", { class: "ctv-end", title: "end: a K-means cluster centre" });
  const modeSel = h("select", { class: "ctv-mode", title: "straight line in latent space, or the shortest path through the particles' nearest-neighbour graph" });
  for (const [v, text] of [["straight", "straight line"], ["data", "along the data"]])
    modeSel.appendChild(h("option", { value: v, text }));
  const nInput = h("input", { class: "ctv-n", type: "number", min: "2", max: "200", step: "1", title: "maps along the trajectory" });
  nInput.style.width = "4em";
  const buildBtn = h("button", { class: "ctv-build", text: "build", title: "decode the maps along the trajectory (in the background)" });
  if (trajectory) {
    root.appendChild(h("div", { class: "ctv-ends" }, [
      h("span", { text: "from " }), startSel, h("span", { text: " to " }), endSel, h("span", { text: " " }),
      modeSel, h("span", { text: " maps " }), nInput, h("span", { text: " " }), buildBtn]));
  }
  const progress = h("progress", { class: "ctv-progress", max: "1", value: "0" });
  progress.style.width = SIZE + "px";
  if (trajectory) root.appendChild(progress);

  // ------------------------------------------------------------ the view: mesh or slices
  const stage = h("div", { class: "ctv-stage" });
  stage.style.cssText = `min-width: ${SIZE}px; min-height: ${SIZE}px;`;
  root.appendChild(stage);
  const meshBox = h("div", { class: "ctv-mesh" });
  const slices = h("img", { class: "ctv-slices", alt: "central slices (xy, xz, yz)" });
  slices.style.maxWidth = SIZE * 1.4 + "px";
  stage.appendChild(meshBox);
  stage.appendChild(slices);
  let view = null;
  try {
    view = createMeshView(meshBox, { width: SIZE, height: SIZE });
  } catch (e) {
    meshBox.appendChild(h("div", { class: "cfm-nogl", text: "3D view failed: " + e.message }));
  }
  const webgl = view && view.available ? view.api : "none";
  root.dataset.webgl = webgl;
  model.set("webgl", webgl);
  model.save_changes();

  // ------------------------------------------------------------ player
  const playBtn = h("button", { class: "ctv-play", text: "▶ play" });
  const slider = h("input", { class: "ctv-frame", type: "range", min: "0", max: "0", step: "1", value: "0" });
  slider.style.width = "180px";
  const frameLabel = h("span", { class: "ctv-frame-label" });
  const fpsInput = h("input", { class: "ctv-fps", type: "number", min: "0.5", max: "30", step: "0.5", title: "frames per second" });
  fpsInput.style.width = "3.5em";
  const thrInput = h("input", { class: "ctv-threshold", type: "number", step: "0.1", title: "surface level: σ above the series' mean" });
  thrInput.style.width = "4em";
  const viewSel = h("select", { class: "ctv-view", title: "3D mesh, or the three central slices" });
  for (const v of ["mesh", "slices"]) viewSel.appendChild(h("option", { value: v, text: v }));
  const exportBtn = h("button", { class: "ctv-export", text: "export", title: "write the maps, a ChimeraX script and a movie (a new folder in output_dir)" });
  const controls = [thrInput, h("span", { text: " σ " }), viewSel];
  if (trajectory) controls.unshift(playBtn, slider, frameLabel, h("span", { text: " fps " }), fpsInput, h("span", { text: " level " }));
  else controls.unshift(h("span", { text: "level " }));
  if (trajectory) controls.push(exportBtn);
  root.appendChild(h("div", { class: "ctv-player" }, controls));
  const status = h("div", { class: "ctv-status" });
  status.style.color = "#555";
  const error = h("div", { class: "ctv-error-line" });
  error.style.color = "#b00";
  root.appendChild(status);
  root.appendChild(error);

  // ------------------------------------------------------------ frames of the current series
  let series = model.get("series_id");
  let requested = new Set();
  const pngs = new Map(), labels = new Map();
  let shown = model.get("frame");

  function dropSeries() {
    for (const url of pngs.values()) URL.revokeObjectURL(url);
    pngs.clear(); labels.clear(); requested = new Set();
    if (view) view.clear();
  }

  function requestMissing() {
    const ready = model.get("frames_ready");
    for (let k = 0; k < ready; k++) {
      if (requested.has(k)) continue;
      requested.add(k);
      model.send({ type: "frame", frame: k, series });
    }
  }

  function show(k) {
    shown = k;
    const useMesh = model.get("view") === "mesh" && view && view.available;
    meshBox.style.display = useMesh ? "" : "none";
    slices.style.display = useMesh ? "none" : "";
    if (view) view.setFrame(k);
    if (pngs.has(k)) slices.src = pngs.get(k);
    slider.value = String(k);
    const n = model.get("n_frames");
    frameLabel.textContent = ` ${k + 1}/${n} `;
    root.dataset.frame = String(k);
    const label = labels.get(k) || (model.get("frame_labels") || [])[k] || "";
    slices.title = label;
    meshBox.title = label + " — drag to rotate, wheel to zoom";
  }

  model.on("msg:custom", (msg, buffers) => {
    if (!msg || msg.type !== "frame" || msg.series !== series) return; // an older series
    try {
      if (view && view.available) view.setMesh(unpackMesh(buffers[0]), msg.frame);
      const png = bytesOf(buffers[1]);
      if (pngs.has(msg.frame)) URL.revokeObjectURL(pngs.get(msg.frame));
      pngs.set(msg.frame, URL.createObjectURL(new Blob([png], { type: "image/png" })));
      labels.set(msg.frame, msg.label || "");
      root.dataset.received = String(pngs.size);
      if (msg.frame === shown) show(shown);
    } catch (e) {
      error.textContent = "frame " + msg.frame + ": " + e.message;
    }
  });

  // ------------------------------------------------------------ playing
  let timer = null;
  function step() {
    const ready = model.get("frames_ready");
    if (ready === 0) return;
    const k = (shown + 1) % ready;
    show(k);
    model.set("frame", k);
    model.save_changes();
  }
  function syncPlaying() {
    if (timer) { clearInterval(timer); timer = null; }
    const playing = model.get("playing");
    playBtn.textContent = playing ? "❚❚ pause" : "▶ play";
    if (playing) timer = setInterval(step, 1000 / Math.max(0.5, model.get("fps")));
  }

  // ------------------------------------------------------------ model → view
  function syncClusters() {
    const names = model.get("cluster_names") || [];
    for (const sel of [startSel, endSel]) {
      sel.textContent = "";
      names.forEach((name, i) => sel.appendChild(h("option", { value: String(i), text: name })));
    }
    if (model.get("start_cluster") >= 0) startSel.value = String(model.get("start_cluster"));
    if (model.get("end_cluster") >= 0) endSel.value = String(model.get("end_cluster"));
  }
  function syncSeries() {
    if (model.get("series_id") !== series) { series = model.get("series_id"); dropSeries(); }
    const n = model.get("n_frames"), ready = model.get("frames_ready");
    slider.max = String(Math.max(0, ready - 1));
    nInput.value = String(n);
    root.dataset.ready = String(ready);
    root.dataset.series = String(series);
    requestMissing();
    show(Math.min(model.get("frame"), Math.max(0, ready - 1)));
  }
  function syncText() {
    title.textContent = model.get("title");
    status.textContent = model.get("status") + (model.get("busy") ? " …" : "");
    error.textContent = model.get("error");
    error.className = model.get("error") ? "ctv-error-line ctv-error" : "ctv-error-line";
    progress.value = model.get("progress");
    root.dataset.busy = model.get("busy") ? "1" : "0";
  }
  model.on("change:series_id", syncSeries);
  model.on("change:frames_ready", syncSeries);
  model.on("change:n_frames", syncSeries);
  model.on("change:frame", () => { if (model.get("frame") !== shown) show(model.get("frame")); });
  model.on("change:playing", syncPlaying);
  model.on("change:fps", () => { fpsInput.value = String(model.get("fps")); syncPlaying(); });
  model.on("change:threshold_sigma", () => { thrInput.value = String(model.get("threshold_sigma")); });
  model.on("change:view", () => { viewSel.value = model.get("view"); show(shown); });
  model.on("change:mode", () => { modeSel.value = model.get("mode"); });
  model.on("change:cluster_names", syncClusters);
  model.on("change:start_cluster", syncClusters);
  model.on("change:end_cluster", syncClusters);
  for (const name of ["title", "status", "error", "busy", "progress"]) model.on("change:" + name, syncText);

  // ------------------------------------------------------------ view → model
  playBtn.addEventListener("click", () => { model.set("playing", !model.get("playing")); model.save_changes(); syncPlaying(); });
  slider.addEventListener("input", () => {
    const k = parseInt(slider.value, 10);
    show(k);
    model.set("frame", k);
    model.save_changes();
  });
  fpsInput.addEventListener("change", () => {
    const fps = parseFloat(fpsInput.value);
    if (fps > 0) { model.set("fps", fps); model.save_changes(); syncPlaying(); }
  });
  thrInput.addEventListener("change", () => {
    const t = parseFloat(thrInput.value);
    if (Number.isFinite(t)) { model.set("threshold_sigma", t); model.save_changes(); }
  });
  viewSel.addEventListener("change", () => { model.set("view", viewSel.value); model.save_changes(); show(shown); });
  buildBtn.addEventListener("click", () => {
    model.send({ type: "build", start: parseInt(startSel.value, 10), end: parseInt(endSel.value, 10),
                 mode: modeSel.value, n_frames: parseInt(nInput.value, 10) });
  });
  exportBtn.addEventListener("click", () => model.send({ type: "export" }));

  if (webgl === "none" && model.get("view") === "mesh") { model.set("view", "slices"); model.save_changes(); }
  viewSel.value = model.get("view");
  modeSel.value = model.get("mode");
  fpsInput.value = String(model.get("fps"));
  thrInput.value = String(model.get("threshold_sigma"));
  syncClusters();
  syncText();
  syncSeries();
  syncPlaying();

  return () => {
    if (timer) clearInterval(timer);
    dropSeries();
    if (view) view.destroy();
  };
}

export default { render };
