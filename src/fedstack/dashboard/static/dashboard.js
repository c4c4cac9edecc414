/* fedstack dashboard: charts (uPlot) and the live view (server-sent events).
   Every text that comes from the server is set with textContent, never as HTML. */
(function () {
  "use strict";

  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function fmt(v) {
    if (v === null || v === undefined) { return "-"; }
    if (typeof v === "number") {
      if (Number.isInteger(v)) { return String(v); }
      return Number(v.toPrecision(4)).toString();
    }
    return String(v).slice(0, 200);
  }

  function metricsText(m) {
    if (!m || typeof m !== "object") { return ""; }
    var keys = Object.keys(m);
    var parts = keys.slice(0, 6).map(function (k) { return String(k).slice(0, 64) + "=" + fmt(m[k]); });
    var text = parts.join(", ");
    if (keys.length > 6) { text += ", ... (" + (keys.length - 6) + " more)"; }
    return text;
  }

  var ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

  function width(el) { return Math.max(280, Math.floor(el.clientWidth || 480)); }

  function makeChart(el, label, series) {
    if (typeof uPlot === "undefined" || !el) { return null; }
    var opts = {
      width: width(el),
      height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "round", incrs: ROUND_STEPS }, {}],
      series: [{ label: "round" }].concat(series.map(function (s, i) {
        return { label: s, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
                 points: { show: false } };
      })),
      legend: { show: series.length > 1 || !!label }
    };
    var data = [[]].concat(series.map(function () { return []; }));
    var plot = new uPlot(opts, data, el);
    el.dataset.points = "0";
    return { plot: plot, data: data, el: el };
  }

  function push(chart, x, y) {
    if (!chart) { return; }
    chart.data[0].push(x);
    chart.data[1].push(y === undefined ? null : y);
    chart.plot.setData(chart.data);
    chart.el.dataset.points = String(chart.data[0].length);
    noteEmpty(chart);
  }

  /* a chart whose rounds have no value of its metric says so (instead of empty axes) */
  function noteEmpty(chart) {
    var empty = chart.data[1].every(function (v) { return v === null; });
    var note = chart.el.parentNode.querySelector(".chart-note");
    if (empty && !note && chart.data[0].length) {
      note = document.createElement("p");
      note.className = "chart-note empty";
      note.textContent = "No round has this metric (" + (chart.el.dataset.metric || "") + ").";
      chart.el.parentNode.appendChild(note);
    } else if (!empty && note) {
      note.remove();
    }
  }

  function roundRow(r, dp) {
    var tr = document.createElement("tr");
    tr.dataset.round = String(r.round);
    tr.className = "new";
    var cells = [
      ["round", fmt(r.round)], ["finished", r.finished_text || "-"], ["seconds", fmt(r.seconds)],
      ["updates", fmt(r.num_updates)], ["samples", fmt(r.num_samples)],
      ["accuracy", fmt(r.accuracy)], ["loss", fmt(r.loss)], ["metrics", metricsText(r.metrics)]
    ];
    if (dp) { cells.splice(7, 0, ["dp-epsilon", fmt(r.dp_epsilon)]); }
    cells.forEach(function (c) {
      var td = document.createElement("td");
      td.className = c[0];
      td.textContent = c[1];
      tr.appendChild(td);
    });
    var td = document.createElement("td");
    td.className = "model";
    var a = document.createElement("a");
    a.href = "/models/" + encodeURIComponent(String(r.model_id || ""));
    a.textContent = "lineage";
    td.appendChild(a);
    tr.appendChild(td);
    return tr;
  }

  function fetchSeries(runId) {
    return fetch("/runs/" + encodeURIComponent(runId) + "/series", {
      credentials: "same-origin", headers: { "Accept": "application/json" }
    }).then(function (res) {
      if (!res.ok) { throw new Error("series: HTTP " + res.status); }
      return res.json();
    });
  }

  function liveRun(root) {
    var runId = root.dataset.runId;
    var charts = {
      accuracy: makeChart($("#accuracy-chart"), "", ["accuracy"]),
      loss: makeChart($("#loss-chart"), "", ["loss"]),
      seconds: makeChart($("#round-time-chart"), "", ["seconds"])
    };
    var last = parseInt(root.dataset.lastRound || "0", 10) || 0;
    var firstPage = root.dataset.page === "1";
    var shown = 0;

    function add(r) {
      if (r.round <= shown) { return; }
      shown = r.round;
      push(charts.accuracy, r.round, r.accuracy);
      push(charts.loss, r.round, r.loss);
      push(charts.seconds, r.round, r.seconds);
    }

    function listen() {
      if (typeof EventSource === "undefined") { return; }
      var es = new EventSource("/runs/" + encodeURIComponent(runId) + "/events?after=" + last);
      es.addEventListener("round", function (ev) {
        var r;
        try { r = JSON.parse(ev.data); } catch (e) { return; }
        if (typeof r.round !== "number" || r.round <= last) { return; }
        last = r.round;
        add(r);
        var v = $("#run-version");
        if (v) { v.textContent = String(Math.max(parseInt(v.textContent, 10) || 0, r.round)); }
        var n = $("#run-rounds");
        if (n) { n.textContent = String((parseInt(n.textContent, 10) || 0) + 1); }
        var empty = $("#no-rounds");
        if (empty) { empty.remove(); }
        var eps = $("#dp-epsilon");
        if (eps && typeof r.dp_epsilon === "number") { eps.textContent = fmt(r.dp_epsilon); }
        if (firstPage) {
          var body = $("#rounds tbody");
          if (body) {
            body.insertBefore(roundRow(r, root.dataset.dp === "1"), body.firstChild);
            while (body.rows.length > 50) { body.deleteRow(body.rows.length - 1); }
          }
        }
      });
    }

    fetchSeries(runId).then(function (s) {
      s.rounds.forEach(function (r) { if (r.round <= last) { add(r); } });
    }).catch(function () { /* the table still shows the rounds */ }).then(listen);
  }

  function compare(root) {
    var items = $$("li[data-run-id]", root);
    var el = $("#compare-chart");
    var lossEl = $("#compare-loss-chart");
    if (!el || typeof uPlot === "undefined") { return; }
    Promise.all(items.map(function (li) { return fetchSeries(li.dataset.runId); })).then(function (all) {
      var xs = {};
      all.forEach(function (s) { s.rounds.forEach(function (r) { xs[r.round] = true; }); });
      var x = Object.keys(xs).map(Number).sort(function (a, b) { return a - b; });
      var index = {};
      x.forEach(function (v, i) { index[v] = i; });
      function build(target, metric) {
        if (!target) { return; }
        var data = [x];
        all.forEach(function (s) {
          var col = x.map(function () { return null; });
          s.rounds.forEach(function (r) { col[index[r.round]] = r[metric]; });
          data.push(col);
        });
        var names = items.map(function (li) { return li.dataset.runName || li.dataset.runId; });
        var opts = {
          width: width(target), height: 280, scales: { x: { time: false } },
          axes: [{ label: "round", incrs: ROUND_STEPS }, { label: metric }],
          series: [{ label: "round" }].concat(names.map(function (n, i) {
            return { label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
                     points: { show: false } };
          }))
        };
        new uPlot(opts, data, target);
        target.dataset.series = String(all.length);
        target.dataset.points = String(x.length);
      }
      build(el, "accuracy");
      build(lossEl, "loss");
    }).catch(function () {
      el.textContent = "The runs' rounds could not be read.";
    });
  }

  function compareButton() {
    var form = $("#compare-form");
    var button = $("#compare");
    if (!form || !button) { return; }
    function update() { button.disabled = $$("input[name=run]:checked", form).length === 0; }
    $$("input[name=run]", form).forEach(function (c) { c.addEventListener("change", update); });
    update();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = $("#live");
    if (live) { liveRun(live); }
    var cmp = $("#compare-runs");
    if (cmp) { compare(cmp); }
    compareButton();
  });
})();
