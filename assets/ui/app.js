// orchestrator web UI: a small single-page app over the public REST API of the node that
// served it. No framework, no build step, nothing from another origin.
//
// Rules this file keeps (the unit tests in src/api/ui.rs check the first two):
// - Text from the API (DAG ids, owners, commands, logs, error messages) reaches the page
//   only through textContent / text nodes / setAttribute of inert attributes; never as
//   markup.
// - The token lives in sessionStorage only (this tab, until it closes); it is sent as a
//   Bearer header to this origin and nowhere else.
// - Polling stops when the page changes, when the run is over, and while the tab is
//   hidden; it backs off on errors and while nothing changes.
'use strict';

(function () {
  const API = '/api/v1/runtime/orchestrator';
  const TOKEN_KEY = 'orchestrator.token';
  const RUN_FINISHED = new Set(['done', 'failed', 'cancelled']);
  const TASK_STATES = ['pending', 'queued', 'running', 'retrying', 'done', 'failed',
    'upstream_failed', 'skipped', 'cancelled'];
  const RUN_STATES = ['queued', 'running', 'done', 'failed', 'cancelled'];

  // ---------------------------------------------------------------- DOM helpers

  // An element with attributes and children. `text` sets textContent, `class` the class
  // list, `on*` adds a listener (functions only); other attributes are set as strings.
  function el(tag, attrs, ...children) {
    return build(document.createElement(tag), attrs, children);
  }

  function svg(tag, attrs, ...children) {
    return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
  }

  function build(e, attrs, children) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') e.textContent = String(v);
      else if (k === 'class') e.setAttribute('class', v);
      else if (k.startsWith('on')) {
        if (typeof v === 'function') e.addEventListener(k.slice(2), v);
      } else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  // Replace `parent`'s children (null, undefined and false are skipped: the DOM's own
  // replaceChildren would show them as text).
  function put(parent, ...children) {
    parent.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false));
    return parent;
  }

  function badge(state, extra) {
    const s = String(state || 'unknown');
    return el('span', { class: 'badge state-' + s.replace(/[^a-z_]/g, '') + (extra ? ' ' + extra : ''), 'data-state': s, text: s.replace('_', ' ') });
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function randomHex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // ---------------------------------------------------------------- formatting

  function fmtDuration(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return '—';
    if (ms < 1000) return Math.round(ms) + ' ms';
    const s = ms / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min ' + Math.round(s % 60) + ' s';
    const h = Math.floor(m / 60);
    if (h < 48) return h + ' h ' + (m % 60) + ' min';
    return Math.floor(h / 24) + ' d ' + (h % 24) + ' h';
  }

  function relative(iso) {
    const t = Date.parse(iso);
    if (!isFinite(t)) return '';
    const d = t - Date.now();
    const word = fmtDuration(Math.abs(d));
    return d >= 0 ? 'in ' + word : word + ' ago';
  }

  // A timestamp as local time plus a relative hint; the exact instant in the tooltip.
  function when(iso) {
    if (!iso) return el('span', { class: 'muted', text: '—' });
    const t = new Date(iso);
    if (isNaN(t.getTime())) return el('span', { text: iso });
    const sameDay = new Date().toDateString() === t.toDateString();
    const shown = sameDay ? t.toLocaleTimeString() : t.toLocaleString();
    return el('time', { datetime: iso, title: iso }, shown, ' ', el('span', { class: 'muted', text: '(' + relative(iso) + ')' }));
  }

  function between(a, b) {
    if (!a) return null;
    const end = b ? Date.parse(b) : Date.now();
    return end - Date.parse(a);
  }

  // ---------------------------------------------------------------- session

  const session = {
    token() {
      return sessionStorage.getItem(TOKEN_KEY);
    },
    set(token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    },
    clear() {
      sessionStorage.removeItem(TOKEN_KEY);
    },
    // The token's claims, for display only (the node verifies the token; we do not).
    claims() {
      const t = this.token();
      if (!t) return null;
      try {
        const part = t.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
        const json = atob(part + '='.repeat((4 - (part.length % 4)) % 4));
        return JSON.parse(json);
      } catch (_) {
        return null;
      }
    },
  };

  // ---------------------------------------------------------------- API client

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    describe() {
      if (this.status === 0) return this.message;
      return this.message + ' (HTTP ' + this.status + ' ' + this.code + ')';
    }
  }

  // One API call. Writes carry a fresh X-Request-Id (the idempotency key), reused when a
  // 429 makes us retry. A 401 signs the user out with the node's message.
  async function api(method, path, body) {
    const token = session.token();
    if (!token) throw new ApiError(401, 'unauthorized', 'not signed in');
    const headers = { Authorization: 'Bearer ' + token, Accept: 'application/json' };
    const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
    if (method !== 'GET') headers['X-Request-Id'] = 'ui-' + randomHex(12);
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    for (let attempt = 0; ; attempt++) {
      let resp;
      try {
        resp = await fetch(API + path, init);
      } catch (e) {
        throw new ApiError(0, 'unreachable', 'The node did not answer (' + e.message + ').');
      }
      if (resp.status === 429 && attempt < 3) {
        const wait = Math.min(Number(resp.headers.get('Retry-After')) || 1, 10);
        await sleep(wait * 1000);
        continue;
      }
      const type = resp.headers.get('Content-Type') || '';
      if (resp.ok) return type.startsWith('application/json') ? resp.json() : resp.text();
      let code = 'http_' + resp.status;
      let message = resp.statusText || 'request failed';
      try {
        const j = await resp.json();
        code = String(j.error || code);
        message = String(j.message || message);
      } catch (_) {
        // Not JSON: keep the status text.
      }
      const err = new ApiError(resp.status, code, message);
      if (resp.status === 401) signedOut('The node refused your token: ' + err.describe() + '. Paste a valid token to sign in again.');
      throw err;
    }
  }

  // Any failure as one line: the API's message and status, or a script error's message.
  function describe(e) {
    if (e instanceof ApiError) return e.describe();
    return String(e && e.message ? e.message : e);
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- page lifecycle

  const app = document.getElementById('app');
  let page = null;

  // What one rendered page owns: its liveness (a page that was left must not render) and
  // its pollers.
  function newPage() {
    if (page) page.close();
    const p = {
      alive: true,
      pollers: [],
      close() {
        this.alive = false;
        this.pollers.forEach((x) => x.stop());
      },
    };
    page = p;
    return p;
  }

  // Call `tick` now and then again: after `interval` while what it returns changes, slower
  // (up to `idle`) while it does not, slower still (up to `max`) after errors. `tick`
  // returns a signature of what it saw, or STOP. Paused while the tab is hidden.
  const STOP = Symbol('stop');
  function poll(p, tick, opts) {
    const interval = (opts && opts.interval) || 1000;
    const idle = (opts && opts.idle) || interval * 5;
    const max = (opts && opts.max) || 30000;
    const onError = opts && opts.onError;
    let delay = interval;
    let timer = null;
    let running = false;
    let stopped = false;
    let last;
    async function run() {
      timer = null;
      if (stopped || !p.alive || document.hidden) return;
      running = true;
      let result;
      try {
        result = await tick();
        if (result === STOP) {
          stopped = true;
        } else {
          delay = result === last ? Math.min(Math.round(delay * 1.5), idle) : interval;
          last = result;
        }
      } catch (e) {
        if (e instanceof ApiError && (e.status === 401 || e.status === 403)) stopped = true;
        delay = Math.min(delay * 2, max);
        if (onError && p.alive) onError(e);
      }
      running = false;
      if (!stopped && p.alive && !document.hidden) timer = setTimeout(run, delay);
    }
    const poller = {
      stop() {
        stopped = true;
        if (timer) clearTimeout(timer);
        document.removeEventListener('visibilitychange', onVisibility);
      },
      // Run now (after an action), keeping the schedule.
      now() {
        if (stopped || running) return;
        if (timer) clearTimeout(timer);
        delay = interval;
        run();
      },
      get stopped() {
        return stopped;
      },
    };
    function onVisibility() {
      if (document.hidden) {
        if (timer) clearTimeout(timer);
        timer = null;
      } else if (!stopped && !running && !timer) {
        delay = interval;
        run();
      }
    }
    document.addEventListener('visibilitychange', onVisibility);
    p.pollers.push(poller);
    run();
    return poller;
  }

  // ---------------------------------------------------------------- messages

  let flashTimer = null;
  function flash(message, bad) {
    const f = document.getElementById('flash');
    f.textContent = message;
    f.className = bad ? 'bad' : '';
    f.hidden = false;
    if (flashTimer) clearTimeout(flashTimer);
    flashTimer = setTimeout(() => {
      f.hidden = true;
    }, bad ? 12000 : 5000);
  }

  function errorBox(e, id) {
    const text = describe(e);
    return el('div', { class: 'error', role: 'alert', id: id || null, text });
  }

  // Show (or clear, with null) a page's error line in `slot`.
  function showError(slot, e) {
    put(slot, e ? errorBox(e) : '');
  }

  // ---------------------------------------------------------------- sign-in

  let signInMessage = null;
  let returnTo = null;

  function signedOut(message) {
    session.clear();
    // The sign-in form shows its own message for the token it is checking.
    if (page && page.signIn) return;
    signInMessage = message;
    if (location.hash && !location.hash.startsWith('#/signin')) returnTo = location.hash;
    if (location.hash === '#/signin') route();
    else location.hash = '#/signin';
  }

  function renderSignIn(p) {
    p.signIn = true;
    const input = el('textarea', { id: 'token-input', spellcheck: 'false', autocomplete: 'off', placeholder: 'eyJhbGciOi…', 'aria-label': 'API token' });
    const message = el('div', { id: 'signin-message' });
    if (signInMessage) message.append(el('div', { class: 'error', role: 'alert', text: signInMessage }));
    const button = el('button', { id: 'sign-in', class: 'primary', type: 'submit', text: 'Sign in' });
    const form = el('form', {
      class: 'card signin',
      onsubmit: async (ev) => {
        ev.preventDefault();
        let token = input.value.trim().replace(/^Bearer\s+/i, '');
        if (!/^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*$/.test(token)) {
          put(message, el('div', { class: 'error', role: 'alert', text: 'That does not look like a token: a JWT is three base64url parts separated by dots.' }));
          return;
        }
        button.disabled = true;
        session.set(token);
        signInMessage = null;
        try {
          await api('GET', '/dags?limit=1');
          input.value = '';
          const target = returnTo || '#/dags';
          returnTo = null;
          if (location.hash === target) route();
          else location.hash = target;
        } catch (e) {
          if (!p.alive && e.status === 401) return; // signedOut() re-rendered this page
          session.clear();
          const text = e.status === 401
            ? 'The node refused this token: ' + describe(e) + '.'
            : e.status === 403
              ? 'The token is valid but may not read DAGs (it needs orchestrator:read): ' + describe(e) + '.'
              : 'Could not check the token: ' + describe(e);
          put(message, el('div', { class: 'error', role: 'alert', text }));
        } finally {
          button.disabled = false;
        }
      },
    },
    el('h1', { text: 'Sign in' }),
    el('p', {},
      'Paste an API token (a JWT). It stays in this browser tab only (session storage, gone when the tab closes) and is sent as ',
      el('code', { text: 'Authorization: Bearer' }), ' to this node\'s API. You see what the token\'s tenant may see.'),
    el('p', { class: 'muted' }, 'Mint one on a node: ',
      el('code', { text: 'orchestrator token --data-dir DATA_DIR --tenant TENANT --scope "orchestrator:read orchestrator:write"' }),
      '. The cluster page needs an admin token of an operator tenant.'),
    input,
    el('div', { class: 'actions' }, button),
    message);
    put(app, form);
    input.focus();
  }

  // ---------------------------------------------------------------- DAG graph

  // Layers by longest path from a root (so every edge points right), ordered within a
  // layer by the mean position of their upstream tasks (fewer crossings).
  function layout(tasks) {
    const byId = new Map(tasks.map((t) => [t.id, t]));
    const depth = new Map();
    const visiting = new Set();
    function depthOf(id) {
      if (depth.has(id)) return depth.get(id);
      if (visiting.has(id)) return 0; // a cycle cannot be stored, but never loop
      visiting.add(id);
      let d = 0;
      for (const up of byId.get(id).deps) if (byId.has(up)) d = Math.max(d, depthOf(up) + 1);
      depth.set(id, d);
      return d;
    }
    tasks.forEach((t) => depthOf(t.id));
    const layers = [];
    tasks.forEach((t) => {
      const d = depth.get(t.id);
      (layers[d] = layers[d] || []).push(t.id);
    });
    const pos = new Map();
    layers.forEach((layer, i) => {
      if (i > 0) {
        const key = (id) => {
          const ups = byId.get(id).deps.filter((u) => pos.has(u));
          return ups.length ? ups.reduce((s, u) => s + pos.get(u), 0) / ups.length : Infinity;
        };
        const keys = new Map(layer.map((id) => [id, key(id)]));
        layer.sort((a, b) => keys.get(a) - keys.get(b) || (a < b ? -1 : 1));
      }
      layer.forEach((id, j) => pos.set(id, j));
    });
    return layers;
  }

  // Tasks of a DAG definition as {id, deps, kind}.
  function tasksOf(definition) {
    return ((definition && definition.tasks) || []).map((t) => ({
      id: t.task_id,
      deps: t.depends_on || [],
      kind: t.kind && t.kind.kind ? t.kind.kind : String(t.kind || ''),
      spec: t,
    }));
  }

  // Topological order (layer by layer) of a DAG's tasks.
  function taskOrder(tasks) {
    return layout(tasks).flat();
  }

  // The graph as SVG; `states` (task id -> state) colours the boxes.
  function drawGraph(tasks, states, link) {
    const W = 160;
    const H = 34;
    const GX = 56;
    const GY = 16;
    const PAD = 10;
    const layers = layout(tasks);
    const tallest = Math.max(1, ...layers.map((l) => l.length));
    const width = PAD * 2 + layers.length * W + Math.max(0, layers.length - 1) * GX;
    const height = PAD * 2 + tallest * H + (tallest - 1) * GY;
    const at = new Map();
    layers.forEach((layer, i) => {
      const offset = ((tallest - layer.length) * (H + GY)) / 2;
      layer.forEach((id, j) => at.set(id, { x: PAD + i * (W + GX), y: PAD + offset + j * (H + GY) }));
    });
    const root = svg('svg', { width, height, viewBox: '0 0 ' + width + ' ' + height, role: 'img', 'aria-label': 'task graph', id: 'dag-graph' },
      svg('defs', {}, svg('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
        svg('path', { d: 'M 0 0 L 10 5 L 0 10 z', class: 'arrow' }))));
    for (const t of tasks) {
      for (const up of t.deps) {
        const a = at.get(up);
        const b = at.get(t.id);
        if (!a || !b) continue;
        const x1 = a.x + W;
        const y1 = a.y + H / 2;
        const x2 = b.x;
        const y2 = b.y + H / 2;
        const mx = (x1 + x2) / 2;
        root.append(svg('path', { class: 'edge', d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, 'marker-end': 'url(#arrow)' }));
      }
    }
    for (const t of tasks) {
      const p = at.get(t.id);
      const state = (states && states[t.id]) || 'pending';
      const label = t.id.length > 20 ? t.id.slice(0, 19) + '…' : t.id;
      const box = svg('g', { class: 'node state-' + state.replace(/[^a-z_]/g, ''), 'data-task': t.id, 'data-state': state, transform: `translate(${p.x},${p.y})` },
        svg('title', { text: t.id + (t.kind ? ' (' + t.kind + ')' : '') + ' — ' + state }),
        svg('rect', { width: W, height: H, rx: 6 }),
        svg('text', { x: W / 2, y: H / 2, text: label }));
      root.append(link ? svg('a', { href: link(t.id) }, box) : box);
    }
    return el('div', { class: 'graph' }, root);
  }

  function legend(states) {
    return el('div', { class: 'legend' }, states.map((s) => badge(s)));
  }

  // ---------------------------------------------------------------- DAGs page

  function pauseButton(dag, after) {
    const paused = dag.status === 'paused';
    return el('button', {
      type: 'button',
      class: 'pause-toggle',
      'data-dag-id': dag.dag_id,
      text: paused ? 'Unpause' : 'Pause',
      onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          await api('POST', '/dags/' + enc(dag.dag_id) + (paused ? '/unpause' : '/pause'));
          flash((paused ? 'Unpaused ' : 'Paused ') + dag.dag_id + '.');
        } catch (e) {
          flash('Could not ' + (paused ? 'unpause ' : 'pause ') + dag.dag_id + ': ' + describe(e), true);
        } finally {
          after();
        }
      },
    });
  }

  function renderDags(p) {
    const errors = el('div');
    const body = el('tbody');
    const more = el('p', { class: 'muted' });
    const table = el('div', { class: 'table-wrap' }, el('table', { id: 'dags-table' },
      el('thead', {}, el('tr', {}, ['DAG', 'Owner', 'Schedule', 'Next window', 'Last run', 'Tasks', 'Version', 'Status', ''].map((h) => el('th', { text: h })))),
      body));
    const empty = el('div', { class: 'card', id: 'no-dags', hidden: true },
      el('p', { text: 'No DAGs for this tenant yet.' }),
      el('p', { class: 'muted' }, 'Apply one with the CLI: ', el('code', { text: 'orchestrator dag apply -f examples/' })));
    put(app, el('h1', { text: 'DAGs' }), errors, table, empty, more);
    const poller = poll(p, async () => {
      const data = await api('GET', '/dags?limit=500');
      if (!p.alive) return STOP;
      showError(errors, null);
      const dags = data.dags || [];
      put(body, ...dags.map((d) => el('tr', { 'data-dag-id': d.dag_id },
        el('td', {}, el('a', { class: 'dag-link', href: '#/dags/' + enc(d.dag_id), text: d.dag_id })),
        el('td', { text: d.owner || '—' }),
        el('td', {}, d.schedule ? el('code', { text: d.schedule }) : el('span', { class: 'muted', text: 'manual only' }), d.schedule && d.timezone && d.timezone !== 'UTC' ? el('span', { class: 'muted', text: ' ' + d.timezone }) : null),
        el('td', {}, d.status === 'paused' ? el('span', { class: 'muted', text: 'paused' }) : when(d.next_fire_time)),
        el('td', {}, d.last_run ? el('a', { href: '#/runs/' + enc(d.last_run.run_id), class: 'last-run' }, badge(d.last_run.state), ' ', when(d.last_run.created_at)) : el('span', { class: 'muted', text: 'never run' })),
        el('td', { text: d.tasks }),
        el('td', { text: d.version }),
        el('td', {}, el('span', { class: 'badge ' + (d.status === 'paused' ? 'paused' : 'active'), text: d.status })),
        el('td', {}, pauseButton(d, () => poller.now())))));
      table.hidden = dags.length === 0;
      empty.hidden = dags.length !== 0;
      more.textContent = data.next_cursor ? 'Showing the first 500 DAGs.' : '';
      return JSON.stringify(data);
    }, { interval: 3000, idle: 15000, onError: (e) => showError(errors, e) });
  }

  // ---------------------------------------------------------------- one DAG

  function taskWhat(t) {
    const k = t.spec.kind || {};
    if (k.kind === 'shell') return el('code', { text: k.command });
    if (k.kind === 'http') return el('code', { text: (k.method || 'GET') + ' ' + k.url });
    return el('span', { class: 'muted', text: 'no-op' });
  }

  function renderDag(p, dagId) {
    const errors = el('div');
    const title = el('h1', {}, dagId);
    const facts = el('dl', { class: 'facts' });
    const graph = el('div', {});
    const tasksBody = el('tbody');
    const versions = el('div', {});
    const runsBody = el('tbody');
    const trigger = el('button', {
      id: 'trigger',
      type: 'button',
      class: 'primary',
      text: 'Trigger run',
      onclick: async () => {
        trigger.disabled = true;
        try {
          const r = await api('POST', '/runs', { dag_id: dagId, run_type: 'manual' });
          flash('Triggered ' + r.run_id + '.');
          location.hash = '#/runs/' + enc(r.run_id);
        } catch (e) {
          flash('Could not trigger a run of ' + dagId + ': ' + describe(e), true);
          trigger.disabled = false;
        }
      },
    });
    const pauseSlot = el('span');
    put(app,
      el('p', { class: 'muted' }, el('a', { href: '#/dags', text: 'DAGs' }), ' / ', dagId),
      title,
      el('div', { class: 'actions' }, trigger, pauseSlot, el('a', { href: '#/dags/' + enc(dagId) + '/grid', id: 'grid-link', text: 'Runs grid →' })),
      errors,
      el('div', { class: 'card' }, facts),
      el('h2', { text: 'Graph' }), graph, legend(TASK_STATES),
      el('h2', { text: 'Tasks' }),
      el('div', { class: 'table-wrap' }, el('table', { id: 'tasks-table' }, el('thead', {}, el('tr', {}, ['Task', 'Kind', 'Does', 'Depends on', 'Retries', 'Timeout'].map((h) => el('th', { text: h })))), tasksBody)),
      el('h2', { text: 'Versions' }), versions,
      el('h2', { text: 'Recent runs' }),
      el('div', { class: 'table-wrap' }, el('table', { id: 'runs-table' }, el('thead', {}, el('tr', {}, ['Run', 'State', 'Type', 'Version', 'Window', 'Created', 'Ended'].map((h) => el('th', { text: h })))), runsBody)));
    let poller = null;
    poller = poll(p, async () => {
      let dag;
      try {
        dag = await api('GET', '/dags/' + enc(dagId));
      } catch (e) {
        if (e.status === 404) {
          put(app, el('h1', { text: dagId }), el('div', { class: 'notice', id: 'not-found', text: 'No DAG named ' + dagId + ' for this tenant (or it was deleted).' }));
          return STOP;
        }
        throw e;
      }
      const runs = (await api('GET', '/runs?dag_id=' + enc(dagId) + '&limit=25')).runs || [];
      // A 404 here means the DAG went away since the GET above: the next poll says so.
      const history = (await api('GET', '/dags/' + enc(dagId) + '/versions?limit=20').catch((e) => {
        if (e.status === 404) return {};
        throw e;
      })).versions || [];
      if (!p.alive) return STOP;
      showError(errors, null);
      const def = dag.definition || {};
      put(title, dag.dag_id, ' ', el('span', { class: 'badge ' + (dag.status === 'paused' ? 'paused' : 'active'), id: 'dag-status', text: dag.status }));
      put(pauseSlot, pauseButton(dag, () => poller && poller.now()));
      put(facts,
        el('dt', { text: 'Owner' }), el('dd', { text: dag.owner || '—' }),
        el('dt', { text: 'Schedule' }), el('dd', {}, dag.schedule ? el('code', { text: dag.schedule }) : el('span', { class: 'muted', text: 'none (manual and backfill runs only)' }), ' ', el('span', { class: 'muted', text: dag.timezone || '' })),
        el('dt', { text: 'Next windows' }), el('dd', {}, dag.status === 'paused' ? el('span', { class: 'muted', text: 'paused' })
          : (dag.next_fire_times || []).length ? (dag.next_fire_times || []).map((t, i) => [i ? ', ' : '', when(t)]) : el('span', { class: 'muted', text: '—' })),
        el('dt', { text: 'Last fired window end' }), el('dd', {}, when(dag.last_fired_window_end)),
        el('dt', { text: 'SLA' }), el('dd', { text: def.sla_ms ? fmtDuration(def.sla_ms) + ' after the window ends' : 'none' }),
        el('dt', { text: 'Catch-up / max active runs' }), el('dd', { text: (def.catchup ? 'yes' : 'no') + ' / ' + (def.max_active_runs || '—') }),
        el('dt', { text: 'Version' }), el('dd', { id: 'dag-version', text: String(dag.version) }));
      const tasks = tasksOf(def);
      const latest = runs[0];
      put(graph, drawGraph(tasks, latest && latest.tasks, null),
        el('p', { class: 'muted', text: latest ? 'Coloured by the newest run, ' + latest.run_id + ' (' + latest.state + ').' : 'No runs yet.' }));
      const order = taskOrder(tasks);
      const byId = new Map(tasks.map((t) => [t.id, t]));
      put(tasksBody, ...order.map((id) => {
        const t = byId.get(id);
        return el('tr', { 'data-task': id },
          el('td', {}, el('strong', { text: id })),
          el('td', { text: t.kind }),
          el('td', {}, taskWhat(t)),
          el('td', { text: t.deps.length ? t.deps.join(', ') : '—' }),
          el('td', { text: String(t.spec.retries || 0) + (t.spec.retries ? ' every ' + fmtDuration(t.spec.retry_delay_ms) + (t.spec.retry_exponential ? ', exponential' : '') : '') }),
          el('td', { text: t.spec.timeout_ms ? fmtDuration(t.spec.timeout_ms) : '—' }));
      }));
      const seen = new Map();
      for (const r of runs) {
        if (r.dag_version === undefined) continue;
        const v = seen.get(r.dag_version) || { count: 0, newest: r.created_at };
        v.count += 1;
        seen.set(r.dag_version, v);
      }
      put(versions, el('div', { class: 'card', id: 'versions' },
        el('p', {}, 'Current version ', el('strong', { text: String(dag.version) }), ', updated ', when(dag.updated_at), ', created ', when(dag.created_at),
          '. Every change (an update, a pause, an unpause) makes a new version; a run keeps the version it started with.'),
        history.length ? el('table', {}, el('thead', {}, el('tr', {}, ['Version', 'Changed', 'Recent runs', 'Definition'].map((h) => el('th', { text: h })))),
          el('tbody', {}, history.map((h, i) => {
            const s = seen.get(h.version);
            return el('tr', { 'data-version': String(h.version) },
              el('td', {}, String(h.version), h.version === dag.version ? el('span', { class: 'muted', text: ' (current)' }) : null),
              el('td', { text: versionChange(h, history[i + 1]) }),
              el('td', { text: s ? String(s.count) : '—' }),
              el('td', {}, el('details', {}, el('summary', { text: 'show' }), el('pre', { class: 'mono', text: JSON.stringify(h.definition, null, 2) }))));
          }))) : null));
      put(runsBody, ...runs.map((r) => el('tr', { 'data-run-id': r.run_id },
        el('td', {}, el('a', { href: '#/runs/' + enc(r.run_id), class: 'run-link', text: r.run_id })),
        el('td', {}, badge(r.state), r.sla_missed ? [' ', el('span', { class: 'badge sla-missed', text: 'SLA missed' })] : null),
        el('td', { text: r.run_type }),
        el('td', { text: r.dag_version === undefined ? '—' : String(r.dag_version) }),
        el('td', {}, windowText(r)),
        el('td', {}, when(r.created_at)),
        el('td', {}, when(r.ended_at)))));
      if (!runs.length) runsBody.append(el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'No runs yet: trigger one.' })));
      return JSON.stringify([dag, runs]);
    }, { interval: 2000, idle: 10000, onError: (e) => showError(errors, e) });
  }

  // What a version changed against the one before it (`older`, when this page holds it).
  function versionChange(v, older) {
    if (!older) return v.version === 1 ? 'created' : '—';
    const a = v.definition || {}, b = older.definition || {};
    const out = [];
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      if (JSON.stringify(a[k]) === JSON.stringify(b[k])) continue;
      out.push(k === 'paused' ? (a.paused ? 'paused' : 'unpaused') : k);
    }
    return out.length ? out.join(', ') : (older.version === v.version - 1 ? 're-created' : '—');
  }

  function windowText(r) {
    const w = r.window || {};
    if (!w.from) return '—';
    if (w.from === w.to) return el('span', { class: 'muted', text: 'manual' });
    return el('span', { class: 'mono', text: w.from.slice(0, 16).replace('T', ' ') + ' → ' + (w.to || '').slice(0, 16).replace('T', ' ') });
  }

  // ---------------------------------------------------------------- runs grid

  function renderGrid(p, dagId) {
    const errors = el('div');
    const grid = el('div', { class: 'table-wrap' });
    put(app,
      el('p', { class: 'muted' }, el('a', { href: '#/dags', text: 'DAGs' }), ' / ', el('a', { href: '#/dags/' + enc(dagId), text: dagId }), ' / grid'),
      el('h1', { text: 'Runs of ' + dagId }),
      el('p', { class: 'muted', text: 'The newest 25 runs, oldest on the left; a row per task. Click a cell to open the run.' }),
      errors, grid,
      el('div', { class: 'legend' }, el('span', { class: 'muted', text: 'Tasks:' }), TASK_STATES.map((s) => badge(s))),
      el('div', { class: 'legend' }, el('span', { class: 'muted', text: 'Runs (top bars):' }), RUN_STATES.map((s) => badge(s))));
    poll(p, async () => {
      const dag = await api('GET', '/dags/' + enc(dagId));
      const runs = ((await api('GET', '/runs?dag_id=' + enc(dagId) + '&limit=25')).runs || []).slice().reverse();
      if (!p.alive) return STOP;
      showError(errors, null);
      const order = taskOrder(tasksOf(dag.definition));
      // Tasks of older versions that the current definition no longer has.
      for (const r of runs) for (const t of Object.keys(r.tasks || {})) if (!order.includes(t)) order.push(t);
      const head = el('tr', {}, el('th', { class: 'task', text: '' }), runs.map((r) => el('th', {},
        el('a', { href: '#/runs/' + enc(r.run_id), title: r.run_id + ' — ' + r.state + ' — ' + (r.created_at || '') },
          el('span', { class: 'run-bar state-' + r.state, 'data-run-id': r.run_id, 'data-state': r.state })))));
      const rows = order.map((task) => el('tr', { 'data-task': task }, el('th', { class: 'task', text: task }), runs.map((r) => {
        const s = r.tasks && r.tasks[task];
        return el('td', {}, s
          ? el('a', { href: '#/runs/' + enc(r.run_id), title: task + ' — ' + s + ' — ' + r.run_id },
            el('span', { class: 'cell state-' + s, 'data-run-id': r.run_id, 'data-task': task, 'data-state': s }))
          : el('span', { class: 'cell none', title: task + ' was not part of ' + r.run_id }));
      })));
      put(grid, runs.length
        ? el('table', { class: 'grid', id: 'runs-grid' }, el('thead', {}, head), el('tbody', {}, rows))
        : el('p', { class: 'muted', text: 'No runs yet.' }));
      return JSON.stringify(runs);
    }, { interval: 2000, idle: 10000, onError: (e) => showError(errors, e) });
  }

  // ---------------------------------------------------------------- one run

  function renderRun(p, runId) {
    const errors = el('div');
    const title = el('h1', {}, 'Run ', runId);
    const crumbs = el('p', { class: 'muted' }, el('a', { href: '#/dags', text: 'DAGs' }));
    const facts = el('dl', { class: 'facts' });
    const graph = el('div');
    const tasksBody = el('tbody');
    const logTitle = el('h2', { text: 'Log' });
    const logMessage = el('p', { class: 'muted', id: 'log-message' });
    const logText = el('pre', { class: 'log', id: 'log-text' });
    const logPanel = el('section', { id: 'log-panel', hidden: true }, logTitle, logMessage, logText,
      el('div', { class: 'actions' }, el('button', { type: 'button', id: 'log-close', text: 'Close log', onclick: () => { openLog = null; logPanel.hidden = true; } })));
    let openLog = null; // {task, attempt, ended}
    let poller = null;

    const cancelConfirm = el('span', { class: 'confirm', id: 'cancel-confirm', hidden: true },
      el('span', { text: 'Cancel this run? Running attempts are killed.' }),
      el('button', { type: 'button', class: 'danger', id: 'cancel-yes', text: 'Yes, cancel', onclick: () => act('cancel') }),
      el('button', { type: 'button', id: 'cancel-no', text: 'Keep running', onclick: () => { cancelConfirm.hidden = true; cancel.disabled = false; } }));
    const cancel = el('button', { type: 'button', id: 'cancel', text: 'Cancel run', onclick: () => { cancel.disabled = true; cancelConfirm.hidden = false; } });
    const retry = el('button', { type: 'button', id: 'retry', text: 'Retry failed tasks', onclick: () => act('retry') });
    const live = el('span', { id: 'live' });

    async function act(what) {
      cancel.disabled = true;
      retry.disabled = true;
      cancelConfirm.hidden = true;
      try {
        const r = await api('POST', '/runs/' + enc(runId) + '/' + what);
        flash(what === 'cancel' ? 'Cancelled ' + runId + '.' : 'Retrying ' + Number(r.retried_tasks || 0) + ' task(s) of ' + runId + '.');
      } catch (e) {
        flash('Could not ' + what + ' ' + runId + ': ' + describe(e), true);
      }
      // The run may live again after a retry: poll anew.
      if (poller) poller.stop();
      poller = start();
    }

    async function showLog(task, attempt, ended) {
      openLog = { task, attempt, ended };
      logPanel.hidden = false;
      logTitle.textContent = 'Log — ' + task + ', attempt ' + attempt;
      await refreshLog();
      logPanel.scrollIntoView({ block: 'nearest' });
    }

    async function refreshLog() {
      if (!openLog) return;
      const want = openLog;
      let text = '';
      let message = '';
      try {
        text = await api('GET', '/runs/' + enc(runId) + '/tasks/' + enc(want.task) + '/attempts/' + want.attempt + '/log');
        if (typeof text !== 'string') text = JSON.stringify(text, null, 2);
        message = want.ended ? '' : 'The attempt is still running: the log refreshes with the page.';
      } catch (e) {
        message = e.status === 404 ? 'No log for this attempt (no output yet, or purged).' : 'Could not read the log: ' + describe(e);
      }
      if (openLog !== want || !p.alive) return;
      const atEnd = logText.scrollTop + logText.clientHeight >= logText.scrollHeight - 4;
      logText.textContent = text;
      logText.hidden = text === '';
      logMessage.textContent = message;
      if (atEnd) logText.scrollTop = logText.scrollHeight;
    }

    put(app, crumbs, title,
      el('div', { class: 'actions' }, cancel, cancelConfirm, retry, live),
      errors, el('div', { class: 'card' }, facts),
      el('h2', { text: 'Graph' }), graph,
      el('h2', { text: 'Tasks' }),
      el('div', { class: 'table-wrap' }, el('table', { id: 'run-tasks' },
        el('thead', {}, el('tr', {}, ['Task', 'State', 'Attempts', 'Started', 'Ended', 'Duration', 'Next try'].map((h) => el('th', { text: h })))),
        tasksBody)),
      logPanel);

    function render(r, dag) {
      const finished = RUN_FINISHED.has(r.state);
      put(crumbs, el('a', { href: '#/dags', text: 'DAGs' }), ' / ', el('a', { href: '#/dags/' + enc(r.dag_id), id: 'run-dag', text: r.dag_id }), ' / ', runId);
      put(title, 'Run ', el('span', { class: 'mono', text: runId }), ' ', badge(r.state), r.sla_missed ? el('span', { class: 'badge sla-missed', id: 'sla-missed', text: 'SLA missed' }) : null);
      title.querySelector('.badge').id = 'run-state';
      cancel.hidden = finished;
      if (finished) cancelConfirm.hidden = true;
      if (!finished && cancelConfirm.hidden) cancel.disabled = false;
      const failedTasks = Object.values(r.tasks || {}).some((s) => s === 'failed' || s === 'upstream_failed' || s === 'cancelled');
      retry.hidden = !finished;
      retry.disabled = !failedTasks;
      retry.title = failedTasks ? 'Re-run the failed, upstream-failed and cancelled tasks as new attempts' : 'No failed tasks to retry';
      put(live, finished ? el('span', { class: 'muted', text: 'Finished.' }) : el('span', { class: 'badge live', text: 'live: updating' }));
      const dur = between(r.started_at || r.created_at, r.ended_at);
      put(facts,
        el('dt', { text: 'DAG' }), el('dd', {}, el('a', { href: '#/dags/' + enc(r.dag_id), text: r.dag_id }), el('span', { class: 'muted', text: ' version ' + r.dag_version })),
        el('dt', { text: 'Type' }), el('dd', { text: r.run_type }),
        el('dt', { text: 'Window' }), el('dd', {}, windowText(r)),
        el('dt', { text: 'Created' }), el('dd', {}, when(r.created_at)),
        el('dt', { text: 'Started' }), el('dd', {}, when(r.started_at)),
        el('dt', { text: 'Ended' }), el('dd', {}, when(r.ended_at)),
        el('dt', { text: 'Duration' }), el('dd', { id: 'run-duration', text: fmtDuration(dur) + (finished ? '' : ' so far') }),
        el('dt', { text: 'SLA deadline' }), el('dd', {}, r.sla_deadline ? when(r.sla_deadline) : el('span', { class: 'muted', text: 'no SLA' }),
          r.sla_missed ? [' ', el('span', { class: 'badge sla-missed', text: 'missed' })]
            : r.sla_deadline ? el('span', { class: 'muted', id: 'sla-status', text: finished ? ' (met)' : ' (not missed yet)' }) : null));
      const tasks = dag ? tasksOf(dag.definition) : [];
      const known = new Set(tasks.map((t) => t.id));
      for (const id of Object.keys(r.tasks || {})) if (!known.has(id)) tasks.push({ id, deps: [], kind: '' });
      put(graph, drawGraph(tasks.filter((t) => r.tasks && t.id in r.tasks), r.tasks, null));
      const details = r.task_details || {};
      const rows = [];
      for (const id of taskOrder(tasks)) {
        if (!r.tasks || !(id in r.tasks)) continue;
        const d = details[id] || { attempts: [] };
        const attempts = d.attempts || [];
        const first = attempts[0];
        const lastA = attempts[attempts.length - 1];
        rows.push(el('tr', { class: 'task-row', 'data-task': id, 'data-state': r.tasks[id] },
          el('td', {}, el('strong', { text: id })),
          el('td', {}, badge(r.tasks[id])),
          el('td', { text: String(attempts.length) }),
          el('td', {}, when(first && first.started_at)),
          el('td', {}, when(lastA && lastA.ended_at)),
          el('td', { text: first ? fmtDuration(between(first.started_at, lastA.ended_at)) : '—' }),
          el('td', {}, when(d.next_try_at))));
        if (attempts.length) {
          rows.push(el('tr', { class: 'attempt-row' }, el('td', {}), el('td', { colspan: 6 },
            el('table', { class: 'attempts' },
              el('thead', {}, el('tr', {}, ['#', 'Node', 'State', 'Started', 'Duration', 'Exit', 'Error', ''].map((h) => el('th', { text: h })))),
              el('tbody', {}, attempts.map((a) => el('tr', { 'data-task': id, 'data-attempt': a.attempt },
                el('td', { text: String(a.attempt) }),
                el('td', { text: 'node ' + a.node }),
                el('td', {}, badge(a.state)),
                el('td', {}, when(a.started_at)),
                el('td', { text: fmtDuration(a.duration_ms !== null && a.duration_ms !== undefined ? a.duration_ms : between(a.started_at, null)) + (a.ended_at ? '' : ' so far') }),
                el('td', { text: a.exit_code === null || a.exit_code === undefined ? '—' : String(a.exit_code) }),
                el('td', { class: 'mono', text: a.error || '' }),
                el('td', {}, el('button', { type: 'button', class: 'log-button', 'data-task': id, 'data-attempt': a.attempt, text: 'Log', onclick: () => showLog(id, a.attempt, !!a.ended_at) })))))))));
        }
      }
      put(tasksBody, ...rows);
      if (openLog) {
        const a = ((details[openLog.task] || {}).attempts || []).find((x) => x.attempt === openLog.attempt);
        const wasRunning = !openLog.ended;
        openLog.ended = !!(a && a.ended_at);
        if (wasRunning) refreshLog();
      }
    }

    let dag = null;
    function start() {
      return poll(p, async () => {
        let r;
        try {
          r = await api('GET', '/runs/' + enc(runId));
        } catch (e) {
          if (e.status === 404) {
            put(app, el('h1', { text: 'Run ' + runId }), el('div', { class: 'notice', id: 'not-found', text: 'No run ' + runId + ' for this tenant.' }));
            return STOP;
          }
          throw e;
        }
        if (!dag || dag.dag_id !== r.dag_id) {
          try {
            dag = await api('GET', '/dags/' + enc(r.dag_id));
          } catch (e) {
            if (e.status !== 404) throw e;
            dag = { dag_id: r.dag_id, definition: { tasks: [] } }; // deleted since: no graph edges
          }
        }
        if (!p.alive) return STOP;
        showError(errors, null);
        render(r, dag);
        return RUN_FINISHED.has(r.state) ? STOP : JSON.stringify(r);
      }, { interval: 1000, idle: 4000, onError: (e) => showError(errors, e) });
    }
    poller = start();
  }

  // ---------------------------------------------------------------- cluster

  function renderCluster(p) {
    const errors = el('div');
    const body = el('div');
    put(app, el('h1', { text: 'Cluster' }), errors, body);
    poll(p, async () => {
      let s;
      try {
        s = await api('GET', '/cluster/status');
      } catch (e) {
        if (e.status === 403) {
          put(body, el('div', { class: 'notice', id: 'operators-only', role: 'alert' },
            el('strong', { text: 'Operators only. ' }),
            'The cluster page needs an admin token (orchestrator:admin) of an operator tenant (auth.operator_tenants). The node said: ',
            el('span', { text: describe(e) })));
          return STOP;
        }
        throw e;
      }
      if (!p.alive) return STOP;
      showError(errors, null);
      const isLeader = s.state === 'leader';
      const members = Object.entries(s.members || {}).map(([id, m]) => ({ id: Number(id), m }));
      const lag = s.replication_lag || {};
      // When each other member last answered this node (absent from older nodes): a
      // leader hears every member at each heartbeat, any node its voters every 2 s.
      const answered = s.peer_answered_ms_ago;
      const silent = (id, ms) => answered !== undefined && !(answered[id] <= ms);
      const rows = members.map(({ id, m }) => {
        const role = id === s.leader ? 'leader' : (s.voters || []).includes(id) ? 'voter' : (s.learners || []).includes(id) ? 'learner' : 'member';
        let lagText = '—';
        let health = 'unknown';
        if (isLeader) {
          const l = lag[id];
          if (id === s.node_id) {
            lagText = '0';
            health = (s.millis_since_quorum_ack !== null && s.millis_since_quorum_ack !== undefined && s.millis_since_quorum_ack < 5000) ? 'healthy' : 'no quorum';
          } else if (l === null || l === undefined || silent(id, 3000)) {
            if (l !== null && l !== undefined) lagText = String(l) + ' entries';
            health = 'unreachable';
          } else {
            lagText = String(l) + ' entries';
            health = l <= 100 ? 'healthy' : 'lagging';
          }
        } else if (id === s.node_id) {
          health = s.leader !== null && s.leader !== undefined ? 'healthy' : 'no leader';
        } else if (answered !== undefined && (s.voters || []).includes(id)) {
          health = silent(id, 5000) ? 'unreachable' : 'reachable';
        }
        const cls = (health === 'healthy' || health === 'reachable') ? 'state-done' : health === 'unknown' ? 'state-pending' : health === 'lagging' ? 'state-retrying' : 'state-failed';
        return el('tr', { 'data-node-id': id },
          el('td', {}, el('strong', { text: 'node ' + id }), id === s.node_id ? el('span', { class: 'muted', text: ' (this node)' }) : null),
          el('td', {}, el('span', { class: 'badge ' + (role === 'leader' ? 'state-running' : 'state-pending'), text: role })),
          el('td', { class: 'mono', text: m.api_addr || '' }),
          el('td', { class: 'mono', text: m.peer_addr || '' }),
          el('td', { text: lagText }),
          el('td', {}, el('span', { class: 'badge ' + cls, 'data-health': health, text: health })));
      });
      const leaderMember = (s.members || {})[s.leader];
      const exec = s.executor || {};
      const sched = s.scheduler || {};
      put(body,
        el('div', { class: 'card' }, el('dl', { class: 'facts', id: 'cluster-facts' },
          el('dt', { text: 'This node' }), el('dd', { text: 'node ' + s.node_id + ' (' + s.state + ')' }),
          el('dt', { text: 'Leader' }), el('dd', { id: 'cluster-leader', text: s.leader === null || s.leader === undefined ? 'none known' : 'node ' + s.leader }),
          el('dt', { text: 'Term' }), el('dd', { id: 'cluster-term', text: String(s.term) }),
          el('dt', { text: 'Log: last / committed / applied' }), el('dd', { text: [s.last_log_index, s.committed_index, s.applied_index].map((x) => (x === null || x === undefined ? '—' : x)).join(' / ') }),
          el('dt', { text: 'Snapshot / purged' }), el('dd', { text: [s.snapshot_index, s.purged_index].map((x) => (x === null || x === undefined ? '—' : x)).join(' / ') }),
          el('dt', { text: 'Log size' }), el('dd', { text: (s.log_size_bytes / 1048576).toFixed(1) + ' MiB' }),
          el('dt', { text: 'Executor' }), el('dd', { text: exec.slots !== undefined ? exec.running + ' of ' + exec.slots + ' slots busy' + (exec.ready === false ? ', not ready' : '') : '—' }),
          el('dt', { text: 'Scheduler' }), el('dd', { text: (sched.windows_fired || 0) + ' windows fired; last fire lag ' + fmtDuration(sched.last_fire_lag_ms) + ', max ' + fmtDuration(sched.max_fire_lag_ms) }))),
        isLeader ? null : el('p', { class: 'notice' }, 'Replication lag and the health of the other nodes are known to the leader only. ',
          leaderMember ? el('a', { href: location.protocol + '//' + leaderMember.api_addr + '/ui/#/cluster', text: 'Open the UI on the leader' }) : 'No leader is known.',
          ' (you sign in again there: the token stays per node).'),
        el('div', { class: 'table-wrap' }, el('table', { id: 'members' },
          el('thead', {}, el('tr', {}, ['Node', 'Role', 'API address', 'Peer address', 'Replication lag', 'Health'].map((h) => el('th', { text: h })))),
          el('tbody', {}, rows))));
      return JSON.stringify([s.leader, s.term, s.replication_lag, s.members, s.applied_index, rows.map((r) => r.textContent)]);
    }, { interval: 2000, idle: 10000, onError: (e) => showError(errors, e) });
  }

  // ---------------------------------------------------------------- header and routing

  async function showNode(p) {
    // The probe needs no token and costs no rate-limit budget.
    try {
      const r = await fetch('/readyz', { cache: 'no-store', credentials: 'omit' });
      const j = await r.json();
      if (!p.alive) return;
      document.getElementById('node-info').textContent = 'node ' + j.node_id + ' · ' + String(j.state).toLowerCase() + (j.ready ? '' : ' · not ready');
    } catch (_) {
      document.getElementById('node-info').textContent = '';
    }
  }

  function header(signedIn, section) {
    document.getElementById('nav').hidden = !signedIn;
    document.getElementById('sign-out').hidden = !signedIn;
    const who = document.getElementById('whoami');
    const c = signedIn ? session.claims() : null;
    who.textContent = c ? 'tenant ' + (c.tenant || c.tid || '?') + (c.sub ? ' · ' + c.sub : '') : '';
    document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.dataset.nav === section));
  }

  function route() {
    const p = newPage();
    const hash = decodeURIComponentSafe(location.hash.replace(/^#/, '')) || '/dags';
    const parts = hash.split('/').filter((x) => x !== '');
    if (!session.token() || parts[0] === 'signin') {
      if (session.token() && parts[0] === 'signin') {
        location.hash = '#/dags';
        return;
      }
      if (parts[0] !== 'signin') returnTo = location.hash || null;
      header(false, null);
      document.title = 'Sign in · orchestrator';
      renderSignIn(p);
      return;
    }
    showNode(p);
    if (parts[0] === 'dags' && parts.length === 1) {
      header(true, 'dags');
      document.title = 'DAGs · orchestrator';
      renderDags(p);
    } else if (parts[0] === 'dags' && parts.length === 2) {
      header(true, 'dags');
      document.title = parts[1] + ' · orchestrator';
      renderDag(p, parts[1]);
    } else if (parts[0] === 'dags' && parts.length === 3 && parts[2] === 'grid') {
      header(true, 'dags');
      document.title = parts[1] + ' grid · orchestrator';
      renderGrid(p, parts[1]);
    } else if (parts[0] === 'runs' && parts.length === 2) {
      header(true, 'dags');
      document.title = parts[1] + ' · orchestrator';
      renderRun(p, parts[1]);
    } else if (parts[0] === 'cluster') {
      header(true, 'cluster');
      document.title = 'Cluster · orchestrator';
      renderCluster(p);
    } else {
      header(true, null);
      put(app, el('h1', { text: 'Not found' }), el('p', {}, 'No page at ', el('code', { text: hash }), '. ', el('a', { href: '#/dags', text: 'Go to the DAGs.' })));
    }
  }

  function decodeURIComponentSafe(s) {
    try {
      return decodeURIComponent(s);
    } catch (_) {
      return s;
    }
  }

  document.getElementById('sign-out').addEventListener('click', () => {
    session.clear();
    signInMessage = null;
    returnTo = null;
    flash('Signed out: the token was removed from this tab.');
    location.hash = '#/signin';
  });
  window.addEventListener('hashchange', route);
  route();
})();
