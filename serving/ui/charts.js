// Usage charts as inline SVG: one chart per measure, one line per series, drawn from the usage
// buckets of GET /api/2.0/sqlinfer/serving-endpoints/{name}/usage. A few dozen lines instead
// of a charting library: the charts are simple, and nothing has to be shipped or kept up to date.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 520, HEIGHT = 170, LEFT = 52, RIGHT = 10, TOP = 12, BOTTOM = 26;

function node(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function tick(value) {
  if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
  if (value >= 1e3) return (value / 1e3).toFixed(1) + "k";
  if (Number.isInteger(value)) return String(value);
  if (value < 0.01) return value.toExponential(1);  // a cost of $0.0000049 fits the axis as 4.9e-6
  return value < 1 ? String(Number(value.toPrecision(2))) : value.toFixed(1);
}

// series: [{key, label, cls}] read from each bucket; buckets: [{start_time_ms, ...}]
export function lineChart(title, buckets, series, unit = "") {
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.dataset.chart = title;
  const caption = document.createElement("figcaption");
  caption.textContent = title + (unit ? ` (${unit})` : "");
  const values = buckets.flatMap((b) => series.map((s) => b[s.key]).filter((v) => v !== null && v !== undefined));
  const top = Math.max(...values, 0) || 1;  // all zero: a 0..1 axis
  const x = (i) => LEFT + (buckets.length <= 1 ? 0 : (i * (WIDTH - LEFT - RIGHT)) / (buckets.length - 1));
  const y = (v) => TOP + (HEIGHT - TOP - BOTTOM) * (1 - v / top);
  const svg = node("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title });
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    svg.append(node("line", { x1: LEFT, x2: WIDTH - RIGHT, y1: y(value), y2: y(value), class: "grid" }));
    svg.append(node("text", { x: LEFT - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" }, values.length ? tick(value) : ""));
  }
  if (buckets.length) {
    const label = (ms) => new Date(ms).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
    svg.append(node("text", { x: LEFT, y: HEIGHT - 6, class: "axis" }, label(buckets[0].start_time_ms)));
    svg.append(node("text", { x: WIDTH - RIGHT, y: HEIGHT - 6, class: "axis", "text-anchor": "end" },
      label(buckets[buckets.length - 1].start_time_ms)));
  }
  series.forEach((s, index) => {
    const points = buckets.map((b, i) => [i, b[s.key]]).filter(([, v]) => v !== null && v !== undefined);
    if (!points.length) return;
    svg.append(node("polyline", { points: points.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), class: `series s${index}` }));
    for (const [i, v] of points) {
      const dot = node("circle", { cx: x(i), cy: y(v), r: v ? 2.5 : 0, class: `series s${index}` });
      dot.append(node("title", {}, `${s.label}: ${tick(v)}`));
      svg.append(dot);
    }
  });
  const legend = document.createElement("p");
  legend.className = "legend";
  series.forEach((s, index) => {
    const item = document.createElement("span");
    item.className = `key s${index}`;
    const total = buckets.reduce((sum, b) => sum + (b[s.key] || 0), 0);
    item.textContent = s.summary === false ? s.label : `${s.label}: ${tick(total)}`;
    legend.append(item);
  });
  figure.append(caption, svg, legend);
  return figure;
}
