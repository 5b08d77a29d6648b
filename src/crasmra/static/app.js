// The page of `crasmra serve`: upload or drop an image, show the JSON API's answer.
// Everything from the server is written with textContent or as image sources, never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  let info = null;
  let latest = 0; // only the newest request's answer is shown

  function setStatus(text) { $("status").textContent = text; }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    setStatus("");
    document.body.dataset.state = "error";
  }

  function clearError() { $("error").hidden = true; $("error").textContent = ""; }

  async function getJSON(url) {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    return body;
  }

  function percent(p) { return `${(100 * p).toFixed(p >= 0.9995 ? 0 : 1)}%`; }

  function image(src, alt, className) {
    const img = document.createElement("img");
    img.src = src; img.alt = alt; img.className = className;
    return img;
  }

  function figure(img, caption) {
    const fig = document.createElement("figure");
    const cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.append(img, cap);
    return fig;
  }

  function render(result, name) {
    $("input-image").src = result.input;
    const list = $("top5");
    list.replaceChildren();
    for (const row of result.top_k) {
      const li = document.createElement("li");
      const rank = document.createElement("span");
      rank.className = "rank"; rank.textContent = `${row.rank}.`;
      const label = document.createElement("span");
      label.className = "label"; label.textContent = row.label;
      const prob = document.createElement("span");
      prob.className = "prob"; prob.textContent = percent(row.probability);
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.max(0.5, 100 * row.probability)}%`;
      bar.append(fill);
      li.append(rank, label, prob, document.createElement("span"), bar);
      list.append(li);
    }
    const stages = $("stages");
    stages.replaceChildren();
    for (const stage of result.stages) {
      const card = document.createElement("div");
      card.className = "stage";
      const title = document.createElement("h3");
      title.textContent = stage.name;
      const pair = document.createElement("div");
      pair.className = "pair";
      pair.append(
        figure(image(stage.gradcam, `Grad-CAM, ${stage.name}`, "gradcam"), "Grad-CAM"),
        figure(image(stage.activation, `activation map, ${stage.name}`, "activation"),
               "activation"),
      );
      card.append(title, pair);
      stages.append(card);
    }
    $("results").hidden = false;
    const [w, h] = result.image_size;
    setStatus(`${name} (${w}×${h}): ${result.top_k[0].label}, ` +
              `${percent(result.top_k[0].probability)} · ${Math.round(result.elapsed_ms)} ms`);
    document.body.dataset.state = "done";
  }

  async function analyse(file, name) {
    clearError();
    if (info && file.size > info.max_upload_bytes) {
      showError(`${name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; this server accepts ` +
                `at most ${(info.max_upload_bytes / 2 ** 20).toFixed(0)} MiB.`);
      return;
    }
    const id = ++latest;
    document.body.dataset.state = "busy";
    setStatus(`Analysing ${name}…`);
    const form = new FormData();
    form.append("image", file, name);
    let response;
    let body;
    try {
      response = await fetch("/api/predict", { method: "POST", body: form });
      body = await response.json().catch(() => ({}));
    } catch (err) {
      if (id === latest) showError(`The server cannot be reached (${err.message}).`);
      return;
    }
    if (id !== latest) return;
    if (!response.ok) {
      showError(body.error || `The server answered HTTP ${response.status}.`);
      return;
    }
    render(body, name);
  }

  async function loadExamples() {
    let examples;
    try { examples = await getJSON("/api/examples"); } catch { return; }
    if (!examples.length) return;
    const box = $("examples");
    for (const ex of examples) {
      const button = document.createElement("button");
      button.type = "button";
      button.title = `Try this example (${ex.label})`;
      const caption = document.createElement("span");
      caption.textContent = ex.label;
      button.append(image(ex.url, ex.label, "example"), caption);
      button.addEventListener("click", async () => {
        const response = await fetch(ex.url);
        const blob = await response.blob();
        analyse(blob, `example ${ex.index + 1}`);
      });
      box.append(button);
    }
    $("examples-box").hidden = false;
  }

  function setUpInput() {
    const input = $("file");
    input.addEventListener("change", () => {
      if (input.files.length) analyse(input.files[0], input.files[0].name);
      input.value = ""; // choosing the same file again fires "change" again
    });
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      const file = e.dataTransfer.files[0];
      if (file) analyse(file, file.name);
    });
    drop.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
    });
  }

  async function start() {
    setUpInput();
    try {
      info = await getJSON("/api/info");
      const size = Array.isArray(info.image_size) ? info.image_size.join("×") : info.image_size;
      $("model-info").textContent = `${info.checkpoint} · ${info.backbone} · ${info.variant} · ` +
        `${info.num_classes} classes · ${size} px · stages ${info.stage_names.join(", ")}`;
    } catch (err) {
      showError(`Cannot read the model description: ${err.message}`);
    }
    loadExamples();
    document.body.dataset.state = "ready";
  }

  start();
})();
