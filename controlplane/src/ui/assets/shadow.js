// The Shadow route page: replay buttons and the compare-rule editor.
//
// The editor keeps the route's compare rules (the filter config's
// `shadow.compare` section) and, on every edit, compares every stored sample
// again in the browser with understudy-preview: the filter's own compare,
// compiled to wasm. It shows which serious differences remain, which are no
// longer serious, and the new match rate. An operator may apply the rules
// (POST .../rules, CSRF token in `x-csrf-token`); a refusal names the field.
//
// Plain ES module, no build step. `window.understudyPreview(rulesJson,
// samplesJson)` answers the preview's JSON text, for tests that compare the
// browser's result with the native one.

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content ?? '';

async function post(url, body) {
  const response = await fetch(url, {
    method: 'POST',
    credentials: 'same-origin',
    headers: { 'content-type': 'application/json', 'x-csrf-token': csrf() },
    body: body === undefined ? '' : JSON.stringify(body),
  });
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* a plain-text refusal (403) */ }
  return { ok: response.ok, status: response.status, text, json };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const errorText = (r) => r.json?.error?.message ?? r.text ?? `HTTP ${r.status}`;

// === replay ===

function setUpReplay() {
  const out = document.getElementById('replay-result');
  for (const button of document.querySelectorAll('button.replay')) {
    button.addEventListener('click', async () => {
      const id = button.dataset.sample;
      out.textContent = `Replaying sample ${id}…`;
      button.disabled = true;
      try {
        const r = await post(`/ui/shadow/samples/${encodeURIComponent(id)}/replay`);
        out.replaceChildren();
        out.dataset.sample = id;
        out.dataset.ok = r.ok ? '1' : '0';
        if (r.ok) {
          const o = r.json;
          out.dataset.matched = o.matched ? '1' : '0';
          out.append(el('p', {}, `Sample ${id} replayed to ${o.cluster} (${o.endpoint}): status ${o.status}, `,
            el('strong', {}, o.matched ? 'matches' : 'differs'),
            ` (${o.comparison.serious} serious, ${o.comparison.noise} noise).`));
          const list = el('ul');
          for (const d of o.comparison.differences) {
            list.append(el('li', { dataset: { path: d.path } }, `${d.path}: ${d.kind} (${d.bucket})`));
          }
          out.append(list);
        } else {
          out.append(el('p', { class: 'error' }, `Replay of sample ${id} refused (${r.status}): ${errorText(r)}`));
        }
      } catch (e) {
        out.textContent = `Replay failed: ${e}`;
      } finally {
        button.disabled = false;
      }
    });
  }
}

// === rule editor ===

let wasmPreview = null;
let ready = null;

// Loads the wasm module once; resolves to the preview function.
function loadPreview(editor) {
  if (!ready) {
    ready = (async () => {
      if (!editor?.dataset.glue) throw new Error('rule preview not built: run `cargo xtask setup`');
      const glue = await import(editor.dataset.glue);
      await glue.default({ module_or_path: editor.dataset.wasm });
      wasmPreview = glue.preview;
      return wasmPreview;
    })();
  }
  return ready;
}

window.understudyPreview = async (rulesJson, samplesJson) => {
  const preview = await loadPreview(document.getElementById('rule-editor'));
  return preview(rulesJson, samplesJson);
};

function ruleItem(text, onRemove) {
  return el('li', { dataset: { rule: text } }, el('code', {}, text),
    el('button', { type: 'button', class: 'rule-remove', onclick: onRemove }, 'Remove'));
}

function setUpEditor() {
  const editor = document.getElementById('rule-editor');
  if (!editor) return;
  const status = document.getElementById('preview-status');
  const initial = JSON.parse(editor.dataset.rules || 'null');
  if (initial === null) { status.textContent = 'No rules to edit.'; return; }
  const rules = structuredClone(initial);
  for (const k of ['ignore', 'tolerance', 'unordered', 'match_by_id']) rules[k] ??= [];
  let samplesJson = null;
  let baseline = null;

  const lists = {
    ignore: document.getElementById('rules-ignore'),
    tolerance: document.getElementById('rules-tolerance'),
    unordered: document.getElementById('rules-unordered'),
    match_by_id: document.getElementById('rules-match-by-id'),
  };
  const label = {
    ignore: (r) => r,
    unordered: (r) => r,
    tolerance: (r) => r.absolute !== undefined ? `${r.path} ± ${r.absolute}` : `${r.path} ± ${r.relative * 100}%`,
    match_by_id: (r) => `${r.path} by ${r.id}`,
  };

  function renderRules() {
    for (const [kind, list] of Object.entries(lists)) {
      list.replaceChildren(...rules[kind].map((r, i) => ruleItem(label[kind](r), () => {
        rules[kind].splice(i, 1);
        changed();
      })));
    }
  }

  const pct = (r) => (r === null || r === undefined) ? '–' : `${(r * 100).toFixed(1)}%`;

  function showPreview() {
    if (!wasmPreview || samplesJson === null) return;
    const result = JSON.parse(wasmPreview(JSON.stringify(rules), samplesJson));
    const remaining = document.getElementById('preview-remaining');
    const gone = document.getElementById('preview-gone');
    const noise = document.getElementById('preview-noise');
    if (result.error) {
      status.textContent = `These rules are not valid: ${result.error}`;
      status.className = 'error';
      status.dataset.field = result.field ?? '';
      return;
    }
    status.className = '';
    delete status.dataset.field;
    status.textContent = `${result.compared} stored samples compared again in the browser.`;
    document.getElementById('preview-match-rate').textContent = pct(result.match_rate);
    const now = new Map(result.paths.map((p) => [p.path, p]));
    const item = (path, text) => el('li', { dataset: { path } }, el('code', {}, path), ` ${text}`);
    remaining.replaceChildren(...result.paths.filter((p) => p.serious > 0)
      .map((p) => item(p.path, `${p.serious} samples`)));
    noise.replaceChildren(...result.paths.filter((p) => p.serious === 0 && p.noise > 0)
      .map((p) => item(p.path, `${p.noise} samples`)));
    gone.replaceChildren(...(baseline?.paths ?? []).filter((p) => p.serious > 0 && !(now.get(p.path)?.serious > 0))
      .map((p) => item(p.path, now.has(p.path) ? 'now noise' : 'gone')));
  }

  function changed() {
    renderRules();
    showPreview();
  }

  const value = (id) => document.getElementById(id).value.trim();
  const adder = (button, make) => document.getElementById(button).addEventListener('click', () => {
    const made = make();
    if (!made) return;
    rules[made[0]].push(made[1]);
    changed();
  });
  adder('rule-ignore-add', () => value('rule-ignore-input') && ['ignore', value('rule-ignore-input')]);
  adder('rule-unordered-add', () => value('rule-unordered-input') && ['unordered', value('rule-unordered-input')]);
  adder('rule-tolerance-add', () => {
    const path = value('rule-tolerance-path');
    const x = Number(value('rule-tolerance-value'));
    if (!path || value('rule-tolerance-value') === '' || Number.isNaN(x)) return null;
    return ['tolerance', { path, [document.getElementById('rule-tolerance-kind').value]: x }];
  });
  adder('rule-match-add', () => value('rule-match-path') && value('rule-match-id')
    && ['match_by_id', { path: value('rule-match-path'), id: value('rule-match-id') }]);
  document.getElementById('rule-ignore-input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter') document.getElementById('rule-ignore-add').click();
  });

  const apply = document.getElementById('apply-rules');
  const applied = document.getElementById('apply-result');
  apply?.addEventListener('click', async () => {
    applied.textContent = 'Applying…';
    const r = await post(editor.dataset.apply, rules);
    applied.dataset.ok = r.ok ? '1' : '0';
    if (r.ok) {
      applied.textContent = 'Applied: the filter compares with these rules from now on.';
      delete applied.dataset.field;
    } else {
      applied.dataset.field = r.json?.field ?? '';
      applied.textContent = `Refused (${r.status})${r.json?.field ? ` at ${r.json.field}` : ''}: ${errorText(r)}`;
    }
  });

  renderRules();
  (async () => {
    try {
      const [preview, response] = await Promise.all([
        loadPreview(editor),
        fetch(editor.dataset.samples, { credentials: 'same-origin' }),
      ]);
      if (!response.ok) throw new Error(`samples: HTTP ${response.status}`);
      samplesJson = await response.text();
      baseline = JSON.parse(preview(JSON.stringify(initial), samplesJson));
      document.getElementById('preview-base-rate').textContent = pct(baseline.match_rate);
      editor.dataset.ready = '1';
      showPreview();
    } catch (e) {
      status.textContent = `${e.message ?? e}`;
      status.className = 'error';
    }
  })();
}

setUpReplay();
setUpEditor();
