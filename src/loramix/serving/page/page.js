/* loramix explorer: streams a completion through the server's own API (same origin, the key from the key field,
   `xlora.return_scalings: "layers"`) and draws the X-LoRA scalings as they arrive: each token coloured by its
   leading expert, the token history (experts x tokens), one token's layers x experts heatmap, and downloads.
   Plain JavaScript and SVG, no library. Nothing is stored: no cookies, no localStorage. */
"use strict";
(function () {
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];  // matplotlib's C0-C9, as `loramix analyze` colours the experts
  const VIRIDIS = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
    "#b5de2b", "#fde725"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const FONT = "DejaVu Sans, Arial, sans-serif";
  const $ = (id) => document.getElementById(id);

  // what the model card says, and the run being shown: one entry per generated token
  const model = { id: null, experts: [], layers: [], chat: false };
  const run = { tokens: [], scalings: [], spans: [], labels: [], selected: -1, controller: null, messages: [],
    prompt: null, request: null };
  const history = { svg: null, cols: null, selection: null, labelWidth: 0 };
  const H = { cellW: 20, cellH: 22, lead: 8, top: 6, labels: 54 };  // history layout, pixels

  // ---- small helpers -------------------------------------------------------------------------------------
  function rgb(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }
  function tint(hex, alpha) { const [r, g, b] = rgb(hex); return `rgba(${r},${g},${b},${alpha})`; }
  function expertColor(e) { return PALETTE[e % PALETTE.length]; }
  function viridis(x) {
    x = Math.min(1, Math.max(0, Number.isFinite(x) ? x : 0));
    const p = x * (VIRIDIS.length - 1), i = Math.min(Math.floor(p), VIRIDIS.length - 2), f = p - i;
    const a = rgb(VIRIDIS[i]), b = rgb(VIRIDIS[i + 1]);
    return `rgb(${a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",")})`;
  }
  function svgEl(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }
  function svgText(text, attrs, parent) {
    const el = svgEl("text", { "font-family": FONT, "font-size": 10, fill: "#1d232b", ...attrs }, parent);
    el.textContent = text;
    return el;
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }
  function shortLayer(name) {  // model.layers.3.self_attn.q_proj -> layers.3.q_proj, as analyze labels them
    const skip = new Set(["model", "self_attn", "mlp", "transformer", "base_model"]);
    return name.split(".").filter((p) => !skip.has(p)).join(".") || name;
  }
  function visible(text) { return text.replace(/\n/g, "\\n").replace(/ /g, "\u2423"); }
  function setStatus(text, error) {
    $("status").textContent = text;
    $("status").classList.toggle("error", Boolean(error));
  }
  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }
  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    } catch (err) { /* not JSON */ }
    return `${response.status} ${response.statusText}`;
  }
  function optionalInt(id) {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  }

  // one token's scalings [layer][expert] -> each expert's weight averaged over the LoRA layers
  function perExpert(s) {
    const out = new Array(s[0].length).fill(0);
    for (const row of s) row.forEach((v, e) => { out[e] += v; });
    return out.map((v) => v / s.length);
  }
  function leading(weights) {
    let best = 0;
    weights.forEach((v, e) => { if (v > weights[best]) best = e; });
    return best;
  }
  function mixText(weights) {
    return weights.map((w, e) => [w, e]).sort((a, b) => b[0] - a[0])
      .map(([w, e]) => `${model.experts[e]} ${w.toFixed(2)}`).join(" \u00b7 ");
  }

  // ---- the model card ------------------------------------------------------------------------------------
  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      setStatus("cannot reach the server: " + err.message, true);
      return false;
    }
    if (response.status === 401) {
      model.id = null;
      $("model-line").textContent = "this server needs its API key: type it in the key field";
      $("api-key").focus();
      return false;
    }
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return false;
    }
    const card = (await response.json()).data[0];
    const xlora = card.xlora || {};
    const n = xlora.n_lora_layers || 0;
    model.id = card.id;
    model.experts = xlora.experts || [];
    model.layers = (xlora.lora_layers || []).length === n ? xlora.lora_layers
      : Array.from({ length: n }, (_, i) => `LoRA layer ${i}`);
    model.chat = card.chat_template === true;
    $("model-line").textContent = `${model.id}: ${model.experts.length} experts, ${n} LoRA layers` +
      (model.chat ? ", a chat template" : ", no chat template (completions only)");
    $("mode-chat").disabled = !model.chat;
    if (!model.chat) $("mode-completion").checked = true;
    $("top-k").max = String(model.experts.length);
    setStatus("");
    drawLegend();
    updateMode();
    return true;
  }

  function drawLegend() {
    const legend = $("legend");
    clear(legend);
    model.experts.forEach((name, e) => {
      const item = document.createElement("span");
      item.className = "expert";
      item.dataset.expert = String(e);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = expertColor(e);
      item.append(swatch, name);
      legend.appendChild(item);
    });
  }

  function updateMode() {
    const chat = $("mode-chat").checked;
    $("new-chat").hidden = !chat;
    $("transcript").hidden = !chat || run.messages.length === 0;
    $("prompt").placeholder = chat ? "your message" : "type a prompt";
  }

  function drawTranscript() {
    const box = $("transcript");
    clear(box);
    for (const m of run.messages) {
      const line = document.createElement("div");
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = m.role + ": ";
      line.append(role, m.content);
      box.appendChild(line);
    }
    updateMode();
  }

  // ---- a run: request, stream, tokens --------------------------------------------------------------------
  function requestBody(chat, text) {
    const body = { model: model.id, stream: true, temperature: Number($("temperature").value || 0),
      xlora: { return_scalings: "layers" } };
    const maxTokens = optionalInt("max-tokens"), topK = optionalInt("top-k"), freeze = optionalInt("freeze-after");
    if (maxTokens !== null) body.max_tokens = maxTokens;
    if (topK !== null) body.xlora.top_k = topK;
    if (freeze !== null) body.xlora.freeze_scalings_after = freeze;
    if (chat) body.messages = run.messages.concat([{ role: "user", content: text }]);
    else body.prompt = text;
    return body;
  }

  function resetRun(promptText, chat) {
    run.tokens = []; run.scalings = []; run.spans = []; run.labels = []; run.selected = -1;
    run.prompt = promptText;
    const answer = $("answer");
    clear(answer);
    if (!chat) {
      const prompt = document.createElement("span");
      prompt.className = "prompt";
      prompt.textContent = promptText;
      answer.appendChild(prompt);
    }
    $("mix").textContent = "";
    drawHistoryFrame();
    clear($("heatmap"));
    $("heatmap-caption").textContent = "click a token to see its scalings per layer";
  }

  async function generate() {
    if (!model.id && !(await loadModel())) return;
    const chat = $("mode-chat").checked;
    const text = $("prompt").value;
    if (!text) { setStatus("type a prompt first", true); return; }
    const body = requestBody(chat, text);
    run.request = body;
    resetRun(text, chat);
    const answer = $("answer");
    answer.dataset.state = "streaming";
    $("run").disabled = true;
    $("stop").disabled = false;
    setStatus("generating\u2026");
    run.controller = new AbortController();
    let finish = null;
    try {
      const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
        method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body), signal: run.controller.signal, cache: "no-store" });
      if (!response.ok) throw new Error(await errorText(response));
      finish = await readStream(response, chat);
      if (chat) {
        run.messages = body.messages.concat([{ role: "assistant", content: run.tokens.join("") }]);
        $("prompt").value = "";
        drawTranscript();
      }
      answer.dataset.state = "done";
      setStatus(`${run.tokens.length} tokens` + (finish ? `, finish reason: ${finish}` : ""));
      if (run.tokens.length && run.selected < 0) select(0);
    } catch (err) {
      const stopped = err.name === "AbortError";
      answer.dataset.state = stopped ? "done" : "error";
      setStatus(stopped ? `stopped after ${run.tokens.length} tokens` : err.message, !stopped);
    } finally {
      run.controller = null;
      $("run").disabled = false;
      $("stop").disabled = true;
    }
  }

  // the server-sent events of one answer; returns the finish reason
  async function readStream(response, chat) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return finish;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return finish;
          finish = onChunk(JSON.parse(data), chat) || finish;
        }
      }
    }
  }

  // a chunk carries one event: the scalings of its new token (if any) and the text released with it
  function onChunk(chunk, chat) {
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = (chunk.choices || [])[0];
    for (const s of (chunk.xlora || {}).scalings || []) addToken(s);
    const text = !choice ? "" : chat ? ((choice.delta || {}).content || "") : (choice.text || "");
    if (text) appendText(text);
    return choice ? choice.finish_reason : null;
  }

  function addToken(s) {
    const t = run.tokens.length;
    run.tokens.push("");
    run.scalings.push(s);
    const weights = perExpert(s);
    const span = document.createElement("span");
    span.className = "tok empty";
    span.dataset.index = String(t);
    span.dataset.expert = String(leading(weights));
    span.style.background = tint(expertColor(leading(weights)), 0.4);
    span.style.borderBottomColor = expertColor(leading(weights));
    span.title = `token ${t}: ${mixText(weights)}`;
    $("answer").appendChild(span);
    run.spans.push(span);
    appendColumn(t, weights);
  }

  function appendText(text) {
    if (!run.tokens.length) {  // text before any token (not sent by this server): shown, not counted
      $("answer").appendChild(document.createTextNode(text));
      return;
    }
    const t = run.tokens.length - 1;
    run.tokens[t] += text;
    run.spans[t].textContent = run.tokens[t];
    run.spans[t].classList.toggle("empty", run.tokens[t] === "");
    run.labels[t].textContent = visible(run.tokens[t]).slice(0, 8);
    run.labels[t].parentNode.querySelector("title").textContent =
      `token ${t} ${JSON.stringify(run.tokens[t])}: ${mixText(perExpert(run.scalings[t]))}`;
  }

  function showMix(t) {
    const box = $("mix");
    clear(box);
    if (t < 0 || t >= run.tokens.length) return;
    const label = document.createElement("span");
    label.className = "item";
    label.textContent = `token ${t} ${JSON.stringify(run.tokens[t])}:`;
    box.appendChild(label);
    perExpert(run.scalings[t]).forEach((w, e) => {
      const item = document.createElement("span");
      item.className = "item";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(60 * Math.min(1, w))}px`;
      bar.style.background = expertColor(e);
      item.append(model.experts[e], bar, w.toFixed(2));
      box.appendChild(item);
    });
  }

  function select(t) {
    if (t < 0 || t >= run.tokens.length) return;
    if (run.selected >= 0) run.spans[run.selected].classList.remove("selected");
    run.selected = t;
    run.spans[t].classList.add("selected");
    history.selection.setAttribute("x", history.labelWidth + t * H.cellW);
    history.selection.setAttribute("visibility", "visible");
    drawHeatmap(t);
    showMix(t);
  }

  // ---- the token history: experts x tokens, one column per token, grown as tokens arrive ------------------
  function drawHistoryFrame() {
    const svg = $("history");
    clear(svg);
    const longest = Math.max(8, ...model.experts.map((n) => n.length));
    history.labelWidth = Math.round(longest * 6.4 + 14);
    const rowsH = H.top + H.lead + 4 + model.experts.length * H.cellH;
    const height = rowsH + H.labels + 30;
    history.minWidth = history.labelWidth + 330;
    svg.setAttribute("height", height);
    svg.setAttribute("width", history.minWidth);
    svg.setAttribute("viewBox", `0 0 ${history.minWidth} ${height}`);
    svgEl("rect", { class: "background", x: 0, y: 0, width: "100%", height: "100%", fill: "#ffffff" }, svg);
    svgText("leading", { x: history.labelWidth - 6, y: H.top + H.lead, "text-anchor": "end", "font-size": 9,
      fill: "#5c6670" }, svg);
    model.experts.forEach((name, e) => {
      const y = H.top + H.lead + 4 + e * H.cellH;
      svgText(name, { class: "row-label", "data-expert": e, x: history.labelWidth - 6, y: y + H.cellH / 2 + 3.5,
        "text-anchor": "end", fill: expertColor(e) }, svg);
    });
    drawColorbar(svg, history.labelWidth, rowsH + H.labels + 6, 140, "weight, mean over the LoRA layers");
    history.cols = svgEl("g", { class: "cols" }, svg);
    history.selection = svgEl("rect", { class: "selection", x: history.labelWidth, y: H.top - 2, width: H.cellW,
      height: rowsH - H.top + 4, fill: "none", stroke: "#1d232b", "stroke-width": 1.5, visibility: "hidden" }, svg);
    history.svg = svg;
    history.rowsH = rowsH;
  }

  function appendColumn(t, weights) {
    const x = history.labelWidth + t * H.cellW;
    const col = svgEl("g", { class: "col", "data-token": t }, history.cols);
    svgEl("title", {}, col).textContent = `token ${t}: ${mixText(weights)}`;
    svgEl("rect", { class: "lead", x, y: H.top, width: H.cellW - 1, height: H.lead,
      fill: expertColor(leading(weights)) }, col);
    weights.forEach((w, e) => {
      svgEl("rect", { class: "cell", "data-token": t, "data-expert": e, x, y: H.top + H.lead + 4 + e * H.cellH,
        width: H.cellW - 1, height: H.cellH - 1, fill: viridis(w) }, col);
    });
    const cx = x + H.cellW / 2, cy = history.rowsH + 4;
    run.labels.push(svgText("", { class: "token-label", x: cx, y: cy, "font-size": 10, "text-anchor": "end",
      transform: `rotate(-90 ${cx} ${cy})`, fill: "#5c6670" }, col));
    run.labels[t].setAttribute("dy", "0.3em");
    col.addEventListener("click", () => select(t));
    const width = Math.max(history.minWidth, x + H.cellW + 20);
    history.svg.setAttribute("width", width);
    history.svg.setAttribute("viewBox", `0 0 ${width} ${history.svg.getAttribute("height")}`);
    const box = $("history-box");
    box.scrollLeft = box.scrollWidth;
  }

  function drawColorbar(svg, x, y, width, label) {
    const id = svg.id + "-scale";
    const defs = svgEl("defs", {}, svg);
    const gradient = svgEl("linearGradient", { id, x1: 0, x2: 1, y1: 0, y2: 0 }, defs);
    VIRIDIS.forEach((c, i) => svgEl("stop", { offset: i / (VIRIDIS.length - 1), "stop-color": c }, gradient));
    svgEl("rect", { x, y, width, height: 8, fill: `url(#${id})` }, svg);
    svgText("0", { x, y: y + 19, "font-size": 9 }, svg);
    svgText("1", { x: x + width, y: y + 19, "font-size": 9, "text-anchor": "end" }, svg);
    svgText(label, { x: x + width + 8, y: y + 8, "font-size": 9, fill: "#5c6670" }, svg);
  }

  // ---- one token: LoRA layers x experts, and the mean over the layers beneath ----------------------------
  function drawHeatmap(t) {
    const svg = $("heatmap");
    clear(svg);
    const s = run.scalings[t], L = model.layers.length, E = model.experts.length;
    const labels = model.layers.map(shortLayer);
    const labelW = Math.round(Math.max(...labels.map((n) => n.length), 6) * 6 + 12);
    const cellW = 48, cellH = Math.max(5, Math.min(16, Math.floor(520 / Math.max(L, 1))));
    const every = Math.ceil(10 / cellH), top = 22, mapH = L * cellH, barsTop = top + mapH + 16, barsH = 70;
    const nameRoom = Math.round(Math.max(...model.experts.map((n) => n.length), 4) * 6.2 * 0.6 + 26);
    const width = labelW + E * cellW + 40, height = barsTop + barsH + nameRoom;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svgEl("rect", { x: 0, y: 0, width: "100%", height: "100%", fill: "#ffffff" }, svg);
    const title = `token ${t} ${JSON.stringify(run.tokens[t])}`;
    svgText(title, { x: labelW, y: 14, "font-size": 11 }, svg);
    for (let l = 0; l < L; l++) {
      const y = top + l * cellH;
      if (l % every === 0) {
        svgText(labels[l], { class: "layer-label", x: labelW - 6, y: y + cellH / 2 + 3, "text-anchor": "end",
          "font-size": Math.min(10, cellH * every - 1) }, svg);
      }
      for (let e = 0; e < E; e++) {
        const cell = svgEl("rect", { class: "cell", "data-layer": l, "data-expert": e, x: labelW + e * cellW, y,
          width: cellW - 1, height: cellH - (cellH > 6 ? 1 : 0), fill: viridis(s[l][e]) }, svg);
        svgEl("title", {}, cell).textContent = `${model.layers[l]}, ${model.experts[e]}: ${s[l][e].toFixed(3)}`;
      }
    }
    // the colour scale, upright, right of the map
    const barX = labelW + E * cellW + 14;
    const id = "heatmap-scale";
    const gradient = svgEl("linearGradient", { id, x1: 0, x2: 0, y1: 1, y2: 0 }, svgEl("defs", {}, svg));
    VIRIDIS.forEach((c, i) => svgEl("stop", { offset: i / (VIRIDIS.length - 1), "stop-color": c }, gradient));
    svgEl("rect", { x: barX, y: top, width: 10, height: Math.max(mapH, 40), fill: `url(#${id})` }, svg);
    svgText("1", { x: barX + 14, y: top + 8, "font-size": 9 }, svg);
    svgText("0", { x: barX + 14, y: top + Math.max(mapH, 40), "font-size": 9 }, svg);
    // bars: each expert's weight averaged over the layers, scale 0-1
    const weights = perExpert(s);
    svgEl("line", { x1: labelW, x2: labelW + E * cellW, y1: barsTop + barsH, y2: barsTop + barsH,
      stroke: "#5c6670" }, svg);
    svgText("mean over layers", { x: labelW - 6, y: barsTop + barsH / 2, "text-anchor": "end", "font-size": 9,
      fill: "#5c6670" }, svg);
    weights.forEach((w, e) => {
      const h = barsH * Math.min(1, Math.max(0, w)), x = labelW + e * cellW + 8;
      svgEl("rect", { class: "bar", "data-expert": e, x, y: barsTop + barsH - h, width: cellW - 16, height: h,
        fill: expertColor(e) }, svg);
      svgText(w.toFixed(2), { x: x + (cellW - 16) / 2, y: barsTop + barsH - h - 3, "font-size": 9,
        "text-anchor": "middle" }, svg);
      const cx = labelW + e * cellW + cellW / 2, cy = barsTop + barsH + 10;
      svgText(model.experts[e], { x: cx, y: cy, "text-anchor": "end", "font-size": 10,
        transform: `rotate(-35 ${cx} ${cy})`, fill: expertColor(e) }, svg);
    });
    $("heatmap-caption").textContent = `${title}: each expert's weight in each LoRA layer`;
  }

  // ---- downloads ------------------------------------------------------------------------------------------
  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function svgBlob(svg) {
    const copy = svg.cloneNode(true);
    copy.setAttribute("xmlns", SVG_NS);
    const text = '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(copy);
    return new Blob([text], { type: "image/svg+xml" });
  }

  function savePng(svg, name) {
    const width = Number(svg.getAttribute("width")), height = Number(svg.getAttribute("height"));
    const url = URL.createObjectURL(svgBlob(svg));
    const image = new Image();
    image.onload = () => {
      const canvas = document.createElement("canvas");
      canvas.width = 2 * width;
      canvas.height = 2 * height;
      const ctx = canvas.getContext("2d");
      ctx.scale(2, 2);
      ctx.drawImage(image, 0, 0, width, height);
      URL.revokeObjectURL(url);
      canvas.toBlob((png) => save(png, name), "image/png");
    };
    image.onerror = () => { URL.revokeObjectURL(url); setStatus("could not draw the PNG", true); };
    image.src = url;
  }

  function scalingsJson() {
    const body = { model: model.id, experts: model.experts, lora_layers: model.layers, request: run.request,
      tokens: run.tokens, scalings: run.scalings };
    return new Blob([JSON.stringify(body)], { type: "application/json" });
  }

  // the layout `loramix analyze --scalings FILE` reads (analysis.ScalingsLog): one F32 tensor "scalings"
  // (tokens, n_lora_layers, n_experts) and the names as JSON strings in the metadata
  function scalingsSafetensors() {
    const T = run.scalings.length, L = model.layers.length, E = model.experts.length;
    const data = new Float32Array(T * L * E);
    let k = 0;
    for (const s of run.scalings) for (const row of s) for (const v of row) data[k++] = v;
    const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
    const bytes = new Uint8Array(data.buffer);
    if (!little) for (let i = 0; i < bytes.length; i += 4) bytes.subarray(i, i + 4).reverse();
    const metadata = { tokens: JSON.stringify(run.tokens), layer_names: JSON.stringify(model.layers),
      expert_names: JSON.stringify(model.experts), segments: JSON.stringify([[0, T, "generated"]]) };
    let header = JSON.stringify({ __metadata__: metadata,
      scalings: { dtype: "F32", shape: [T, L, E], data_offsets: [0, bytes.length] } });
    let encoded = new TextEncoder().encode(header);
    while (encoded.length % 8) { header += " "; encoded = new TextEncoder().encode(header); }
    const size = new DataView(new ArrayBuffer(8));
    size.setBigUint64(0, BigInt(encoded.length), true);
    return new Blob([size.buffer, encoded, bytes], { type: "application/octet-stream" });
  }

  function needTokens(fn) {
    return () => {
      if (!run.tokens.length) { setStatus("generate something first", true); return; }
      fn();
    };
  }

  // ---- wiring ---------------------------------------------------------------------------------------------
  function init() {
    $("run").addEventListener("click", generate);
    $("stop").addEventListener("click", () => { if (run.controller) run.controller.abort(); });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && !$("run").disabled) generate();
    });
    $("api-key").addEventListener("change", loadModel);
    for (const id of ["mode-completion", "mode-chat"]) $(id).addEventListener("change", updateMode);
    $("new-chat").addEventListener("click", () => { run.messages = []; drawTranscript(); });
    const answer = $("answer");
    const tokenOf = (ev) => (ev.target.classList && ev.target.classList.contains("tok")
      ? Number(ev.target.dataset.index) : -1);
    answer.addEventListener("mouseover", (ev) => { if (tokenOf(ev) >= 0) showMix(tokenOf(ev)); });
    answer.addEventListener("mouseleave", () => showMix(run.selected));
    answer.addEventListener("click", (ev) => { if (tokenOf(ev) >= 0) select(tokenOf(ev)); });
    $("dl-history-svg").addEventListener("click", needTokens(() => save(svgBlob($("history")), "history.svg")));
    $("dl-history-png").addEventListener("click", needTokens(() => savePng($("history"), "history.png")));
    $("dl-heatmap-svg").addEventListener("click", needTokens(() => save(svgBlob($("heatmap")),
      `heatmap-token-${run.selected}.svg`)));
    $("dl-heatmap-png").addEventListener("click", needTokens(() => savePng($("heatmap"),
      `heatmap-token-${run.selected}.png`)));
    $("dl-json").addEventListener("click", needTokens(() => save(scalingsJson(), "scalings.json")));
    $("dl-safetensors").addEventListener("click", needTokens(() => save(scalingsSafetensors(),
      "scalings.safetensors")));
    drawHistoryFrame();
    loadModel();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
