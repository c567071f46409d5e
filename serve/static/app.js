// Demo page of the composed image retrieval service: pick or upload a reference,
// type the change, POST /search, show the result images. No external resources.
"use strict";

const state = { refId: null, upload: null };
const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function figure(item, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = item.image_url;
  img.alt = item.id;
  img.loading = "lazy";
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  cap.title = caption;
  fig.append(img, cap);
  return fig;
}

function chooseReference(item, fig) {
  state.refId = item.id;
  state.upload = null;
  $("upload").value = "";
  document.querySelectorAll("#samples figure").forEach((f) => f.classList.remove("chosen"));
  if (fig) fig.classList.add("chosen");
  $("reference-image").src = item.image_url;
  $("reference-name").textContent = item.id;
  $("reference").hidden = false;
}

async function loadSamples() {
  const response = await fetch("/gallery/sample?n=12");
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  const grid = $("samples");
  grid.replaceChildren();
  for (const item of body.items) {
    const fig = figure(item, item.caption || item.label || item.id);
    fig.dataset.id = item.id;
    fig.addEventListener("click", () => chooseReference(item, fig));
    grid.append(fig);
  }
  return body.gallery_size;
}

async function loadHealth() {
  const response = await fetch("/healthz");
  const body = await response.json();
  $("status").textContent =
    `${body.model} · ${body.backend_detail} on ${body.device} · ${body.gallery_size} catalogue images`;
}

$("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  state.upload = file;
  state.refId = null;
  document.querySelectorAll("#samples figure").forEach((f) => f.classList.remove("chosen"));
  $("reference-image").src = URL.createObjectURL(file);
  $("reference-name").textContent = file.name;
  $("reference").hidden = false;
});

$("shuffle").addEventListener("click", () => loadSamples().catch((e) => showError(e.message)));

$("query").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  if (!state.refId && !state.upload) {
    showError("Pick a picture above or upload one first.");
    return;
  }
  const form = new FormData();
  form.append("text", $("text").value);
  form.append("k", $("k").value || "12");
  if (state.upload) form.append("image", state.upload);
  else form.append("ref_id", state.refId);
  $("search").disabled = true;
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) {
      showError(`${body.error}: ${body.detail}`);
      return;
    }
    const grid = $("results");
    grid.replaceChildren();
    for (const hit of body.results) {
      const fig = figure(hit, `${hit.score.toFixed(3)} · ${hit.id}`);
      fig.classList.add("result");
      grid.append(fig);
    }
    $("timing").textContent =
      `${body.results.length} results in ${body.timing.total_ms.toFixed(1)} ms ` +
      `(batch of ${body.timing.batch_size})`;
  } catch (e) {
    showError(`request failed: ${e.message}`);
  } finally {
    $("search").disabled = false;
  }
});

Promise.all([loadHealth(), loadSamples()]).catch((e) => showError(e.message));
