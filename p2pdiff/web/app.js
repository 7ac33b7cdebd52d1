// p2pdiff dashboard: plain JS, no build step. State comes from one initial fetch
// (/api/health, /api/stats, /api/queue/{room}) and then from /api/events (Server-Sent Events).
// Everything shown that a client sent (prompts, ids) goes through textContent, never innerHTML.
'use strict';

const TOKEN_KEY = 'p2pdiff.adminToken';
const MAX_TASKS_PER_ROOM = 1000; // what the page keeps per room; the oldest finished go first
const MAX_FINISHED_SHOWN = 50;   // finished rows shown per room, newest first
const FETCH_LIMIT = 500;
const STATS_MIN_INTERVAL_MS = 1000; // totals are refetched at most this often while events flow
const HEALTH_INTERVAL_MS = 10000;
const ACTIVE = new Set(['pending', 'processing']);

const state = {
  mode: null,
  rooms: new Map(), // id -> Room
  stats: null,
  health: null,
  lastEventId: null,
  loaded: false,
  early: [], // events that arrived while the initial fetch was running
};

// ---------------------------------------------------------------- rooms

function room(id) {
  let r = state.rooms.get(id);
  if (!r) {
    // whole: the page holds every task of the room, so counts can be made here, live; else they
    // come from the server's last /api/stats (a room too big to keep whole).
    r = {
      id, tasks: new Map(), peers: new Map(), relays: {}, helperJoined: false, selfId: null, stats: null,
      whole: true, loading: 0, touched: new Set(),
    };
    state.rooms.set(id, r);
  }
  return r;
}

function upsertTask(task) {
  const r = room(task.roomId);
  const old = r.tasks.get(task.id);
  // Events and fetches can cross; never let an older copy replace a newer one.
  if (old && old.updatedAt > task.updatedAt) return;
  if (r.stats && task.status === 'complete' && old && old.status !== 'complete') r.stats.generated += 1;
  r.tasks.set(task.id, task);
  if (r.tasks.size > MAX_TASKS_PER_ROOM) {
    r.whole = false;
    for (const [id, t] of r.tasks) {
      if (!ACTIVE.has(t.status)) { r.tasks.delete(id); break; }
    }
  }
  renumber(r);
}

// Pending positions depend on every task of the room: recount in queue order.
function renumber(r) {
  let pos = 0;
  for (const t of r.tasks.values()) {
    if (t.status === 'pending') t.position = ++pos; else delete t.position;
  }
}

// ---------------------------------------------------------------- fetching

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function request(method, url, body) {
  // Up to three tries: a 401/403 asks for the admin token and tries again with it.
  for (let attempt = 0; attempt < 3; attempt++) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const t = token();
    if (t) headers.Authorization = 'Bearer ' + t;
    const resp = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await resp.json(); } catch { data = null; }
    if ((resp.status === 401 || resp.status === 403) && attempt < 2) {
      const msg = data && data.error ? data.error.message : resp.statusText;
      const reason = resp.status === 401 && !t
        ? 'This server needs an admin token for changes.'
        : `The server refused the request (${resp.status}: ${msg}). Enter the admin token.`;
      if (!(await askToken(reason))) throw new Error('cancelled: no admin token');
      continue;
    }
    if (!resp.ok) {
      throw new Error(data && data.error ? data.error.message : `${resp.status} ${resp.statusText}`);
    }
    return data;
  }
  throw new Error('the server refused the admin token');
}

const get = (url) => request('GET', url);

async function loadRoom(id) {
  const enc = encodeURIComponent(id);
  const r = room(id);
  // Events keep arriving while we fetch, on another connection: remember which tasks they touched,
  // so the fetched (possibly older) copies do not undo them.
  r.loading = (r.loading || 0) + 1;
  let active, finished;
  try {
    [active, finished] = await Promise.all([
      get(`/api/queue/${enc}?status=pending,processing&limit=${FETCH_LIMIT}`),
      get(`/api/queue/${enc}?status=complete,failed,cancelled&limit=${FETCH_LIMIT}`),
    ]);
  } finally {
    r.loading -= 1;
  }
  const touched = r.touched || new Set();
  r.touched = new Set();
  const before = r.tasks;
  r.tasks = new Map();
  r.whole = active.queue.length < FETCH_LIMIT && finished.queue.length < FETCH_LIMIT;
  // Queue order (what the page uses for positions) is the server's order of both lists merged.
  const all = [...active.queue, ...finished.queue].sort((a, b) => (a.queuedAt - b.queuedAt));
  for (const t of all) {
    const seen = touched.has(t.id) ? before.get(t.id) : undefined;
    upsertTask(seen && seen.updatedAt >= t.updatedAt ? seen : t);
  }
  for (const tid of touched) if (!r.tasks.has(tid) && before.has(tid)) upsertTask(before.get(tid));
  r.stats = active.stats;
  r.helperJoined = !!active.stats.helperJoined;
  for (const p of active.peers || []) r.peers.set(p.id, p);
}

async function loadAll() {
  const since = netEvents;
  const [health, stats] = await Promise.all([get('/api/health'), get('/api/stats')]);
  applyHealth(health, since);
  applyStats(stats);
  const ids = new Set([...Object.keys(stats.rooms), ...stats.helperRooms]);
  for (const id of [...state.rooms.keys()]) if (!ids.has(id)) state.rooms.delete(id);
  await Promise.all([...ids].map(loadRoom));
  state.loaded = true;
  const early = state.early;
  state.early = [];
  for (const ev of early) applyEvent(ev);
  render();
}

// Peer and relay events applied so far. A /api/health answer is a snapshot taken at some point
// after its request left: where a peer or relay event arrived since then, the event is newer.
let netEvents = 0;

function applyHealth(health, since) {
  state.health = health;
  state.mode = health.p2p.mode;
  const joined = new Set();
  for (const hr of health.p2p.rooms) {
    const r = room(hr.roomId);
    joined.add(hr.roomId);
    r.helperJoined = true;
    r.selfId = hr.selfId || null;
    if ((r.netAt || 0) > since) continue;
    if (hr.relays) r.relays = { ...hr.relays };
    r.peers = new Map((hr.peers || []).map((p) => [p.id, p]));
  }
  for (const r of state.rooms.values()) {
    if (!joined.has(r.id)) { r.helperJoined = false; r.relays = {}; r.peers.clear(); }
  }
}

function applyStats(stats) {
  state.stats = stats;
  for (const [id, s] of Object.entries(stats.rooms)) {
    const r = room(id);
    r.stats = s;
  }
}

// Totals and peer RTTs change with every event; refetch /api/stats at most once a second.
let statsTimer = null;
let statsLast = 0;
function refreshStatsSoon() {
  if (statsTimer) return;
  const wait = Math.max(0, STATS_MIN_INTERVAL_MS - (Date.now() - statsLast));
  statsTimer = setTimeout(async () => {
    statsTimer = null;
    statsLast = Date.now();
    try { applyStats(await get('/api/stats')); scheduleRender(); } catch (e) { /* next event retries */ }
  }, wait);
}

async function refreshHealth() {
  const since = netEvents;
  try { applyHealth(await get('/api/health'), since); scheduleRender(); } catch (e) { /* shown by conn state */ }
}

// ---------------------------------------------------------------- events

function applyEvent(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case 'task.created': case 'task.claimed': case 'task.progress': case 'task.complete':
    case 'task.failed': case 'task.cancelled': case 'task.requeued': case 'task.result':
    case 'task.updated': case 'task.moved': {
      const from = d.fromRoom !== undefined ? state.rooms.get(d.fromRoom) : null;
      if (from && from.tasks.delete(d.task.id)) renumber(from); // moved out of the default room
      const r = room(d.task.roomId);
      if (r.loading) r.touched.add(d.task.id);
      upsertTask(d.task);
      break;
    }
    case 'helper.joined':
      room(ev.room).helperJoined = true;
      refreshHealth();
      break;
    case 'helper.left': {
      const r = room(ev.room);
      r.helperJoined = false; r.relays = {}; r.peers.clear();
      break;
    }
    case 'peer.joined': case 'peer.rtt': case 'peer.capabilities':
      room(ev.room).peers.set(d.peer.id, { ...(room(ev.room).peers.get(d.peer.id) || {}), ...d.peer });
      room(ev.room).netAt = ++netEvents;
      break;
    case 'peer.left':
      room(ev.room).peers.delete(d.peer.id);
      room(ev.room).netAt = ++netEvents;
      break;
    case 'relay.state':
      room(ev.room).relays[d.url] = d.state;
      room(ev.room).netAt = ++netEvents;
      break;
    case 'tasks.pruned':
      loadRoom(ev.room).then(scheduleRender, showError);
      break;
    case 'reset': case 'queue.reloaded':
      loadAll().catch(showError);
      return;
    default:
      return; // a newer server's event type: ignore
  }
  refreshStatsSoon();
  scheduleRender();
}

let source = null;
function connect() {
  const url = state.lastEventId === null ? '/api/events' : `/api/events?lastEventId=${state.lastEventId}`;
  source = new EventSource(url);
  source.onopen = () => setConn('live');
  source.onmessage = (msg) => {
    if (msg.lastEventId) state.lastEventId = msg.lastEventId;
    let ev;
    try { ev = JSON.parse(msg.data); } catch { return; }
    if (!state.loaded) { state.early.push(ev); return; }
    applyEvent(ev);
  };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (e.g. a 503): reconnect ourselves, resuming from the last id seen.
      setConn('offline');
      source.close();
      setTimeout(connect, 5000);
    } else {
      setConn('reconnecting'); // EventSource retries by itself, sending Last-Event-ID
    }
  };
}

// ---------------------------------------------------------------- actions

async function addTask(roomId, prompt) {
  await request('POST', `/api/queue/${encodeURIComponent(roomId)}`, { prompt });
}

async function cancelTask(roomId, taskId) {
  await request('DELETE', `/api/queue/${encodeURIComponent(roomId)}/${encodeURIComponent(taskId)}`);
}

async function joinRoom(roomId) {
  const data = await request('POST', `/api/join/${encodeURIComponent(roomId)}`);
  room(roomId).helperJoined = true;
  toast(data.message || `joined ${roomId}`);
  await Promise.all([refreshHealth(), loadRoom(roomId)]);
  render();
}

async function leaveRoom(roomId) {
  const data = await request('DELETE', `/api/join/${encodeURIComponent(roomId)}`);
  const r = room(roomId);
  r.helperJoined = false; r.peers.clear(); r.relays = {};
  toast(data.message || `left ${roomId}`);
  render();
}

// ---------------------------------------------------------------- token dialog

function askToken(reason) {
  const dialog = document.getElementById('token-dialog');
  const input = document.getElementById('token-input');
  document.getElementById('token-reason').textContent = reason;
  input.value = '';
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      const ok = dialog.returnValue === 'ok' && input.value.trim() !== '';
      if (ok) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      updateTokenButton();
      resolve(ok);
    }, { once: true });
    dialog.returnValue = '';
    dialog.showModal();
    input.focus();
  });
}

function updateTokenButton() {
  document.getElementById('token-btn').hidden = !token();
}

// ---------------------------------------------------------------- rendering

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k === 'width') node.style.width = v; // CSSOM, not a style attribute: fine under any CSP
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmtTime = (ms) => (ms ? new Date(ms).toLocaleTimeString() : '');
function fmtDuration(s) {
  if (s === null || s === undefined) return '–';
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  const h = Math.floor(s / 3600);
  return h < 48 ? `${h}h ${Math.floor((s % 3600) / 60)}m` : `${Math.floor(h / 24)}d ${h % 24}h`;
}

function setConn(what) {
  const node = document.getElementById('conn');
  node.textContent = what;
  node.className = `conn conn-${what}`;
}

let renderQueued = false;
function scheduleRender() {
  // Many events in one frame cost one render.
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function render() {
  renderTotals();
  const mode = document.getElementById('mode');
  mode.textContent = state.mode || '…';
  mode.className = `badge mode-${state.mode || 'unknown'}`;
  const info = document.getElementById('server-info');
  if (state.health) info.textContent = `v${state.health.version}`;
  const container = document.getElementById('rooms');
  const ids = [...state.rooms.keys()].sort();
  document.getElementById('empty').hidden = ids.length > 0;
  // Keep the card of each room (and what is typed in its form); rebuild only its contents.
  const existing = new Map([...container.children].map((c) => [c.dataset.room, c]));
  for (const [id, card] of existing) if (!state.rooms.has(id)) card.remove();
  let prev = null;
  for (const id of ids) {
    let card = existing.get(id);
    if (!card) card = roomCard(id);
    renderRoom(card, state.rooms.get(id));
    if (prev ? prev.nextSibling !== card : container.firstChild !== card) {
      container.insertBefore(card, prev ? prev.nextSibling : container.firstChild);
    }
    prev = card;
  }
}

function roomCounts(r) {
  if (!r.whole) return (r.stats && r.stats.byStatus) || {};
  const counts = {};
  for (const t of r.tasks.values()) counts[t.status] = (counts[t.status] || 0) + 1;
  return counts;
}

function renderTotals() {
  const s = state.stats;
  const set = (k, v) => { document.querySelector(`[data-total="${k}"]`).textContent = v; };
  if (s) {
    // Task counts and peers from what the page holds (live); the rest from the last /api/stats.
    const totals = {};
    let peers = 0;
    for (const r of state.rooms.values()) {
      for (const [k, n] of Object.entries(roomCounts(r))) totals[k] = (totals[k] || 0) + n;
      peers += r.peers.size;
    }
    set('rooms', state.rooms.size);
    for (const k of ['pending', 'processing', 'complete', 'failed', 'cancelled']) set(k, totals[k] || 0);
    set('peers', peers);
    set('requeues', s.requeues);
    set('wait', fmtDuration(s.waitSeconds.p95));
  }
  if (state.health) set('uptime', fmtDuration(state.health.uptime));
}

function roomCard(id) {
  const input = el('input', { name: 'prompt', placeholder: 'prompt for a new task', required: true, maxlength: '4000', autocomplete: 'off', 'aria-label': `prompt for room ${id}` });
  const form = el('form', {
    class: 'inline-form add-task',
    onsubmit: (e) => {
      e.preventDefault();
      const prompt = input.value.trim();
      if (!prompt) return;
      addTask(id, prompt).then(() => { input.value = ''; }, showError);
    },
  }, input, el('button', { type: 'submit', class: 'add-btn', text: 'Add task' }));
  return el('section', { class: 'room', 'data-room': id },
    el('header', { class: 'room-head' }),
    el('div', { class: 'room-net' }),
    form,
    el('div', { class: 'room-tasks' }));
}

function renderRoom(card, r) {
  const head = card.querySelector('.room-head');
  const stats = r.stats || { byStatus: {}, generated: 0 };
  const byStatus = roomCounts(r);
  head.replaceChildren(
    el('h2', { text: r.id }),
    el('span', { class: `badge ${r.helperJoined ? 'joined' : 'not-joined'}`, text: r.helperJoined ? 'helper in room' : 'helper not in room' }),
    el('span', { class: 'muted small', text: `${byStatus.pending || 0} queued · ${byStatus.processing || 0} processing · ${stats.generated || 0} generated` }),
    el('span', { class: 'spacer' }),
    r.helperJoined
      ? el('button', { type: 'button', class: 'secondary leave-btn', text: 'Leave', onclick: () => leaveRoom(r.id).catch(showError) })
      : el('button', { type: 'button', class: 'secondary join-btn', text: 'Join', onclick: () => joinRoom(r.id).catch(showError) }),
  );

  const net = card.querySelector('.room-net');
  const relayChips = Object.entries(r.relays).map(([url, st]) => el('span', { class: `chip relay relay-${st}`, title: url, text: `${shortUrl(url)}: ${st}` }));
  const peerRows = [...r.peers.values()].map((p) => el('li', { class: 'peer' },
    el('code', { text: shortId(p.id), title: p.id }),
    el('span', { class: 'rtt', text: p.rttMs === null || p.rttMs === undefined ? 'rtt –' : `${p.rttMs} ms` }),
    ...capabilities(p)));
  net.replaceChildren(
    el('div', { class: 'net-line' }, el('span', { class: 'label', text: 'relays' }),
      ...(relayChips.length ? relayChips : [el('span', { class: 'muted', text: r.helperJoined && state.mode === 'p2p' ? 'none yet' : (state.mode === 'api-only' ? 'api-only: no relays' : '–') })])),
    el('div', { class: 'net-line' }, el('span', { class: 'label', text: `peers (${r.peers.size})` }),
      peerRows.length ? el('ul', { class: 'peers' }, ...peerRows) : el('span', { class: 'muted', text: 'none' })),
  );

  const tasks = [...r.tasks.values()];
  const processing = tasks.filter((t) => t.status === 'processing');
  const pending = tasks.filter((t) => t.status === 'pending');
  const finished = tasks.filter((t) => !ACTIVE.has(t.status))
    .sort((a, b) => (b.finishedAt || b.updatedAt) - (a.finishedAt || a.updatedAt));
  const shown = [...processing, ...pending, ...finished.slice(0, MAX_FINISHED_SHOWN)];
  const box = card.querySelector('.room-tasks');
  if (!shown.length) {
    box.replaceChildren(el('p', { class: 'muted', text: 'No tasks.' }));
    return;
  }
  const table = el('table', { class: 'tasks' },
    el('thead', {}, el('tr', {}, ...['#', 'task', 'prompt', 'status', 'progress', 'worker', 'updated', ''].map((h) => el('th', { text: h })))),
    el('tbody', {}, ...shown.map(taskRow)));
  const more = finished.length > MAX_FINISHED_SHOWN
    ? el('p', { class: 'muted small', text: `+${finished.length - MAX_FINISHED_SHOWN} older finished tasks not shown` })
    : null;
  box.replaceChildren(table, ...(more ? [more] : []));
}

function taskRow(t) {
  const pct = Math.round((t.progress || 0) * 100);
  const cancellable = ACTIVE.has(t.status);
  return el('tr', { 'data-task-id': t.id, 'data-status': t.status },
    el('td', { class: 'pos', text: t.position ? String(t.position) : '' }),
    el('td', {}, el('code', { text: shortId(t.id), title: t.id })),
    el('td', { class: 'prompt', text: t.prompt, title: t.error ? `${t.prompt}\n\nerror: ${t.error}` : t.prompt }),
    el('td', {}, el('span', { class: `status status-${t.status}`, text: t.status })),
    el('td', {}, el('div', { class: `bar bar-${t.status}`, role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': String(pct), 'aria-label': `progress of ${t.id}` },
      el('div', { class: 'fill', width: `${pct}%` })), el('span', { class: 'pct', text: `${pct}%` })),
    el('td', { class: 'worker', text: t.claimedBy || '' }),
    el('td', { class: 'time', text: fmtTime(t.updatedAt) }),
    el('td', {}, cancellable
      ? el('button', { type: 'button', class: 'danger cancel-btn', text: 'Cancel', 'aria-label': `cancel ${t.id}`, onclick: (e) => { e.target.disabled = true; cancelTask(t.roomId, t.id).catch((err) => { e.target.disabled = false; showError(err); }); } })
      : null),
  );
}

function capabilities(peer) {
  const caps = peer.capabilities;
  if (!caps) return [];
  const items = Array.isArray(caps) ? caps.map(String)
    : Object.entries(caps).filter(([, v]) => v !== false && v !== null).map(([k, v]) => (v === true ? k : `${k}: ${typeof v === 'object' ? JSON.stringify(v) : v}`));
  return items.slice(0, 8).map((c) => el('span', { class: 'chip cap', text: c }));
}

const shortId = (id) => (id.length > 18 ? `${id.slice(0, 8)}…${id.slice(-6)}` : id);
function shortUrl(url) {
  try { const u = new URL(url); return u.host + (u.pathname !== '/' ? u.pathname : ''); } catch { return url; }
}

// ---------------------------------------------------------------- toasts and start

function toast(text, kind = 'info') {
  const box = document.getElementById('toasts');
  const node = el('div', { class: `toast toast-${kind}`, text });
  box.append(node);
  while (box.children.length > 4) box.firstChild.remove();
  setTimeout(() => node.remove(), kind === 'error' ? 8000 : 3000);
}

function showError(err) {
  toast(err && err.message ? err.message : String(err), 'error');
}

function start() {
  document.getElementById('join-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = document.getElementById('join-room-input');
    const id = input.value.trim();
    if (!id) return;
    joinRoom(id).then(() => { input.value = ''; }, showError);
  });
  document.getElementById('token-btn').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    updateTokenButton();
    toast('admin token forgotten');
  });
  updateTokenButton();
  connect(); // first, so nothing that happens during the initial fetch is missed
  loadAll().catch((err) => { showError(err); setConn('offline'); });
  setInterval(refreshHealth, HEALTH_INTERVAL_MS);
  setInterval(() => { if (state.stats) refreshStatsSoon(); }, HEALTH_INTERVAL_MS);
}

start();
