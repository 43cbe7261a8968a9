// Tests of the console's pure functions (run by TestJavaScriptFunctions, or by hand:
// node internal/web/testdata/app_test.mjs). GROW_APP_JS names the module to test.
import assert from 'node:assert/strict';
import { pathToFileURL } from 'node:url';

const app = await import(process.env.GROW_APP_JS ? pathToFileURL(process.env.GROW_APP_JS).href : new URL('../static/app.js', import.meta.url).href);

let passed = 0;
async function test(name, fn) {
  try {
    await fn();
    passed++;
  } catch (e) {
    console.error('FAIL ' + name + ': ' + (e && e.stack ? e.stack : e));
    process.exitCode = 1;
  }
}

await test('formatYen', () => {
  assert.equal(app.formatYen(0), '¥0');
  assert.equal(app.formatYen(980), '¥980');
  assert.equal(app.formatYen(1000), '¥1,000');
  assert.equal(app.formatYen(1234567), '¥1,234,567');
  assert.equal(app.formatYen(-4500), '-¥4,500');
  assert.equal(app.formatYen(99.6), '¥100');
  assert.equal(app.formatYen(undefined), '—');
  assert.equal(app.formatYen(NaN), '—');
});

await test('formatBytes', () => {
  assert.equal(app.formatBytes(0), '0 B');
  assert.equal(app.formatBytes(1023), '1023 B');
  assert.equal(app.formatBytes(1024), '1 KiB');
  assert.equal(app.formatBytes(512 * 1024 * 1024), '512 MiB');
  assert.equal(app.formatBytes(1.5 * 1024 ** 3), '1.5 GiB');
  assert.equal(app.formatBytes(20 * 1024 ** 3), '20 GiB');
  assert.equal(app.formatBytes(2 * 1024 ** 4), '2 TiB');
  assert.equal(app.formatBytes(-1), '—');
  assert.equal(app.formatBytes('12'), '—');
});

await test('formatDate and months', () => {
  assert.equal(app.formatDate('2026-11-26T03:17:12.123456Z'), '2026-11-26 03:17 UTC');
  assert.equal(app.formatDate('2026-11-26T12:00:00+09:00'), '2026-11-26 03:00 UTC');
  assert.equal(app.formatDate('0001-01-01T00:00:00Z'), '—');
  assert.equal(app.formatDate(''), '—');
  assert.equal(app.formatDate('yesterday'), '—');
  assert.equal(app.monthOf(new Date(Date.UTC(2026, 0, 31, 23, 59))), '2026-01');
  assert.ok(app.validMonth('2026-11'));
  assert.ok(!app.validMonth('2026-13'));
  assert.ok(!app.validMonth('2026-1'));
  assert.ok(!app.validMonth('../x'));
});

await test('pathFor escapes every segment', () => {
  assert.equal(app.pathFor('servers', 'web1', 'start'), '/v1/servers/web1/start');
  assert.equal(app.pathFor('servers', '../users', 'console', 'ws'), '/v1/servers/..%2Fusers/console/ws');
  assert.equal(app.pathFor('customers', 'a b?c#d', 'invoices', '2026-11'), '/v1/customers/a%20b%3Fc%23d/invoices/2026-11');
});

await test('apiRequest', () => {
  const { url, init } = app.apiRequest('tok123', 'POST', '/v1/servers', { name: 'web1' }, { 'Idempotency-Key': 'k1' });
  assert.equal(url, '/v1/servers');
  assert.equal(init.method, 'POST');
  assert.equal(init.headers.Authorization, 'Bearer tok123');
  assert.equal(init.headers['Content-Type'], 'application/json');
  assert.equal(init.headers['Idempotency-Key'], 'k1');
  assert.equal(init.body, '{"name":"web1"}');
  assert.equal(init.credentials, 'omit');
  assert.equal(init.cache, 'no-store');
  const g = app.apiRequest('tok123', 'GET', '/v1/whoami');
  assert.equal(g.init.body, undefined);
  assert.equal(g.init.headers['Content-Type'], undefined);
  // The token never goes into the URL, and only same-origin /v1 paths are called.
  assert.ok(!g.url.includes('tok123'));
  for (const bad of ['https://evil.example/v1/x', '//evil.example/v1/x', '/v1/../ui/', 'v1/servers', '/ui/app.js', '/v1//x']) {
    assert.throws(() => app.apiRequest('t', 'GET', bad), /Not an API path/, bad);
  }
});

await test('errorMessage shows the API message', () => {
  assert.equal(app.errorMessage(409, { code: 'quota_exceeded', message: 'Customer acme may run 5 servers' }), 'Customer acme may run 5 servers');
  assert.equal(app.errorMessage(502, null), 'HTTP 502');
  assert.equal(app.errorMessage(500, 'upstream broke\n'), 'upstream broke');
  const e = new app.ApiError(404, 'not_found', 'Server "x" does not exist');
  assert.equal(e.status, 404);
  assert.equal(e.code, 'not_found');
  assert.equal(e.message, 'Server "x" does not exist');
});

await test('withPage and fetchAll follow next', async () => {
  assert.equal(app.withPage('/v1/servers', '', 50), '/v1/servers?limit=50');
  assert.equal(app.withPage('/v1/servers?customer=acme', 'srv-9', 2), '/v1/servers?customer=acme&after=srv-9&limit=2');
  const all = ['a', 'b', 'c', 'd', 'e'];
  const asked = [];
  const getPage = async (path) => {
    asked.push(path);
    const u = new URL(path, 'http://x');
    const after = u.searchParams.get('after') || '';
    const limit = Number(u.searchParams.get('limit'));
    const items = all.filter((x) => x > after).slice(0, limit).map((id) => ({ id }));
    return { items, next: items.length === limit ? items[items.length - 1].id : '' };
  };
  const got = await app.fetchAll(getPage, '/v1/plans', 2);
  assert.deepEqual(got.map((x) => x.id), all);
  assert.deepEqual(asked, ['/v1/plans?limit=2', '/v1/plans?after=b&limit=2', '/v1/plans?after=d&limit=2']);
  // A server that repeats its cursor does not loop forever.
  let calls = 0;
  const stuck = async () => {
    calls++;
    return { items: [{ id: 'x' }], next: 'x' };
  };
  await app.fetchAll(stuck, '/v1/plans', 1);
  assert.equal(calls, 2);
});

await test('role checks mirror the API', () => {
  const admin = { role: 'admin', name: 'admin' };
  const cust = { role: 'customer', name: 'alice', customer_id: 'cus-1' };
  for (const a of ['servers', 'start', 'stop', 'reboot', 'console', 'invoices', 'plans']) {
    assert.ok(app.can(admin, a), 'admin ' + a);
    assert.ok(app.can(cust, a), 'customer ' + a);
  }
  for (const a of ['create', 'delete', 'resize', 'migrate', 'hosts', 'storage', 'images', 'customers', 'chooseCustomer', 'seeHost']) {
    assert.ok(app.can(admin, a), 'admin ' + a);
    assert.ok(!app.can(cust, a), 'customer ' + a);
  }
  assert.ok(!app.can(null, 'servers'));
  assert.ok(!app.can({ role: 'root' }, 'servers'));
  assert.ok(!app.can(admin, 'format-disk'));
  assert.deepEqual(app.navFor(cust).map(([h]) => h), ['#/servers', '#/invoices', '#/plans']);
  assert.deepEqual(app.navFor(admin).map(([h]) => h), ['#/servers', '#/invoices', '#/plans', '#/hosts', '#/storage', '#/images', '#/customers']);
  assert.deepEqual(app.serverColumns(cust), ['Name', 'Plan', 'State', 'IPv4', 'IPv6', 'Image', 'Created']);
  assert.deepEqual(app.serverColumns(admin).slice(-2), ['Customer', 'Host']);
  const sv = { id: 'srv-1', name: 'web1', plan: 'E', state: 'running', ipv4: '198.51.100.10', image_id: 'img-1',
    customer_id: 'cus-1', host_id: 'host-1', created_at: '2026-11-01T00:00:00Z' };
  const lookups = { images: app.byID([{ id: 'img-1', name: 'tiny' }]), customers: app.byID([{ id: 'cus-1', name: 'acme' }]), hosts: app.byID([]) };
  assert.deepEqual(app.serverRow(cust, sv, lookups), ['web1', 'E', 'running', '198.51.100.10', '—', 'tiny', '2026-11-01 00:00 UTC']);
  assert.deepEqual(app.serverRow(admin, sv, lookups).slice(-2), ['acme', 'host-1']);
});

await test('parseRoute', () => {
  assert.deepEqual(app.parseRoute(''), { view: 'servers' });
  assert.deepEqual(app.parseRoute('#/'), { view: 'servers' });
  assert.deepEqual(app.parseRoute('#/plans'), { view: 'plans' });
  assert.deepEqual(app.parseRoute('#/servers/srv-1'), { view: 'server', id: 'srv-1' });
  assert.deepEqual(app.parseRoute('#/servers/a%2Fb/console'), { view: 'console', id: 'a/b' });
  assert.deepEqual(app.parseRoute('#/servers/x/y/z'), { view: 'notfound' });
  assert.deepEqual(app.parseRoute('#/servers/%E0%A4%A'), { view: 'server', id: '' });
});

await test('operations', () => {
  assert.ok(!app.opDone({ state: 'pending' }));
  assert.ok(!app.opDone({ state: 'running' }));
  for (const s of ['succeeded', 'failed', 'cancelled']) assert.ok(app.opDone({ state: s }));
  assert.ok(!app.opDone(null));
  assert.equal(app.opSummary({ kind: 'create', state: 'running', progress: 40, step: 'booting' }), 'create: running 40% — booting');
  assert.equal(app.opSummary({ kind: 'resize', state: 'failed', progress: 60, error: 'no capacity' }), 'resize: failed: no capacity');
});

await test('console websocket', () => {
  assert.equal(app.consoleURL({ protocol: 'https:', host: 'grow.example:7470' }, 'srv-1'), 'wss://grow.example:7470/v1/servers/srv-1/console/ws');
  assert.equal(app.consoleURL({ protocol: 'http:', host: '127.0.0.1:7470' }, 'web 1'), 'ws://127.0.0.1:7470/v1/servers/web%201/console/ws');
  assert.deepEqual(app.consoleProtocols('abc123'), ['grow.bearer.abc123', 'grow.console']);
  assert.throws(() => app.consoleProtocols('abc, grow.console'));
  assert.throws(() => app.consoleProtocols(''));
});

await test('keyToBytes', () => {
  const k = (key, mods = {}) => app.keyToBytes({ key, ...mods });
  assert.equal(k('a'), 'a');
  assert.equal(k('A'), 'A');
  assert.equal(k('é'), 'é');
  assert.equal(k('Enter'), '\r');
  assert.equal(k('Backspace'), '\x7f');
  assert.equal(k('ArrowUp'), '\x1b[A');
  assert.equal(k('ArrowLeft'), '\x1b[D');
  assert.equal(k('Delete'), '\x1b[3~');
  assert.equal(k('c', { ctrlKey: true }), '\x03');
  assert.equal(k('D', { ctrlKey: true }), '\x04');
  assert.equal(k('[', { ctrlKey: true }), '\x1b');
  assert.equal(k('x', { altKey: true }), '\x1bx');
  assert.equal(k('Shift'), null);
  assert.equal(k('F5'), null);
  assert.equal(k('c', { metaKey: true }), null);
});

await test('appendTerminal', () => {
  assert.equal(app.appendTerminal('', 'login: '), 'login: ');
  assert.equal(app.appendTerminal('', 'a\r\nb\r\n'), 'a\nb\n');
  assert.equal(app.appendTerminal('', '\x1b[1;32mgreen\x1b[0m \x1b]0;title\x07ok'), 'green ok');
  assert.equal(app.appendTerminal('$ ls', '\b \b\b \b'), '$ ');
  assert.equal(app.appendTerminal('line\n', '\b'), 'line\n');
  assert.equal(app.appendTerminal('', 'ab\bc'), 'ac');
  const long = app.appendTerminal('', 'x'.repeat(50) + '\n' + 'y'.repeat(50) + '\n', 60);
  assert.ok(long.length <= 60);
  assert.equal(long, 'y'.repeat(50) + '\n');
});

await test('create form', () => {
  assert.deepEqual(app.splitKeys('ssh-ed25519 AAA a@b\n\n# old key\r\n  ssh-rsa BBB c@d  \n'), ['ssh-ed25519 AAA a@b', 'ssh-rsa BBB c@d']);
  assert.deepEqual(app.createServerBody({ name: ' web2 ', customer: 'acme', plan: 'E', image: 'tiny', sshKeys: '', userData: '  ' }),
    { name: 'web2', customer: 'acme', plan: 'E', image: 'tiny' });
  assert.deepEqual(app.createServerBody({ name: 'web2', customer: 'acme', plan: 'E', image: 'tiny', sshKeys: 'ssh-ed25519 K', userData: '#cloud-config\n' }),
    { name: 'web2', customer: 'acme', plan: 'E', image: 'tiny', ssh_keys: ['ssh-ed25519 K'], user_data: '#cloud-config\n' });
  assert.equal(app.planLabel({ name: 'E', vcpus: 1, memory_bytes: 512 << 20, disk_bytes: 10 * 1024 ** 3, traffic_bytes: 1024 ** 4, price_yen: 1100 }),
    'E: 1 vCPU, 512 MiB RAM, 10 GiB disk, 1 TiB traffic, ¥1,100/month');
  const fixed = { getRandomValues: (b) => b.fill(171) };
  assert.equal(app.newIdempotencyKey(fixed), 'web-' + 'ab'.repeat(16));
  assert.notEqual(app.newIdempotencyKey(), app.newIdempotencyKey());
});

if (process.exitCode) {
  console.error('app_test: failures');
} else {
  console.log('app_test: ' + passed + ' tests passed');
}
