/** Small formatting helpers shared by the panels. */

export function fmtDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '';
  }
  if (seconds < 1) {
    return `${Math.round(seconds * 1000)} ms`;
  }
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  const m = Math.floor(seconds / 60);
  if (m < 60) {
    return `${m} m ${Math.round(seconds % 60)} s`;
  }
  return `${Math.floor(m / 60)} h ${m % 60} m`;
}

export function fmtAgo(ts: number | null | undefined, now = Date.now() / 1000): string {
  if (!ts) {
    return '';
  }
  const d = Math.max(0, now - ts);
  if (d < 60) {
    return `${Math.round(d)} s ago`;
  }
  if (d < 3600) {
    return `${Math.round(d / 60)} min ago`;
  }
  if (d < 86400) {
    return `${Math.round(d / 3600)} h ago`;
  }
  return new Date(ts * 1000).toLocaleDateString();
}

export function fmtNum(v: unknown): string {
  if (typeof v !== 'number') {
    return v === null || v === undefined ? '' : typeof v === 'string' ? v : JSON.stringify(v);
  }
  if (Number.isInteger(v)) {
    return String(v);
  }
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toPrecision(4).replace(/\.?0+$/, '');
}

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '';
  }
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 && i > 0 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export function fmtMiB(mb: number | null | undefined): string {
  return mb === null || mb === undefined ? '?' : fmtBytes(mb * 1024 * 1024);
}

/** Build an element with classes, text and children in one call. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string | null | undefined)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') {
      el.className = v;
    } else {
      el.setAttribute(k, v);
    }
  }
  for (const c of children) {
    if (c !== null && c !== undefined) {
      el.append(typeof c === 'string' ? document.createTextNode(c) : c);
    }
  }
  return el;
}
