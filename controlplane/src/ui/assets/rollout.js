// The Rollout page's live part: three uPlot charts on one time axis
// (requests/s, 5xx %, latency) with the stop rules' thresholds and a
// vertical release mark per transition, and the server-sent `update`
// events that replace the page's fragments without a reload.
//
// Every fragment is HTML rendered (and escaped) by the server; this file
// only places it. `window.understudyChart` says what the charts hold, and
// `document.body.dataset.updates` counts applied updates (browser tests).
"use strict";

(function () {
  const charts = document.getElementById("charts");
  if (!charts) return;
  const id = charts.dataset.rollout;
  const STABLE = "#1f6feb", CANARY = "#d4731c", LIMIT = "#b00020";
  let plots = [];

  // Vertical lines with labels at each release mark.
  function marksPlugin(getMarks) {
    return {
      hooks: {
        draw: [u => {
          const ctx = u.ctx;
          const top = u.bbox.top, height = u.bbox.height;
          ctx.save();
          ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
          for (const m of getMarks()) {
            const x = Math.round(u.valToPos(m.t, "x", true));
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = "#555";
            ctx.setLineDash([4, 3]);
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
            ctx.fillStyle = "#333";
            ctx.fillText(m.label, x + 3, top + 12 * devicePixelRatio);
          }
          ctx.restore();
        }],
      },
    };
  }

  let marks = [];
  const width = () => Math.max(320, charts.clientWidth || 800);

  function make(el, title, unit, series) {
    return new uPlot({
      title, width: width(), height: 200,
      scales: { x: { time: true } },
      axes: [{}, { label: unit }],
      series: [{}].concat(series),
      plugins: [marksPlugin(() => marks)],
    }, [[]].concat(series.map(() => [])), el);
  }

  function build() {
    plots = [
      make(document.getElementById("chart-rps"), "Requests per second", "req/s", [
        { label: "stable", stroke: STABLE },
        { label: "canary", stroke: CANARY },
      ]),
      make(document.getElementById("chart-errors"), "5xx rate", "%", [
        { label: "stable", stroke: STABLE },
        { label: "canary", stroke: CANARY },
        { label: "canary limit", stroke: LIMIT, dash: [6, 4] },
      ]),
      make(document.getElementById("chart-latency"), "Latency", "ms", [
        { label: "stable p50", stroke: STABLE, dash: [2, 2] },
        { label: "stable p99", stroke: STABLE },
        { label: "canary p50", stroke: CANARY, dash: [2, 2] },
        { label: "canary p99", stroke: CANARY },
        { label: "canary p99 limit", stroke: LIMIT, dash: [6, 4] },
      ]),
    ];
  }

  function points(xs) { return xs.filter(v => v !== null && v !== undefined).length; }

  function draw(s) {
    if (!s || !s.t) return;
    marks = s.marks || [];
    const th = s.thresholds || {};
    const data = [
      [s.t, s.stable.rps, s.canary.rps],
      [s.t, s.stable.error_pct, s.canary.error_pct, th.error_pct || []],
      [s.t, s.stable.p50_ms, s.stable.p99_ms, s.canary.p50_ms, s.canary.p99_ms, th.p99_ms || []],
    ];
    plots.forEach((p, i) => p.setData(data[i]));
    window.understudyChart = {
      // Bins in which the side served requests.
      stable: s.stable.rps.filter(v => v > 0).length,
      canary: s.canary.rps.filter(v => v > 0).length,
      latency_points: points(s.stable.p99_ms) + points(s.canary.p99_ms),
      marks: marks.length,
      bins: s.t.length,
    };
  }

  function place(boxId, html) {
    const box = document.getElementById(boxId);
    if (box && box.innerHTML !== html) box.innerHTML = html;
  }

  build();
  try { draw(JSON.parse(document.getElementById("initial-series").textContent)); } catch (e) { console.error(e); }
  document.body.dataset.updates = "0";

  const source = new EventSource(`/ui/rollouts/${encodeURIComponent(id)}/events`);
  source.addEventListener("update", ev => {
    const u = JSON.parse(ev.data);
    place("status-box", u.status);
    place("actions-box", u.actions);
    place("ladder-box", u.ladder);
    place("verdict-box", u.verdict);
    place("audit-box", u.audit);
    draw(u.series);
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
  });

  // Actions ask first (the fragment with the forms is replaced live, so
  // listen on the document).
  document.addEventListener("submit", ev => {
    const f = ev.target;
    if (f.dataset && f.dataset.confirm && !window.confirm(f.dataset.confirm)) ev.preventDefault();
  });

  window.addEventListener("resize", () => plots.forEach(p => p.setSize({ width: width(), height: 200 })));
})();
