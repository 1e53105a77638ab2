// The P2R page: one image and a question in, the streamed chat completion out.
// Uses only the OpenAI-compatible streaming API of this gateway (POST /v1/chat/completions,
// stream: true) and its "p2r" extension field: regions (0-1000 coordinates), crop boxes in
// pixels and their colours in the first chunk, the reasoner's text as it is generated, and the
// extracted answer and per-stage timings in the last one.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const COORD_SCALE = 1000;
let imageDataUrl = null;
let model = null;

fetch("/v1/models").then((r) => r.json()).then((m) => { model = m.data[0].id; ready(); })
  .catch((e) => showError(`cannot list models: ${e}`));

function ready() { $("ask").disabled = !(model && imageDataUrl); }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  document.body.dataset.state = "error";
}

function pick(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    imageDataUrl = reader.result;
    $("photo").src = imageDataUrl;
    $("drop-text").textContent = file.name;
    clearView();
    ready();
  };
  reader.readAsDataURL(file);
}

$("image-input").addEventListener("change", (e) => pick(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  pick(e.dataTransfer.files[0]);
});

function clearView() {
  $("overlay").replaceChildren();
  $("crops").replaceChildren();
  $("reasoning").textContent = "";
  $("answer").textContent = "-";
  $("perceiver-output").textContent = "";
  $("timings").tBodies[0].replaceChildren();
  $("error").hidden = true;
}

// Regions as rectangles over the image, in the image's own pixel space (the SVG's viewBox).
function drawRegions(ext) {
  const { width, height } = ext.image;
  const overlay = $("overlay");
  overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
  overlay.setAttribute("preserveAspectRatio", "none");
  overlay.replaceChildren();
  ext.regions.forEach((r, i) => {
    const colour = ext.colours[i % ext.colours.length];
    const rect = document.createElementNS(SVG, "rect");
    const x = (r.x1 / COORD_SCALE) * width, y = (r.y1 / COORD_SCALE) * height;
    rect.setAttribute("x", x);
    rect.setAttribute("y", y);
    rect.setAttribute("width", ((r.x2 - r.x1) / COORD_SCALE) * width);
    rect.setAttribute("height", ((r.y2 - r.y1) / COORD_SCALE) * height);
    rect.setAttribute("stroke", colour);
    rect.classList.add("region");
    rect.dataset.box = JSON.stringify([r.x1, r.y1, r.x2, r.y2]);
    rect.dataset.label = r.label;
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", x + 4);
    text.setAttribute("y", Math.max(14, y - 4));
    text.setAttribute("fill", colour);
    text.textContent = `${i + 1}${r.label ? ": " + r.label : ""}`;
    overlay.append(rect, text);
  });
  const crops = $("crops");
  crops.replaceChildren();
  const photo = $("photo");
  ext.crops.forEach(([left, top, right, bottom], i) => {
    const canvas = document.createElement("canvas");
    canvas.width = right - left;
    canvas.height = bottom - top;
    canvas.style.borderColor = ext.colours[i % ext.colours.length];
    canvas.getContext("2d").drawImage(photo, left, top, right - left, bottom - top, 0, 0, right - left, bottom - top);
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `crop ${i + 1}${ext.regions[i].label ? ": " + ext.regions[i].label : ""}`;
    figure.append(canvas, caption);
    crops.append(figure);
  });
  if (!ext.regions.length) crops.textContent = "No region: the reasoner sees the whole image.";
  $("perceiver-output").textContent = ext.perceiver_output;
}

function showTimings(timings, firstTokenMs) {
  const rows = [["perceive", timings.perceive_ms], ["evidence", timings.evidence_ms],
    ["reason", timings.reason_ms], ["total (server)", timings.total_ms],
    ["first reasoner token (page)", firstTokenMs]];
  $("timings").tBodies[0].replaceChildren(...rows.filter(([, v]) => v != null).map(([name, ms]) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${name}</td><td class="num">${Number(ms).toFixed(1)} ms</td>`;
    return tr;
  }));
}

// The perceiver's sampling fields that are filled in (the others take the server's defaults).
function perceiveSampling() {
  const out = {};
  const fields = [["temperature", "perceive-temperature", parseFloat], ["seed", "perceive-seed", parseInt],
    ["max_tokens", "perceive-max-tokens", parseInt]];
  for (const [name, id, parse] of fields) {
    if ($(id).value !== "") out[name] = parse($(id).value, 10);
  }
  return out;
}

// Server-sent events from a fetch body: "data: {json}" blocks separated by blank lines.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  clearView();
  document.body.dataset.state = "running";
  $("ask").disabled = true;
  $("status").textContent = "perceiving...";
  const started = performance.now();
  let firstTokenMs = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model, stream: true, temperature: 0,
        messages: [{ role: "user", content: [
          { type: "image_url", image_url: { url: imageDataUrl } },
          { type: "text", text: $("question").value },
        ] }],
        p2r: { answer_form: $("answer-form").value, structured: $("structured").checked, perceive: perceiveSampling() },
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (chunk.p2r && choice && choice.finish_reason == null) {
        drawRegions(chunk.p2r);
        document.body.dataset.regions = "drawn";
        $("status").textContent = "reasoning...";
      }
      if (choice && choice.delta && choice.delta.content) {
        if (firstTokenMs === null) firstTokenMs = performance.now() - started;
        $("reasoning").textContent += choice.delta.content;
      }
      if (chunk.p2r && choice && choice.finish_reason != null) {
        $("answer").textContent = chunk.p2r.answer || "(no <answer> in the reply)";
        $("status").textContent = `done (${choice.finish_reason})`;
        showTimings(chunk.p2r.timings, firstTokenMs);
        window.p2rResult = chunk.p2r;
        document.body.dataset.state = "done";
      }
    }
    if (document.body.dataset.state !== "done") throw new Error("the stream ended without an answer");
  } catch (err) {
    $("status").textContent = "";
    showError(String(err.message || err));
  } finally {
    ready();
  }
});
