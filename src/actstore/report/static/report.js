/* actstore report: draws charts lazily and runs the top-k explorers.
 *
 * Figure specs live in one JSON blob (<script id="figures">), keyed by the id on each
 * <div class="chart" data-fig="...">. A chart is drawn once it is visible, i.e. not
 * inside a closed <details>: at load, and whenever a <details> opens. Drawing goes
 * through a small queue so that a page with hundreds of charts stays responsive.
 * window.actstoreReport exposes the state for tests (idle(), drawn count, openAll()).
 */
(function () {
  "use strict";
  var FIGS = JSON.parse(document.getElementById("figures").textContent);
  var CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };
  var queue = [];
  var busy = false;
  var explorers = [];

  function hidden(el) {
    return el.closest("details:not([open])") !== null;
  }

  function pump() {
    if (busy) return;
    var el = queue.shift();
    if (!el) return;
    busy = true;
    var done = function () { busy = false; setTimeout(pump, 0); };
    var result;
    if (el.dataset.fig) {
      var spec = FIGS[el.dataset.fig];
      if (!spec) {
        console.error("actstore report: no figure " + el.dataset.fig);
        done();
        return;
      }
      result = Plotly.newPlot(el, spec.data, spec.layout, CONFIG);
    } else {
      result = el._explorer.drawChart();
    }
    el.classList.add("drawn");
    Promise.resolve(result).then(done, function (err) { console.error(err); done(); });
  }

  function drawVisible(root) {
    var nodes = (root || document).querySelectorAll(".chart:not(.drawn):not(.queued)");
    nodes.forEach(function (el) {
      if (!hidden(el)) {
        el.classList.add("queued");
        queue.push(el);
      }
    });
    pump();
  }

  document.addEventListener("toggle", function (e) {
    if (e.target.open) drawVisible(e.target);
  }, true);

  /* ---- generation top-k explorer ---------------------------------------------- */
  var WINDOW = 7; // steps shown after the selected one, which comes first

  function cell(tag, text, cls) {
    var el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    if (cls) el.className = cls;
    return el;
  }

  function Explorer(box) {
    this.box = box;
    this.data = JSON.parse(box.querySelector(".topk-data").textContent);
    this.slider = box.querySelector(".topk-slider");
    this.label = box.querySelector(".topk-step-label");
    this.thead = box.querySelector(".topk-table thead");
    this.tbody = box.querySelector(".topk-table tbody");
    this.chart = box.querySelector(".topk-chart");
    this.chart._explorer = this;
    var self = this;
    this.slider.addEventListener("input", function () { self.update(); });
    box.querySelectorAll(".topk-step-btn").forEach(function (btn) {
      btn.addEventListener("click", function () {
        var v = Number(self.slider.value) + Number(btn.dataset.delta);
        self.slider.value = String(Math.max(0, Math.min(self.data.steps.length - 1, v)));
        self.update();
      });
    });
    this.update();
  }

  Explorer.prototype.selected = function () {
    return this.data.steps[Number(this.slider.value)];
  };

  Explorer.prototype.update = function () {
    var steps = this.data.steps;
    var sel = Number(this.slider.value);
    var lo = sel;
    var hi = Math.min(steps.length - 1, sel + WINDOW);
    var st = steps[sel];
    this.label.textContent = "step " + st.step + " (" + st.kind + ") generated “" + st.generated + "”";
    var head = document.createElement("tr");
    head.appendChild(cell("th", "rank", "rank"));
    for (var i = lo; i <= hi; i++) {
      var th = cell("th", "", i === sel ? "sel" : "");
      th.appendChild(cell("div", "step " + steps[i].step, "step-num"));
      th.appendChild(cell("div", steps[i].kind, "step-kind " + steps[i].kind));
      th.appendChild(cell("div", steps[i].generated, "tok"));
      head.appendChild(th);
    }
    this.thead.replaceChildren(head);
    var rows = [];
    for (var r = 0; r < this.data.k; r++) {
      var tr = document.createElement("tr");
      tr.appendChild(cell("td", String(r + 1), "rank"));
      for (var j = lo; j <= hi; j++) {
        var t = steps[j].top[r];
        var td = cell("td", "", j === sel ? "sel" : "");
        if (t) {
          td.appendChild(cell("span", t[0], "tok"));
          td.appendChild(cell("span", (100 * t[1]).toFixed(2) + "%", "prob"));
          td.style.background = "rgba(37,99,235," + (0.08 + 0.5 * t[1]).toFixed(3) + ")";
          if (t[0] === steps[j].generated) td.classList.add("chosen");
        }
        tr.appendChild(td);
      }
      rows.push(tr);
    }
    this.tbody.replaceChildren.apply(this.tbody, rows);
    if (this.chart.classList.contains("drawn")) this.drawChart();
  };

  Explorer.prototype.drawChart = function () {
    var st = this.selected();
    var labels = st.top.map(function (t, i) { return (i + 1) + ". " + t[0]; });
    var probs = st.top.map(function (t) { return t[1]; });
    var data = [{
      type: "bar", orientation: "h", x: probs, y: labels, marker: { color: "#2563eb" },
      hovertemplate: "%{y}: %{x:.2%}<extra></extra>"
    }];
    var layout = {
      title: { text: "Top-" + probs.length + " next-token probabilities at step " + st.step, font: { size: 13 }, x: 0.02, xanchor: "left" },
      height: Math.max(260, 40 + 18 * probs.length), margin: { l: 110, r: 16, t: 36, b: 36 },
      font: { size: 11, family: "system-ui, sans-serif" },
      xaxis: { tickformat: ".0%", range: [0, 1] }, yaxis: { autorange: "reversed", type: "category" },
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fbfbfd"
    };
    return Plotly.react(this.chart, data, layout, CONFIG);
  };

  document.querySelectorAll(".topk").forEach(function (box) { explorers.push(new Explorer(box)); });

  /* ---- expand / collapse buttons ---------------------------------------------- */
  document.querySelectorAll("[data-expand]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var scope = document.getElementById(btn.dataset.expand);
      var open = btn.dataset.open === "1";
      scope.querySelectorAll("details").forEach(function (d) { d.open = open; });
    });
  });

  window.actstoreReport = {
    drawVisible: drawVisible,
    idle: function () { return queue.length === 0 && !busy; },
    openAll: function () {
      document.querySelectorAll("details").forEach(function (d) { d.open = true; });
      drawVisible();
    },
    explorers: explorers,
    figureCount: Object.keys(FIGS).length
  };
  drawVisible();
})();
