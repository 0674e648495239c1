// SDXS web page: plain JavaScript, no build step. Talks to the same server: /config, /health, /generate,
// /refine, /upscale, /encode-image. One request at a time from this page (the server runs one job at a time).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, busy: false, timer: null, objectUrls: [] };

// ---- server calls ------------------------------------------------------------------------------------------

/** fetch + readable errors: the server's `detail` line, or what went wrong on the way. */
async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("Cannot reach the server. Is `sdxs serve` still running?");
  }
  if (response.ok) return response;
  let detail = response.statusText || `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (err) { /* not JSON: keep the status text */ }
  if (response.status === 429) {
    const wait = response.headers.get("Retry-After");
    detail = `The server is busy${wait ? `; try again in ${wait} s` : ""}.`;
  } else if (response.status === 413) {
    detail = `Too large: ${detail}`;
  }
  throw new Error(detail);
}

async function postJson(path, payload) {
  const response = await call(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  return response.json();
}

// ---- busy state and errors ---------------------------------------------------------------------------------

const ACTION_IDS = ["generate", "refine", "upscale", "variation"];

function setBusy(label) {
  state.busy = true;
  ACTION_IDS.forEach((id) => { $(id).disabled = true; });
  $("generate-form").setAttribute("aria-busy", "true");
  $("error").hidden = true;
  $("progress").hidden = false;
  const started = performance.now();
  const tick = () => {
    $("progress-text").textContent = `${label}… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  };
  tick();
  state.timer = setInterval(tick, 100);
}

function setIdle() {
  state.busy = false;
  clearInterval(state.timer);
  ACTION_IDS.forEach((id) => { $(id).disabled = false; });
  $("generate-form").removeAttribute("aria-busy");
  $("progress").hidden = true;
  updateFeatures();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

/** Run one action with the busy state on and any error shown to the user. */
async function run(label, action) {
  if (state.busy) return;
  setBusy(label);
  try {
    await action();
  } catch (err) {
    showError(err.message || String(err));
  } finally {
    setIdle();
  }
}

// ---- controls ----------------------------------------------------------------------------------------------

function fillSelect(select, values, selected, format = String) {
  select.replaceChildren(...values.map((v) => {
    const option = document.createElement("option");
    option.value = String(v);
    option.textContent = format(v);
    option.selected = v === selected;
    return option;
  }));
}

function applyConfig(cfg) {
  state.config = cfg;
  fillSelect($("width"), cfg.sizes, cfg.default_width, (v) => `${v} px`);
  fillSelect($("height"), cfg.sizes, cfg.default_height, (v) => `${v} px`);
  const counts = Array.from({ length: cfg.max_images }, (_, i) => i + 1);
  fillSelect($("num-images"), counts, 1);
  $("steps").max = cfg.max_steps;
  $("steps").value = cfg.default_steps;
  $("guidance").max = cfg.max_guidance;
  $("guidance").value = cfg.default_guidance;
  $("seed").max = cfg.max_seed;
  $("prompt").maxLength = cfg.max_prompt_chars;
  $("negative").maxLength = cfg.max_prompt_chars;
  // a model that declares styles gets a select (a style's tag ends the prompt on the server; "as typed" sends
  // none: the prompt's own tag, or the style of the training captions without one); none: no select
  const styles = Object.keys(cfg.styles || {});
  $("style-field").hidden = styles.length === 0;
  fillSelect($("style"), ["", ...styles], "", (name) => (name ? `${name} (${cfg.styles[name]})` : "as typed"));
  showValues();
  updateFeatures();
}

function updateFeatures() {
  const features = (state.config && state.config.features) || {};
  if (features.refine === false) $("refine").disabled = true;
  if (features.encode_image === false) $("variation").disabled = true;
}

function showValues() {
  $("steps-value").textContent = $("steps").value;
  $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
}

/** The generation parameters from the form; null (with an error shown) when something needs fixing first. */
function readParams() {
  const cfg = state.config;
  const params = {
    negative_prompt: $("negative").value.trim(),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    width: Number($("width").value),
    height: Number($("height").value),
    num_images: Number($("num-images").value),
  };
  if (cfg && params.width * params.height > cfg.max_pixels) {
    showError(`${params.width}×${params.height} is more than this server's limit of ${cfg.max_pixels} pixels.`);
    return null;
  }
  if (!$("random-seed").checked) {
    const seed = $("seed").value.trim();
    if (!/^\d+$/.test(seed)) {
      showError("Seed must be a whole number (or tick “Random seed”).");
      $("seed").focus();
      return null;
    }
    params.seed = Number(seed);
  }
  return params;
}

function useSeed(seed) {
  $("random-seed").checked = false;
  $("seed").disabled = false;
  $("seed").value = String(seed);
  $("seed").focus();
}

// ---- gallery -----------------------------------------------------------------------------------------------

function addCard({ src, caption, facts, seed, filename, width, height }) {
  const item = document.createElement("li");
  item.className = "card";

  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  img.className = "result";
  img.dataset.width = String(width);
  img.dataset.height = String(height);
  if (Math.max(width, height) < 256) img.classList.add("small"); // keep tiny images crisp when enlarged
  frame.append(img);

  const meta = document.createElement("div");
  meta.className = "meta";
  const text = document.createElement("p");
  text.className = "caption";
  text.title = caption;
  text.textContent = caption;
  const info = document.createElement("p");
  info.className = "facts";
  info.textContent = facts;
  meta.append(text, info);

  const actions = document.createElement("div");
  actions.className = "actions";
  const download = document.createElement("a");
  download.href = src;
  download.download = filename;
  download.textContent = "Download";
  actions.append(download);
  if (seed !== undefined) {
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Use seed";
    reuse.addEventListener("click", () => useSeed(seed));
    actions.append(reuse);
  }
  const up = document.createElement("button");
  up.type = "button";
  up.textContent = "Upscale 2×";
  up.addEventListener("click", async () => {
    const blob = await (await fetch(src)).blob();
    run("Upscaling", () => upscaleBlob(blob, `${filename.replace(/\.png$/, "")}-2x.png`, caption));
  });
  actions.append(up);

  item.append(frame, meta, actions);
  $("gallery").prepend(item);
  $("empty").hidden = true;
}

function addGenerated(result, caption, prefix) {
  // the first image of a batch ends up first in the gallery
  [...result.images].reverse().forEach((im) => addCard({
    src: im.image,
    caption,
    facts: `${im.width}×${im.height} · seed ${im.seed} · ${result.steps} steps · ${result.seconds.toFixed(2)} s`,
    seed: im.seed,
    filename: `${prefix}-${im.seed}.png`,
    width: im.width,
    height: im.height,
  }));
}

// ---- actions -----------------------------------------------------------------------------------------------

async function generate() {
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Type a prompt first.");
    $("prompt").focus();
    return;
  }
  const params = readParams();
  if (!params) return;
  const style = $("style-field").hidden ? null : $("style").value;
  if (style) params.style = style;
  await run("Generating", async () => {
    const result = await postJson("/generate", { prompt, ...params });
    addGenerated(result, style ? `${prompt} [${style}]` : prompt, "sdxs");
  });
}

async function refine() {
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Type a short prompt to refine.");
    $("prompt").focus();
    return;
  }
  await run("Refining", async () => {
    const result = await postJson("/refine", { prompt });
    $("prompt").value = result.refined || prompt;
    $("prompt").focus();
  });
}

function chosenFile(inputId) {
  const file = $(inputId).files[0];
  if (!file) {
    showError("Choose an image file first.");
    $(inputId).focus();
    return null;
  }
  if (state.config && file.size > state.config.max_upload_bytes) {
    const mb = (state.config.max_upload_bytes / 2 ** 20).toFixed(1);
    showError(`That file is larger than this server's upload limit of ${mb} MB.`);
    return null;
  }
  return file;
}

async function upscaleBlob(blob, filename, caption) {
  const form = new FormData();
  form.append("image", blob, filename);
  const response = await call("/upscale", { method: "POST", body: form });
  const png = await response.blob();
  const url = URL.createObjectURL(png);
  state.objectUrls.push(url);
  const size = await new Promise((resolve) => {
    const probe = new Image();
    probe.onload = () => resolve([probe.naturalWidth, probe.naturalHeight]);
    probe.onerror = () => resolve([0, 0]);
    probe.src = url;
  });
  const seconds = Number(response.headers.get("X-Seconds") || 0);
  addCard({
    src: url,
    caption: `${caption} (upscaled 2×)`,
    facts: `${size[0]}×${size[1]} · ${seconds.toFixed(2)} s`,
    filename,
    width: size[0],
    height: size[1],
  });
}

async function upscaleUpload() {
  const file = chosenFile("upscale-file");
  if (!file) return;
  const stem = file.name.replace(/\.[^.]+$/, "");
  await run("Upscaling", () => upscaleBlob(file, `${stem}-2x.png`, file.name));
}

async function variation() {
  const file = chosenFile("image-prompt-file");
  if (!file) return;
  const params = readParams();
  if (!params) return;
  await run("Making variations", async () => {
    const form = new FormData();
    form.append("image", file, file.name);
    Object.entries(params).forEach(([k, v]) => { if (v !== "" && v !== undefined) form.append(k, String(v)); });
    const response = await call("/encode-image", { method: "POST", body: form });
    addGenerated(await response.json(), `variation of ${file.name}`, "sdxs-variation");
  });
}

async function checkHealth() {
  const badge = $("server-status");
  try {
    const health = await (await call("/health")).json();
    badge.textContent = `${health.model} · ${health.device} · ${health.dtype}`;
    badge.classList.remove("down");
  } catch (err) {
    badge.textContent = "server unreachable";
    badge.classList.add("down");
  }
}

// ---- wiring ------------------------------------------------------------------------------------------------

async function init() {
  $("generate-form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(); }
  });
  $("refine").addEventListener("click", refine);
  $("upscale").addEventListener("click", upscaleUpload);
  $("variation").addEventListener("click", variation);
  $("steps").addEventListener("input", showValues);
  $("guidance").addEventListener("input", showValues);
  $("random-seed").addEventListener("change", () => {
    $("seed").disabled = $("random-seed").checked;
    if (!$("seed").disabled) $("seed").focus();
  });
  $("clear").addEventListener("click", () => {
    $("gallery").replaceChildren();
    state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
    state.objectUrls = [];
    $("empty").hidden = false;
  });
  showValues();
  try {
    applyConfig(await (await call("/config")).json());
    document.body.dataset.ready = "true"; // tests wait for this before typing
  } catch (err) {
    showError(`Could not load the server's settings: ${err.message}`);
  }
  checkHealth();
}

document.addEventListener("DOMContentLoaded", init);
