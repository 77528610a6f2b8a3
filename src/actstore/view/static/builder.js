// actstore view: the scenario builder. The server parses, checks and writes YAML
// (the same checks as `actstore capture` and `actstore validate`); this file keeps the
// form and the YAML text in step, shows each problem at its field, and runs captures.
(function () {
  "use strict";
  var view = window.actstoreView;
  var lib = view.lib;
  var $ = function (id) { return document.getElementById(id); };
  var doc = {};  // the scenario as data: what the form shows, unknown keys kept
  var promptIsList = false;
  var timers = {};
  var b = (view.builder = { problems: [], jobs: [], checks: 0 });

  function api(route, params, post) { return lib.api(route, params, post); }
  function later(key, fn, ms) { clearTimeout(timers[key]); timers[key] = setTimeout(fn, ms); }
  function status(text) { $("b-status").textContent = text; }

  // ---- data <-> form ------------------------------------------------------------------------
  function getPath(obj, path) {
    return path.split(".").reduce(function (o, k) { return o && typeof o === "object" ? o[k] : undefined; }, obj);
  }
  function setPath(obj, path, value) {
    var keys = path.split(".");
    var o = obj;
    keys.slice(0, -1).forEach(function (k) { if (!o[k] || typeof o[k] !== "object") o[k] = {}; o = o[k]; });
    if (value === undefined) delete o[keys[keys.length - 1]];
    else o[keys[keys.length - 1]] = value;
  }

  function simpleInputs() { return $("b-form").querySelectorAll("fieldset.simple [data-field]"); }

  function readInput(el) {
    if (el.type === "checkbox") return el.checked;
    var v = el.value.trim();
    if (v === "") return undefined;
    if (el.type === "number") return Number(v);
    if (el.dataset.field === "capture.layers") {
      if (/^\d+(\s*,\s*\d+)*$/.test(v)) return v.split(",").map(function (x) { return Number(x); });
      return v;
    }
    return v;
  }

  function writeInput(el, value) {
    if (el.type === "checkbox") { el.checked = Boolean(value); return; }
    if (value === undefined || value === null) { el.value = ""; return; }
    el.value = Array.isArray(value) ? value.join(",") : String(value);
  }

  function prompts() {
    var p = doc.prompt;
    if (Array.isArray(p)) return p;
    return p && typeof p === "object" ? [p] : [];
  }

  function fillForm() {
    Array.prototype.forEach.call(simpleInputs(), function (el) { writeInput(el, getPath(doc, el.dataset.field)); });
    promptIsList = Array.isArray(doc.prompt);
    drawPrompts();
    drawRefs();
  }

  function messageEditor(messages, base, onChange) {
    var box = document.createElement("div");
    messages.forEach(function (m, j) {
      var row = document.createElement("div");
      row.className = "msg";
      var role = document.createElement("select");
      ["system", "user", "assistant"].forEach(function (r) { var o = document.createElement("option"); o.value = o.textContent = r; role.appendChild(o); });
      role.value = m.role || "user";
      role.dataset.field = base + "[" + j + "].role";
      role.setAttribute("aria-label", role.dataset.field);
      var content = document.createElement("textarea");
      content.rows = 2;
      content.value = m.content || "";
      content.dataset.field = base + "[" + j + "].content";
      content.setAttribute("aria-label", content.dataset.field);
      var remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "remove message";
      role.addEventListener("change", function () { m.role = role.value; onChange(); });
      content.addEventListener("input", function () { m.content = content.value; onChange(); });
      remove.addEventListener("click", function () { messages.splice(j, 1); onChange(true); });
      row.appendChild(role);
      row.appendChild(remove);
      row.appendChild(content);
      box.appendChild(row);
    });
    var add = document.createElement("button");
    add.type = "button";
    add.textContent = "add a message";
    add.addEventListener("click", function () {
      var last = messages[messages.length - 1];
      messages.push({ role: last && last.role === "user" ? "assistant" : "user", content: "" });
      onChange(true);
    });
    box.appendChild(add);
    return box;
  }

  function drawPrompts() {
    var box = $("b-prompts");
    box.innerHTML = "";
    var list = prompts();
    list.forEach(function (p, i) {
      if (!Array.isArray(p.messages)) p.messages = [];
      var base = promptIsList ? "prompt[" + i + "]" : "prompt";
      var card = document.createElement("div");
      card.className = "prompt";
      card.dataset.field = base;
      var head = document.createElement("div");
      head.innerHTML = "<strong>prompt " + i + "</strong> ";
      var each = document.createElement("label");
      var cb = document.createElement("input");
      cb.type = "checkbox";
      cb.checked = Boolean(p.run_at_each_message);
      cb.dataset.field = base + ".run_at_each_message";
      cb.addEventListener("change", function () { if (cb.checked) p.run_at_each_message = true; else delete p.run_at_each_message; formChanged(); });
      each.appendChild(document.createTextNode("run at each message "));
      each.appendChild(cb);
      head.appendChild(each);
      if (list.length > 1) {
        var rm = document.createElement("button");
        rm.type = "button";
        rm.textContent = "remove prompt";
        rm.addEventListener("click", function () { list.splice(i, 1); setPrompts(list); formChanged(true); });
        head.appendChild(rm);
      }
      card.appendChild(head);
      card.appendChild(messageEditor(p.messages, base + ".messages", formChanged));
      box.appendChild(card);
    });
  }

  function setPrompts(list) {
    promptIsList = promptIsList || list.length > 1;
    doc.prompt = promptIsList ? list : list[0];
  }

  function drawRefs() {
    var box = $("b-refs");
    box.innerHTML = "";
    var refs = Array.isArray(doc.reference_states) ? doc.reference_states : [];
    refs.forEach(function (r, i) {
      if (!Array.isArray(r.messages)) r.messages = [];
      var base = "reference_states[" + i + "]";
      var card = document.createElement("div");
      card.className = "reference";
      card.dataset.field = base;
      var label = document.createElement("input");
      label.type = "text";
      label.value = r.label || "";
      label.dataset.field = base + ".label";
      label.setAttribute("aria-label", label.dataset.field);
      label.addEventListener("input", function () { r.label = label.value; formChanged(); });
      var rm = document.createElement("button");
      rm.type = "button";
      rm.textContent = "remove reference";
      rm.addEventListener("click", function () { refs.splice(i, 1); formChanged(true); });
      var l = document.createElement("label");
      l.appendChild(document.createTextNode("label "));
      l.appendChild(label);
      card.appendChild(l);
      card.appendChild(rm);
      card.appendChild(messageEditor(r.messages, base + ".messages", formChanged));
      box.appendChild(card);
    });
  }

  // ---- the two directions -------------------------------------------------------------------
  var formEdits = 0;  // a check that started before the last form edit must not refill the form

  function formChanged(redraw) {
    formEdits += 1;
    Array.prototype.forEach.call(simpleInputs(), function (el) { setPath(doc, el.dataset.field, readInput(el)); });
    if (redraw) { drawPrompts(); drawRefs(); }
    later("render", function () {
      api("render", { data: JSON.stringify(doc) }, true).then(function (res) {
        $("b-yaml").value = res.text;
        return check(false);
      }).catch(lib.showError);
    }, 250);
  }

  function yamlChanged() { later("check", function () { check(true).catch(lib.showError); }, 400); }

  // Validate the YAML text; with ``refill`` the form follows it too.
  function check(refill) {
    var text = $("b-yaml").value;
    var name = $("b-name").value.trim() || "scenario.yaml";
    var edits = formEdits;
    b.checks += 1;
    return api("validate", { text: text, name: name }, true).then(function (res) {
      if ($("b-yaml").value !== text) return;  // edited since: the next check answers
      if (refill && res.data && edits === formEdits) { doc = res.data; fillForm(); }
      showProblems(res.problems);
    });
  }

  function showProblems(problems) {
    b.problems = problems;
    var form = $("b-form");
    Array.prototype.forEach.call(form.querySelectorAll(".field-error"), function (el) { el.remove(); });
    Array.prototype.forEach.call(form.querySelectorAll(".invalid"), function (el) { el.classList.remove("invalid"); });
    var list = $("b-problems");
    list.innerHTML = problems.length ? "" : '<p class="note">No problems: actstore capture accepts this scenario.</p>';
    problems.forEach(function (p) {
      var line = document.createElement("div");
      line.className = "problem " + p.severity;
      line.textContent = p.severity + ": " + (p.field ? p.field + ": " : "") + p.message + (p.fix ? " (" + p.fix + ")" : "");
      list.appendChild(line);
      var el = fieldElement(p.field);
      if (!el) return;
      el.classList.add("invalid");
      var msg = document.createElement("span");
      msg.className = "field-error";
      msg.dataset.for = p.field;
      msg.textContent = p.message + (p.fix ? " (" + p.fix + ")" : "");
      el.insertAdjacentElement("afterend", msg);
    });
  }

  function fieldElement(field) {  // the input for a field, else the nearest enclosing one
    var path = field || "";
    while (path) {
      var el = $("b-form").querySelector('[data-field="' + path.replace(/"/g, '\\"') + '"]');
      if (el) return el;
      var cut = Math.max(path.lastIndexOf("."), path.lastIndexOf("["));
      path = cut > 0 ? path.slice(0, cut) : "";
    }
    return null;
  }

  // ---- files, clone, save, launch -------------------------------------------------------------
  function loadFiles(chosen) {
    return api("scenarios").then(function (res) {
      $("b-folder").textContent = res.folder === null ? "no scenarios folder: start actstore view with --scenarios DIR to open and save files"
        : "folder: " + res.folder + " (" + res.files.length + " files)";
      lib.fill($("b-files"), res.files.map(function (f) { return f.name; }), chosen);
    }).catch(function (err) { $("b-folder").textContent = err.message; });
  }

  function setText(text, name) {
    $("b-yaml").value = text;
    if (name !== undefined) $("b-name").value = name;
    return check(true);
  }

  function openFile() {
    var name = $("b-files").value;
    if (!name) return Promise.resolve();
    return api("scenario", { name: name }).then(function (res) { status("opened " + res.name); return setText(res.text, res.name); });
  }

  function newScenario() {
    doc = { name: "my_scenario", model: { id: "smollm2", dtype: "float32", device: "auto" },
            prompt: { messages: [{ role: "user", content: "Hello!" }] },
            generation: { max_new_tokens: 8, do_sample: false }, capture: { hidden_states: true, layers: "all" } };
    $("b-name").value = "my_scenario.yaml";
    fillForm();
    formChanged();
  }

  function cloneRun() {
    return api("clone", { run: lib.state.run }).then(function (res) {
      status("cloned the scenario of " + res.run);
      return setText(res.text, res.name);
    });
  }

  function save() {
    var params = { name: $("b-name").value.trim(), text: $("b-yaml").value, overwrite: $("b-overwrite").checked };
    return api("save", params, true).then(function (res) {
      status("saved " + res.name + " (" + res.bytes + " bytes)");
      return loadFiles(res.name);
    });
  }

  function launch() {
    var name = $("b-name").value.trim();
    return api("launch", { name: name }, true).then(function (job) {
      status("capture " + job.id + " of " + job.name + " queued");
      return pollJobs();
    });
  }

  function pollJobs() {
    return api("jobs").then(function (res) {
      b.jobs = res.jobs;
      drawJobs(res.jobs);
      var active = res.jobs.some(function (j) { return j.state === "queued" || j.state === "running"; });
      if (active) later("jobs", function () { pollJobs().catch(lib.showError); }, 1000);
      else refreshRunList(res.jobs);
    });
  }

  function refreshRunList(jobs) {  // new runs appear in the run list
    var known = Array.prototype.map.call($("run-select").options, function (o) { return o.value; });
    var fresh = [].concat.apply([], jobs.map(function (j) { return j.runs; })).filter(function (r) { return known.indexOf(r) < 0; });
    if (!fresh.length) return;
    api("runs").then(function (res) {
      var current = $("run-select").value;
      lib.fillRuns(res.runs, current);
      lib.fill($("pick-run"), res.runs.map(function (r) { return [r.id, r.id]; }), $("pick-run").value);
    }).catch(lib.showError);
  }

  function drawJobs(jobs) {
    var box = $("b-jobs");
    box.innerHTML = jobs.length ? "" : '<p class="note">No captures launched from this page yet.</p>';
    jobs.forEach(function (j) {
      var card = document.createElement("div");
      card.className = "job " + j.state;
      card.dataset.job = String(j.id);
      var title = document.createElement("div");
      title.innerHTML = "<strong>#" + j.id + " " + lib.escapeHtml(j.name) + "</strong> · <span class=\"state\">" + j.state + "</span> ";
      if (j.state === "queued" || j.state === "running") {
        var cancel = document.createElement("button");
        cancel.type = "button";
        cancel.textContent = "cancel";
        cancel.addEventListener("click", function () { api("cancel", { job: j.id }, true).then(pollJobs).catch(lib.showError); });
        title.appendChild(cancel);
      }
      card.appendChild(title);
      if (j.total) {
        var bar = document.createElement("progress");
        bar.max = j.total;
        bar.value = j.done;
        card.appendChild(bar);
        card.appendChild(document.createTextNode(" " + j.progress));
      }
      j.runs.forEach(function (run) {
        var open = document.createElement("button");
        open.type = "button";
        open.className = "open-run";
        open.textContent = "open " + run;
        open.addEventListener("click", function () {
          api("runs").then(function (res) {
            lib.fillRuns(res.runs, run);
            $("run-select").dispatchEvent(new Event("change"));
            window.scrollTo(0, 0);
          }).catch(lib.showError);
        });
        card.appendChild(open);
      });
      var log = document.createElement("pre");
      log.textContent = j.log.join("\n");
      card.appendChild(log);
      box.appendChild(card);
    });
  }

  // ---- wiring ---------------------------------------------------------------------------------
  Array.prototype.forEach.call(simpleInputs(), function (el) {
    el.addEventListener(el.type === "checkbox" || el.tagName === "SELECT" ? "change" : "input", function () { formChanged(); });
  });
  $("b-yaml").addEventListener("input", yamlChanged);
  $("b-form").addEventListener("submit", function (e) { e.preventDefault(); });  // Enter in a field submits nothing
  $("b-add-prompt").addEventListener("click", function () {
    var list = prompts();
    list.push({ messages: [{ role: "user", content: "" }] });
    setPrompts(list);
    formChanged(true);
  });
  $("b-add-ref").addEventListener("click", function () {
    if (!Array.isArray(doc.reference_states)) doc.reference_states = [];
    doc.reference_states.push({ label: "ref" + doc.reference_states.length, messages: [{ role: "user", content: "" }] });
    formChanged(true);
  });
  $("b-open").addEventListener("click", function () { openFile().catch(lib.showError); });
  $("b-new").addEventListener("click", newScenario);
  $("b-clone").addEventListener("click", function () { cloneRun().catch(lib.showError); });
  $("b-save").addEventListener("click", function () { save().catch(function (e) { status("not saved: " + e.message); }); });
  $("b-launch").addEventListener("click", function () { launch().catch(function (e) { status("not launched: " + e.message); }); });

  var previous = view.onRun;
  view.onRun = function () {
    var first = !b.started;
    b.started = true;
    return Promise.resolve(previous ? previous() : null).then(function () {
      if (!first) return null;
      api("models").then(function (res) {
        var list = $("b-models");
        list.innerHTML = "";
        res.models.forEach(function (m) { var o = document.createElement("option"); o.value = m.id; o.label = m.kind + ": " + m.note; list.appendChild(o); });
      }).catch(lib.showError);
      return Promise.all([loadFiles(), pollJobs()]);
    });
  };
})();
