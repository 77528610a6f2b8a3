// actstore view: the compare and depth panels. Every number comes from the server's
// query layer (the same functions as `actstore query pair|group|depth|next-token`);
// this file only picks states and draws.
(function () {
  "use strict";
  var view = window.actstoreView;
  var lib = view.lib;
  var $ = function (id) { return document.getElementById(id); };
  var MARGIN = { l: 55, r: 15, t: 10, b: 45 };
  var sel = { items: [], source: "" };  // items: "RUN@STATE"; source "": every residual source
  var runInfo = {};  // run id -> {states, sources} (from its summary)

  function api(route, params, post) { return lib.api(route, params, post); }
  function short(label) { var at = label.indexOf("@"); return at < 0 ? label : label.slice(at + 1); }
  function shortRun(label) {
    var at = label.indexOf("@");
    if (at < 0) return label;
    var runs = {};
    sel.items.forEach(function (it) { runs[it.slice(0, it.indexOf("@"))] = true; });
    return Object.keys(runs).length > 1 ? label.slice(0, 8) + "…@" + label.slice(at + 1) : label.slice(at + 1);
  }
  function rows(table) {  // JSON columns -> row objects
    var names = Object.keys(table);
    var n = names.length ? table[names[0]].length : 0;
    var out = [];
    for (var i = 0; i < n; i++) {
      var r = {};
      names.forEach(function (k) { r[k] = table[k][i]; });
      out.push(r);
    }
    return out;
  }
  function note(id, text) { $(id).innerHTML = '<p class="note">' + lib.escapeHtml(text) + "</p>"; }
  function plot(id, traces, layout) {
    return Plotly.react(id, traces, Object.assign({ margin: MARGIN, height: 320, legend: { orientation: "h", y: -0.25 } }, layout), lib.config);
  }

  // ---- the selection, kept in the address ------------------------------------------------
  function saveAddress() {
    var q = new URLSearchParams(location.search);
    q.delete("cmp");
    sel.items.forEach(function (it) { q.append("cmp", it); });
    if (sel.source) q.set("cmp_source", sel.source);
    history.replaceState(null, "", "?" + q.toString());
  }

  function statesOf(run) {
    if (runInfo[run]) return Promise.resolve(runInfo[run].states);
    return api("summary", { run: run }).then(function (S) { remember(S); return S.states; });
  }

  function remember(S) { runInfo[S.id] = { states: S.states, sources: S.sources, layers: S.layers }; }

  function layerCount(item) {
    var info = runInfo[item.slice(0, item.indexOf("@"))];
    return info ? info.layers.length : Infinity;
  }

  function isFull(item) {  // is "RUN@STATE" a full pass (a step, or a snapshot/reference stored whole)?
    var info = runInfo[item.slice(0, item.indexOf("@"))];
    var state = item.slice(item.indexOf("@") + 1);
    var found = info ? info.states.filter(function (s) { return s.state === state; })[0] : null;
    return !found || found.full;
  }

  function has(item, source) {  // does the run of "RUN@STATE" serve this source?
    var info = runInfo[item.slice(0, item.indexOf("@"))];
    return !info || info.sources.indexOf(source) >= 0;
  }

  function fillPicker() {
    var run = $("pick-run").value;
    return statesOf(run).then(function (states) {
      lib.fill($("pick-state"), states.map(function (s) { return [s.state, s.label]; }));
      $("pick-state").dataset.run = run;  // which run's states the list holds now
    });
  }

  function drawChips() {
    var box = $("selection");
    box.innerHTML = "";
    if (!sel.items.length) {
      box.innerHTML = '<span class="note">Nothing picked yet: add two states to compare them.</span>';
    }
    sel.items.forEach(function (it, i) {
      var chip = document.createElement("span");
      chip.className = "chip mono";
      chip.textContent = shortRun(it) + " ";
      chip.title = it;
      var x = document.createElement("button");
      x.type = "button";
      x.textContent = "×";
      x.setAttribute("aria-label", "remove " + it);
      x.addEventListener("click", function () { sel.items.splice(i, 1); changed(); });
      chip.appendChild(x);
      box.appendChild(chip);
    });
  }

  function changed() {
    saveAddress();
    drawChips();
    fillDepthStates();
    var side = view.onSelection ? view.onSelection() : null;  // side by side may draw the selection
    return Promise.all([drawComparison(), drawDepth(), side]).catch(lib.showError);
  }
  view.selectionItems = function () { return sel.items.slice(); };

  // ---- pair ---------------------------------------------------------------------------------
  function drawComparison() {
    $("pair-view").hidden = sel.items.length !== 2;
    $("group-view").hidden = sel.items.length < 3;
    if (sel.items.length === 2) return drawPair();
    if (sel.items.length >= 3) return drawGroup();
    return Promise.resolve();
  }

  function sourceParams() { return sel.source ? { source: sel.source } : {}; }

  function drawPair() {
    var a = sel.items[0], b = sel.items[1];
    $("pair-title").textContent = "Pair: " + shortRun(a) + "  vs  " + shortRun(b);
    var both = Object.assign({ a: a, b: b }, sourceParams());
    var jobs = [
      api("pair", Object.assign({ what: "vectors" }, both)).then(function (res) {
        view.pair = res;
        drawPairCurves();
      }),
      api("pair", Object.assign({ what: "summary" }, both)).then(function (res) {
        var cols = ["source", "mean_cosine", "min_cosine", "most_divergent_layer", "mean_MAE", "mean_overlap", "min_overlap_layer", "mean_std_diff"];
        var body = rows(res.table).map(function (r) {
          return "<tr>" + cols.map(function (c) { return '<td class="' + (c === "source" ? "mono" : "num") + '">' + (r[c] === null ? "–" : r[c]) + "</td>"; }).join("") + "</tr>";
        }).join("");
        $("pair-summary").innerHTML = '<table class="pair-summary"><thead><tr>' + cols.map(function (c) { return "<th>" + c + "</th>"; }).join("") +
          "</tr></thead><tbody>" + body + "</tbody></table>";
      }),
      !(isFull(a) && isFull(b)) ? note("pair-passes", "Both states need full passes (runs captured before full passes keep last-token vectors only).") :
      api("pair", Object.assign({ what: "passes" }, both, { source: sel.source || "hidden_out" })).then(function (res) {
        var r = rows(res.table);
        $("pair-passes-title").textContent = "Token by token (" + (r.length ? r[0].aligned + " aligned tokens" : "") + ")";
        return plot("pair-passes", [
          { type: "scatter", mode: "lines+markers", name: "mean cosine over tokens", x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.mean_cosine; }) },
          { type: "scatter", mode: "lines+markers", name: "minimum cosine", x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.min_cosine; }),
            text: r.map(function (x) { return "at token " + x.min_token; }), hovertemplate: "%{y} %{text}<extra></extra>" },
        ], { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "cosine" } } });
      }).catch(function (err) { note("pair-passes", "Token by token unavailable: " + err.message); }),
      drawPairMap(),
    ];
    return Promise.all(jobs);
  }

  function drawPairCurves() {
    var res = view.pair;
    if (!res) return;
    var metric = $("pair-metric").value;
    var bySource = {};
    rows(res.table).forEach(function (r) { (bySource[r.source] = bySource[r.source] || []).push(r); });
    var traces = Object.keys(bySource).map(function (s) {
      var rs = bySource[s];
      return { type: "scatter", mode: "lines+markers", name: s, x: rs.map(function (r) { return r.layer; }), y: rs.map(function (r) { return r[metric]; }) };
    });
    plot("pair-curves", traces, { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: metric } } });
  }

  function drawPairMap() {
    var layer = $("map-layer").value;
    if (layer === "") { note("pair-map", "No layers in common."); return Promise.resolve(); }
    var kind = $("map-kind").value;
    var needs = kind === "attention" ? ["attn_weights"] : ["q", "k"];
    if (!sel.items.slice(0, 2).every(function (it) { return needs.every(function (s) { return has(it, s); }); })) {
      note("pair-map", "Both states' runs need " + needs.join(" and ") + ".");
      return Promise.resolve();
    }
    var params = { a: sel.items[0], b: sel.items[1], what: kind, layer: layer };
    if ($("map-head").value !== "") params.head = $("map-head").value;
    return api("pair", params).then(function (res) {
      var show = $("map-show").value;
      var z = res.maps[show];
      view.pairMap = res;
      $("pair-map-title").textContent = ($("map-kind").value === "attention" ? "Attention" : "q·k scores") + " of layer " + res.layer +
        (res.head === null ? " (mean of heads)" : " · head " + res.head) + " · " + shape(res) + lib.range(z);
      // signed maps on the diverging scale (positive red); weights and squared errors are not
      var signed = show === "ratio" || ($("map-kind").value === "scores" && ["a", "b", "hadamard"].indexOf(show) >= 0);
      return plot("pair-map", [{ type: "heatmap", z: z, colorscale: signed ? res.colorscale : "Viridis", zmid: signed ? 0 : undefined, hoverongaps: false }],
        { height: 520, xaxis: { title: { text: "key position" } }, yaxis: { title: { text: "query position" }, autorange: "reversed" } });
    }).catch(function (err) { note("pair-map", "Map unavailable: " + err.message); });
  }

  function shape(res) {  // the map's shape, and the blocks it was averaged over to draw
    var binned = res.block[0] > 1 || res.block[1] > 1;
    return res.shape[0] + " × " + res.shape[1] +
      (binned ? " (means of " + res.block[0] + " × " + res.block[1] + " blocks)" : "");
  }


  // ---- group ----------------------------------------------------------------------------------
  function drawGroup() {
    var base = Object.assign({}, sourceParams());
    var params = function (what) {
      var p = new URLSearchParams(Object.assign({ what: what }, base));
      sel.items.forEach(function (it) { p.append("state", it); });
      return p;
    };
    $("group-title").textContent = "Group of " + sel.items.length + " states";
    var get = function (what) { return api("group", params(what)); };
    return Promise.all([
      get("centroid").then(function (res) {
        var byState = {};
        rows(res.table).filter(firstSource(res)).forEach(function (r) { (byState[r.state] = byState[r.state] || []).push(r); });
        view.groupCentroid = res;
        return plot("group-centroid", Object.keys(byState).map(function (s) {
          return { type: "scatter", mode: "lines", name: shortRun(s), x: byState[s].map(function (r) { return r.layer; }), y: byState[s].map(function (r) { return r.cos_to_centroid; }) };
        }), { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "cosine to centroid" } } });
      }),
      get("divergence").then(function (res) {
        var r = rows(res.table).filter(firstSource(res));
        view.groupDivergence = res;
        return plot("group-divergence", [{ type: "scatter", mode: "lines+markers", name: "divergence", x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.divergence; }) }],
          { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "1 − mean pairwise cosine" } } });
      }),
      drawMatrix(get),
      Promise.all([get("linkage"), get("leaves")]).then(function (res) { drawDendrogram(res[0], res[1]); }),
      Promise.all([get("pca"), get("pca-variance")]).then(function (res) { drawPca(res[0], res[1]); }),
      get("spectrum").then(function (res) {
        var r = rows(res.table).filter(firstSource(res));
        return plot("group-spectrum", [
          { type: "scatter", mode: "lines", name: "effective rank", x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.effective_rank; }) },
          { type: "scatter", mode: "lines", name: "spectral norm", yaxis: "y2", line: { dash: "dot" }, x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.spectral_norm; }) },
          { type: "scatter", mode: "lines", name: "nuclear norm", yaxis: "y2", line: { dash: "dash" }, x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.nuclear_norm; }) },
        ], { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "effective rank" } },
             yaxis2: { title: { text: "norm" }, overlaying: "y", side: "right", showgrid: false } });
      }),
    ]);
  }

  function firstSource(res) {  // group charts draw one source: hidden_out when there, else the first
    var sources = res.table.source || [];
    var first = sources.indexOf("hidden_out") >= 0 ? "hidden_out" : sources[0];
    return function (r) { return r.source === first; };
  }

  function drawMatrix(get) {
    var metric = $("matrix-metric").value;
    return get(metric === "cka" ? "cka" : "pairwise").then(function (res) {
      var labels = res.states;
      var idx = {};
      labels.forEach(function (l, i) { idx[l] = i; });
      var z = labels.map(function () { return labels.map(function () { return null; }); });
      rows(res.table).filter(firstSource(res)).forEach(function (r) {
        z[idx[r.state_a]][idx[r.state_b]] = r[metric];
        z[idx[r.state_b]][idx[r.state_a]] = r[metric];
      });
      view.groupMatrix = { metric: metric, states: labels, z: z };
      var names = labels.map(shortRun);
      return plot("group-matrix", [{ type: "heatmap", z: z, x: names, y: names, colorscale: "Viridis", hovertemplate: "%{y} · %{x}<br>%{z}<extra></extra>" }],
        { height: 420, margin: { l: 140, r: 10, t: 10, b: 120 }, yaxis: { autorange: "reversed" } });
    });
  }

  function drawDendrogram(linkage, leaves) {
    var merges = rows(linkage.table).filter(firstSource(linkage));
    var order = rows(leaves.table).filter(firstSource(leaves));
    var states = linkage.states;
    var n = states.length;
    var x = {}, y = {};
    order.forEach(function (r) { x[states.indexOf(r.state)] = r.order; y[states.indexOf(r.state)] = 0; });
    var xs = [], ys = [];
    merges.forEach(function (m, i) {
      var a = m.cluster_a, b = m.cluster_b, id = n + i;
      xs.push(x[a], x[a], x[b], x[b], null);
      ys.push(y[a], m.distance, m.distance, y[b], null);
      x[id] = (x[a] + x[b]) / 2;
      y[id] = m.distance;
    });
    return plot("group-dendrogram", [{ type: "scatter", mode: "lines", x: xs, y: ys, line: { color: "#334155" }, hoverinfo: "skip", showlegend: false }],
      { height: 420, margin: { l: 55, r: 10, t: 10, b: 120 }, yaxis: { title: { text: "1 − cosine" } },
        xaxis: { tickvals: order.map(function (r) { return r.order; }), ticktext: order.map(function (r) { return shortRun(r.state); }) } });
  }

  function drawPca(pca, variance) {
    var byState = {};
    rows(pca.table).filter(firstSource(pca)).forEach(function (r) { (byState[r.state] = byState[r.state] || []).push(r); });
    var v = rows(variance.table).filter(firstSource(variance));
    $("group-pca-title").textContent = "PCA of the states through depth (explained variance: " +
      v.map(function (r) { return "PC" + r.component + " " + (100 * r.explained_variance).toFixed(1) + "%"; }).join(", ") + ")";
    return plot("group-pca", Object.keys(byState).map(function (s) {
      var rs = byState[s];
      return { type: "scatter", mode: "lines+markers", name: shortRun(s), x: rs.map(function (r) { return r.pc1; }), y: rs.map(function (r) { return r.pc2; }),
               text: rs.map(function (r) { return "layer " + r.layer; }), hovertemplate: "%{text}<extra></extra>" };
    }), { height: 420, xaxis: { title: { text: "PC1" } }, yaxis: { title: { text: "PC2" } } });
  }

  // ---- depth ----------------------------------------------------------------------------------
  function fillDepthStates() {
    var run = lib.state.run;
    var own = ((runInfo[run] || {}).states || []).filter(function (s) { return s.full; }).map(function (s) { return [run + "@" + s.state, s.label]; });
    var picked = sel.items.map(function (it) { return [it, "picked: " + shortRun(it)]; });
    var before = $("depth-state").value || new URLSearchParams(location.search).get("depth");
    lib.fill($("depth-state"), picked.concat(own));
    if (before && Array.prototype.some.call($("depth-state").options, function (o) { return o.value === before; })) $("depth-state").value = before;
  }

  function drawDepth() {
    var state = $("depth-state").value;
    if (!state) return Promise.resolve();
    var at = { state: state };
    var attention = has(state, "attn_weights"), qk = has(state, "q") && has(state, "k");
    var converges = has(state, "hidden_out") && layerCount(state) >= 2;
    if (!converges) note("depth-convergence", "Needs hidden_out at two or more layers.");
    if (!attention) { note("depth-entropy", "Needs attention weights."); note("depth-heads", "Needs attention weights."); }
    if (!qk) note("depth-scores", "Needs q and k.");
    return Promise.all([
      !converges ? null :
      Promise.all([api("depth", Object.assign({ what: "convergence" }, at)), api("depth", Object.assign({ what: "effective-depth" }, at))]).then(function (res) {
        var r = rows(res[0].table);
        var eff = rows(res[1].table)[0] || {};
        view.convergence = res[0];
        $("depth-convergence-title").textContent = "Residual convergence of " + shortRun(state) + " (effective depth: last token " +
          (eff.effective_depth_last === null ? "none" : eff.effective_depth_last) + ", mean over tokens " + (eff.effective_depth_mean === null ? "none" : eff.effective_depth_mean) + ")";
        var layer = r.map(function (x) { return x.layer; });
        return plot("depth-convergence", [
          { type: "scatter", mode: "lines", name: "cos(h, next) last token", x: layer, y: r.map(function (x) { return x.cos_last; }) },
          { type: "scatter", mode: "lines", name: "cos(h, next) mean", x: layer, y: r.map(function (x) { return x.cos_mean; }) },
          { type: "scatter", mode: "lines", name: "‖Δh‖/‖h‖ last token", yaxis: "y2", line: { dash: "dot" }, x: layer, y: r.map(function (x) { return x.update_last; }) },
          { type: "scatter", mode: "lines", name: "‖Δh‖/‖h‖ mean", yaxis: "y2", line: { dash: "dot" }, x: layer, y: r.map(function (x) { return x.update_mean; }) },
        ], { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "adjacent-layer cosine" } },
             yaxis2: { title: { text: "relative update" }, overlaying: "y", side: "right", showgrid: false } });
      }).catch(function (err) { note("depth-convergence", "Convergence unavailable: " + err.message); }),
      !attention ? null : api("depth", Object.assign({ what: "entropy" }, at)).then(function (res) {
        var r = rows(res.table);
        return plot("depth-entropy", [{ type: "scatter", mode: "lines+markers", name: "mean entropy (nats)", x: r.map(function (x) { return x.layer; }), y: r.map(function (x) { return x.entropy; }) }],
          { xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "entropy (nats)" } } });
      }).catch(function (err) { note("depth-entropy", "Attention entropy unavailable: " + err.message); }),
      !attention ? null : api("depth", Object.assign({ what: "head-entropy" }, at)).then(function (res) {
        var r = rows(res.table);
        var layers = [], heads = [];
        r.forEach(function (x) { if (layers.indexOf(x.layer) < 0) layers.push(x.layer); if (heads.indexOf(x.head) < 0) heads.push(x.head); });
        var z = layers.map(function () { return heads.map(function () { return null; }); });
        r.forEach(function (x) { z[layers.indexOf(x.layer)][heads.indexOf(x.head)] = x.entropy; });
        return plot("depth-heads", [{ type: "heatmap", z: z, x: heads, y: layers, colorscale: "Viridis", hovertemplate: "layer %{y} · head %{x}<br>%{z} nats<extra></extra>" }],
          { xaxis: { title: { text: "head" } }, yaxis: { title: { text: "layer" }, autorange: "reversed" } });
      }).catch(function (err) { note("depth-heads", "Per-head entropy unavailable: " + err.message); }),
      !qk ? null : api("depth", Object.assign({ what: "scores", layer: $("depth-layer").value }, at)).then(function (res) {
        var z = res.maps.score;
        var stacked = res.layer === null;
        view.depthScores = res;
        $("depth-scores-title").textContent = "q·k / √d scores, " + (stacked ? "every layer stacked (layer 0 on top)" : "layer " + res.layer) +
          " (mean of heads) · " + (stacked ? res.shape.join(" × ") : shape(res)) + lib.range(z);
        var yaxis = { title: { text: stacked ? "layer (its query positions)" : "query position" }, autorange: "reversed" };
        if (stacked) { yaxis.tickvals = res.layer_starts; yaxis.ticktext = res.layers.map(String); }
        return plot("depth-scores", [{ type: "heatmap", z: z, colorscale: res.colorscale, zmid: 0, hoverongaps: false }],
          { height: stacked ? 640 : 420, xaxis: { title: { text: "key position" } }, yaxis: yaxis });
      }).catch(function (err) { note("depth-scores", "Scores unavailable: " + err.message); }),
      !converges ? null : api("cross_layer", at).then(function (res) {
        view.crossLayer = res;
        return plot("depth-cross", [{ type: "heatmap", z: res.z, x: res.layers, y: res.layers, colorscale: "Viridis",
          hovertemplate: "layer %{y} · layer %{x}<br>%{z}<extra></extra>" }],
          { height: 380, xaxis: { title: { text: "layer" } }, yaxis: { title: { text: "layer" }, autorange: "reversed" } });
      }).catch(function (err) { note("depth-cross", "Cross-layer cosine unavailable: " + err.message); }),
      !(qk && has(state, "v")) ? note("depth-qkv", "Needs q, k and v.") : api("depth", Object.assign({ what: "qkv-last" }, at)).then(function (res) {
        return plot("depth-qkv", [{ type: "heatmap", z: res.maps.qkv_last, y: res.layers, colorscale: res.colorscale, zmid: 0, hoverongaps: false }],
          { height: 380, xaxis: { title: { text: "index (v's width)" } }, yaxis: { title: { text: "layer" }, autorange: "reversed" } });
      }).catch(function (err) { note("depth-qkv", "qkv_last unavailable: " + err.message); }),
    ]);
  }

  function drawNextToken() {
    if (lib.state.S.sources.indexOf("logits") < 0) { note("next-token", "Needs logits."); return Promise.resolve(); }
    return api("next_token", {}).then(function (res) {
      var r = rows(res.table);
      var steps = r.map(function (x) { return x.step; });
      return plot("next-token", [
        { type: "scatter", mode: "lines+markers", name: "entropy (nats)", x: steps, y: r.map(function (x) { return x.entropy; }) },
        { type: "scatter", mode: "lines+markers", name: "effective vocabulary exp(H)", yaxis: "y2", x: steps, y: r.map(function (x) { return x.effective_vocab; }) },
        { type: "scatter", mode: "lines+markers", name: "top-1 probability", x: steps, y: r.map(function (x) { return x.top1_prob; }), line: { dash: "dot" } },
      ], { xaxis: { title: { text: "generation step" } }, yaxis: { title: { text: "entropy / probability" } },
           yaxis2: { title: { text: "exp(H)" }, overlaying: "y", side: "right", showgrid: false } });
    }).catch(function (err) { note("next-token", "Next-token statistics unavailable: " + err.message); });
  }

  // ---- wiring -----------------------------------------------------------------------------------
  view.onRun = function () {
    var S = lib.state.S;
    remember(S);
    return api("runs").then(function (res) {
      var before = $("pick-run").value;
      lib.fill($("pick-run"), res.runs.map(function (r) { return [r.id, r.id]; }), before || S.id);
      var sources = S.sources.filter(function (s) { return ["attn_weights", "embeddings", "logits"].indexOf(s) < 0; });
      lib.fill($("cmp-source"), [["", "every residual source"]].concat(sources), sel.source);
      lib.fill($("map-layer"), S.layers, $("map-layer").value || S.layers[Math.floor(S.layers.length / 2)]);
      lib.fill($("depth-layer"), [["", "all layers, stacked"]].concat(S.layers.map(function (l) { return [String(l), String(l)]; })),
               $("depth-layer").value || S.layers[Math.floor(S.layers.length / 2)]);
      var heads = [["", "mean of heads"]];
      for (var h = 0; h < (S.heads || 0); h++) heads.push([String(h), "head " + h]);
      lib.fill($("map-head"), heads, "");
      return fillPicker();
    }).then(function () {
      if (!view.compareStarted) {
        view.compareStarted = true;
        var q = new URLSearchParams(location.search);
        sel.items = q.getAll("cmp");
        if (q.has("cmp_source")) { sel.source = q.get("cmp_source"); $("cmp-source").value = sel.source; }
      }
      drawChips();
      fillDepthStates();
      return Promise.all([drawComparison(), drawDepth(), drawNextToken()]);
    }).catch(lib.showError);
  };

  $("pick-run").addEventListener("change", function () { fillPicker().catch(lib.showError); });
  $("pick-add").addEventListener("click", function () {
    var item = $("pick-run").value + "@" + $("pick-state").value;
    if (sel.items.indexOf(item) < 0) sel.items.push(item);
    changed();
  });
  $("pick-clear").addEventListener("click", function () { sel.items = []; changed(); });
  $("cmp-source").addEventListener("change", function () { sel.source = $("cmp-source").value; changed(); });
  $("pair-metric").addEventListener("change", drawPairCurves);
  ["map-kind", "map-layer", "map-head", "map-show"].forEach(function (id) { $(id).addEventListener("change", function () { drawPairMap(); }); });
  $("matrix-metric").addEventListener("change", function () {
    drawMatrix(function (what) {
      var p = new URLSearchParams(Object.assign({ what: what }, sourceParams()));
      sel.items.forEach(function (it) { p.append("state", it); });
      return api("group", p);
    }).catch(lib.showError);
  });
  ["depth-state", "depth-layer"].forEach(function (id) {
    $(id).addEventListener("change", function () {
      var q = new URLSearchParams(location.search);
      q.set("depth", $("depth-state").value);  // the link reopens this depth view too
      history.replaceState(null, "", "?" + q.toString());
      drawDepth().catch(lib.showError);
    });
  });
})();
