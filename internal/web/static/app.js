// GrowServer web console: an ES module with no dependencies and no build step.
//
// The first half holds pure functions (formatting, API requests, pagination, role
// checks, terminal input and output); they touch no DOM and are exported so that
// internal/web/testdata/app_test.mjs can test them under node. The second half renders
// the console with createElement and textContent only (never parsing HTML), and runs only
// in a browser.
//
// The user's API token lives in sessionStorage (never persistent storage, never a URL) and
// goes to the API as "Authorization: Bearer"; on the console websocket, where browsers
// cannot set headers, it goes as the subprotocol grow.bearer.<token> next to grow.console.

/** sessionStorage key of the API token. */
export const TOKEN_KEY = 'grow.token';
/** Subprotocol of the serial console websocket. */
export const CONSOLE_PROTOCOL = 'grow.console';
/** Prefix of the subprotocol that carries the token on the console websocket. */
export const BEARER_PREFIX = 'grow.bearer.';
/** Page size of list requests. */
export const PAGE_LIMIT = 50;
/** Longest console scrollback kept in the page, in characters. */
export const TERMINAL_MAX = 200000;

// ---------------------------------------------------------------- pure functions

/** formatYen renders an amount of yen: 1234567 -> "¥1,234,567". */
export function formatYen(n) {
  if (typeof n !== 'number' || !Number.isFinite(n)) return '—';
  const digits = String(Math.round(Math.abs(n))).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  return (n < 0 ? '-¥' : '¥') + digits;
}

/** formatBytes renders a byte count in binary units: 1610612736 -> "1.5 GiB". */
export function formatBytes(n) {
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const s = Number.isInteger(v) ? String(v) : v.toFixed(1).replace(/\.0$/, '');
  return s + ' ' + units[i];
}

/** formatDate renders an RFC 3339 time as "YYYY-MM-DD HH:MM UTC" ("—" if absent). */
export function formatDate(iso) {
  if (!iso || typeof iso !== 'string' || iso.startsWith('0001-')) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '—';
  return d.toISOString().slice(0, 16).replace('T', ' ') + ' UTC';
}

/** monthOf returns the UTC month "YYYY-MM" of a Date. */
export function monthOf(d) {
  return d.toISOString().slice(0, 7);
}

/** validMonth reports whether m is "YYYY-MM". */
export function validMonth(m) {
  return typeof m === 'string' && /^\d{4}-(0[1-9]|1[0-2])$/.test(m);
}

/** pathFor builds an API path from segments, each escaped: pathFor('servers', id). */
export function pathFor(...segments) {
  return '/v1/' + segments.map((s) => encodeURIComponent(String(s))).join('/');
}

/** withPage adds ?after= and ?limit= to an API path (keeping its own query). */
export function withPage(path, after, limit) {
  const u = new URL(path, 'http://console.invalid');
  if (after) u.searchParams.set('after', after);
  if (limit) u.searchParams.set('limit', String(limit));
  return u.pathname + u.search;
}

/** ApiError is a failed API call: its HTTP status, the API's code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code || '';
  }
}

/**
 * apiRequest builds the fetch arguments of one API call: only same-origin /v1 paths,
 * the token as a bearer header, JSON bodies, no caching, no cookies, no redirects.
 */
export function apiRequest(token, method, path, body, headers) {
  if (typeof path !== 'string' || !path.startsWith('/v1/') || path.includes('..') || path.includes('//')) {
    throw new Error('Not an API path: ' + path);
  }
  const h = { Accept: 'application/json', ...(headers || {}) };
  if (token) h.Authorization = 'Bearer ' + token;
  const init = { method, headers: h, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  if (body !== undefined && body !== null) {
    h['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  return { url: path, init };
}

/** errorMessage returns what to show for a failed answer: the API's message if any. */
export function errorMessage(status, body) {
  if (body && typeof body === 'object' && typeof body.message === 'string' && body.message) {
    return body.message;
  }
  if (typeof body === 'string' && body.trim()) return body.trim().slice(0, 300);
  return 'HTTP ' + status;
}

/**
 * fetchAll follows the API's pagination: getPage(path) answers {items, next}; pages are
 * requested with ?after=<next> until next is empty (or maxPages were read).
 */
export async function fetchAll(getPage, path, limit = 100, maxPages = 1000) {
  const items = [];
  let after = '';
  for (let i = 0; i < maxPages; i++) {
    const page = await getPage(withPage(path, after, limit));
    items.push(...((page && page.items) || []));
    if (!page || !page.next || page.next === after) break;
    after = page.next;
  }
  return items;
}

const everyone = new Set(['servers', 'start', 'stop', 'reboot', 'console', 'invoices', 'plans']);
const adminOnly = new Set(['create', 'delete', 'resize', 'migrate', 'hosts', 'storage', 'images',
  'customers', 'chooseCustomer', 'seeHost']);

/** can reports whether user (from /v1/whoami) may do action; it mirrors the API's rules. */
export function can(user, action) {
  if (!user || typeof user !== 'object') return false;
  if (user.role === 'admin') return everyone.has(action) || adminOnly.has(action);
  if (user.role === 'customer') return everyone.has(action);
  return false;
}

/** navFor lists the views of the navigation bar that user may open: [hash, label]. */
export function navFor(user) {
  const all = [['servers', 'Servers'], ['invoices', 'Invoices'], ['plans', 'Plans'], ['hosts', 'Hosts'],
    ['storage', 'Storage'], ['images', 'Images'], ['customers', 'Customers']];
  return all.filter(([v]) => can(user, v)).map(([v, label]) => ['#/' + v, label]);
}

/** parseRoute reads the location hash: "#/servers/ID/console" -> {view:'console', id:'ID'}. */
export function parseRoute(hash) {
  const parts = String(hash || '').replace(/^#\/?/, '').split('/').filter(Boolean).map((p) => {
    try {
      return decodeURIComponent(p);
    } catch {
      return '';
    }
  });
  if (parts.length === 0) return { view: 'servers' };
  if (parts[0] === 'servers' && parts.length === 2) return { view: 'server', id: parts[1] };
  if (parts[0] === 'servers' && parts.length === 3 && parts[2] === 'console') return { view: 'console', id: parts[1] };
  if (parts.length === 1) return { view: parts[0] };
  return { view: 'notfound' };
}

/** opDone reports whether an operation reached a final state. */
export function opDone(op) {
  return !!op && ['succeeded', 'failed', 'cancelled'].includes(op.state);
}

/** opSummary is one line about an operation's progress. */
export function opSummary(op) {
  if (!op) return '';
  let s = op.kind + ': ' + op.state;
  if (typeof op.progress === 'number' && !opDone(op)) s += ' ' + op.progress + '%';
  if (op.step) s += ' — ' + op.step;
  if (op.message) s += ' (' + op.message + ')';
  if (op.error) s += ': ' + op.error;
  return s;
}

/** consoleURL is the websocket URL of a server's console on this origin. */
export function consoleURL(loc, id) {
  const scheme = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return scheme + '//' + loc.host + pathFor('servers', id, 'console', 'ws');
}

/** consoleProtocols are the subprotocols that carry token to the console websocket. */
export function consoleProtocols(token) {
  if (typeof token !== 'string' || !/^[A-Za-z0-9._~-]+$/.test(token)) {
    throw new Error('This token cannot be sent to the console');
  }
  return [BEARER_PREFIX + token, CONSOLE_PROTOCOL];
}

const specialKeys = {
  Enter: '\r', Backspace: '\x7f', Tab: '\t', Escape: '\x1b',
  ArrowUp: '\x1b[A', ArrowDown: '\x1b[B', ArrowRight: '\x1b[C', ArrowLeft: '\x1b[D',
  Home: '\x1b[H', End: '\x1b[F', Insert: '\x1b[2~', Delete: '\x1b[3~', PageUp: '\x1b[5~', PageDown: '\x1b[6~',
};

/** keyToBytes maps a keydown (key, ctrlKey, altKey, metaKey) to what a serial terminal sends; null if nothing. */
export function keyToBytes(ev) {
  if (!ev || ev.metaKey || typeof ev.key !== 'string') return null;
  const { key } = ev;
  if (Object.hasOwn(specialKeys, key)) return (ev.altKey ? '\x1b' : '') + specialKeys[key];
  if ([...key].length !== 1) return null;
  if (ev.ctrlKey) {
    const c = key.toUpperCase().charCodeAt(0);
    if (c >= 0x40 && c <= 0x5f) return String.fromCharCode(c & 0x1f);
    if (key === ' ') return '\x00';
    if (key === '?') return '\x7f';
    return null;
  }
  return (ev.altKey ? '\x1b' : '') + key;
}

// Escape sequences a serial console prints that a <pre> cannot show.
const ansi = /\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\|\x1b[@-Z\\-_]|\x1b[ -/][@-~]/g;

/**
 * appendTerminal adds console output to the text shown: escape sequences are dropped,
 * carriage returns and bells ignored, backspaces erase; the text keeps its last max
 * characters, cut at a line start.
 */
export function appendTerminal(text, chunk, max = TERMINAL_MAX) {
  let out = text;
  const clean = chunk.replace(ansi, '');
  let buf = '';
  for (const ch of clean) {
    if (ch === '\b') {
      if (buf.length > 0) {
        if (buf[buf.length - 1] !== '\n') buf = buf.slice(0, -1);
      } else if (out.length > 0 && out[out.length - 1] !== '\n') {
        out = out.slice(0, -1);
      }
    } else if (ch === '\r' || ch === '\x07' || ch === '\x00') {
      continue;
    } else if (ch === '\n' || ch === '\t' || ch >= ' ') {
      buf += ch;
    }
  }
  out += buf;
  if (out.length > max) {
    out = out.slice(out.length - max);
    const nl = out.indexOf('\n');
    if (nl >= 0) out = out.slice(nl + 1);
  }
  return out;
}

/** splitKeys turns the SSH key text of a form into keys: one a line, blanks and comments dropped. */
export function splitKeys(text) {
  return String(text || '').split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith('#'));
}

/** createServerBody builds POST /v1/servers from the create form's fields. */
export function createServerBody(f) {
  const body = { name: String(f.name || '').trim(), customer: String(f.customer || '').trim(),
    plan: String(f.plan || ''), image: String(f.image || '') };
  const keys = splitKeys(f.sshKeys);
  if (keys.length) body.ssh_keys = keys;
  if (f.userData && String(f.userData).trim()) body.user_data = String(f.userData);
  return body;
}

/** planLabel describes a plan in one line with its monthly price. */
export function planLabel(p) {
  return p.name + ': ' + p.vcpus + ' vCPU, ' + formatBytes(p.memory_bytes) + ' RAM, ' + formatBytes(p.disk_bytes) +
    ' disk, ' + formatBytes(p.traffic_bytes) + ' traffic, ' + formatYen(p.price_yen) + '/month';
}

/** byID indexes a list by id (and name) for lookups. */
export function byID(list) {
  const m = new Map();
  for (const it of list || []) {
    if (it.id) m.set(it.id, it);
  }
  return m;
}

/** serverColumns are the headings of the server list for user (admins also see customer and host). */
export function serverColumns(user) {
  const cols = ['Name', 'Plan', 'State', 'IPv4', 'IPv6', 'Image', 'Created'];
  if (can(user, 'seeHost')) cols.push('Customer', 'Host');
  return cols;
}

/** serverRow is the text of one server's row, matching serverColumns(user). */
export function serverRow(user, sv, lookups) {
  const name = (m, id) => (m && m.get(id) && m.get(id).name) || id || '—';
  const row = [sv.name, sv.plan, sv.state, sv.ipv4 || '—', sv.ipv6 || '—', name(lookups.images, sv.image_id),
    formatDate(sv.created_at)];
  if (can(user, 'seeHost')) row.push(name(lookups.customers, sv.customer_id), name(lookups.hosts, sv.host_id));
  return row;
}

/** newIdempotencyKey returns a random key so that a retried create never makes two servers. */
export function newIdempotencyKey(rand = globalThis.crypto) {
  const b = new Uint8Array(16);
  rand.getRandomValues(b);
  return 'web-' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

// ---------------------------------------------------------------- browser

let token = '';
let me = null;
// generation counts renders; a view's late callbacks (polls, websockets) stop when it changes.
let generation = 0;
// cleanups run when the view is left (a console's websocket, timers).
let cleanups = [];

/** h creates an element: attributes (on* are listeners), then children as nodes or text. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function $(id) {
  return document.getElementById(id);
}

function flash(msg) {
  $('flash').textContent = msg || '';
}

function stateBadge(state) {
  return h('span', { class: 'state state-' + String(state || '').replace(/[^a-z]/g, '') }, state || '—');
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** api calls the API with the session's token; a 401 signs out. */
async function api(method, path, body, headers) {
  const { url, init } = apiRequest(token, method, path, body, headers);
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, 'network', 'The API did not answer: ' + e.message);
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (resp.status === 401) {
    signOut('The API refused the token (' + errorMessage(401, data) + '); sign in again.');
    throw new ApiError(401, 'unauthorized', errorMessage(401, data));
  }
  if (!resp.ok) {
    throw new ApiError(resp.status, data && data.code, errorMessage(resp.status, data));
  }
  return data;
}

function getPage(path) {
  return api('GET', path);
}

function signOut(msg) {
  token = '';
  me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  render();
  flash(msg || '');
}

function leaveView() {
  generation++;
  for (const f of cleanups) {
    try {
      f();
    } catch {
      // the view is gone; nothing to clean
    }
  }
  cleanups = [];
}

/** show replaces the main area with nodes (null and false are skipped). */
function show(...nodes) {
  $('main').replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function errorBox(err) {
  return h('p', { class: 'error' }, err && err.message ? err.message : String(err));
}

function table(headings, rows, numeric) {
  const num = new Set(numeric || []);
  return h('table', {},
    h('thead', {}, h('tr', {}, headings.map((t, i) => h('th', { class: num.has(i) ? 'num' : null }, t)))),
    h('tbody', {}, rows.length ? rows.map((r) => h('tr', { class: r.class || null },
      r.cells.map((c, i) => h('td', { class: num.has(i) ? 'num' : null }, c)))) :
      h('tr', {}, h('td', { colspan: headings.length, class: 'muted' }, 'None.'))));
}

function renderChrome() {
  const nav = $('nav');
  const who = $('who');
  if (!me) {
    nav.replaceChildren();
    who.replaceChildren();
    return;
  }
  const current = '#/' + (location.hash.replace(/^#\/?/, '').split('/')[0] || 'servers');
  nav.replaceChildren(...navFor(me).map(([href, label]) => h('a', { href, class: href === current ? 'active' : null }, label)));
  who.replaceChildren(h('span', {}, me.name + ' (' + me.role + (me.customer_id ? ', ' + me.customer_id : '') + ')'),
    h('button', { type: 'button', onclick: () => signOut('Signed out.') }, 'Sign out'));
}

function renderSignIn() {
  const input = h('input', { type: 'password', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true, size: 70 });
  const err = h('p', { class: 'error' });
  const form = h('form', { class: 'stack', onsubmit: async (ev) => {
    ev.preventDefault();
    err.textContent = '';
    const t = input.value.trim();
    if (!t) return;
    try {
      const { url, init } = apiRequest(t, 'GET', '/v1/whoami');
      const resp = await fetch(url, init);
      const body = await resp.json().catch(() => null);
      if (!resp.ok) {
        err.textContent = resp.status === 401 ? 'The API refused this token.' : errorMessage(resp.status, body);
        return;
      }
      token = t;
      me = body;
      sessionStorage.setItem(TOKEN_KEY, t);
      flash('');
      if (!location.hash || location.hash === '#/') location.hash = '#/servers';
      render();
    } catch (e) {
      err.textContent = 'The API did not answer: ' + e.message;
    }
  } },
  h('label', {}, 'API token', input),
  h('button', { type: 'submit' }, 'Sign in'), err);
  show(h('div', { class: 'panel signin' },
    h('h1', {}, 'Sign in to GrowServer'),
    h('p', { class: 'muted' }, 'Paste your API token. Admins find theirs in DATA/admin.token (or create one with grow user create); ' +
      'customer users get theirs from their admin. The token stays in this tab only and is forgotten when you sign out or close it.'),
    form));
  input.focus();
}

/** followOperation polls an operation once a second until it is done, showing it in box. */
async function followOperation(op, box) {
  const gen = generation;
  const bar = h('progress', { max: 100, value: op.progress || 0 });
  const line = h('span', {}, opSummary(op));
  box.replaceChildren(h('div', { class: 'op' }, line, bar));
  while (!opDone(op)) {
    await sleep(1000);
    if (gen !== generation) return op;
    try {
      op = await api('GET', pathFor('operations', op.id));
    } catch (e) {
      line.textContent = 'Failed to follow operation ' + op.id + ': ' + e.message;
      return op;
    }
    line.textContent = opSummary(op);
    bar.value = op.progress || 0;
  }
  bar.value = 100;
  if (op.state !== 'succeeded') line.className = 'error';
  return op;
}

async function loadLookups(withHosts) {
  const admin = can(me, 'seeHost');
  const [images, hosts, customers] = await Promise.all([
    fetchAll(getPage, '/v1/images'),
    admin && withHosts ? fetchAll(getPage, '/v1/hosts') : [],
    admin ? fetchAll(getPage, '/v1/customers') : [],
  ]);
  return { images: byID(images), hosts: byID(hosts), customers: byID(customers) };
}

async function viewServers() {
  const gen = generation;
  const body = h('tbody');
  const tbl = h('table', {}, h('thead', {}, h('tr', {}, serverColumns(me).map((c) => h('th', {}, c)))), body);
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load more');
  const count = h('span', { class: 'muted' });
  show(h('h1', {}, 'Servers'),
    can(me, 'create') ? h('div', { class: 'actions' }, h('a', { href: '#/create' }, h('button', { type: 'button' }, 'Create a server'))) : null,
    tbl, h('div', { class: 'pager' }, more, count));
  const lookups = await loadLookups(true);
  if (gen !== generation) return;
  let after = '';
  let n = 0;
  const loadPage = async () => {
    more.disabled = true;
    const page = await api('GET', withPage('/v1/servers', after, PAGE_LIMIT));
    if (gen !== generation) return;
    for (const sv of page.items || []) {
      const cells = serverRow(me, sv, lookups);
      const tr = h('tr', {}, cells.map((c, i) => h('td', {}, i === 0 ? h('a', { href: '#/servers/' + encodeURIComponent(sv.id) }, c) :
        i === 2 ? stateBadge(c) : c)));
      body.append(tr);
      n++;
    }
    after = page.next || '';
    more.hidden = !after;
    more.disabled = false;
    count.textContent = n + ' server' + (n === 1 ? '' : 's') + (after ? ' so far' : '');
    if (n === 0) body.replaceChildren(h('tr', {}, h('td', { colspan: serverColumns(me).length, class: 'muted' }, 'No servers.')));
  };
  more.addEventListener('click', () => loadPage().catch((e) => count.replaceChildren(errorBox(e))));
  await loadPage();
}

async function viewServer(id) {
  const gen = generation;
  const [sv, lookups, unfinished] = await Promise.all([api('GET', pathFor('servers', id)), loadLookups(can(me, 'migrate')),
    api('GET', withPage('/v1/operations?unfinished=true&server=' + encodeURIComponent(id), '', 10))]);
  if (gen !== generation) return;
  const opBox = h('div', { class: 'panel', hidden: true });
  const errBox = h('div');
  const buttons = [];
  const run = async (label, method, path, body) => {
    errBox.replaceChildren();
    for (const b of buttons) b.disabled = true;
    try {
      const op = await api(method, path, body);
      opBox.hidden = false;
      const done = await followOperation(op, opBox);
      if (done.kind === 'server.delete' && done.state === 'succeeded') {
        location.hash = '#/servers';
        flash('Server ' + sv.name + ' was deleted.');
        return;
      }
      if (opDone(done)) {
        const keep = opBox.firstChild;
        await viewServer(id);
        const box = document.querySelector('#main .opresult');
        if (box && keep) {
          box.hidden = false;
          box.replaceChildren(keep);
        }
      }
    } catch (e) {
      errBox.replaceChildren(errorBox(new Error(label + ': ' + e.message)));
    } finally {
      for (const b of buttons) b.disabled = false;
    }
  };
  const action = (name, label, cls) => {
    const b = h('button', { type: 'button', class: cls || null, onclick: () => run(label, 'POST', pathFor('servers', sv.id, name)) }, label);
    buttons.push(b);
    return b;
  };
  const fields = [['ID', sv.id], ['State', stateBadge(sv.state)], ['Plan', sv.plan],
    ['vCPUs', sv.vcpus], ['Memory', formatBytes(sv.memory_bytes)], ['Disk', formatBytes(sv.disk_bytes)],
    ['IPv4', sv.ipv4 || '—'], ['IPv6', sv.ipv6 || '—'],
    ['Image', (lookups.images.get(sv.image_id) || {}).name || sv.image_id || '—'],
    ['Created', formatDate(sv.created_at)], ['Updated', formatDate(sv.updated_at)]];
  if (can(me, 'seeHost')) {
    fields.push(['Customer', (lookups.customers.get(sv.customer_id) || {}).name || sv.customer_id],
      ['Host', (lookups.hosts.get(sv.host_id) || {}).name || sv.host_id || '—'], ['Storage', sv.storage_id || '—'],
      ['Volume', sv.volume || '—']);
  }
  if (sv.ssh_keys && sv.ssh_keys.length) fields.push(['SSH keys', sv.ssh_keys.length + ' key(s)']);
  const actions = h('div', { class: 'actions' },
    can(me, 'start') ? action('start', 'Start') : null,
    can(me, 'stop') ? action('stop', 'Stop', 'secondary') : null,
    can(me, 'reboot') ? action('reboot', 'Reboot', 'secondary') : null,
    can(me, 'console') ? h('a', { href: '#/servers/' + encodeURIComponent(sv.id) + '/console' }, h('button', { type: 'button', class: 'secondary' }, 'Serial console')) : null);
  const admin = [];
  if (can(me, 'resize')) {
    const plans = await fetchAll(getPage, '/v1/plans');
    if (gen !== generation) return;
    const sel = h('select', { name: 'plan' }, plans.map((p) => h('option', { value: p.name, selected: p.name === sv.plan }, planLabel(p))));
    const b = h('button', { type: 'submit' }, 'Resize');
    buttons.push(b);
    admin.push(h('form', { class: 'inline', onsubmit: (ev) => {
      ev.preventDefault();
      if (sel.value === sv.plan) {
        errBox.replaceChildren(errorBox(new Error('The server has plan ' + sv.plan + ' already.')));
        return;
      }
      run('Resize', 'POST', pathFor('servers', sv.id, 'resize'), { plan: sel.value });
    } }, h('label', {}, 'Plan', sel), b));
  }
  if (can(me, 'migrate')) {
    const hosts = [...lookups.hosts.values()].filter((x) => x.id !== sv.host_id);
    const sel = h('select', { name: 'to' }, h('option', { value: '' }, 'any host (placement chooses)'),
      hosts.map((x) => h('option', { value: x.name }, x.name + ' (' + x.state + ')')));
    const b = h('button', { type: 'submit' }, 'Migrate');
    buttons.push(b);
    admin.push(h('form', { class: 'inline', onsubmit: (ev) => {
      ev.preventDefault();
      run('Migrate', 'POST', pathFor('servers', sv.id, 'migrate'), sel.value ? { to: sel.value } : {});
    } }, h('label', {}, 'Move to', sel), b));
  }
  if (can(me, 'delete')) {
    const b = h('button', { type: 'button', class: 'danger', onclick: () => {
      if (window.confirm('Delete server ' + sv.name + ' and its disk? This cannot be undone.')) {
        run('Delete', 'DELETE', pathFor('servers', sv.id));
      }
    } }, 'Delete');
    buttons.push(b);
    admin.push(h('div', { class: 'actions' }, b));
  }
  opBox.classList.add('opresult');
  const running = (unfinished.items || [])[0];
  if (running) {
    opBox.hidden = false;
    followOperation(running, opBox).then((done) => {
      if (gen === generation && opDone(done)) render();
    });
  }
  show(h('p', {}, h('a', { href: '#/servers' }, '← Servers')),
    h('h1', {}, 'Server ' + sv.name),
    h('div', { class: 'panel' }, h('dl', { class: 'fields' }, fields.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]))),
    actions, admin.length ? h('div', { class: 'panel' }, h('h2', {}, 'Admin'), admin) : null, opBox, errBox);
}

function viewConsole(id) {
  const gen = generation;
  const status = h('p', { class: 'muted' }, 'Connecting…');
  const term = h('pre', { class: 'terminal', tabindex: 0, 'aria-label': 'Serial console; type here' });
  show(h('p', {}, h('a', { href: '#/servers/' + encodeURIComponent(id) }, '← Server')),
    h('h1', {}, 'Serial console'), status, term,
    h('p', { class: 'muted' }, 'Click the console and type; paste works too. Escape sequences are not drawn.'));
  let ws;
  try {
    ws = new WebSocket(consoleURL(location, id), consoleProtocols(token));
  } catch (e) {
    status.textContent = e.message;
    return;
  }
  ws.binaryType = 'arraybuffer';
  cleanups.push(() => ws.close());
  const dec = new TextDecoder();
  const enc = new TextEncoder();
  let text = '';
  let opened = false;
  ws.onopen = () => {
    opened = true;
    status.textContent = 'Connected to ' + id + '.';
    term.focus();
  };
  ws.onmessage = (ev) => {
    if (gen !== generation) return;
    const chunk = typeof ev.data === 'string' ? ev.data : dec.decode(ev.data, { stream: true });
    const atBottom = term.scrollTop + term.clientHeight >= term.scrollHeight - 8;
    text = appendTerminal(text, chunk);
    term.textContent = text;
    if (atBottom) term.scrollTop = term.scrollHeight;
  };
  ws.onclose = (ev) => {
    if (gen !== generation) return;
    status.textContent = opened ? 'Disconnected' + (ev.reason ? ': ' + ev.reason : '.') :
      'The console did not open: the server is not running, does not exist, or the token was refused.';
    status.className = opened ? 'muted' : 'error';
  };
  const send = (s) => {
    if (ws.readyState === WebSocket.OPEN && s) ws.send(enc.encode(s));
  };
  term.addEventListener('keydown', (ev) => {
    const s = keyToBytes(ev);
    if (s === null) return;
    ev.preventDefault();
    send(s);
  });
  term.addEventListener('paste', (ev) => {
    ev.preventDefault();
    send(((ev.clipboardData && ev.clipboardData.getData('text')) || '').replace(/\r?\n/g, '\r'));
  });
}

async function viewCreate() {
  const gen = generation;
  const [plans, images, customers] = await Promise.all([fetchAll(getPage, '/v1/plans'),
    fetchAll(getPage, '/v1/images'), fetchAll(getPage, '/v1/customers')]);
  if (gen !== generation) return;
  const name = h('input', { name: 'name', required: true, maxlength: 63, pattern: '[a-z0-9]([a-z0-9-]*[a-z0-9])?', autocomplete: 'off' });
  const customer = h('select', { name: 'customer', required: true }, customers.map((c) => h('option', { value: c.name }, c.name)));
  const plan = h('select', { name: 'plan', required: true }, plans.map((p) => h('option', { value: p.name }, planLabel(p))));
  const image = h('select', { name: 'image', required: true }, images.filter((i) => i.state !== 'importing').map((i) => h('option', { value: i.name }, i.name + ' (' + formatBytes(i.size_bytes) + ')')));
  const keys = h('textarea', { name: 'ssh_keys', placeholder: 'ssh-ed25519 AAAA… one key a line' });
  const userData = h('textarea', { name: 'user_data', placeholder: '#cloud-config' });
  const submit = h('button', { type: 'submit' }, 'Create');
  const opBox = h('div', { class: 'panel', hidden: true });
  const errBox = h('div');
  const idem = newIdempotencyKey();
  const form = h('form', { class: 'stack', onsubmit: async (ev) => {
    ev.preventDefault();
    errBox.replaceChildren();
    submit.disabled = true;
    try {
      const body = createServerBody({ name: name.value, customer: customer.value, plan: plan.value, image: image.value,
        sshKeys: keys.value, userData: userData.value });
      const op = await api('POST', '/v1/servers', body, { 'Idempotency-Key': idem });
      opBox.hidden = false;
      const done = await followOperation(op, opBox);
      if (done.state === 'succeeded' && done.server_id) {
        opBox.append(h('p', {}, h('a', { href: '#/servers/' + encodeURIComponent(done.server_id) }, 'Open server ' + body.name)));
      }
    } catch (e) {
      errBox.replaceChildren(errorBox(e));
      submit.disabled = false;
    }
  } },
  h('label', {}, 'Name', name), h('label', {}, 'Customer', customer), h('label', {}, 'Plan', plan),
  h('label', {}, 'Image', image), h('label', {}, 'SSH public keys', keys), h('label', {}, 'User data (cloud-init)', userData),
  h('div', {}, submit));
  show(h('p', {}, h('a', { href: '#/servers' }, '← Servers')), h('h1', {}, 'Create a server'), h('div', { class: 'panel' }, form), opBox, errBox);
}

async function viewInvoices() {
  const gen = generation;
  const month = h('input', { type: 'month', name: 'month', value: monthOf(new Date()), required: true });
  let customer = null;
  if (can(me, 'chooseCustomer')) {
    const cs = await fetchAll(getPage, '/v1/customers');
    if (gen !== generation) return;
    customer = h('select', { name: 'customer' }, cs.map((c) => h('option', { value: c.id }, c.name)));
  }
  const out = h('div');
  const load = async () => {
    out.replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    const cust = customer ? customer.value : me.customer_id;
    if (!cust) {
      out.replaceChildren(h('p', { class: 'muted' }, 'No customer.'));
      return;
    }
    if (!validMonth(month.value)) {
      out.replaceChildren(errorBox(new Error('Choose a month (YYYY-MM).')));
      return;
    }
    try {
      const inv = await api('GET', pathFor('customers', cust, 'invoices', month.value));
      if (gen !== generation) return;
      const rows = (inv.lines || []).map((l) => ({ cells: [l.server_name || l.server_id, l.description,
        formatDate(l.from), formatDate(l.to), formatYen(l.amount_yen)] }));
      rows.push({ class: 'total', cells: ['Total', '', '', '', formatYen(inv.total_yen)] });
      out.replaceChildren(h('p', { class: 'muted' }, 'Invoice ' + inv.month + ' (' + formatDate(inv.from) + ' – ' + formatDate(inv.to) + ')'),
        table(['Server', 'Description', 'From', 'To', 'Amount'], rows, [4]));
    } catch (e) {
      out.replaceChildren(errorBox(e));
    }
  };
  show(h('h1', {}, 'Invoices'),
    h('form', { class: 'inline', onsubmit: (ev) => {
      ev.preventDefault();
      load();
    } }, customer ? h('label', {}, 'Customer', customer) : null, h('label', {}, 'Month', month), h('button', { type: 'submit' }, 'Show')),
    out);
  await load();
}

async function viewPlans() {
  const gen = generation;
  const plans = await fetchAll(getPage, '/v1/plans');
  if (gen !== generation) return;
  show(h('h1', {}, 'Plans'), table(['Plan', 'vCPUs', 'Memory', 'Disk', 'Traffic', 'Price / month'],
    plans.map((p) => ({ cells: [p.name, p.vcpus, formatBytes(p.memory_bytes), formatBytes(p.disk_bytes),
      formatBytes(p.traffic_bytes), formatYen(p.price_yen)] })), [1, 2, 3, 4, 5]));
}

function healthCell(hl) {
  if (!hl) return '—';
  const s = hl.reachable ? 'up' : (hl.checked ? 'down' : 'unknown');
  return h('span', {}, stateBadge(s), ' ', hl.detail || '', hl.checked ? ' (checked ' + formatDate(hl.checked) + ')' : '');
}

async function viewHosts() {
  const gen = generation;
  const hosts = await fetchAll(getPage, '/v1/hosts');
  if (gen !== generation) return;
  show(h('h1', {}, 'Hosts'), table(['Name', 'State', 'Health', 'CPUs', 'Memory', 'CPU model', 'Agent URL', 'Created'],
    hosts.map((x) => ({ cells: [x.name, stateBadge(x.state), healthCell(x.health), x.cpus, formatBytes(x.memory_bytes),
      x.cpu_model || '—', x.url, formatDate(x.created_at)] }))));
}

async function viewStorage() {
  const gen = generation;
  const cs = await fetchAll(getPage, '/v1/storage');
  if (gen !== generation) return;
  show(h('h1', {}, 'Storage controllers'), table(['Name', 'State', 'Health', 'URL', 'Mirror partner', 'Created'],
    cs.map((c) => ({ cells: [c.name, stateBadge(c.state), healthCell(c.health), c.url, c.partner_url || '—', formatDate(c.created_at)] }))));
}

async function viewImages() {
  const gen = generation;
  const ims = await fetchAll(getPage, '/v1/images');
  if (gen !== generation) return;
  show(h('h1', {}, 'Images'), table(['Name', 'State', 'Size', 'Storage', 'Created'],
    ims.map((i) => ({ cells: [i.name, stateBadge(i.state), formatBytes(i.size_bytes), i.storage_id || '—', formatDate(i.created_at)] }))));
}

async function viewCustomers() {
  const gen = generation;
  const cs = await fetchAll(getPage, '/v1/customers');
  if (gen !== generation) return;
  show(h('h1', {}, 'Customers'), table(['Name', 'ID', 'Email', 'Max servers', 'Created'],
    cs.map((c) => ({ cells: [c.name, c.id, c.email || '—', c.max_servers || 'unlimited', formatDate(c.created_at)] }))));
}

const views = {
  servers: viewServers, server: (r) => viewServer(r.id), console: (r) => viewConsole(r.id), create: viewCreate,
  invoices: viewInvoices, plans: viewPlans, hosts: viewHosts, storage: viewStorage, images: viewImages, customers: viewCustomers,
};

/** render draws the view of the location hash (or the sign-in). */
async function render() {
  leaveView();
  const gen = generation;
  if (!token) {
    renderChrome();
    renderSignIn();
    return;
  }
  if (!me) {
    try {
      me = await api('GET', '/v1/whoami');
    } catch (e) {
      if (token) show(errorBox(e));
      return;
    }
    if (gen !== generation) return;
  }
  renderChrome();
  const route = parseRoute(location.hash);
  const view = views[route.view];
  const allowed = { server: 'servers', console: 'console' }[route.view] || route.view;
  if (!view || !can(me, allowed)) {
    show(h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/servers' }, 'Servers')));
    return;
  }
  show(h('p', { class: 'muted' }, 'Loading…'));
  try {
    await view(route);
  } catch (e) {
    if (gen === generation && token) show(errorBox(e));
  }
}

function start() {
  token = sessionStorage.getItem(TOKEN_KEY) || '';
  window.addEventListener('hashchange', () => {
    flash('');
    render();
  });
  render();
}

if (typeof window !== 'undefined' && typeof document !== 'undefined') {
  start();
}
