// actstore view: keeping what is on screen. "pin" copies a chart's curves into the
// pinned chart, where curves from any view, state or run are overlaid on one axis;
// "save as HTML" writes a section (its charts with their numbers, and its tables) as one
// self-contained page that opens offline, plotly included.
(function () {
  "use strict";
  var view = window.actstoreView;
  var lib = view.lib;
  var $ = function (id) { return document.getElementById(id); };
  var keep = (view.keep = { pinned: [], saved: null });
  var plotlySource = null;

  function heading(chart) {  // the chart's title: the nearest heading before it
    var el = chart;
    while (el) {
      var prev = el.previousElementSibling;
      while (prev) {
        if (/^H[1-4]$/.test(prev.tagName)) return prev.textContent.trim();
        var inner = prev.querySelector && prev.querySelector("h3");
        if (inner) return inner.textContent.trim();
        prev = prev.previousElementSibling;
      }
      el = el.parentElement;
    }
    return chart.id;
  }

  // ---- pins -------------------------------------------------------------------------------
  function pin(chart) {
    var curves = (chart.data || []).filter(function (t) { return t.type === "scatter"; });
    if (!curves.length) return;
    var where = heading(chart) + " · " + (lib.state.run || "");
    curves.forEach(function (t) {
      keep.pinned.push({ type: "scatter", mode: t.mode || "lines", x: t.x, y: t.y, text: t.text,
                         name: (t.name || chart.id) + " — " + where, line: { dash: t.line && t.line.dash } });
    });
    drawPinned();
  }

  function drawPinned() {
    $("pinned-section").hidden = keep.pinned.length === 0;
    if (!keep.pinned.length) return;
    Plotly.react("pinned", keep.pinned, { margin: { l: 55, r: 15, t: 10, b: 45 }, height: 420,
      legend: { orientation: "h", y: -0.2 }, xaxis: { title: { text: "layer or step, as each curve's chart" } } }, lib.config);
  }

  function addPinButtons() {
    Array.prototype.forEach.call(document.querySelectorAll("#compare .chart, #depth .chart, #decomposition, #trajectory"), function (chart) {
      if (chart.dataset.pinnable) return;
      chart.dataset.pinnable = "1";
      var button = document.createElement("button");
      button.type = "button";
      button.className = "pin";
      button.textContent = "pin";
      button.title = "overlay this chart's curves in the pinned chart";
      button.addEventListener("click", function () { pin(chart); });
      chart.insertAdjacentElement("beforebegin", button);
    });
  }

  // ---- save as HTML -------------------------------------------------------------------------
  function script(json) { return JSON.stringify(json).replace(/</g, "\\u003c"); }

  function pageFor(section, name) {
    var blocks = [];
    var n = 0;
    Array.prototype.forEach.call(section.querySelectorAll(".js-plotly-plot, .table-wrap"), function (el) {
      if (el.offsetParent === null) return;  // hidden: not part of what is shown
      var title = lib.escapeHtml(heading(el));
      if (el.classList.contains("js-plotly-plot")) {
        var id = "chart" + n++;
        var layout = JSON.parse(JSON.stringify(el.layout || {}));
        blocks.push("<h3>" + title + "</h3><div id=\"" + id + "\"></div><script>Plotly.newPlot(" + script(id) + "," +
          script(el.data) + "," + script(layout) + ",{displaylogo:false,responsive:true});<\/script>");
      } else if (el.innerHTML.trim()) {
        blocks.push("<h3>" + title + "</h3>" + el.innerHTML);
      }
    });
    var title = name + " · " + (lib.state.run || "");
    return "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + lib.escapeHtml("actstore: " + title) +
      "</title><script>" + plotlySource + "<\/script><style>body{font:14px system-ui,sans-serif;margin:1rem 2rem}" +
      "table{border-collapse:collapse;font-size:.8rem}td,th{border:1px solid #e2e8f0;padding:.2rem .5rem}</style></head><body>" +
      "<h1>" + lib.escapeHtml(title) + "</h1><p>Saved " + new Date().toISOString() + " from actstore view. Reopen the live view: <code>" +
      lib.escapeHtml(location.pathname + location.search) + "</code></p>" + blocks.join("\n") + "</body></html>";
  }

  function save(section, name) {
    var ready = plotlySource ? Promise.resolve() : fetch("/static/plotly.min.js").then(function (r) { return r.text(); })
      .then(function (text) { plotlySource = text.replace(/<\/script/gi, "<\\/script"); });
    return ready.then(function () {
      var html = pageFor(section, name);
      keep.saved = { section: section.id || "main", bytes: html.length };
      var a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([html], { type: "text/html" }));
      a.download = "actstore-" + (section.id || "view") + "-" + (lib.state.run || "run") + ".html";
      document.body.appendChild(a);
      a.click();
      setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    }).catch(lib.showError);
  }

  Array.prototype.forEach.call(document.querySelectorAll("section.savable"), function (section) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "save-html";
    button.textContent = "save as HTML";
    button.title = "this section's charts and tables as one page that opens offline";
    var h2 = section.querySelector("h2");
    var name = h2.textContent;
    button.addEventListener("click", function () { save(section, name); });
    h2.appendChild(button);
  });
  $("save-page").addEventListener("click", function () { save(document.querySelector("main"), "actstore view"); });
  $("pinned-clear").addEventListener("click", function () { keep.pinned = []; drawPinned(); });

  var previous = view.onRun;
  view.onRun = function () {
    return Promise.resolve(previous ? previous() : null).then(addPinButtons);
  };
})();
