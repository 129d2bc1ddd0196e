// The MedSegX viewer: a page over the JSON API of `medsegx serve` (docs/SERVE.md). No build step, no
// downloads: plain DOM and a canvas. Coordinates sent to the server are voxel indices of the stored
// array (x = column, y = row, z = slice), as `predict.py --box` takes them.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
  [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195]];
const colour = (label) => PALETTE[1 + ((label - 1) % (PALETTE.length - 1))];

const state = {
  token: null, image: null, z: 0, level: 40, width: 400,
  zoom: 1, panX: 0, panY: 0, fit: 1,
  slice: null, overlay: null, overlayPixels: 0, request: 0,
  drag: null, box: null, marks: { first: null, last: null },
};

// ------------------------------------------------------------------ talking to the server
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["X-MedSegX-Token"] = state.token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const response = await fetch(path, init);
  const type = response.headers.get("content-type") || "";
  if (!response.ok) {
    let message = `${method} ${path}: HTTP ${response.status}`;
    if (type.includes("json")) message = (await response.json()).error || message;
    throw new Error(message);
  }
  return type.includes("json") ? response.json() : response.blob();
}

async function imageFrom(path) {
  const blob = await api("GET", path);
  const url = URL.createObjectURL(blob);
  try {
    const img = new Image();
    img.src = url;
    await img.decode();
    return img;
  } finally {
    URL.revokeObjectURL(url);
  }
}

function status(text, kind) {
  const el = $("status");
  el.textContent = text || "";
  el.className = kind || "";
}

async function guarded(what, work) {
  try {
    status(what + "…", "busy");
    const result = await work();
    if ($("status").className === "busy") status("");
    return result;
  } catch (err) {
    status(err.message, "error");
    return undefined;
  }
}

// ------------------------------------------------------------------ opening an image
async function openImage(info) {
  if (state.image) api("DELETE", `/api/images/${state.image.id}`).catch(() => {});
  state.image = info;
  state.level = info.display.level;
  state.width = info.display.width;
  state.z = Math.floor(info.shape[0] / 2);
  state.box = null;
  state.marks = { first: null, last: null };
  const slider = $("slice");
  slider.max = info.shape[0] - 1;
  slider.disabled = info.shape[0] === 1;
  $("level").value = round(state.level);
  $("width").value = round(state.width);
  const [sz, sy, sx] = info.spacing;
  $("image-info").textContent = `${info.name}: ${info.shape[2]} x ${info.shape[1]} x ${info.shape[0]}` +
    ` voxels, ${sx} x ${sy} x ${sz} mm, ${info.orientation || "2-D"}`;
  $("hint").textContent = "";
  $("download").href = "#";
  document.body.dataset.image = info.id;
  resetView();
  renderMarks();
  renderObjects(info.objects);
  await loadSlice();
}

const round = (v) => Math.round(v * 100) / 100;

async function loadSlice() {
  const image = state.image;
  if (!image) return;
  const ticket = ++state.request;
  const z = state.z;
  const query = `level=${encodeURIComponent(state.level)}&width=${encodeURIComponent(state.width)}`;
  const [slice, labels] = await Promise.all([
    imageFrom(`/api/images/${image.id}/slices/${z}.png?${query}`),
    imageFrom(`/api/images/${image.id}/labels/${z}.png?v=${Date.now()}`),
  ]);
  if (ticket !== state.request) return; // a newer slice was asked for meanwhile
  state.slice = slice;
  state.overlay = colourOverlay(labels);
  $("slice").value = z;
  $("slice-label").textContent = `${z + 1} / ${image.shape[0]}`;
  draw();
}

function colourOverlay(img) {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const px = data.data;
  let count = 0;
  for (let i = 0; i < px.length; i += 4) {
    const label = px[i]; // a grey PNG: value = label
    if (label === 0) { px[i + 3] = 0; continue; }
    const [r, g, b] = colour(label);
    px[i] = r; px[i + 1] = g; px[i + 2] = b; px[i + 3] = 120;
    count++;
  }
  ctx.putImageData(data, 0, 0);
  state.overlayPixels = count;
  document.body.dataset.overlayPixels = String(count);
  return canvas;
}

// ------------------------------------------------------------------ drawing
// The stored slice (rows y, columns x) is shown as the model sees it (info.view: transpose, then flip
// the displayed columns / rows; LPS: anterior at the top, the patient's right on the left). Display
// axes are u (columns) and v (rows).
function geometry() {
  const [, Y, X] = state.image.shape;
  const [, sy, sx] = state.image.spacing;
  const t = state.image.view.transpose;
  return { W: t ? Y : X, H: t ? X : Y, su: t ? sy : sx, sv: t ? sx : sy };
}

function scale() {
  // screen pixels per displayed voxel along u and v (anisotropic pixels keep their physical shape)
  const g = geometry();
  const unit = Math.min(g.su, g.sv);
  const s = state.fit * state.zoom;
  return [s * g.su / unit, s * g.sv / unit];
}

function resetView() {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(rect.width));
  canvas.height = Math.max(1, Math.round(rect.height));
  if (!state.image) return;
  const g = geometry();
  const unit = Math.min(g.su, g.sv);
  state.fit = 0.95 * Math.min(canvas.width / (g.W * g.su / unit), canvas.height / (g.H * g.sv / unit));
  state.zoom = 1;
  state.panX = state.panY = 0;
  draw();
}

function origin() {
  const canvas = $("canvas");
  const g = geometry();
  const [ku, kv] = scale();
  return [(canvas.width - g.W * ku) / 2 + state.panX, (canvas.height - g.H * kv) / 2 + state.panY];
}

function toVoxel(event) {
  // screen position -> stored voxel (x, y) of the slice, clamped to the image
  const rect = $("canvas").getBoundingClientRect();
  const [ox, oy] = origin();
  const [ku, kv] = scale();
  const g = geometry();
  const view = state.image.view;
  let u = Math.min(Math.max(Math.floor((event.clientX - rect.left - ox) / ku), 0), g.W - 1);
  let v = Math.min(Math.max(Math.floor((event.clientY - rect.top - oy) / kv), 0), g.H - 1);
  if (view.flip_x) u = g.W - 1 - u;
  if (view.flip_y) v = g.H - 1 - v;
  return view.transpose ? [v, u] : [u, v];
}

function withImageTransform(ctx, paint) {
  // draw in stored pixel coordinates (x, y): translate, scale, flip, transpose
  const g = geometry();
  const view = state.image.view;
  const [ox, oy] = origin();
  const [ku, kv] = scale();
  ctx.save();
  ctx.translate(ox, oy);
  ctx.scale(ku, kv);
  if (view.flip_x) { ctx.translate(g.W, 0); ctx.scale(-1, 1); }
  if (view.flip_y) { ctx.translate(0, g.H); ctx.scale(1, -1); }
  if (view.transpose) ctx.transform(0, 1, 1, 0, 0, 0);
  paint(Math.min(ku, kv));
  ctx.restore();
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!state.image || !state.slice) return;
  ctx.imageSmoothingEnabled = false;
  const box = state.drag && state.drag.mode === "box" ? dragBox() : (state.box && state.box.z === state.z ? state.box : null);
  withImageTransform(ctx, (k) => {
    ctx.drawImage(state.slice, 0, 0);
    if (state.overlay) ctx.drawImage(state.overlay, 0, 0);
    if (box) {
      const [r, g, b] = colour(labelValue());
      ctx.strokeStyle = `rgb(${r},${g},${b})`;
      ctx.lineWidth = 1.5 / k;
      ctx.setLineDash(state.drag ? [4 / k, 3 / k] : []);
      ctx.strokeRect(box.x0, box.y0, box.x1 - box.x0 + 1, box.y1 - box.y0 + 1);
    }
  });
  ctx.fillStyle = "#fffc";
  ctx.font = "12px system-ui";
  const marks = state.marks;
  const note = marks.first !== null && marks.first === state.z ? "  [first slice]" :
    (marks.last !== null && marks.last === state.z ? "  [last slice]" : "");
  ctx.fillText(`z ${state.z}   L ${round(state.level)} W ${round(state.width)}   zoom ${round(state.zoom)}${note}`, 8, 16);
}

function dragBox() {
  const d = state.drag;
  return { x0: Math.min(d.x0, d.x1), y0: Math.min(d.y0, d.y1), x1: Math.max(d.x0, d.x1), y1: Math.max(d.y0, d.y1),
    z: state.z };
}

// ------------------------------------------------------------------ prompting
function labelValue() {
  const v = parseInt($("label").value, 10);
  return Number.isFinite(v) ? v : 1;
}

function renderMarks() {
  const { first, last } = state.marks;
  let text = "2-D: the box prompts this slice";
  if (first !== null || last !== null) {
    text = `3-D: first slice ${first === null ? "?" : first}, last slice ${last === null ? "?" : last}`;
    if (first !== null && last !== null) text += " — the next box spans them";
  }
  $("marks").textContent = text;
  const [r, g, b] = colour(labelValue());
  $("label-swatch").style.background = `rgb(${r},${g},${b})`;
}

async function segment(box) {
  const image = state.image;
  const { first, last } = state.marks;
  const body = { label: labelValue(), modality: $("modality").value.trim(), propagate: $("propagate").checked };
  const task = $("task").value.trim();
  if (task) body.task = task;
  const threeD = first !== null && last !== null;
  if (threeD) {
    const [z0, z1] = [Math.min(first, last), Math.max(first, last)];
    body.box = [box.x0, box.y0, z0, box.x1, box.y1, z1];
    // propagation starts on the slice the box was drawn on (else on the middle of the marked slices)
    if (body.propagate && box.z >= z0 && box.z <= z1) body.seed = box.z;
  } else {
    body.box = [box.x0, box.y0, box.x1, box.y1];
    if (image.shape[0] > 1) body.z = box.z;
  }
  const t0 = performance.now();
  const result = await guarded("segmenting", () => api("POST", `/api/images/${image.id}/segment`, body));
  if (!result) return;
  if (threeD) state.marks = { first: null, last: null };
  renderMarks();
  renderObjects(result.objects);
  const seconds = ((performance.now() - t0) / 1000).toFixed(2);
  const span = result.slices.length > 1 ? `slices ${result.slices[0]}-${result.slices[result.slices.length - 1]}` :
    `slice ${result.slices[0]}`;
  status(`label ${result.label} (${result.task || "no task"}): ${span}, ${result.voxels} voxels, ${seconds} s` +
    (result.notes.length ? "\n" + result.notes.join("\n") : ""));
  await loadSlice();
}

function renderObjects(objects) {
  const body = $("objects").querySelector("tbody");
  body.textContent = "";
  for (const o of objects) {
    const tr = document.createElement("tr");
    tr.dataset.label = o.label;
    const [r, g, b] = colour(o.label);
    const size = o.volume_ml !== undefined ? o.volume_ml.toFixed(2) : `${o.area_mm2} mm²`;
    tr.innerHTML = `<td><span class="swatch" style="background:rgb(${r},${g},${b})"></span></td>` +
      `<td>${o.label}</td><td></td><td>${size}</td><td>${o.slices[0]}–${o.slices[1]}</td>` +
      `<td><button type="button" title="erase this object">erase</button></td>`;
    tr.children[2].textContent = o.task || "";
    tr.querySelector("button").addEventListener("click", (ev) => { ev.stopPropagation(); erase(o.label); });
    tr.addEventListener("click", () => {
      $("label").value = o.label;
      if (o.task) $("task").value = o.task;
      if (o.modality) $("modality").value = o.modality;
      renderMarks();
      goTo(Math.round((o.slices[0] + o.slices[1]) / 2));
    });
    body.appendChild(tr);
  }
}

async function erase(label) {
  const result = await guarded(`erasing ${label}`, () => api("DELETE", `/api/images/${state.image.id}/objects/${label}`));
  if (result) { renderObjects(result.objects); status(`erased label ${label}`); await loadSlice(); }
}

async function undo() {
  if (!state.image) return;
  const result = await guarded("undoing", () => api("POST", `/api/images/${state.image.id}/undo`));
  if (result) { renderObjects(result.objects); status("undone"); await loadSlice(); }
}

async function save() {
  if (!state.image) return;
  const result = await guarded("saving", () => api("POST", `/api/images/${state.image.id}/save`));
  if (result) {
    status(`saved ${result.path}${result.replaced ? " (replaced)" : ""}`);
    document.body.dataset.saved = result.path;
  }
}

async function download(event) {
  event.preventDefault();
  if (!state.image) return;
  const name = state.image.kind === "image2d" ? "label.png" : "label.nii.gz";
  const blob = await guarded("downloading", () => api("GET", `/api/images/${state.image.id}/${name}`));
  if (!blob) return;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `${state.image.case}${name.slice(5)}`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// ------------------------------------------------------------------ navigation
function goTo(z) {
  if (!state.image) return;
  const n = state.image.shape[0];
  const next = Math.min(Math.max(z, 0), n - 1);
  if (next === state.z && state.slice) return;
  state.z = next;
  loadSlice().catch((err) => status(err.message, "error"));
}

function zoomBy(factor, cx, cy) {
  if (!state.image) return;
  const canvas = $("canvas");
  const px = cx === undefined ? canvas.width / 2 : cx;
  const py = cy === undefined ? canvas.height / 2 : cy;
  const [ox, oy] = origin();
  const zoom = Math.min(Math.max(state.zoom * factor, 0.2), 40);
  const ratio = zoom / state.zoom;
  // keep the point under the cursor still: px = origin' + (px - origin) * ratio
  state.zoom = zoom;
  state.panX = state.panY = 0;
  const [cx0, cy0] = origin();
  state.panX = px - (px - ox) * ratio - cx0;
  state.panY = py - (py - oy) * ratio - cy0;
  draw();
}

function setWindow(level, width) {
  state.level = level;
  state.width = Math.max(width, 1e-3);
  $("level").value = round(state.level);
  $("width").value = round(state.width);
  clearTimeout(state.windowTimer);
  state.windowTimer = setTimeout(() => loadSlice().catch((err) => status(err.message, "error")), 60);
}

function wire() {
  const canvas = $("canvas");
  canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
  canvas.addEventListener("mousedown", (ev) => {
    if (!state.image) return;
    ev.preventDefault();
    if (ev.button === 1 || (ev.button === 0 && ev.shiftKey)) {
      state.drag = { mode: "pan", sx: ev.clientX, sy: ev.clientY, panX: state.panX, panY: state.panY };
    } else if (ev.button === 2) {
      state.drag = { mode: "window", sx: ev.clientX, sy: ev.clientY, level: state.level, width: state.width };
    } else if (ev.button === 0) {
      const [x, y] = toVoxel(ev);
      state.drag = { mode: "box", x0: x, y0: y, x1: x, y1: y };
    }
  });
  window.addEventListener("mousemove", (ev) => {
    const d = state.drag;
    if (!d) return;
    if (d.mode === "pan") {
      state.panX = d.panX + ev.clientX - d.sx;
      state.panY = d.panY + ev.clientY - d.sy;
      draw();
    } else if (d.mode === "window") {
      const step = Math.max(d.width, 1) / 300;
      setWindow(d.level - (ev.clientY - d.sy) * step, d.width + (ev.clientX - d.sx) * step);
      draw();
    } else {
      [d.x1, d.y1] = toVoxel(ev);
      draw();
    }
  });
  window.addEventListener("mouseup", () => {
    const d = state.drag;
    state.drag = null;
    if (!d || d.mode !== "box") return;
    const box = { x0: Math.min(d.x0, d.x1), y0: Math.min(d.y0, d.y1), x1: Math.max(d.x0, d.x1),
      y1: Math.max(d.y0, d.y1), z: state.z };
    if (box.x1 - box.x0 < 1 || box.y1 - box.y0 < 1) { draw(); return; } // a click, not a box
    state.box = box;
    draw();
    segment(box);
  });
  canvas.addEventListener("wheel", (ev) => {
    if (!state.image) return;
    ev.preventDefault();
    if (ev.ctrlKey) {
      const rect = canvas.getBoundingClientRect();
      zoomBy(ev.deltaY < 0 ? 1.15 : 1 / 1.15, ev.clientX - rect.left, ev.clientY - rect.top);
    } else {
      goTo(state.z + (ev.deltaY > 0 ? 1 : -1));
    }
  }, { passive: false });
  window.addEventListener("keydown", (ev) => {
    if (ev.target instanceof HTMLInputElement && ev.target.type !== "range") return;
    if (!state.image) return;
    const keys = {
      ArrowUp: () => goTo(state.z + 1), ArrowDown: () => goTo(state.z - 1),
      PageUp: () => goTo(state.z + 10), PageDown: () => goTo(state.z - 10),
      Home: () => goTo(0), End: () => goTo(state.image.shape[0] - 1),
      "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8), "0": resetView,
      f: () => mark("first"), l: () => mark("last"),
    };
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "z") { ev.preventDefault(); undo(); return; }
    if (keys[ev.key]) { ev.preventDefault(); keys[ev.key](); }
  });
  window.addEventListener("resize", resetView);
  $("slice").addEventListener("input", (ev) => goTo(parseInt(ev.target.value, 10)));
  $("level").addEventListener("change", () => setWindow(parseFloat($("level").value), state.width));
  $("width").addEventListener("change", () => setWindow(state.level, parseFloat($("width").value)));
  $("preset").addEventListener("change", (ev) => {
    const v = ev.target.value;
    if (v) { const [level, width] = JSON.parse(v); setWindow(level, width); }
  });
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-reset").addEventListener("click", resetView);
  $("label").addEventListener("input", () => { renderMarks(); draw(); });
  $("mark-first").addEventListener("click", () => mark("first"));
  $("mark-last").addEventListener("click", () => mark("last"));
  $("mark-clear").addEventListener("click", () => { state.marks = { first: null, last: null }; renderMarks(); draw(); });
  $("undo").addEventListener("click", undo);
  $("save").addEventListener("click", save);
  $("download").addEventListener("click", download);
  $("open-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { path: $("path").value.trim(), modality: $("modality").value.trim() || undefined };
    const info = await guarded("opening", () => api("POST", "/api/images", body));
    if (info) { await guarded("loading", () => openImage(info)); status(`opened ${info.name}`); }
  });
  $("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $("upload").files[0];
    if (!file) { status("choose a file to upload first", "error"); return; }
    const form = new FormData();
    form.append("file", file, file.name);
    if ($("modality").value.trim()) form.append("modality", $("modality").value.trim());
    const info = await guarded(`uploading ${file.name}`, () => api("POST", "/api/images", form));
    if (info) { await guarded("loading", () => openImage(info)); status(`opened ${info.name}`); }
  });
}

function mark(which) {
  if (!state.image) return;
  state.marks[which] = state.z;
  renderMarks();
  draw();
}

async function start() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) { sessionStorage.setItem("medsegx-token", hash.get("token")); history.replaceState(null, "", location.pathname); }
  state.token = sessionStorage.getItem("medsegx-token");
  wire();
  resetView();
  renderMarks();
  const health = await guarded("connecting", () => api("GET", "/api/health"));
  if (!health) return;
  $("model").textContent = `model ${health.model_type}${health.model_weight ? " + " + health.model_weight : ""} on ${health.device || "?"}`;
  const [tax, files] = await Promise.all([api("GET", "/api/taxonomy"), api("GET", "/api/files")]);
  const fill = (id, values) => {
    const list = $(id);
    for (const v of values) { const o = document.createElement("option"); o.value = v; list.appendChild(o); }
  };
  fill("modalities", tax.modalities);
  fill("tasks", tax.tasks);
  fill("files", files.files);
  for (const [name, [level, width]] of Object.entries(tax.windows)) {
    const o = document.createElement("option");
    o.value = JSON.stringify([level, width]);
    o.textContent = `${name} (${level}, ${width})`;
    $("preset").appendChild(o);
  }
  if (!files.root) $("path").placeholder = "no --root: upload a file";
  document.body.dataset.ready = "1";
}

window.addEventListener("error", (ev) => status(`page error: ${ev.message}`, "error"));
window.addEventListener("unhandledrejection", (ev) => status(`page error: ${ev.reason && ev.reason.message}`, "error"));
start();
