// The op's DAG as SVG: one node per step (a fan-out's items grouped into one node with counts),
// coloured by status, columns by depth (a step stands right of everything it needs).

const NS = "http://www.w3.org/2000/svg";
const W = 170, H = 46, GAP_X = 46, GAP_Y = 14, PAD = 10;

// Which status a group of tasks shows, the most urgent first.
const ORDER = ["running", "canceling", "waiting", "failed", "interrupted", "canceled",
  "pending", "succeeded", "skipped"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Groups the op's tasks by step: { step, status, counts: {status: n}, items: n }.
export function groups(steps, tasks) {
  const known = new Set(steps.map((s) => s.id));
  const names = steps.map((s) => s.id);
  for (const t of tasks) if (!known.has(t.step)) { known.add(t.step); names.push(t.step); }
  return names.map((step) => {
    const mine = tasks.filter((t) => t.step === step);
    const items = mine.filter((t) => t.item !== null && t.item !== undefined);
    const counted = items.length ? items : mine;
    const counts = {};
    for (const t of counted) counts[t.status] = (counts[t.status] || 0) + 1;
    const own = mine.find((t) => t.item === null || t.item === undefined);
    let status = own ? own.status : ORDER.find((s) => counts[s]) || "pending";
    if (items.length && counts.running) status = "running";
    return { step, status, counts, items: items.length };
  });
}

// Draws into `svg` (emptied first); `onPick(step)` when a node is clicked.
export function draw(svg, steps, tasks, selected, onPick) {
  const needs = new Map(steps.map((s) => [s.id, s.needs]));
  const depth = new Map();
  const depthOf = (id, seen = new Set()) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const d = Math.max(-1, ...(needs.get(id) || []).map((n) => depthOf(n, seen))) + 1;
    depth.set(id, d);
    return d;
  };
  const all = groups(steps, tasks);
  const columns = [];
  const place = new Map();
  for (const g of all) {
    const d = needs.has(g.step) ? depthOf(g.step) : Math.max(0, ...[...depth.values()]) + 1;
    (columns[d] ||= []).push(g);
  }
  columns.forEach((col, x) => (col || []).forEach((g, y) => place.set(g.step, {
    x: PAD + x * (W + GAP_X), y: PAD + y * (H + GAP_Y),
  })));
  const width = PAD * 2 + columns.length * (W + GAP_X) - GAP_X;
  const height = PAD * 2 + Math.max(1, ...columns.map((c) => (c || []).length)) * (H + GAP_Y) - GAP_Y;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${Math.max(width, W)} ${height}`);
  svg.setAttribute("class", "dag");
  // Text stays legible on a narrow screen: the drawing scrolls sideways in its card instead.
  svg.style.minWidth = `${Math.round(Math.max(width, W) * 0.75)}px`;
  const defs = el("defs");
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" });
  marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#888" }));
  defs.append(marker);
  svg.append(defs);
  for (const s of steps) {
    const to = place.get(s.id);
    for (const n of s.needs) {
      const from = place.get(n);
      if (!from || !to) continue;
      const [x1, y1, x2, y2] = [from.x + W, from.y + H / 2, to.x, to.y + H / 2];
      const mid = (x1 + x2) / 2;
      svg.append(el("path", { class: "edge", d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}` }));
    }
  }
  for (const g of all) {
    const at = place.get(g.step);
    const node = el("g", {
      class: `node${g.step === selected ? " selected" : ""}`,
      "data-step": g.step, "data-status": g.status, transform: `translate(${at.x},${at.y})`,
      tabindex: 0, role: "button",
    });
    node.append(el("rect", { width: W, height: H, class: `n-${g.status}` }));
    const label = g.step.length > 22 ? `${g.step.slice(0, 21)}…` : g.step;
    node.append(el("text", { x: 8, y: 18 }, label));
    const summary = g.items
      ? `${g.items} items: ${ORDER.filter((s) => g.counts[s]).map((s) => `${g.counts[s]} ${s}`).join(", ")}`
      : g.status;
    node.append(el("text", { x: 8, y: 36 }, summary));
    node.append(el("title", {}, `${g.step}: ${summary}`));
    node.addEventListener("click", () => onPick(g.step));
    node.addEventListener("keydown", (e) => { if (e.key === "Enter") onPick(g.step); });
    svg.append(node);
  }
}
