// Time-series charts drawn with uPlot (from npm, embedded in the controller and loaded
// by app.html as /assets/uplot.js before the modules): zoomable, with a live legend and
// crisp at any width, which the hand-drawn SVG in charts.js is not for long series.
// They draw what they are given; no fetching here.

const PALETTE = ['#2563eb', '#16a34a', '#d97706', '#9333ea', '#0891b2', '#dc2626', '#4f46e5', '#65a30d'];

/// The i-th colour of the charts' palette.
export function seriesColor(i) {
  return PALETTE[i % PALETTE.length];
}

function formatValue(v) {
  if (v === null || v === undefined) return '–';
  if (Math.abs(v) >= 10000) return `${(v / 1000).toFixed(0)}k`;
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(Math.abs(v) < 10 ? 2 : 1);
}

/// series: [{name, points: [[ms, v]], color, step, area}] over [from, to] (ms). Returns a
/// box that draws the chart once it is in the page (uPlot needs its width) and follows
/// its width after.
export function timeSeries({ from, to, series, height = 220, yLabel = '', label = '' }) {
  const box = document.createElement('div');
  box.className = 'plot';
  box.setAttribute('role', 'img');
  box.setAttribute('aria-label', label || yLabel || series.map((s) => s.name).join(', '));
  const uPlot = globalThis.uPlot;
  if (!uPlot) {
    box.textContent = 'The charting library did not load.';
    return box;
  }
  // uPlot wants one x array for every series: the union of their times, in seconds.
  const times = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const data = [times.map((t) => t / 1000)];
  for (const s of series) {
    const ys = new Array(times.length).fill(null);
    for (const [t, v] of s.points) ys[index.get(t)] = Number.isFinite(v) ? v : null;
    data.push(ys);
  }
  // A step series (replicas) holds its last value to the window's end.
  if (series.some((s) => s.step) && times.length && times[times.length - 1] < to) {
    data[0].push(to / 1000);
    series.forEach((s, i) => {
      const ys = data[i + 1];
      let last = null;
      for (let j = ys.length - 1; j >= 0; j--) if (ys[j] !== null) { last = ys[j]; break; }
      ys.push(s.step ? last : null);
    });
  }
  const opts = {
    width: 600,
    height,
    scales: {
      x: { time: true, range: () => [from / 1000, to / 1000] },
      y: { range: (u, min, max) => [Math.min(0, min ?? 0), max > 0 ? max * 1.1 : 1] },
    },
    series: [{}, ...series.map((s, i) => {
      const color = s.color || seriesColor(i);
      return {
        label: s.name,
        stroke: color,
        width: 2,
        fill: s.area ? `${color}22` : undefined,
        spanGaps: true,
        paths: s.step ? uPlot.paths.stepped({ align: 1 }) : undefined,
        points: { show: s.points.length <= 60 },
        value: (u, v) => formatValue(v),
      };
    })],
    axes: [
      { stroke: '#64748b', grid: { stroke: '#eef2f7' } },
      { stroke: '#64748b', grid: { stroke: '#eef2f7' }, label: yLabel || undefined, size: 56, values: (u, vs) => vs.map(formatValue) },
    ],
    cursor: { drag: { x: true, y: false } },
  };
  let chart = null;
  const observer = new ResizeObserver(() => {
    // A redrawn page drops its charts: let go of the one that left the page.
    if (chart && !box.isConnected) {
      chart.destroy();
      observer.disconnect();
      return;
    }
    const width = Math.floor(box.clientWidth);
    if (width <= 0) return;
    if (!chart) chart = new uPlot({ ...opts, width }, data, box);
    else if (chart.width !== width) chart.setSize({ width, height });
  });
  observer.observe(box);
  return box;
}
