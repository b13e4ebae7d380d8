/**
 * Lineage DAG drawn as SVG. Layout is a plain layered (Sugiyama-style) pass: longest-path layers from the sources
 * (dataset / base model at the top, deployment at the bottom), one barycenter sweep to order each layer, then
 * fixed-size boxes. Registry lineage graphs are small (tens of nodes), so nothing fancier is needed.
 */
import { IGraph, IGraphNode } from './api';

const SVG_NS = 'http://www.w3.org/2000/svg';
export const NODE_W = 116;
export const NODE_H = 38;
const GAP_X = 10;
const GAP_Y = 30;
const PAD = 8;

export interface IPlacedNode {
  node: IGraphNode;
  layer: number;
  x: number;
  y: number;
}

export interface ILayout {
  nodes: IPlacedNode[];
  width: number;
  height: number;
}

/** Assign layers (longest path from a source) and positions. Cycles (should not exist) are broken by visit order. */
export function layoutDag(graph: IGraph): ILayout {
  const ids = graph.nodes.map(n => n.hash);
  const known = new Set(ids);
  const edges = graph.edges.filter(e => known.has(e.src) && known.has(e.dst) && e.src !== e.dst);
  const parents = new Map<string, string[]>(ids.map(id => [id, []]));
  const children = new Map<string, string[]>(ids.map(id => [id, []]));
  for (const e of edges) {
    parents.get(e.dst)!.push(e.src);
    children.get(e.src)!.push(e.dst);
  }
  // Kahn's algorithm: a node's layer is 1 + the max layer of its parents.
  const indeg = new Map<string, number>(ids.map(id => [id, parents.get(id)!.length]));
  const layer = new Map<string, number>();
  const queue = ids.filter(id => indeg.get(id) === 0);
  queue.forEach(id => layer.set(id, 0));
  while (queue.length) {
    const id = queue.shift()!;
    for (const c of children.get(id)!) {
      layer.set(c, Math.max(layer.get(c) ?? 0, (layer.get(id) ?? 0) + 1));
      indeg.set(c, indeg.get(c)! - 1);
      if (indeg.get(c) === 0) {
        queue.push(c);
      }
    }
  }
  for (const id of ids) {
    if (!layer.has(id)) {
      layer.set(id, 0); // part of a cycle
    }
  }
  const nLayers = Math.max(0, ...Array.from(layer.values())) + 1;
  const rows: string[][] = Array.from({ length: nLayers }, () => []);
  const byId = new Map(graph.nodes.map(n => [n.hash, n]));
  ids.forEach(id => rows[layer.get(id)!].push(id));
  rows[0].sort((a, b) => (byId.get(a)!.kind + a).localeCompare(byId.get(b)!.kind + b));
  // One top-down barycenter sweep keeps edges short and mostly uncrossed.
  const pos = new Map<string, number>();
  rows[0].forEach((id, i) => pos.set(id, i));
  for (let l = 1; l < nLayers; l++) {
    const bary = (id: string) => {
      const ps = parents.get(id)!.filter(p => pos.has(p));
      return ps.length ? ps.reduce((s, p) => s + pos.get(p)!, 0) / ps.length : 0;
    };
    rows[l].sort((a, b) => bary(a) - bary(b) || a.localeCompare(b));
    rows[l].forEach((id, i) => pos.set(id, i));
  }
  const widest = Math.max(1, ...rows.map(r => r.length));
  const width = PAD * 2 + widest * NODE_W + (widest - 1) * GAP_X;
  const placed: IPlacedNode[] = [];
  rows.forEach((row, l) => {
    const rowW = row.length * NODE_W + (row.length - 1) * GAP_X;
    const x0 = (width - rowW) / 2;
    row.forEach((id, i) => {
      placed.push({ node: byId.get(id)!, layer: l, x: x0 + i * (NODE_W + GAP_X), y: PAD + l * (NODE_H + GAP_Y) });
    });
  });
  return { nodes: placed, width, height: PAD * 2 + nLayers * NODE_H + (nLayers - 1) * GAP_Y };
}

function svg<K extends keyof SVGElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number>
): SVGElementTagNameMap[K] {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    el.setAttribute(k, String(v));
  }
  return el;
}

function clip(text: string, max: number): string {
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/**
 * Render the graph. `highlight` marks the selected run's own artifacts; clicking a node calls `onSelect` with the
 * run that produced it.
 */
export function renderLineage(
  graph: IGraph,
  highlight: Set<string>,
  onSelect?: (node: IGraphNode) => void
): SVGSVGElement {
  const layout = layoutDag(graph);
  const root = svg('svg', {
    class: 'llmops-lineage-svg',
    width: '100%',
    style: `max-width: ${layout.width}px`,
    viewBox: `0 0 ${layout.width} ${layout.height}`,
    role: 'img',
    'aria-label': 'lineage graph'
  });
  const defs = svg('defs', {});
  const marker = svg('marker', {
    id: 'llmops-arrow',
    viewBox: '0 0 10 10',
    refX: 9,
    refY: 5,
    markerWidth: 7,
    markerHeight: 7,
    orient: 'auto-start-reverse'
  });
  marker.append(svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'llmops-edge-head' }));
  defs.append(marker);
  root.append(defs);
  const at = new Map(layout.nodes.map(p => [p.node.hash, p]));
  for (const e of graph.edges) {
    const a = at.get(e.src);
    const b = at.get(e.dst);
    if (!a || !b) {
      continue;
    }
    const x1 = a.x + NODE_W / 2;
    const y1 = a.y + NODE_H;
    const x2 = b.x + NODE_W / 2;
    const y2 = b.y;
    const my = (y1 + y2) / 2;
    const path = svg('path', {
      d: `M ${x1} ${y1} C ${x1} ${my}, ${x2} ${my}, ${x2} ${y2 - 1}`,
      class: 'llmops-edge',
      'marker-end': 'url(#llmops-arrow)'
    });
    const title = svg('title', {});
    title.textContent = `${e.relation}${e.run_id ? ' · ' + e.run_id : ''}`;
    path.append(title);
    root.append(path);
  }
  for (const p of layout.nodes) {
    const n = p.node;
    const g = svg('g', {
      class: `llmops-node llmops-kind-${n.kind.replace(/[^a-z0-9-]/gi, '')}${highlight.has(n.hash) ? ' llmops-node-own' : ''}`,
      transform: `translate(${p.x},${p.y})`,
      'data-hash': n.hash,
      'data-kind': n.kind
    });
    g.append(svg('rect', { width: NODE_W, height: NODE_H, rx: 6, ry: 6 }));
    const kind = svg('text', { x: 8, y: 15, class: 'llmops-node-kind' });
    kind.textContent = n.kind;
    const name = svg('text', { x: 8, y: 30, class: 'llmops-node-name' });
    name.textContent = clip(n.name || n.hash.slice(0, 12), 18);
    const title = svg('title', {});
    title.textContent = `${n.kind} ${n.name ?? ''}\n${n.hash}${n.run_id ? '\nrun ' + n.run_id : ''}`;
    g.append(kind, name, title);
    if (onSelect && n.run_id) {
      g.classList.add('llmops-node-link');
      g.addEventListener('click', () => onSelect(n));
    }
    root.append(g);
  }
  return root;
}
