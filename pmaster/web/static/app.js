/* pmaster web admin: the live dashboard (server-sent events) and its throughput chart, drawn as plain SVG.
   Everything works without this file; it only makes the dashboard live. Loaded from the daemon, nothing else. */
(function () {
  "use strict";
  var SERIES = ["received", "delivered", "deferred", "bounced", "rejected"];
  var SVGNS = "http://www.w3.org/2000/svg";
  var W = 720, H = 220, PAD = 30;

  function el(name, attrs) {
    var node = document.createElementNS(SVGNS, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function points(stats) {
    var pts = stats.history.slice();
    pts.push(stats.current);
    return pts.slice(-Math.ceil(3600 / stats.interval));
  }

  function draw(box, stats) {
    var pts = points(stats);
    var max = 1;
    pts.forEach(function (p) { SERIES.forEach(function (s) { max = Math.max(max, p[s] || 0); }); });
    var n = Math.max(2, Math.ceil(3600 / stats.interval));
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, width: "100%", role: "img",
                         "aria-label": "messages per interval, last hour", id: "chart-svg"});
    svg.appendChild(el("line", {x1: PAD, y1: H - PAD, x2: W - 5, y2: H - PAD, "class": "axis"}));
    svg.appendChild(el("line", {x1: PAD, y1: 5, x2: PAD, y2: H - PAD, "class": "axis"}));
    var label = el("text", {x: 2, y: 14, "class": "tick"});
    label.textContent = String(max);
    svg.appendChild(label);
    var first = stats.now - 3600;
    SERIES.forEach(function (s) {
      var d = pts.map(function (p) {
        var x = PAD + (W - PAD - 5) * Math.max(0, (p.t - first)) / 3600;
        var y = (H - PAD) - (H - PAD - 5) * (p[s] || 0) / max;
        return x.toFixed(1) + "," + y.toFixed(1);
      }).join(" ");
      svg.appendChild(el("polyline", {points: d, "class": "line k-" + s, "data-series": s,
                                      "data-sum": String(pts.reduce(function (a, p) { return a + (p[s] || 0); }, 0))}));
    });
    box.replaceChildren(svg);
    box.setAttribute("data-points", String(pts.length) + "/" + n);
  }

  function text(id, value) {
    var node = document.getElementById(id);
    if (node) { node.textContent = String(value); }
  }

  function update(box, stats) {
    SERIES.forEach(function (s) { text("total-" + s, stats.totals[s]); });
    text("sessions", stats.sessions);
    ["active", "deferred", "hold"].forEach(function (s) { text("queue-" + s, stats.queue[s] || 0); });
    text("oldest", stats.oldest + " s");
    draw(box, stats);
  }

  function dashboard() {
    var box = document.getElementById("chart");
    if (!box) { return; }
    try { draw(box, JSON.parse(box.getAttribute("data-stats"))); } catch (e) { /* the numbers stay */ }
    if (!window.EventSource) { return; }
    var source = new EventSource("/events");
    source.addEventListener("stats", function (ev) {
      try { update(box, JSON.parse(ev.data)); } catch (e) { /* ignore a garbled event */ }
    });
  }

  function selectAll() {
    var table = document.querySelector("table.queue thead tr th");
    if (!table || !document.getElementById("selection")) { return; }
    var box = document.createElement("input");
    box.type = "checkbox";
    box.setAttribute("aria-label", "select all");
    box.id = "select-all";
    box.addEventListener("change", function () {
      document.querySelectorAll("#selection input[name=id]").forEach(function (c) { c.checked = box.checked; });
    });
    table.appendChild(box);
  }

  document.addEventListener("DOMContentLoaded", function () { dashboard(); selectAll(); });
}());
