// A smoke test of the console's browser half under node: a minimal fake DOM, a fake
// API behind fetch and a fake WebSocket; it signs in as an admin and as a customer and
// opens every view, checking what each role is shown and which API calls are made.
// Run by TestJavaScriptDOM (GROW_APP_JS names the module to test).
import assert from 'node:assert/strict';
import { pathToFileURL } from 'node:url';

// ------------------------------------------------------------ fake DOM
class Node {}
class Text extends Node {
  constructor(s) {
    super();
    this.data = s;
  }
  get textContent() {
    return this.data;
  }
}
class Element extends Node {
  constructor(tag) {
    super();
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.attributes = {};
    this.listeners = {};
    this.className = '';
    this.hidden = false;
    this.disabled = false;
    this._value = '';
    this.scrollTop = 0;
    this.scrollHeight = 0;
    this.clientHeight = 0;
    this.classList = { add: (c) => { this.className = (this.className + ' ' + c).trim(); } };
  }
  append(...nodes) {
    for (const n of nodes) {
      // A browser would show null or an object as text ("null"): a bug in the console.
      if (typeof n !== 'string' && !(n instanceof Node)) throw new Error('appended ' + n + ' to <' + this.tagName + '>');
      this.children.push(typeof n === 'string' ? new Text(n) : n);
    }
  }
  replaceChildren(...nodes) {
    this.children = [];
    this.append(...nodes);
  }
  setAttribute(k, v) {
    this.attributes[k] = v;
    if (k === 'hidden') this.hidden = true;
  }
  addEventListener(type, fn) {
    (this.listeners[type] ||= []).push(fn);
  }
  // value of a <select> is its first option's until one is chosen, as in a browser.
  get value() {
    if (this.tagName === 'SELECT' && this._value === '') {
      const opt = this.children.find((c) => c.tagName === 'OPTION');
      return opt ? opt.value : '';
    }
    return this._value;
  }
  set value(v) {
    this._value = String(v);
  }
  get firstChild() {
    return this.children[0] || null;
  }
  get textContent() {
    return this.children.map((c) => c.textContent).join('');
  }
  set textContent(v) {
    this.children = [new Text(String(v))];
  }
  focus() {}
  fire(type, ev = {}) {
    const e = { preventDefault() {}, ...ev };
    for (const f of this.listeners[type] || []) f(e);
    return e;
  }
}
const ids = {};
for (const id of ['nav', 'who', 'flash', 'main']) ids[id] = new Element('div');
const windowListeners = {};
const store = new Map();
globalThis.Node = Node;
globalThis.document = {
  createElement: (t) => new Element(t),
  getElementById: (id) => ids[id] || null,
  querySelector: () => null,
};
globalThis.window = globalThis;
globalThis.addEventListener = (t, f) => { (windowListeners[t] ||= []).push(f); };
globalThis.confirm = () => true;
Object.defineProperty(globalThis, 'location', { value: { hash: '', protocol: 'http:', host: '127.0.0.1:7470' }, configurable: true });
Object.defineProperty(globalThis, 'sessionStorage', { value: {
  getItem: (k) => (store.has(k) ? store.get(k) : null),
  setItem: (k, v) => store.set(k, String(v)),
  removeItem: (k) => store.delete(k),
}, configurable: true });

function all(root, pred, out = []) {
  if (root instanceof Element) {
    if (pred(root)) out.push(root);
    for (const c of root.children) all(c, pred, out);
  }
  return out;
}
const find = (root, pred) => all(root, pred)[0];
const byText = (root, tag, text) => find(root, (e) => e.tagName === tag && e.textContent === text);
const main = () => ids.main;
const settle = async (ms = 30) => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setTimeout(r, ms / 5));
};
async function go(hash, ms) {
  location.hash = hash;
  for (const f of windowListeners.hashchange || []) f();
  await settle(ms);
}

// ------------------------------------------------------------ fake API
const users = {
  'tok-admin': { id: 'usr-a', name: 'admin', role: 'admin' },
  'tok-alice': { id: 'usr-b', name: 'alice', role: 'customer', customer_id: 'cus-1' },
};
const sv1 = { id: 'srv-1', name: 'web1', customer_id: 'cus-1', plan: 'E', image_id: 'img-1', vcpus: 1, memory_bytes: 512 << 20,
  disk_bytes: 10 * 1024 ** 3, host_id: 'host-1', ipv4: '198.51.100.10', state: 'running', created_at: '2026-11-01T00:00:00Z' };
const sv2 = { ...sv1, id: 'srv-2', name: 'web2', ipv4: '198.51.100.11', state: 'stopped' };
const month = new Date().toISOString().slice(0, 7);
const calls = [];
let opPolls = 0;
// unfinishedOps are the operations GET /v1/operations?unfinished=true answers once.
const unfinishedOps = [];
const adminOnly = ['/v1/hosts', '/v1/storage', '/v1/customers'];

function answer(method, url, token, body) {
  const u = new URL(url, 'http://127.0.0.1:7470');
  const key = method + ' ' + u.pathname;
  const me = users[token];
  if (!me) return [401, { code: 'unauthorized', message: 'Invalid bearer token' }];
  if (me.role !== 'admin' && adminOnly.some((p) => u.pathname === p)) {
    throw new Error('the console called admin-only ' + key + ' as a customer');
  }
  const list = (items) => [200, { items, next: '' }];
  switch (key) {
    case 'GET /v1/whoami': return [200, me];
    case 'GET /v1/servers':
      assert.equal(u.searchParams.get('limit'), '50');
      return u.searchParams.get('after') === 'srv-1' ? [200, { items: [sv2], next: '' }] : [200, { items: [sv1], next: 'srv-1' }];
    case 'GET /v1/images': return list([{ id: 'img-1', name: 'tiny', size_bytes: 1 << 20, state: 'ready', created_at: '2026-11-01T00:00:00Z' }]);
    case 'GET /v1/hosts': return list([{ id: 'host-1', name: 'h1', state: 'active', cpus: 8, memory_bytes: 8 << 30, url: 'http://10.0.0.1:7471',
      health: { reachable: true, detail: '2 VMs', checked: '2026-11-26T03:00:00Z' } }, { id: 'host-2', name: 'h2', state: 'active', cpus: 8,
      memory_bytes: 8 << 30, url: 'http://10.0.0.2:7471', health: { reachable: false, detail: 'connection refused', checked: '2026-11-26T03:00:00Z' } }]);
    case 'GET /v1/customers': return list([{ id: 'cus-1', name: 'acme', email: 'a@example.invalid', max_servers: 5, created_at: '2026-11-01T00:00:00Z' }]);
    case 'GET /v1/storage': return list([{ id: 'stor-1', name: 's0', state: 'active', url: 'http://10.0.0.9:7480', health: { reachable: true } }]);
    case 'GET /v1/plans': return list([{ name: 'E', vcpus: 1, memory_bytes: 512 << 20, disk_bytes: 10 * 1024 ** 3, traffic_bytes: 1024 ** 4, price_yen: 1100 },
      { name: 'D', vcpus: 2, memory_bytes: 1 << 30, disk_bytes: 20 * 1024 ** 3, traffic_bytes: 2 * 1024 ** 4, price_yen: 2200 }]);
    case 'GET /v1/servers/srv-1': return [200, sv1];
    case 'POST /v1/servers/srv-1/reboot':
      assert.equal(body, undefined);
      return [202, { id: 'op-1', kind: 'server.reboot', state: 'running', progress: 10 }];
    case 'POST /v1/servers/srv-1/resize':
      assert.deepEqual(JSON.parse(body), { plan: 'D' });
      return [409, { code: 'no_capacity', message: 'No host has room for plan D' }];
    case 'POST /v1/servers/srv-1/migrate':
      assert.deepEqual(JSON.parse(body), { to: 'h2' });
      return [202, { id: 'op-1', kind: 'server.migrate', state: 'pending', progress: 0 }];
    case 'DELETE /v1/servers/srv-1':
      return [202, { id: 'op-2', kind: 'server.delete', state: 'running', progress: 50 }];
    case 'GET /v1/operations/op-2':
      return [200, { id: 'op-2', kind: 'server.delete', state: 'succeeded', progress: 100 }];
    case 'GET /v1/operations':
      assert.equal(u.searchParams.get('unfinished'), 'true');
      assert.equal(u.searchParams.get('server'), 'srv-1');
      return list(unfinishedOps.splice(0));
    case 'GET /v1/operations/op-3':
      return [200, { id: 'op-3', kind: 'server.create', state: 'succeeded', progress: 100 }];
    case 'GET /v1/operations/op-1':
      opPolls++;
      return [200, { id: 'op-1', kind: 'server.reboot', state: 'succeeded', progress: 100 }];
    case 'GET /v1/customers/cus-1/invoices/' + month:
      return [200, { customer_id: 'cus-1', month, total_yen: 1100, from: month + '-01T00:00:00Z', to: month + '-28T00:00:00Z',
        lines: [{ server_id: 'srv-1', server_name: 'web1', description: 'Plan E', amount_yen: 1100, from: month + '-01T00:00:00Z', to: month + '-28T00:00:00Z' }] }];
    default:
      throw new Error('unexpected API call ' + key);
  }
}

globalThis.fetch = async (url, init) => {
  const auth = (init.headers && init.headers.Authorization) || '';
  const token = auth.replace(/^Bearer /, '');
  assert.ok(!String(url).includes('tok-'), 'a token in a URL: ' + url);
  assert.equal(init.credentials, 'omit');
  calls.push(init.method + ' ' + url);
  const [status, data] = answer(init.method, url, token, init.body);
  const text = JSON.stringify(data);
  return { status, ok: status >= 200 && status < 300, text: async () => text, json: async () => JSON.parse(text) };
};

const sockets = [];
class FakeWebSocket {
  static OPEN = 1;
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closed = false;
    sockets.push(this);
  }
  send(b) {
    this.sent.push(new TextDecoder().decode(b));
  }
  close() {
    this.closed = true;
  }
}
globalThis.WebSocket = FakeWebSocket;

// ------------------------------------------------------------ the scenario
await import(process.env.GROW_APP_JS ? pathToFileURL(process.env.GROW_APP_JS).href : new URL('../static/app.js', import.meta.url).href);
await settle();

async function signIn(tok) {
  assert.match(main().textContent, /Sign in to GrowServer/);
  const input = find(main(), (e) => e.tagName === 'INPUT' && e.attributes.type === 'password');
  input.value = tok;
  find(main(), (e) => e.tagName === 'FORM').fire('submit');
  await settle(60);
}

// A wrong token stays on the sign-in, with nothing stored.
await signIn('tok-wrong');
assert.match(main().textContent, /refused this token/);
assert.equal(store.size, 0);

// Admin: every view.
await signIn('tok-admin');
assert.equal(store.get('grow.token'), 'tok-admin');
assert.deepEqual(all(ids.nav, (e) => e.tagName === 'A').map((a) => a.textContent),
  ['Servers', 'Invoices', 'Plans', 'Hosts', 'Storage', 'Images', 'Customers']);
await go('#/servers', 60);
let txt = main().textContent;
assert.match(txt, /web1/);
assert.match(txt, /acme/, 'admins see the customer');
assert.match(txt, /h1/, 'admins see the host');
assert.match(txt, /tiny/);
assert.match(txt, /Create a server/);
const more = byText(main(), 'BUTTON', 'Load more');
assert.ok(more && !more.hidden, 'a next page offers Load more');
more.fire('click');
await settle(60);
assert.match(main().textContent, /web2/);
assert.ok(more.hidden, 'the last page hides Load more');

await go('#/servers/srv-1', 60);
txt = main().textContent;
assert.match(txt, /Server web1/);
for (const b of ['Start', 'Stop', 'Reboot', 'Resize', 'Migrate', 'Delete']) assert.ok(byText(main(), 'BUTTON', b), 'admin button ' + b);
byText(main(), 'BUTTON', 'Reboot').fire('click');
await settle(60);
assert.match(main().textContent, /server\.reboot: running 10%/);
await new Promise((r) => setTimeout(r, 1300));
assert.equal(opPolls, 1, 'the operation was polled until done');
// A refused resize shows the API's message.
await go('#/servers/srv-1', 60);
const plan = find(main(), (e) => e.tagName === 'SELECT' && e.attributes.name === 'plan');
plan.value = 'D';
find(main(), (e) => e.tagName === 'FORM' && e.textContent.includes('Resize')).fire('submit');
await settle(60);
assert.match(main().textContent, /Resize: No host has room for plan D/);

// An operation already running on the server is followed when its page opens.
unfinishedOps.push({ id: 'op-3', kind: 'server.create', state: 'running', progress: 70, step: 'waiting for the guest' });
await go('#/servers/srv-1', 60);
assert.match(main().textContent, /server\.create: running 70% — waiting for the guest/);
await new Promise((r) => setTimeout(r, 1300));
assert.ok(calls.includes('GET /v1/operations/op-3'), 'the running operation was polled');
assert.match(main().textContent, /Server web1/);
assert.ok(!/server\.create: running/.test(main().textContent), 'the page was redrawn when it finished');

// Migrate to a chosen host (the server's own host is not offered).
await go('#/servers/srv-1', 60);
const to = find(main(), (e) => e.tagName === 'SELECT' && e.attributes.name === 'to');
assert.deepEqual(to.children.map((o) => o.value), ['', 'h2']);
to.value = 'h2';
find(main(), (e) => e.tagName === 'FORM' && e.textContent.includes('Migrate')).fire('submit');
await settle(60);
assert.match(main().textContent, /server\.migrate: pending 0%/);
// Delete (confirmed) follows its operation and returns to the list.
await go('#/servers/srv-1', 60);
byText(main(), 'BUTTON', 'Delete').fire('click');
await settle(60);
assert.match(main().textContent, /server\.delete: running 50%/);
await new Promise((r) => setTimeout(r, 1300));
assert.equal(location.hash, '#/servers');
assert.match(ids.flash.textContent, /web1 was deleted/);

await go('#/servers/srv-1/console', 30);
const ws = sockets.at(-1);
assert.equal(ws.url, 'ws://127.0.0.1:7470/v1/servers/srv-1/console/ws');
assert.deepEqual(ws.protocols, ['grow.bearer.tok-admin', 'grow.console']);
ws.readyState = 1;
ws.onopen();
ws.onmessage({ data: new TextEncoder().encode('\x1b[32mlogin:\x1b[0m ').buffer });
const term = find(main(), (e) => e.tagName === 'PRE');
assert.equal(term.textContent, 'login: ');
term.fire('keydown', { key: 'r' });
term.fire('keydown', { key: 'Enter' });
term.fire('keydown', { key: 'c', ctrlKey: true });
term.fire('keydown', { key: 'Shift' });
term.fire('paste', { clipboardData: { getData: () => 'ls\nexit\n' } });
term.fire('paste', {});
assert.deepEqual(ws.sent, ['r', '\r', '\x03', 'ls\rexit\r']);
await go('#/plans', 30);
assert.ok(ws.closed, 'leaving the console closes its websocket');
assert.match(main().textContent, /¥1,100/);
assert.match(main().textContent, /512 MiB/);

// Leaving a view before its data arrived: the late answer never draws over the new view.
location.hash = '#/servers/srv-1';
for (const f of windowListeners.hashchange) f();
await go('#/plans', 60);
assert.match(main().textContent, /Plans/);
assert.ok(!/Server web1/.test(main().textContent), 'a stale view drew over the current one');

await go('#/invoices', 60);
txt = main().textContent;
assert.match(txt, /Plan E/);
assert.match(txt, /Total¥1,100/);
await go('#/hosts', 30);
assert.match(main().textContent, /connection refused/);
assert.match(main().textContent, /2 VMs/);
await go('#/storage', 30);
assert.match(main().textContent, /s0/);
await go('#/images', 30);
assert.match(main().textContent, /tiny/);
await go('#/customers', 30);
assert.match(main().textContent, /a@example\.invalid/);
await go('#/create', 60);
assert.ok(find(main(), (e) => e.tagName === 'TEXTAREA' && e.attributes.name === 'ssh_keys'));
assert.ok(find(main(), (e) => e.tagName === 'SELECT' && e.attributes.name === 'customer'));

// Sign out forgets the token.
byText(ids.who, 'BUTTON', 'Sign out').fire('click');
await settle();
assert.equal(store.size, 0);

// A customer: only its views, no admin buttons, no admin-only calls (answer throws).
await go('#/servers', 10);
await signIn('tok-alice');
await go('#/servers', 60);
assert.deepEqual(all(ids.nav, (e) => e.tagName === 'A').map((a) => a.textContent), ['Servers', 'Invoices', 'Plans']);
txt = main().textContent;
assert.match(txt, /web1/);
assert.ok(!/Create a server/.test(txt));
await go('#/servers/srv-1', 60);
for (const b of ['Start', 'Stop', 'Reboot']) assert.ok(byText(main(), 'BUTTON', b), 'customer button ' + b);
for (const b of ['Resize', 'Migrate', 'Delete']) assert.ok(!byText(main(), 'BUTTON', b), 'no customer button ' + b);
await go('#/invoices', 60);
assert.match(main().textContent, /Total¥1,100/);
await go('#/hosts', 30);
assert.match(main().textContent, /Not found/);
await go('#/create', 30);
assert.match(main().textContent, /Not found/);

// A token the API stops accepting returns to the sign-in and is forgotten.
users['tok-alice'] = undefined;
await go('#/plans', 60);
assert.match(main().textContent, /Sign in to GrowServer/);
assert.match(ids.flash.textContent, /refused the token/);
assert.equal(store.size, 0);

console.log('dom_test: passed after ' + calls.length + ' API calls');
