// actstore view: every chart asks the local server for just what it shows.
(function () {
  "use strict";
  var state = { run: null, S: null, source: null, layer: null, step: 0, head: "", reduce: "signed", neuron: null };
  var view = (window.actstoreView = { busy: 0, loaded: false, requests: [], idle: function () { return view.loaded && view.busy === 0; } });
  // what the compare and depth panels (compare.js) share with this page
  view.lib = { api: function (r, p, post) { return api(r, p, post); }, state: state, showError: function (e) { showError(e); },
               colours: function (t, h) { return colours(t, h); }, readout: function (h) { return readout(h); },
               range: function (z) { return range(z); }, fillRuns: function (r, c) { fillRuns(r, c); },
               fill: function (s, v, c) { fill(s, v, c); }, escapeHtml: function (t) { return escapeHtml(t); }, config: CONFIG };
  var $ = function (id) { return document.getElementById(id); };
  var CONFIG = { displaylogo: false, responsive: true };

  // The access token: the server writes it into the page when the address carried it
  // (or its cookie did). A POST (what loads a model) sends it in a header.
  var meta = document.querySelector('meta[name="actstore-token"]');
  var TOKEN = meta ? meta.content : "";
  if (new URLSearchParams(location.search).has("token")) {
    var clean = new URLSearchParams(location.search);
    clean.delete("token");  // kept in a cookie: out of the address bar and the history
    history.replaceState(null, "", "?" + clean.toString());
  }
  var RETRIES = 60;  // a busy server answers 503 with Retry-After: ask again, this often at most

  function request(route, params, post, tries) {
    var q;
    if (params instanceof URLSearchParams) {  // a name given more than once (a group's states)
      q = new URLSearchParams(params);
      if (!q.has("run")) q.set("run", state.run || "");
    } else {
      q = Object.assign({ run: state.run || "" }, params || {});
    }
    var init = post
      ? { method: "POST", headers: { "Content-Type": "application/json", "X-Actstore-Token": TOKEN }, body: JSON.stringify(q) }
      : { method: "GET" };
    var url = "/api/" + route + (post ? "" : "?" + new URLSearchParams(q).toString());
    return fetch(url, init).then(function (r) {
      if (r.status === 503 && tries < RETRIES) {
        var wait = 1000 * (Number(r.headers.get("Retry-After")) || 1);
        return new Promise(function (resolve) { setTimeout(resolve, wait); })
          .then(function () { return request(route, params, post, tries + 1); });
      }
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.error || r.statusText);
        return body;
      });
    });
  }

  function api(route, params, post) {
    view.busy += 1;
    view.requests.push(route);
    return request(route, params, post, 0).finally(function () { view.busy -= 1; });
  }

  function showError(err) {
    var box = $("error");
    box.textContent = String(err && err.message ? err.message : err);
    box.hidden = false;
  }

  function clearError() { $("error").hidden = true; }

  function option(value, label) {
    var o = document.createElement("option");
    o.value = value;
    o.textContent = label === undefined ? value : label;
    return o;
  }

  function fill(select, values, chosen) {
    select.innerHTML = "";
    values.forEach(function (v) { select.appendChild(Array.isArray(v) ? option(v[0], v[1]) : option(v)); });
    if (chosen !== undefined && chosen !== null) select.value = String(chosen);
  }

  // ---- run ----------------------------------------------------------------------------
  function fillRuns(runs, chosen) {  // the run list, as /api/runs gives it
    fill($("run-select"), runs.map(function (r) { return [r.id, r.id + "  (" + r.scenario + ", " + r.n_steps + " steps)"]; }), chosen);
  }

  function loadRuns() {
    return api("runs").then(function (res) {
      var wanted = new URLSearchParams(location.search).get("run") || res["default"];
      fillRuns(res.runs, wanted);
      return loadRun(wanted);
    });
  }

  function loadRun(id) {
    state.run = id;
    return api("summary").then(function (S) {
      state.S = S;
      $("run-title").textContent = S.id;
      $("run-meta").textContent = S.model + " · " + S.prompt_len + " prompt tokens · " + S.steps.length +
        " forward passes · " + S.layers.length + " layers · generated: " + S.generated_text;
      drawTokens();
      // the first run shown takes its controls from the address (a saved link), if valid
      var q = view.restored ? new URLSearchParams() : new URLSearchParams(location.search);
      view.restored = true;
      var pick = function (name, allowed, fallback) {
        var v = q.get(name);
        return v !== null && allowed.map(String).indexOf(v) >= 0 ? v : fallback;
      };
      fill($("source"), S.sources, pick("source", S.sources, S.sources.indexOf("hidden_out") >= 0 ? "hidden_out" : S.sources[0]));
      fill($("layer"), S.layers, pick("layer", S.layers, S.layers[Math.floor(S.layers.length / 2)]));
      var slider = $("step");
      slider.max = String(S.steps.length - 1);
      slider.value = pick("step", S.steps.map(function (st) { return st.step; }), String(Math.min(1, S.steps.length - 1)));
      if (S.heads) {
        var heads = [["", "mean of heads"]];
        for (var h = 0; h < S.heads; h++) heads.push([String(h), "head " + h]);
        fill($("head"), heads, pick("head", heads.map(function (x) { return x[0]; }), ""));
      }
      $("reduce").value = pick("reduce", ["signed", "abs"], $("reduce").value);
      $("cmap").value = pick("cmap", Array.prototype.map.call($("cmap").options, function (o) { return o.value; }), $("cmap").value);
      readControls();
      state.neuron = null;
      return refresh();
    });
  }

  function drawTokens() {
    var box = $("tokens");
    box.innerHTML = "";
    var S = state.S;
    S.tokens.forEach(function (t, p) {
      var span = document.createElement("span");
      var step = p < S.prompt_len ? 0 : p - S.prompt_len + 1;
      span.className = "tok " + (p < S.prompt_len ? "prefill" : "gen");
      span.textContent = t || "∅";
      span.title = "position " + p + " · step " + step;
      span.dataset.step = String(step);
      box.appendChild(span);
    });
    // the last generated token was chosen but never fed back: show it too
    var last = S.steps[S.steps.length - 1];
    if (last && last.generated) {
      var span = document.createElement("span");
      span.className = "tok gen";
      span.textContent = last.generated;
      span.title = "generated by the last step (not fed back)";
      span.dataset.step = String(S.steps.length - 1);
      box.appendChild(span);
    }
  }

  function markTokens() {
    var step = String(state.step);
    Array.prototype.forEach.call(document.querySelectorAll("#tokens .tok"), function (el) {
      el.classList.toggle("current", el.dataset.step === step && el.classList.contains("gen"));
    });
  }

  function readControls() {
    state.source = $("source").value;
    state.layer = $("layer").value;
    state.step = Number($("step").value);
    state.head = $("head").value || "";
    state.reduce = $("reduce").value;
    var global = ["embeddings", "logits"].indexOf(state.source) >= 0;
    $("layer").disabled = global;
    $("head-wrap").hidden = state.source !== "attn_weights";
    var st = state.S.steps[state.step];
    $("step-label").textContent = state.step + " (" + st.kind + ", positions " + st.positions[0] + "–" + (st.positions[1] - 1) +
      (st.generated ? ", chose " + JSON.stringify(st.generated) : "") + ")";
  }

  // The address reopens this view: the run and the controls (compare.js adds its selection).
  function saveAddress() {
    var q = new URLSearchParams(location.search);
    q.delete("token");
    q.set("run", state.run);
    [["source", state.source], ["layer", state.layer], ["step", state.step], ["head", state.head],
     ["reduce", state.reduce], ["cmap", $("cmap").value]].forEach(function (kv) { q.set(kv[0], String(kv[1])); });
    history.replaceState(null, "", "?" + q.toString());
  }
  view.saveAddress = saveAddress;

  function refresh() {
    clearError();
    readControls();
    saveAddress();
    markTokens();
    drawTopk();
    var jobs = [drawHeatmap(), drawNeurons(), drawDecomposition(), drawLens(), view.afterRefresh ? view.afterRefresh() : null];
    return Promise.all(jobs).catch(showError);
  }

  // ---- charts ---------------------------------------------------------------------------
  function drawHeatmap() {
    var params = { source: state.source, layer: state.layer, step: state.step, head: state.head, reduce: state.reduce };
    return api("heatmap", params).then(function (h) {
      // the colour scale comes from the API (positive red, as in the report and actstore heatmap)
      var trace = { type: "heatmap", z: h.z, hoverongaps: false };
      colours(trace, h);
      var layout = { margin: { l: 60, r: 10, t: 10, b: 50 }, height: 520, xaxis: { title: { text: h.xlabel } },
                     yaxis: { title: { text: h.ylabel }, autorange: "reversed" } };
      if (!h.reshaped) {
        trace.y = h.rows;
        trace.x = h.cols;
        trace.text = h.z.map(function (row, i) {
          return row.map(function (_, j) {
            var c = h.cols[j];
            var key = h.key_tokens ? " → key " + c + " " + JSON.stringify(h.key_tokens[c]) : " · channel " + c;
            return "pos " + h.rows[i] + " " + JSON.stringify(h.row_tokens[i]) + key;
          });
        });
        trace.hovertemplate = "%{text}<br>%{z}<extra></extra>";
      } else {
        trace.hovertemplate = "channel %{customdata}<br>%{z}<extra></extra>";
        var cols = h.grid[1];
        trace.customdata = h.z.map(function (row, i) { return row.map(function (_, j) { return i * cols + j; }); });
      }
      var where = h.layer === null ? "" : " · layer " + h.layer;
      var binned = h.block[0] > 1 || h.block[1] > 1;
      $("heatmap-title").textContent = h.source + where + " · step " + h.step + (h.head !== null ? " · head " + h.head : "") +
        (h.reshaped ? " (one position, drawn as a grid)" : "") +
        (binned ? " (means of " + h.block[0] + " × " + h.block[1] + " blocks: too large to draw cell by cell)" : "") +
        " · " + readout(h);
      view.heatmap = h;
      return Plotly.react("heatmap", [trace], layout, CONFIG);
    });
  }

  // The colour map the controls ask for: "auto" is the API's (diverging around 0 for
  // signed values, positive red; Viridis otherwise).
  function colours(trace, h) {
    var cmap = $("cmap").value;
    trace.colorscale = cmap === "auto" ? h.colorscale : cmap;
    trace.zmid = cmap === "auto" && h.zmid !== null ? h.zmid : undefined;
    return trace;
  }

  function range(z) {  // " · min a, max b" of a drawn map's cells ("" when all are empty)
    var lo = Infinity, hi = -Infinity;
    z.forEach(function (row) { row.forEach(function (v) { if (v !== null) { if (v < lo) lo = v; if (v > hi) hi = v; } }); });
    return lo === Infinity ? "" : " · min " + lo.toPrecision(4) + ", max " + hi.toPrecision(4);
  }

  function readout(h) {  // shape, min and max of what is drawn
    return h.shape.join(" × ") + range(h.z);
  }

  function drawTopk() {
    var st = state.S.steps[state.step];
    var top = st.top_k.slice().reverse();
    var layout = { margin: { l: 90, r: 10, t: 10, b: 40 }, height: Math.max(280, 17 * top.length + 60),
                   xaxis: { title: { text: "probability" } } };
    if (!top.length) layout.annotations = [{ text: "no top-k recorded (capture.top_k_probs: 0)", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    var idx = top.map(function (_, i) { return i; });
    layout.yaxis = { tickvals: idx, ticktext: top.map(function (t) { return JSON.stringify(t.token); }) };
    Plotly.react("topk", [{ type: "bar", orientation: "h", x: top.map(function (t) { return t.p; }), y: idx,
      hovertemplate: "%{x:.4f}<extra></extra>", marker: { color: "#059669" } }], layout, CONFIG);
  }

  function drawNeurons() {
    var box = $("neurons");
    if (state.source === "attn_weights") {
      box.innerHTML = '<p class="note">Attention weights have no channels; pick a vector source to follow a neuron.</p>';
      return Promise.resolve();
    }
    return api("top_neurons", { source: state.source, layer: state.layer, step: state.step }).then(function (res) {
      var rows = res.neurons.map(function (n) {
        return '<tr class="pick" data-neuron="' + n.index + '"><td class="num">' + n.index + '</td><td class="num">' + n.value + "</td></tr>";
      }).join("");
      box.innerHTML = "<table><thead><tr><th>channel</th><th>value at position " + res.position + "</th></tr></thead><tbody>" + rows + "</tbody></table>";
      Array.prototype.forEach.call(box.querySelectorAll("tr.pick"), function (tr) {
        tr.addEventListener("click", function () { follow(Number(tr.dataset.neuron)); });
      });
      var global = ["embeddings", "logits"].indexOf(state.source) >= 0;
      if (!global && (state.neuron === null || state.neuron.source !== state.source || state.neuron.layer !== state.layer)) {
        return follow(res.neurons[0].index);
      }
    });
  }

  function follow(neuron) {
    if (["embeddings", "logits", "attn_weights"].indexOf(state.source) >= 0) return Promise.resolve();
    state.neuron = { source: state.source, layer: state.layer, index: neuron };
    return api("trajectory", { source: state.source, layer: state.layer, neuron: neuron, over: "steps" }).then(function (t) {
      $("trajectory-title").textContent = "Neuron trajectory: " + t.source + " · layer " + t.layer + " · channel " + t.neuron;
      var text = t.token.map(function (tok, i) { return "step " + t.x[i] + " fed " + JSON.stringify(tok); });
      return Plotly.react("trajectory", [{ type: "scatter", mode: "lines+markers", x: t.x, y: t.value, text: text,
        hovertemplate: "%{text}<br>%{y}<extra></extra>", line: { color: "#2563eb" } }],
        { margin: { l: 60, r: 10, t: 10, b: 45 }, height: 300, xaxis: { title: { text: "step (last position of each forward pass)" } },
          yaxis: { title: { text: "value" } } }, CONFIG);
    }).catch(showError);
  }

  function drawDecomposition() {
    if (!state.S.has_decomposition) {
      $("decomposition").innerHTML = '<p class="note">Needs hidden states, attn_out and mlp_down_out.</p>';
      return Promise.resolve();
    }
    return api("decomposition", { step: state.step }).then(function (d) {
      var norms = ["norm_hidden_in", "norm_attn_out", "norm_mlp_down_out", "norm_hidden_out"];
      var traces = norms.map(function (k) {
        return { type: "scatter", mode: "lines", name: "‖" + k.slice(5) + "‖", x: d.layer, y: d[k] };
      });
      traces.push({ type: "scatter", mode: "lines", name: "cos(attn_out, hidden_out)", x: d.layer, y: d.cos_attn_out, yaxis: "y2", line: { dash: "dot" } });
      traces.push({ type: "scatter", mode: "lines", name: "cos(mlp_down_out, hidden_out)", x: d.layer, y: d.cos_mlp_down_out, yaxis: "y2", line: { dash: "dot" } });
      return Plotly.react("decomposition", traces, { margin: { l: 55, r: 55, t: 10, b: 45 }, height: 300,
        xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "norm" } },
        yaxis2: { title: { text: "cosine" }, overlaying: "y", side: "right", range: [-1, 1], dtick: 0.5, showgrid: false },
        legend: { orientation: "h", y: -0.25 } }, CONFIG);
    });
  }

  function escapeHtml(text) {
    var d = document.createElement("div");
    d.textContent = text;
    return d.innerHTML;
  }

  function drawLens() {
    var box = $("lens");
    if (!state.S.has_lens) {
      box.innerHTML = '<p class="note">Needs hidden_out.</p>';
      return Promise.resolve();
    }
    var asked = state.step;
    var st = state.S.steps[asked];
    var positions = [["-1", "last (" + (st.positions[1] - 1) + ")"]];
    for (var p = st.positions[0]; p < st.positions[1] - 1; p++) positions.push([String(p - st.positions[0]), "position " + p + " " + JSON.stringify(state.S.tokens[p])]);
    var sel = $("lens-position");
    var keepPos = sel.dataset.step === String(asked) ? sel.value : "-1";
    fill(sel, positions, keepPos);
    sel.dataset.step = String(asked);
    var params = { step: asked, position: sel.value, top_k: $("lens-topk").value };
    if (!box.querySelector("table")) box.innerHTML = '<p class="note">loading the model…</p>';
    // a model that cannot be loaded is a note in this panel, not an error for the page
    return api("logit_lens", params, true).then(function (l) {
      if (asked !== state.step) return;
      view.lens = l;
      Plotly.react("lens-kl", [{ type: "scatter", mode: "lines+markers", x: l.layer, y: l.kl, line: { color: "#dc2626" },
        text: l.argmax.map(function (t) { return "predicts " + JSON.stringify(t); }), hovertemplate: "layer %{x}: %{y} nats<br>%{text}<extra></extra>" }],
        { margin: { l: 55, r: 10, t: 10, b: 45 }, height: 300, xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "KL (nats)" } } }, CONFIG);
      var rows = l.layer.map(function (layer, i) {
        var top = l.top[i].map(function (t) { return escapeHtml(JSON.stringify(t.token)) + " " + t.p; }).join(" · ");
        return "<tr><td class=\"num\">" + layer + "</td><td class=\"mono\">" + escapeHtml(JSON.stringify(l.argmax[i])) +
          "</td><td class=\"num\">" + l.p[i] + "</td><td class=\"num\">" + l.kl[i] + "</td><td class=\"mono small\">" + top + "</td></tr>";
      }).join("");
      box.innerHTML = "<table class=\"lens\"><thead><tr><th>layer</th><th>predicts</th><th>p</th><th>KL(layer || last)</th>" +
        "<th>top " + escapeHtml($("lens-topk").value) + "</th></tr></thead><tbody>" + rows + "</tbody></table>";
    }).catch(function (err) {
      box.innerHTML = '<p class="note">Logit lens unavailable: ' + escapeHtml(err.message) + "</p>";
    });
  }

  // ---- events ---------------------------------------------------------------------------
  ["source", "layer", "head", "reduce", "cmap"].forEach(function (id) { $(id).addEventListener("change", refresh); });
  ["lens-position", "lens-topk"].forEach(function (id) { $(id).addEventListener("change", function () { drawLens(); }); });
  $("step").addEventListener("input", refresh);
  $("run-select").addEventListener("change", function () {
    var q = new URLSearchParams(location.search);  // the token stays in its cookie
    q.set("run", $("run-select").value);
    history.replaceState(null, "", "?" + q.toString());
    loadRun($("run-select").value).then(function () { return view.onRun ? view.onRun() : null; }).catch(showError);
  });
  $("tokens").addEventListener("click", function (e) {
    var el = e.target.closest(".tok");
    if (!el) return;
    $("step").value = el.dataset.step;
    refresh();
  });

  function wireHeatmapClicks() {
    $("heatmap").on("plotly_click", function (ev) {
      var h = view.heatmap;
      if (!h || h.source === "attn_weights" || !ev.points.length) return;
      var p = ev.points[0];
      var channel = h.reshaped ? p.customdata : p.x;
      if (typeof channel === "number") follow(channel);
    });
  }

  loadRuns()
    .then(function () { wireHeatmapClicks(); return view.onRun ? view.onRun() : null; })
    .then(function () { view.loaded = true; })
    .catch(function (err) { showError(err); view.loaded = true; });
})();
