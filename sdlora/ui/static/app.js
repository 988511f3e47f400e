// sdlora ui: the page. Plain JavaScript, no build step; every call goes to this server's /api.
"use strict";

let csrfToken = null;
let schema = [];
let selectedJob = null;
let events = null;
let lossPoints = [];
let valPoints = [];

const $ = (selector, root = document) => root.querySelector(selector);

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") {
    if (csrfToken === null) csrfToken = (await (await fetch("/api/csrf")).json()).token;
    headers["X-CSRF-Token"] = csrfToken;
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const value = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) throw Object.assign(new Error(value.error || `HTTP ${response.status}`), {option: value.option});
  return value;
}

function say(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  for (const button of document.querySelectorAll("#tabs button")) button.classList.toggle("active", button.dataset.tab === name);
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.id === `tab-${name}`);
  if (name === "jobs") refreshJobs();
}

// ---------------------------------------------------------------- the training form, from the options' sections

const OPEN_SECTIONS = new Set(["data", "base", "network", "optimization", "run"]);

function buildForm(sections) {
  const container = $("#train-sections");
  container.textContent = "";
  for (const section of sections) {
    const details = document.createElement("details");
    details.className = "section";
    details.dataset.section = section.name;
    details.open = OPEN_SECTIONS.has(section.name);
    const summary = document.createElement("summary");
    summary.textContent = section.title;
    details.append(summary);
    const description = document.createElement("p");
    description.className = "note";
    description.textContent = section.description;
    details.append(description);
    for (const option of section.options) details.append(optionField(option));
    container.append(details);
  }
}

function optionField(option) {
  const row = document.createElement("div");
  row.className = "field";
  row.dataset.option = option.name;
  const label = document.createElement("label");
  label.htmlFor = `opt-${option.name}`;
  label.textContent = option.name + (option.required ? " *" : "");
  let input;
  if (option.type === "bool" && !option.optional) {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = option.default === true;
  } else if (option.choices || option.type === "bool") {
    input = document.createElement("select");
    const values = option.choices || ["true", "false"];
    if (option.optional) input.append(new Option(`(default${option.default === null ? "" : ": " + option.default})`, ""));
    for (const value of values) input.append(new Option(value, value));
    if (!option.optional) input.value = String(option.default);
  } else if (option.type === "list") {
    input = document.createElement("textarea");
    input.rows = 2;
    input.placeholder = option.items === "str" ? "one per line" : "numbers, by commas or one per line";
    input.value = (option.default || []).join("\n");
  } else {
    input = document.createElement("input");
    input.type = "text";
    if (option.type === "int" || option.type === "float") input.inputMode = "decimal";
    input.placeholder = option.default === null || option.default === "" ? (option.path ? "path" : "") : String(option.default);
  }
  input.id = `opt-${option.name}`;
  input.name = option.name;
  const help = document.createElement("small");
  help.textContent = option.help + (option.default !== null && option.default !== "" && option.type !== "list" ? ` (default: ${option.default})` : "");
  const error = document.createElement("span");
  error.className = "error field-error";
  error.id = `err-${option.name}`;
  row.append(label, input, help, error);
  return row;
}

// the form's values as config.toml keys: only what differs from the defaults; a number field's text that is not a
// number goes as text, so the server's message says what it must be
function formOptions() {
  const options = {};
  for (const section of schema) {
    for (const option of section.options) {
      const input = document.getElementById(`opt-${option.name}`);
      let value;
      if (input.type === "checkbox") {
        if (input.checked === option.default) continue;
        value = input.checked;
      } else if (option.type === "list") {
        value = input.value.split(option.items === "str" ? "\n" : /[\n,]/).map((line) => line.trim()).filter((line) => line);
        if (option.items !== "str") value = value.map((text) => (Number.isNaN(Number(text)) ? text : Number(text)));
        if (JSON.stringify(value) === JSON.stringify(option.default)) continue;
      } else {
        const text = input.value.trim();
        if (text === "" || (!option.optional && text === String(option.default))) continue;
        if (option.type === "bool") value = text === "true";
        else if ((option.type === "int" || option.type === "float") && text !== "" && !Number.isNaN(Number(text))) value = Number(text);
        else value = text;
      }
      options[option.name] = value;
    }
  }
  return options;
}

// a preset's options into the form: each field shows the preset's value, or its default where the preset has none
function fillForm(options) {
  for (const section of schema) {
    for (const option of section.options) {
      const input = document.getElementById(`opt-${option.name}`);
      const given = Object.prototype.hasOwnProperty.call(options, option.name);
      const value = given ? options[option.name] : option.default;
      if (input.type === "checkbox") input.checked = value === true;
      else if (option.type === "list") input.value = (value || []).join("\n");
      else if (input.tagName === "SELECT") input.value = value === null || (!given && option.optional) ? "" : String(value);
      else input.value = given && value !== null ? String(value) : "";
    }
  }
  modelChanged();
}

// the options training leaves to the model (resolution, buckets, gradient checkpointing): their shown defaults follow
// the model field's family; a field left empty still goes as unset, so the trainer decides as the form says
const MODEL_DEFAULTS = ["resolution", "buckets", "gradient_checkpointing"];
let modelTimer = null;
let modelAsked = 0;

function modelChanged() {
  clearTimeout(modelTimer);
  modelTimer = setTimeout(showModelDefaults, 250);
}

async function showModelDefaults() {
  const input = document.getElementById("opt-model");
  const model = input.value.trim() || input.placeholder;
  const asked = ++modelAsked;
  let answer;
  try {
    answer = await api("GET", `/api/model?model=${encodeURIComponent(model)}`);
  } catch (error) {
    answer = {family: null, label: null, defaults: {}, error: error.message};
  }
  if (asked !== modelAsked) return; // a later model name was typed meanwhile
  const field = document.querySelector('.field[data-option="model"]');
  let info = $(".model-family", field);
  if (!info) {
    info = document.createElement("span");
    info.className = "model-family note";
    field.append(info);
  }
  info.textContent = answer.label ? `${answer.label} model` : answer.error || "family unknown until it loads";
  info.classList.toggle("error", Boolean(answer.error));
  const option = (name) => schema.flatMap((section) => section.options).find((item) => item.name === name);
  for (const name of MODEL_DEFAULTS) {
    const value = answer.defaults[name] === undefined ? null : answer.defaults[name];
    const target = document.getElementById(`opt-${name}`);
    const own = option(name).default;
    const shown = value === null ? own : value;
    const suffix = value === null || !answer.label ? "" : ` for this ${answer.label} model`;
    target.dataset.modelDefault = shown === null ? "" : String(shown);
    if (target.tagName === "SELECT") target.options[0].text = `(default${shown === null ? "" : ": " + shown}${suffix})`;
    else target.placeholder = shown === null ? "" : `${shown}${suffix}`;
  }
}

async function presetAction(action) {
  clearErrors();
  const message = $("#preset-message");
  const path = $("#preset-path").value.trim();
  try {
    if (action === "load") {
      const preset = await api("GET", `/api/presets?path=${encodeURIComponent(path)}`);
      showPreset(preset, `loaded ${preset.path}`);
    } else if (action === "save") {
      const saved = await api("POST", "/api/presets", {path, options: formOptions()});
      say(message, `saved ${saved.path}`);
      listPresets();
    } else {
      const {toml} = await api("POST", "/api/toml", formOptions());
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([toml], {type: "application/toml"}));
      link.download = (path.split("/").pop() || "config.toml").replace(/(\.toml)?$/, ".toml");
      link.click();
      URL.revokeObjectURL(link.href);
      say(message, `downloaded ${link.download}`);
    }
  } catch (error) {
    if (action === "load") say(message, error.message, true);
    else showOptionError(error, message);
  }
}

// the .toml files under the roots, offered as the preset field's choices (asked again when the field is entered)
async function listPresets() {
  try {
    const {presets} = await api("GET", "/api/presets");
    $("#preset-list").replaceChildren(...presets.map((path) => new Option(path, path)));
  } catch (error) {
    // the list is a convenience: a path can still be typed
  }
}

async function uploadPreset(event) {
  const file = event.target.files[0];
  if (!file) return;
  try {
    showPreset(await api("POST", "/api/presets/parse", {toml: await file.text(), name: file.name}), `loaded ${file.name}`);
  } catch (error) {
    say($("#preset-message"), error.message, true);
  }
  event.target.value = "";
}

function showPreset(preset, text) {
  fillForm(preset.options);
  const leftOut = preset.left_out.length ? ` (not a field of this form, left out: ${preset.left_out.join(", ")})` : "";
  say($("#preset-message"), text + leftOut);
}

function clearErrors() {
  for (const element of document.querySelectorAll(".field-error")) element.textContent = "";
  for (const element of document.querySelectorAll(".field.invalid")) element.classList.remove("invalid");
}

function showOptionError(error, message = $("#train-message")) {
  say(message, error.message, true);
  if (!error.option) return;
  const field = document.querySelector(`.field[data-option="${error.option}"]`);
  if (!field) return;
  field.classList.add("invalid");
  $(".field-error", field).textContent = error.message;
  field.closest("details").open = true;
  field.scrollIntoView({block: "center"});
}

async function submitTraining(start, asToml = false) {
  clearErrors();
  const message = $("#train-message");
  const tomlText = $("#train-toml-text");
  tomlText.hidden = true;
  say(message, start ? "starting..." : "checking...");
  try {
    if (asToml) {
      tomlText.textContent = "# sdlora train --config this.toml\n" + (await api("POST", "/api/toml", formOptions())).toml;
      tomlText.hidden = false;
      say(message, "the options are valid");
    } else if (start) {
      const {id} = await api("POST", "/api/jobs", formOptions());
      say(message, `job ${id} queued`);
      selectJob(id);
      showTab("jobs");
    } else {
      await api("POST", "/api/check", formOptions());
      say(message, "the options are valid");
    }
  } catch (error) {
    showOptionError(error);
  }
}

// ---------------------------------------------------------------- jobs

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await api("GET", "/api/jobs")).jobs;
  } catch (error) {
    return;
  }
  const body = $("#job-table tbody");
  body.textContent = "";
  for (const job of jobs.slice().reverse()) {
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    row.classList.toggle("selected", job.id === selectedJob);
    const progress = job.command === "train" ? `${job.step} / ${job.steps}` : `sdlora ${job.command}`;
    const cells = [job.id, job.status, progress, job.loss === null ? "" : job.loss.toFixed(4), job.output_dir];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    row.addEventListener("click", () => selectJob(job.id));
    body.append(row);
  }
  if (selectedJob === null && jobs.length) {
    const active = jobs.find((job) => job.status === "running" || job.status === "queued");
    selectJob((active || jobs[jobs.length - 1]).id);
  }
}

function selectJob(id) {
  selectedJob = id;
  for (const row of document.querySelectorAll("#job-table tbody tr")) row.classList.toggle("selected", Number(row.dataset.job) === id);
  if (events) events.close();
  lossPoints = [];
  valPoints = [];
  $("#job-samples").textContent = "";
  $("#job-detail").hidden = false;
  $("#job-id").textContent = id;
  say($("#job-message"), "");
  drawChart();
  events = new EventSource(`/api/jobs/${id}/events`);
  events.addEventListener("metrics", (event) => {
    const record = JSON.parse(event.data);
    if (typeof record.loss === "number") lossPoints.push([record.step, record.loss]);
    if (typeof record.val_loss === "number") valPoints.push([record.step, record.val_loss]);
    drawChart();
  });
  events.addEventListener("reset", () => {
    lossPoints = [];
    valPoints = [];
    drawChart();
  });
  events.addEventListener("sample", (event) => {
    const sample = JSON.parse(event.data);
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = sample.url;
    image.alt = sample.name;
    const caption = document.createElement("figcaption");
    caption.textContent = sample.name;
    figure.append(image, caption);
    $("#job-samples").prepend(figure);
  });
  events.addEventListener("job", (event) => showJob(JSON.parse(event.data)));
  events.addEventListener("end", () => {
    events.close();
    refreshJobs();
    refreshLog(id);
  });
  refreshLog(id);
}

function showJob(job) {
  if (job.id !== selectedJob) return;
  $("#job-status").textContent = job.status;
  $("#job-status").className = `status-${job.status}`;
  const fraction = job.steps ? Math.min(1, job.step / job.steps) : 0;
  $("#job-bar").style.width = `${(100 * fraction).toFixed(1)}%`;
  $("#job-bar").dataset.step = job.step;
  $("#job-step").textContent = `step ${job.step} / ${job.steps}`;
  $("#job-loss").textContent = job.loss === null ? "" : `loss ${job.loss.toFixed(4)}`;
  $("#job-output").textContent = job.output_dir;
  $("#job-error").textContent = job.error || "";
  // an image job (sdlora grid / generate): its pictures where a training's samples go
  for (const image of job.images || []) {
    if (document.querySelector(`#job-samples img[data-image="${CSS.escape(image)}"]`)) continue;
    const picture = document.createElement("img");
    picture.src = `/api/jobs/${job.id}/images/${encodeURIComponent(image)}`;
    picture.alt = image;
    picture.dataset.image = image;
    $("#job-samples").append(picture);
  }
  $("#job-stop").disabled = !(job.status === "running" || job.status === "queued");
  $("#job-resume").disabled = !job.can_resume;
  refreshJobs();
  refreshLog(job.id);
}

async function refreshLog(id) {
  try {
    const {lines} = await api("GET", `/api/jobs/${id}/log`);
    if (id !== selectedJob) return;
    const log = $("#job-log");
    log.textContent = lines.join("\n");
    log.scrollTop = log.scrollHeight;
  } catch (error) {
    // the log is a convenience: the job's state comes from its events
  }
}

async function jobAction(action) {
  const message = $("#job-message");
  try {
    const job = await api("POST", `/api/jobs/${selectedJob}/${action}`);
    say(message, action === "stop" ? "stopping (the last checkpoint is kept)..." : "queued again from its last checkpoint");
    if (action === "resume") selectJob(job.id);
    else showJob(job);
  } catch (error) {
    say(message, error.message, true);
  }
}

function drawChart() {
  const canvas = $("#loss-chart");
  const context = canvas.getContext("2d");
  const {width, height} = canvas;
  const pad = 44;
  context.clearRect(0, 0, width, height);
  context.strokeStyle = "#999";
  context.strokeRect(pad, 8, width - pad - 8, height - pad);
  canvas.dataset.points = lossPoints.length;
  const all = lossPoints.concat(valPoints);
  if (!all.length) return;
  const steps = all.map((point) => point[0]);
  const values = all.map((point) => point[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  let [y0, y1] = [Math.min(...values), Math.max(...values)];
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const x = (step) => pad + ((step - x0) / (x1 - x0)) * (width - pad - 8);
  const y = (value) => 8 + (1 - (value - y0) / (y1 - y0)) * (height - pad);
  const line = (points, colour, dots = true) => {
    context.strokeStyle = colour;
    context.fillStyle = colour;
    context.beginPath();
    points.forEach(([step, value], index) => (index ? context.lineTo(x(step), y(value)) : context.moveTo(x(step), y(value))));
    context.stroke();
    if (dots) for (const [step, value] of points) context.fillRect(x(step) - 1.5, y(value) - 1.5, 3, 3);
  };
  line(lossPoints, "#a9c4f0");
  // the training loss smoothed as TensorBoard's slider at 0.9 does (a moving average, debiased at the start)
  let average = 0;
  const smoothed = lossPoints.map(([step, value], index) => {
    average = 0.9 * average + 0.1 * value;
    return [step, average / (1 - 0.9 ** (index + 1))];
  });
  line(smoothed, "#1c4fa3", false);
  line(valPoints, "#d9480f");
  context.fillStyle = "#333";
  context.font = "11px sans-serif";
  context.fillText(y1.toPrecision(4), 2, 16);
  context.fillText(y0.toPrecision(4), 2, height - pad + 8);
  context.fillText(`step ${x0}`, pad, height - pad + 22);
  context.fillText(`step ${x1}`, width - 70, height - pad + 22);
  context.fillText(`training loss (light blue; smoothed: dark blue)${valPoints.length ? ", held-out loss (orange)" : ""}`, pad + 120, height - 6);
}

// ---------------------------------------------------------------- the dataset

async function showDataset(event) {
  if (event) event.preventDefault();
  const form = $("#dataset-form").elements;
  const message = $("#dataset-message");
  const extension = form.caption_extension.value;
  for (const id of ["#dataset-problems", "#dataset-subsets", "#dataset-tags", "#dataset-images"]) $(id).textContent = "";
  let dataset;
  try {
    dataset = await api("GET", `/api/datasets?dir=${encodeURIComponent(form.dir.value)}&caption_extension=${encodeURIComponent(extension)}`);
  } catch (error) {
    say(message, error.message, true);
    return;
  }
  say(message, `${dataset.images.length} image(s) in ${dataset.folder}`);
  for (const problem of dataset.problems) {
    const item = document.createElement("li");
    item.textContent = problem;
    $("#dataset-problems").append(item);
  }
  if (dataset.subsets.length) {
    $("#dataset-subsets").textContent = "subsets: " + dataset.subsets.map((subset) => `${subset.name} (${subset.images} images x ${subset.repeats} repeats)`).join(", ");
  }
  const shownTags = dataset.tags.slice(0, 12);
  const moreTags = dataset.tags.length - shownTags.length;
  $("#dataset-tags").textContent = shownTags.length
    ? "tags: " + shownTags.map(([tag, count]) => `${tag} (${count})`).join(", ") + (moreTags > 0 ? `, and ${moreTags} more` : "")
    : "";
  for (const image of dataset.images) $("#dataset-images").append(imageCard(dataset.folder, image, extension));
}

function imageCard(folder, image, extension) {
  const card = document.createElement("figure");
  card.className = "image-card";
  card.dataset.path = image.path;
  const picture = document.createElement("img");
  picture.src = image.thumb;
  picture.alt = image.path;
  picture.loading = "lazy";
  const name = document.createElement("figcaption");
  name.textContent = `${image.path} (${image.width}x${image.height}${image.subset ? ", " + image.subset : ""})`;
  const caption = document.createElement("textarea");
  caption.rows = 3;
  caption.value = image.caption;
  caption.placeholder = "no caption";
  const save = document.createElement("button");
  save.textContent = "Save caption";
  const status = document.createElement("span");
  status.className = "message";
  save.addEventListener("click", async () => {
    try {
      const written = await api("PUT", "/api/datasets/caption", {image: `${folder}/${image.path}`, caption: caption.value, caption_extension: extension});
      say(status, `saved to ${written.caption_file.split("/").pop()}`);
    } catch (error) {
      say(status, error.message, true);
    }
  });
  card.append(picture, name, caption, save, status);
  return card;
}

// ---------------------------------------------------------------- the tools

async function listLoras(event) {
  event.preventDefault();
  const message = $("#loras-message");
  const body = $("#lora-table tbody");
  body.textContent = "";
  try {
    const {loras, other_files: other} = await api("GET", `/api/loras?dir=${encodeURIComponent(new FormData(event.target).get("dir"))}`);
    say(message, `${loras.length} LoRA file(s)` + (other ? `, ${other} other .safetensors file(s)` : ""));
    for (const lora of loras) {
      const row = document.createElement("tr");
      const cells = lora.error
        ? [lora.name, lora.error]
        : [lora.name, lora.format, lora.architecture, lora.kinds.join(", "), lora.modules, lora.rank, lora.alpha, lora.trigger_words.join(" | ")];
      for (const value of cells) {
        const cell = document.createElement("td");
        cell.textContent = value;
        cell.title = value;
        row.append(cell);
      }
      if (lora.error) row.lastChild.colSpan = 7;
      row.addEventListener("click", () => inspect(lora.path));
      body.append(row);
    }
  } catch (error) {
    say(message, error.message, true);
  }
}

async function inspect(path) {
  $("#inspect-form").elements.path.value = path;
  const message = $("#inspect-message");
  try {
    const info = await api("GET", `/api/inspect?path=${encodeURIComponent(path)}`);
    $("#inspect-output").textContent = JSON.stringify(info, null, 2);
    say(message, "");
  } catch (error) {
    $("#inspect-output").textContent = "";
    say(message, error.message, true);
  }
}

async function runTool(event, path, body, message) {
  event.preventDefault();
  say(message, "working...");
  try {
    const result = await api("POST", path, body);
    say(message, `wrote ${result.output} (${result.modules} modules)`);
  } catch (error) {
    say(message, error.message, true);
  }
}

function mergeBody(form) {
  const loras = form.elements.loras.value.split("\n").map((line) => line.trim()).filter((line) => line).map((line) => {
    const match = line.match(/^(.*):(-?[0-9.]+)$/);
    return match ? {path: match[1], scale: Number(match[2])} : {path: line, scale: 1};
  });
  return {model: form.elements.model.value, loras, output: form.elements.output.value};
}

// ---------------------------------------------------------------- image jobs: the X/Y comparison and the generate box

const lines = (text) => text.split("\n").map((line) => line.trim()).filter((line) => line);
// a comma-separated field as a list of numbers (a text that is no number goes as text: the server says what it must be)
const numbers = (text) => text.split(",").map((item) => item.trim()).filter((item) => item).map((item) => (Number.isNaN(Number(item)) ? item : Number(item)));
const optionalNumber = (text) => (text.trim() === "" ? null : Number.isNaN(Number(text)) ? text : Number(text));

function gridBody(form) {
  const e = form.elements;
  return {
    model: e.model.value.trim(), lora_steps: lines(e.lora_steps.value), weights: numbers(e.weights.value), prompts: lines(e.prompts.value),
    seeds: numbers(e.seeds.value), steps: numbers(e.steps.value), guidance: numbers(e.guidance.value),
    samplers: e.samplers.value.split(",").map((item) => item.trim()).filter((item) => item),
    x: e.x.value.trim() || null, y: e.y.value.trim() || null, lora_dir: e.lora_dir.value.trim() || null,
    width: optionalNumber(e.width.value), height: optionalNumber(e.height.value),
  };
}

function generateBody(form) {
  const e = form.elements;
  return {
    model: e.model.value.trim(), prompt: e.prompt.value, lora_dir: e.lora_dir.value.trim() || null, negative_prompt: e.negative_prompt.value,
    seed: optionalNumber(e.seed.value), steps: optionalNumber(e.steps.value), guidance: optionalNumber(e.guidance.value),
    sampler: e.sampler.value.trim() || null, width: optionalNumber(e.width.value), height: optionalNumber(e.height.value),
  };
}

// queue the job, then follow it until it ends and show its pictures (the labelled grid first, then each cell)
async function runImageJob(event, path, body, name) {
  event.preventDefault();
  const message = $(`#${name}-message`);
  const shown = $(`#${name}-images`);
  shown.textContent = "";
  let id;
  try {
    id = (await api("POST", path, body)).id;
  } catch (error) {
    say(message, error.message, true);
    return;
  }
  say(message, `job ${id} queued (see Jobs)...`);
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    let job;
    try {
      job = await api("GET", `/api/jobs/${id}`);
    } catch (error) {
      say(message, error.message, true);
      return;
    }
    if (job.status === "queued" || job.status === "running") {
      say(message, `job ${id} ${job.status}...`);
      continue;
    }
    if (job.status !== "done") {
      say(message, `job ${id} ${job.status}: ${job.error || ""}`, true);
      return;
    }
    say(message, `job ${id} done: ${job.output_dir}`);
    // a comparison: its labelled grid (each cell is a file beside it); generated images: each one
    const pictures = job.command === "grid" ? job.images.filter((image) => image === "grid.png") : job.images.filter((image) => image !== "grid.png");
    for (const image of pictures) {
      const link = document.createElement("a");
      link.href = `/api/jobs/${id}/images/${encodeURIComponent(image)}`;
      link.target = "_blank";
      const picture = document.createElement("img");
      picture.src = link.href;
      picture.alt = image;
      picture.title = image;
      picture.className = job.command === "grid" ? "grid" : "cell";
      link.append(picture);
      shown.append(link);
    }
    return;
  }
}

// ---------------------------------------------------------------- start

async function start() {
  for (const button of document.querySelectorAll("#tabs button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  const options = await api("GET", "/api/options");
  schema = options.sections;
  $("#roots").textContent = `roots: ${options.roots.join(", ")}`;
  buildForm(schema);
  $("#train-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitTraining(true);
  });
  $("#train-check").addEventListener("click", () => submitTraining(false));
  $("#train-toml").addEventListener("click", () => submitTraining(false, true));
  for (const action of ["load", "save", "download"]) $(`#preset-${action}`).addEventListener("click", () => presetAction(action));
  $("#preset-upload").addEventListener("change", uploadPreset);
  $("#preset-path").addEventListener("focus", listPresets);
  listPresets();
  document.getElementById("opt-model").addEventListener("input", modelChanged);
  await showModelDefaults();
  $("#job-stop").addEventListener("click", () => jobAction("stop"));
  $("#job-resume").addEventListener("click", () => jobAction("resume"));
  $("#loras-form").addEventListener("submit", listLoras);
  $("#dataset-form").addEventListener("submit", showDataset);
  $("#inspect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    inspect(event.target.elements.path.value);
  });
  $("#convert-form").addEventListener("submit", (event) => {
    const form = event.target.elements;
    runTool(event, "/api/convert", {input: form.input.value, output: form.output.value, to: form.to.value}, $("#convert-message"));
  });
  $("#merge-form").addEventListener("submit", (event) => runTool(event, "/api/merge", mergeBody(event.target), $("#merge-message")));
  $("#grid-form").addEventListener("submit", (event) => runImageJob(event, "/api/grid", gridBody(event.target), "grid"));
  $("#generate-form").addEventListener("submit", (event) => runImageJob(event, "/api/generate", generateBody(event.target), "generate"));
  await refreshJobs();
  if (selectedJob !== null) showTab("jobs");
  setInterval(() => {
    if ($("#tab-jobs").classList.contains("active")) refreshJobs();
  }, 3000);
  document.body.dataset.ready = "true";
}

start();
