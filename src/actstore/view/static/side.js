// actstore view: other runs side by side, each a column drawn with the main controls.
(function () {
  "use strict";
  var view = window.actstoreView;
  var lib = view.lib;
  var $ = function (id) { return document.getElementById(id); };
  var steps = {};  // run id -> number of steps (from its summary)

  function picked() {
    return Array.prototype.filter.call($("side-runs").options, function (o) { return o.selected; }).map(function (o) { return o.value; });
  }

  function columnId(run) { return "side-" + run.replace(/[^A-Za-z0-9_-]/g, "_"); }

  function column(run) {
    var id = columnId(run);
    var col = document.getElementById(id);
    if (!col) {
      col = document.createElement("div");
      col.className = "col";
      col.id = id;
      col.innerHTML = '<h3></h3><div class="chart"></div>';
      $("side-cols").appendChild(col);
    }
    return col;
  }

  function nSteps(run) {
    if (steps[run] !== undefined) return Promise.resolve(steps[run]);
    return lib.api("summary", { run: run }).then(function (S) { steps[run] = S.steps.length; return steps[run]; });
  }

  function states() {  // the compare selection's RUN@STATE items, when asked for
    return $("side-selection").checked && view.selectionItems ? view.selectionItems() : [];
  }

  function drawState(item) {  // one selected state's full pass, with the main source, layer and head
    var col = column("state:" + item);
    var s = lib.state;
    var params = { state: item, source: s.source, layer: s.layer, head: s.head };
    return lib.api("state_map", params).then(function (m) {
      col.querySelector("h3").textContent = item + " · " + m.source + (m.layer === null ? "" : " · layer " + m.layer) +
        " · " + lib.readout({ shape: m.shape, block: m.block, z: m.maps.z });
      var trace = lib.colours({ type: "heatmap", z: m.maps.z, hoverongaps: false }, m);
      return Plotly.react(col.querySelector(".chart"), [trace], { margin: { l: 50, r: 10, t: 10, b: 40 }, height: 380,
        yaxis: { autorange: "reversed", title: { text: m.source === "attn_weights" ? "query" : "token" } },
        xaxis: { title: { text: m.source === "attn_weights" ? "key" : "channel" } } }, lib.config);
    }).catch(function (err) { col.querySelector(".chart").innerHTML = '<p class="note">' + lib.escapeHtml(err.message) + "</p>"; });
  }

  function draw() {
    var runs = picked();
    var items = states();
    var keep = runs.map(columnId).concat(items.map(function (it) { return columnId("state:" + it); }));
    Array.prototype.forEach.call(Array.prototype.slice.call($("side-cols").children), function (c) {
      if (keep.indexOf(c.id) < 0) c.remove();
    });
    var s = lib.state;
    return Promise.all(items.map(drawState).concat(runs.map(function (run) {
      var col = column(run);
      return nSteps(run).then(function (n) {
        var params = { run: run, source: s.source, layer: s.layer, step: Math.min(s.step, n - 1), head: s.head, reduce: s.reduce };
        return lib.api("heatmap", params).then(function (h) {
          col.querySelector("h3").textContent = run + " · " + h.source + (h.layer === null ? "" : " · layer " + h.layer) +
            " · step " + h.step + " · " + lib.readout(h);
          var trace = lib.colours({ type: "heatmap", z: h.z, hoverongaps: false }, h);
          return Plotly.react(col.querySelector(".chart"), [trace], { margin: { l: 50, r: 10, t: 10, b: 40 }, height: 380,
            yaxis: { autorange: "reversed", title: { text: h.ylabel } }, xaxis: { title: { text: h.xlabel } } }, lib.config);
        });
      }).catch(function (err) { col.querySelector(".chart").innerHTML = '<p class="note">' + lib.escapeHtml(err.message) + "</p>"; });
    })));
  }

  function saveAddress() {  // the address reopens the columns too
    var q = new URLSearchParams(location.search);
    q.delete("side");
    picked().forEach(function (run) { q.append("side", run); });
    if ($("side-selection").checked) q.set("side_sel", "1"); else q.delete("side_sel");
    history.replaceState(null, "", "?" + q.toString());
  }

  function changed() {
    saveAddress();
    draw().catch(lib.showError);
  }

  view.afterRefresh = function () { return picked().length || states().length ? draw() : null; };
  view.onSelection = function () { return $("side-selection").checked ? draw() : null; };
  $("side-runs").addEventListener("change", changed);
  $("side-selection").addEventListener("change", changed);
  var restored = false;  // the first run shown takes its columns from the address

  var previous = view.onRun;
  view.onRun = function () {
    return Promise.resolve(previous ? previous() : null).then(function () {
      return lib.api("runs").then(function (res) {
        var q = new URLSearchParams(location.search);
        var chosen = restored ? picked() : q.getAll("side");
        if (!restored) $("side-selection").checked = q.get("side_sel") === "1";
        restored = true;
        lib.fill($("side-runs"), res.runs.filter(function (r) { return r.id !== lib.state.run; }).map(function (r) { return [r.id, r.id + "  (" + r.scenario + ")"]; }));
        Array.prototype.forEach.call($("side-runs").options, function (o) { o.selected = chosen.indexOf(o.value) >= 0; });
        return draw();
      });
    });
  };
})();
