// ringserve console: one image at a time over REST, or the webcam over /ws/stream, and the
// appliance's numbers from /api/v1/stats. Plain browser JavaScript: no build step, no CDN.
"use strict";

(() => {
  const KEY_STORAGE = "ringserve.apiKey";
  const STATS_EVERY_MS = 3000;
  const MAX_SIDE = 1600; // canvas pixels; the boxes are scaled to it
  const STREAM_SIDE = 640; // webcam frames are sent at most this large
  const STREAM_IN_FLIGHT = 2; // frames sent and not yet answered: the server keeps one running, one waiting
  // Dark enough for white label text (contrast >= 4.5:1).
  const PALETTE = ["#b3261e", "#0b57d0", "#146c2e", "#8e24aa", "#8a4b00", "#00695c", "#c2185b", "#3949ab",
    "#5d4037", "#37474f"];

  const $ = (id) => document.getElementById(id);
  const els = {
    badge: $("engine-badge"), keyButton: $("key-button"), model: $("model"), confidence: $("confidence"),
    confidenceValue: $("confidence-value"), file: $("file"), send: $("send"), webcam: $("webcam"),
    webcamNote: $("webcam-note"), drop: $("drop"), canvas: $("canvas"), message: $("message"), live: $("live"),
    fps: $("fps"), detections: $("detections"), detectionsEmpty: $("detections-empty"), timingBar: $("timing-bar"),
    timings: $("timings"), video: $("video"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
    keyReason: $("key-reason"), keyInput: $("key-input"), keyCancel: $("key-cancel"),
    stat: {
      engine: $("stat-engine"), providers: $("stat-providers"), models: $("stat-models"), rps: $("stat-rps"),
      ips: $("stat-ips"), p99: $("stat-p99"), batch: $("stat-batch"), queue: $("stat-queue"),
      total: $("stat-total"), rings: $("stat-rings"), updated: $("stat-updated"),
    },
  };
  const ctx = els.canvas.getContext("2d");

  let defaultModel = "";
  let modelPicked = false; // the user chose a model: the default no longer overrides it
  let modelsKey = null; // the served models the picker was built from
  let features = { stream: false };
  let image = null; // { file, img, url, name }
  let predictSeq = 0;
  let statsTimer = 0;

  class ApiError extends Error {
    constructor(status, error, detail) {
      super(`${error}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
      this.status = status;
    }
  }

  const colorOf = (classId) => PALETTE[Math.abs(classId | 0) % PALETTE.length];
  const fmt = (x, digits = 1) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));
  const showMessage = (text) => { els.message.textContent = text; };

  function span(className, text) {
    const s = document.createElement("span");
    s.className = className;
    if (text !== undefined) s.textContent = text;
    return s;
  }

  // ------------------------------------------------------------------ API key and requests
  let keyPrompt = null; // one dialog for every request that got a 401 at the same time
  let keyDeclined = false; // cancelled: the stats polling must not open the dialog again (the button does)

  function askKey(reason) {
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      const dialog = els.keyDialog;
      els.keyReason.textContent = reason;
      els.keyInput.value = "";
      dialog.returnValue = "";
      dialog.addEventListener("close", () => {
        const key = dialog.returnValue === "ok" ? els.keyInput.value.trim() : "";
        if (key) sessionStorage.setItem(KEY_STORAGE, key);
        keyDeclined = !key;
        els.keyButton.hidden = false;
        updateWebcamAvailability();
        keyPrompt = null;
        resolve(key || null);
      }, { once: true });
      dialog.showModal();
      els.keyInput.focus();
    });
    return keyPrompt;
  }

  // fetch with the key; on a 401, ask for a key and try again (until the user cancels)
  async function api(path, init = {}) {
    for (;;) {
      const key = sessionStorage.getItem(KEY_STORAGE);
      const headers = new Headers(init.headers);
      if (key) headers.set("X-API-Key", key);
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      if (key && sessionStorage.getItem(KEY_STORAGE) === key) sessionStorage.removeItem(KEY_STORAGE);
      const next = sessionStorage.getItem(KEY_STORAGE) || (keyDeclined ? null : await askKey(key
        ? "That API key was refused. Enter another one."
        : "This appliance needs an API key."));
      if (!next) throw new ApiError(401, "unauthorized", "an API key is required (use the API key button)");
    }
  }

  async function getJSON(path, init) {
    const response = await api(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, body?.error ?? `HTTP ${response.status}`, body?.detail ?? response.statusText);
    }
    return body;
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    const body = await getJSON("api/v1/models");
    const wanted = modelPicked ? els.model.value : defaultModel;
    const options = body.models.map((m) => new Option(`${m.name} (${m.task}, v${m.latest})`, m.name));
    if (!options.length) options.push(new Option("no model is served yet", ""));
    els.model.replaceChildren(...options);
    if (options.some((o) => o.value === wanted)) els.model.value = wanted;
  }

  // ------------------------------------------------------------------ drawing
  // Draw `source` scaled to the (width x height) image the result's boxes refer to, then the boxes.
  function render(source, width, height, result) {
    const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
    const w = Math.max(1, Math.round(width * scale));
    const h = Math.max(1, Math.round(height * scale));
    if (els.canvas.width !== w || els.canvas.height !== h) {
      els.canvas.width = w;
      els.canvas.height = h;
    }
    ctx.drawImage(source, 0, 0, w, h);
    const line = Math.max(2, Math.round(Math.max(w, h) / 300));
    const font = Math.max(12, Math.round(Math.max(w, h) / 40));
    ctx.font = `600 ${font}px system-ui, "DejaVu Sans", sans-serif`;
    ctx.textBaseline = "top";
    const detections = result?.detections ?? [];
    for (const d of detections) {
      const [x1, y1, x2, y2] = d.bbox.map((v) => v * scale);
      const color = colorOf(d.class_id);
      ctx.lineWidth = line;
      ctx.strokeStyle = color;
      // inside the box, so that a box at the image's edge keeps all four sides
      ctx.strokeRect(x1 + line / 2, y1 + line / 2, Math.max(0, x2 - x1 - line), Math.max(0, y2 - y1 - line));
      label(`${d.label} ${Math.round(d.confidence * 100)}%`, color, x1, y1, font, w);
    }
    (result?.classes ?? []).slice(0, 3).forEach((c, i) => {
      label(`${c.label} ${Math.round(c.confidence * 100)}%`, colorOf(c.class_id), 0, i * (font + 8), font, w, true);
    });
    els.canvas.dataset.boxes = String(detections.length);
    els.canvas.dataset.scale = String(scale);
    els.canvas.dataset.line = String(line);
    els.drop.classList.remove("empty");
  }

  function label(text, color, x, y, font, canvasWidth, inside = false) {
    const tw = ctx.measureText(text).width + 8;
    const th = font + 6;
    const top = inside || y - th < 0 ? y : y - th; // above the box when there is room
    const left = Math.max(0, Math.min(x, canvasWidth - tw));
    ctx.fillStyle = color;
    ctx.fillRect(left, top, tw, th);
    ctx.fillStyle = "#ffffff";
    ctx.fillText(text, left + 4, top + 3);
  }

  function describe(result) {
    const items = result.detections ?? result.classes ?? [];
    if (!items.length) return "nothing above the threshold";
    return items.map((d) => `${d.label} ${Math.round(d.confidence * 100)}%`).join(", ");
  }

  function showResults(result) {
    const items = result.detections ?? result.classes ?? [];
    els.detections.replaceChildren(...items.map((d) => {
      const li = document.createElement("li");
      li.dataset.label = d.label;
      const swatch = span("swatch");
      swatch.style.background = colorOf(d.class_id);
      li.append(swatch, span("name", d.label), span("conf", `${(d.confidence * 100).toFixed(1)}%`));
      if (d.bbox) {
        li.dataset.bbox = JSON.stringify(d.bbox);
        li.title = `box ${d.bbox.map((v) => Math.round(v)).join(", ")} (pixels of the image)`;
      }
      return li;
    }));
    els.detectionsEmpty.textContent = "Nothing above the threshold.";
    els.detectionsEmpty.hidden = items.length > 0;
    els.canvas.setAttribute("aria-label", `${result.image.width}×${result.image.height} image: ${describe(result)}`);
  }

  function showTimings(result, roundTripMs) {
    const t = result.timings;
    const other = Math.max(0, roundTripMs - t.decode_ms - t.queue_ms - t.inference_ms);
    const parts = [
      ["decode", "Decode + resize", t.decode_ms], ["queue", "Engine queue", t.queue_ms],
      ["inference", "Inference", t.inference_ms], ["other", "HTTP, network, browser", other],
    ];
    els.timingBar.replaceChildren(...parts.map(([key, , ms]) => {
      const s = span(`t-${key}`);
      s.style.flexGrow = String(Math.max(ms, 0.01));
      return s;
    }));
    const rows = parts.map(([key, name, ms]) => [name, `${fmt(ms)} ms`, key]);
    rows.push(["Server total", `${fmt(t.total_ms)} ms`], ["Round trip", `${fmt(roundTripMs)} ms`],
      ["Batch size", String(result.batch_size)], ["Model", `${result.model.name} v${result.model.version}`]);
    els.timings.replaceChildren(...rows.flatMap(([name, value, key]) => {
      const dt = document.createElement("dt");
      if (key) dt.append(span(`key t-${key}`));
      dt.append(name);
      const dd = document.createElement("dd");
      dd.textContent = value;
      return [dt, dd];
    }));
  }

  // ------------------------------------------------------------------ one image over REST
  async function useFile(file) {
    if (!file) return;
    if (!file.type.startsWith("image/")) {
      showMessage(`${file.name || "That"} is not an image.`);
      return;
    }
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.src = url;
    try {
      await img.decode();
    } catch {
      URL.revokeObjectURL(url);
      showMessage(`This browser cannot show ${file.name || "that image"}; try a JPEG or PNG.`);
      return;
    }
    stopWebcam();
    if (image) URL.revokeObjectURL(image.url);
    image = { file, img, url, name: file.name || "pasted-image" };
    els.send.disabled = false;
    render(img, img.naturalWidth, img.naturalHeight, null);
    await predict();
  }

  async function predict() {
    if (!image) return;
    const model = els.model.value;
    if (!model) {
      showMessage("No model is served yet.");
      return;
    }
    const seq = ++predictSeq;
    const form = new FormData();
    form.append("image", image.file, image.name);
    form.append("confidence_threshold", els.confidence.value);
    showMessage("");
    els.live.textContent = `Detecting with ${model}…`;
    const started = performance.now();
    try {
      const result = await getJSON(`api/v1/models/${encodeURIComponent(model)}/predict`, { method: "POST", body: form });
      if (seq !== predictSeq) return; // a newer request is on its way
      const roundTrip = performance.now() - started;
      render(image.img, image.img.naturalWidth, image.img.naturalHeight, result);
      showResults(result);
      showTimings(result, roundTrip);
      els.live.textContent = `${image.name}: ${describe(result)} (${fmt(roundTrip, 0)} ms)`;
      els.drop.dataset.requestId = result.request_id;
      refreshStats(); // the panel follows what was just done
    } catch (error) {
      if (seq !== predictSeq) return;
      els.live.textContent = "";
      showMessage(error.message);
    }
  }

  // ------------------------------------------------------------------ webcam over /ws/stream
  const webcam = {
    stream: null, ws: null, raf: 0, sent: 0, inFlight: 0, encoding: false, answered: 0, dropped: 0,
    last: null, times: [], sentAt: new Map(), frame: document.createElement("canvas"), fpsShownAt: 0,
  };

  function updateWebcamAvailability() {
    const supported = Boolean(navigator.mediaDevices?.getUserMedia);
    // The appliance asked for a key: a browser cannot send it on a WebSocket, so the stream would be refused.
    const keyed = Boolean(sessionStorage.getItem(KEY_STORAGE));
    els.webcam.hidden = !(features.stream && supported && !keyed);
    els.webcamNote.hidden = !(features.stream && (!supported || keyed));
    els.webcamNote.textContent = keyed
      ? "Webcam mode is off while the appliance needs an API key: browsers send no headers on a WebSocket."
      : "Webcam mode needs this page over https or on localhost (the browser's rule for cameras).";
  }

  async function startWebcam() {
    showMessage("");
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
    } catch (error) {
      showMessage(`No camera: ${error.message}`);
      return;
    }
    webcam.stream = stream;
    els.video.srcObject = stream;
    await els.video.play();
    els.webcam.textContent = "Stop webcam";
    els.webcam.setAttribute("aria-pressed", "true");
    webcam.answered = 0;
    webcam.last = null;
    connect();
    webcam.raf = requestAnimationFrame(paint);
  }

  function stopWebcam() {
    if (!webcam.stream) return;
    cancelAnimationFrame(webcam.raf);
    for (const track of webcam.stream.getTracks()) track.stop();
    webcam.stream = null;
    els.video.srcObject = null;
    const ws = webcam.ws;
    webcam.ws = null;
    ws?.close(1000);
    els.webcam.textContent = "Start webcam";
    els.webcam.setAttribute("aria-pressed", "false");
    els.fps.textContent = `Webcam stopped after ${webcam.answered} answered frames.`;
  }

  function connect() {
    const url = new URL(`ws/stream/${encodeURIComponent(els.model.value || defaultModel)}`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("confidence_threshold", els.confidence.value);
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    Object.assign(webcam, { ws, sent: 0, inFlight: 0, encoding: false, times: [], sentAt: new Map() });
    ws.onopen = () => pump();
    ws.onmessage = (event) => onFrame(ws, event);
    ws.onclose = (event) => {
      if (webcam.ws !== ws || !webcam.stream) return; // closed on purpose
      stopWebcam();
      showMessage(event.code === 1008 || event.code === 1006
        ? "The appliance refused the stream. With an API key set it cannot work: browsers send no headers on a WebSocket."
        : `The stream closed (${event.code}${event.reason ? `: ${event.reason}` : ""}).`);
    };
  }

  function pump() {
    const { ws, frame } = webcam;
    const video = els.video;
    if (!ws || ws.readyState !== WebSocket.OPEN || webcam.inFlight >= STREAM_IN_FLIGHT || webcam.encoding) return;
    if (!video.videoWidth) {
      setTimeout(pump, 50);
      return;
    }
    const scale = Math.min(1, STREAM_SIDE / Math.max(video.videoWidth, video.videoHeight));
    frame.width = Math.round(video.videoWidth * scale);
    frame.height = Math.round(video.videoHeight * scale);
    frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
    webcam.encoding = true;
    frame.toBlob(async (blob) => {
      const data = blob ? await blob.arrayBuffer() : null;
      webcam.encoding = false;
      if (!data || ws !== webcam.ws || ws.readyState !== WebSocket.OPEN) return;
      const id = webcam.sent++; // with raw framing the server numbers the frames 0, 1, 2...
      webcam.sentAt.set(id, performance.now());
      webcam.inFlight++;
      ws.send(data);
      pump();
    }, "image/jpeg", 0.75);
  }

  function onFrame(ws, event) {
    if (ws !== webcam.ws) return;
    const reply = JSON.parse(event.data);
    const id = typeof reply.frame_id === "number" ? reply.frame_id : webcam.sent - 1;
    // Replies come in order; frames the server dropped (latest wins) get none.
    webcam.inFlight = Math.max(0, webcam.sent - id - 1);
    webcam.dropped = reply.dropped ?? webcam.dropped;
    const now = performance.now();
    const sentAt = webcam.sentAt.get(id);
    for (const key of webcam.sentAt.keys()) if (key <= id) webcam.sentAt.delete(key);
    webcam.times.push(now);
    while (webcam.times.length && webcam.times[0] < now - 2000) webcam.times.shift();
    if (reply.error) {
      showMessage(`Frame ${reply.frame_id}: ${reply.error}: ${typeof reply.detail === "string" ? reply.detail : JSON.stringify(reply.detail)}`);
    } else {
      webcam.answered++;
      webcam.last = reply;
      showResults(reply);
      if (sentAt !== undefined) showTimings(reply, now - sentAt);
    }
    pump();
  }

  function paint(now) {
    if (!webcam.stream) return;
    const video = els.video;
    if (video.videoWidth) {
      const last = webcam.last;
      if (last) render(video, last.image.width, last.image.height, last);
      else render(video, webcam.frame.width || video.videoWidth, webcam.frame.height || video.videoHeight, null);
    }
    if (now - webcam.fpsShownAt > 500) {
      webcam.fpsShownAt = now;
      const t = webcam.times;
      const fps = t.length > 1 ? ((t.length - 1) * 1000) / (t[t.length - 1] - t[0]) : 0;
      els.fps.textContent = `Webcam: ${fmt(fps)} fps · ${webcam.answered} frames answered · ${webcam.dropped} dropped`;
      els.fps.dataset.fps = fps.toFixed(2);
      els.fps.dataset.answered = String(webcam.answered);
    }
    webcam.raf = requestAnimationFrame(paint);
  }

  // ------------------------------------------------------------------ status panel
  async function refreshStats() {
    try {
      await showStats(await getJSON("api/v1/stats"));
    } catch (error) {
      els.stat.updated.textContent = `Stats unavailable: ${error.message}`;
      els.stat.updated.dataset.failures = String(Number(els.stat.updated.dataset.failures || 0) + 1);
      setBadge("down", "engine: unknown");
    }
    try {
      if (features.prediction_log) await refreshHistory();
      else showLogOff();
    } catch (error) {
      $("history-note").textContent = `The log is unavailable: ${error.message}`;
    } finally {
      clearTimeout(statsTimer);
      statsTimer = setTimeout(refreshStats, STATS_EVERY_MS);
    }
  }

  function setBadge(state, text) {
    els.badge.className = `badge ${state}`;
    els.badge.textContent = text;
  }

  // Returns the reload of the model picker when the served models changed.
  function showStats(s) {
    const st = els.stat;
    const engine = s.engine;
    setBadge(engine.state, `engine: ${engine.state}`);
    st.engine.textContent = engine.state === "down" ? "down (not connected)"
      : `${engine.state}${engine.instance ? ` · ${engine.instance.slice(0, 8)}` : ""} · ${engine.restarts} restarts`;
    st.providers.textContent = engine.providers.map((p) => p.replace(/ExecutionProvider$/, "")).join(", ") || "—";
    st.providers.title = engine.providers.join(", ");
    const failed = Object.entries(s.failed_models).map(([name, why]) => `${name} failed: ${why}`);
    st.models.textContent = [...s.models, ...failed].join("\n") || "—";
    st.rps.textContent = fmt(s.requests_per_s);
    st.ips.textContent = fmt(s.images_per_s);
    st.p99.textContent = s.p99_ms !== null ? `${fmt(s.p99_ms)} ms`
      : s.p99_ms_total !== null ? `idle (${fmt(s.p99_ms_total)} ms since start)` : "—";
    st.batch.textContent = s.batch_size !== null ? fmt(s.batch_size, 2)
      : s.batch_size_total !== null ? `idle (${fmt(s.batch_size_total, 2)} since start)` : "—";
    st.queue.textContent = String(s.queue_depth);
    st.total.textContent = `${s.requests_total} (${s.errors_total} errors)`;
    st.rings.replaceChildren(...s.workers.map((w) => {
      const li = document.createElement("li");
      li.dataset.pid = String(w.pid);
      const meter = document.createElement("meter");
      Object.assign(meter, { min: 0, max: Math.max(1, w.slots), value: w.in_use, low: w.slots / 2, high: w.slots * 0.9 });
      meter.setAttribute("aria-label", `worker ${w.pid} ring slots in use`);
      li.append(span("pid", `pid ${w.pid}`), meter, span("num", `${w.in_use}/${w.slots}`));
      return li;
    }));
    if (!s.workers.length) st.rings.replaceChildren(Object.assign(document.createElement("li"), { textContent: "—" }));
    const span_ = s.window_s === null ? "rates from the next refresh on" : `rates over the last ${fmt(s.window_s, 0)} s`;
    st.updated.textContent = `Updated ${new Date().toLocaleTimeString()} · ${span_}`;
    st.updated.dataset.updates = String(Number(st.updated.dataset.updates || 0) + 1);

    features = s.features;
    updateWebcamAvailability();
    const firstDefault = !defaultModel;
    defaultModel = s.default_model;
    const key = s.models.join(",");
    if (key !== modelsKey) {
      modelsKey = key;
      return loadModels().catch((error) => showMessage(`Models: ${error.message}`));
    }
    if (firstDefault && !modelPicked && [...els.model.options].some((o) => o.value === defaultModel)) {
      els.model.value = defaultModel;
    }
    return null;
  }

  // ------------------------------------------------------------------ a folder as one async batch job
  const JOB_MAX_IMAGES = 32; // the batch routes' limit
  const JOB_POLL_MS = 300;
  let job = null; // { id, url, names }

  async function runFolder(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/")).slice(0, JOB_MAX_IMAGES);
    const skipped = files.length - images.length;
    if (!images.length) {
      $("job-status").textContent = "No image in that folder.";
      return;
    }
    const form = new FormData();
    for (const f of images) form.append("images", f, f.name);
    form.append("confidence_threshold", els.confidence.value);
    const model = els.model.value || defaultModel;
    $("job-results").replaceChildren();
    $("job-status").textContent = `Sending ${images.length} images${skipped ? ` (${skipped} files left out)` : ""}…`;
    try {
      const accepted = await getJSON(`api/v1/models/${encodeURIComponent(model)}/predict/batch/async`,
        { method: "POST", body: form });
      job = { id: accepted.job_id, url: accepted.status_url.replace(/^\//, ""), names: images.map((f) => f.name) };
      const bar = $("job-progress");
      Object.assign(bar, { hidden: false, max: images.length, value: 0 });
      $("job-cancel").hidden = false;
      pollJob(job);
    } catch (error) {
      $("job-status").textContent = `The job was refused: ${error.message}`;
    }
  }

  async function pollJob(current) {
    if (job !== current) return;
    let s;
    try {
      s = await getJSON(current.url);
    } catch (error) {
      $("job-status").textContent = `Job ${current.id.slice(0, 8)}: ${error.message}`;
      setTimeout(() => pollJob(current), JOB_POLL_MS * 3);
      return;
    }
    const bar = $("job-progress");
    bar.max = s.progress.total;
    bar.value = s.progress.done;
    bar.dataset.done = String(s.progress.done);
    $("job-status").textContent = `Job ${s.job_id.slice(0, 8)}: ${s.status}, ${s.progress.done} of ${s.progress.total} images`
      + (s.error ? ` (${s.error})` : "");
    $("job-status").dataset.status = s.status;
    if (s.status === "pending" || s.status === "running") {
      setTimeout(() => pollJob(current), JOB_POLL_MS);
      return;
    }
    $("job-cancel").hidden = true;
    if (s.status === "done") {
      $("job-results").replaceChildren(...s.result.results.map((r) => {
        const li = document.createElement("li");
        const name = current.names[r.index] ?? `#${r.index}`;
        const found = r.error ? `error: ${r.error}` : describe(r) || "nothing found";
        li.append(span("label", name), span("conf", found));
        return li;
      }));
    }
    job = null;
  }

  async function cancelJob() {
    if (!job) return;
    try {
      await getJSON(job.url, { method: "DELETE" });
    } catch (error) {
      $("job-status").textContent = `Cancel: ${error.message}`;
    }
  }

  // ------------------------------------------------------------------ the prediction log
  function showLogOff() {
    const note = $("history-note");
    note.textContent = "The prediction log is off (RINGSERVE_PREDICTION_LOG=1 turns it on).";
    note.dataset.state = "off";
    $("history").replaceChildren();
  }

  async function refreshHistory() {
    const response = await api("api/v1/predictions?limit=10");
    const body = await response.json().catch(() => null);
    const note = $("history-note");
    if (!response.ok) {
      note.textContent = `The log is unavailable: ${body?.error ?? response.status}`;
      note.dataset.state = "error";
      return;
    }
    note.textContent = body.predictions.length ? "" : "No prediction logged yet.";
    note.dataset.state = "on";
    $("history").replaceChildren(...body.predictions.map((p) => {
      const li = document.createElement("li");
      li.dataset.requestId = p.request_id;
      const when = new Date(p.time).toLocaleTimeString();
      const what = describe(p) || "nothing found";
      li.append(span("when", when), span("label", `${p.model.name}: ${what}`), span("conf", p.cached ? "cached" : p.route));
      return li;
    }));
  }

  // ------------------------------------------------------------------ wiring
  function wire() {
    $("folder").addEventListener("change", () => runFolder($("folder").files));
    $("job-cancel").addEventListener("click", cancelJob);
    els.file.addEventListener("change", () => useFile(els.file.files[0]));
    els.send.addEventListener("click", () => predict());
    els.confidence.addEventListener("input", () => { els.confidenceValue.textContent = Number(els.confidence.value).toFixed(2); });
    const changed = () => {
      if (webcam.stream) {
        webcam.ws?.close(1000);
        connect();
      } else {
        predict();
      }
    };
    els.confidence.addEventListener("change", changed);
    els.model.addEventListener("change", () => { modelPicked = true; changed(); });
    els.webcam.addEventListener("click", () => (webcam.stream ? stopWebcam() : startWebcam()));
    els.keyButton.addEventListener("click", async () => {
      if (await askKey("Enter the appliance's API key.")) {
        showMessage("");
        refreshStats();
      }
    });
    els.keyCancel.addEventListener("click", () => els.keyDialog.close("cancel"));

    // drop anywhere on the page; paste anywhere (but a text paste into the key field stays text)
    let depth = 0;
    document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; els.drop.classList.add("dragging"); });
    document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; els.drop.classList.remove("dragging"); } });
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      els.drop.classList.remove("dragging");
      useFile(e.dataTransfer?.files?.[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData?.items ?? [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!item) return;
      e.preventDefault();
      useFile(item.getAsFile());
    });
    window.addEventListener("pagehide", stopWebcam);
  }

  async function init() {
    els.drop.classList.add("empty");
    els.keyButton.hidden = !sessionStorage.getItem(KEY_STORAGE);
    wire();
    updateWebcamAvailability();
    document.body.dataset.ready = "true";
    await refreshStats(); // the default model, the features, and the models when they are served
  }

  init();
})();
