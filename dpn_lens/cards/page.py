"""The explorer page's HTML, CSS and JavaScript (no framework, no network: plotly.js is copied beside it).

``explorer.write_explorer`` writes ``index.html`` (this page), ``plotly.min.js`` and ``data.js``
(``window.DPN_EXPLORER = {...}``: a script, not a fetched JSON file, so that the page works from disk,
where browsers refuse ``fetch`` of ``file://`` URLs).

Element ids the browser test drives: ``map-select``, ``pole-select``, ``filter``, ``token-search``,
``neuron-table`` (rows carry ``data-label``), ``card`` (its title ``card-title``), ``token-results``.
"""

from __future__ import annotations

__all__ = ["PAGE"]

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 0; color: #222; }
header { background: #1f3b57; color: white; padding: 10px 16px; }
header h1 { font-size: 18px; margin: 0 0 4px 0; }
header .sub { font-size: 12px; opacity: 0.85; }
.controls { display: flex; gap: 12px; flex-wrap: wrap; padding: 10px 16px; background: #f3f5f7;
            border-bottom: 1px solid #dde; align-items: center; font-size: 13px; }
.controls input { padding: 4px 6px; width: 180px; }
main { display: grid; grid-template-columns: minmax(420px, 1fr) minmax(420px, 1.2fr); gap: 12px; padding: 12px 16px; }
#table-wrap { max-height: 520px; overflow: auto; border: 1px solid #dde; }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th { position: sticky; top: 0; background: #e8ecf0; cursor: pointer; text-align: left; padding: 4px 6px; user-select: none; }
td { padding: 3px 6px; border-top: 1px solid #eef; white-space: nowrap; }
tr.row:hover { background: #fff6d6; cursor: pointer; }
tr.row.selected { background: #ffe9a8; }
.pole-high { color: #b03a2e; } .pole-low { color: #1f618d; }
#card { border: 1px solid #dde; padding: 10px 12px; min-height: 200px; font-size: 13px; overflow: auto; max-height: 900px; }
#card h2 { margin: 0 0 6px 0; font-size: 17px; }
.muted { color: #777; font-size: 12px; }
.tokens { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.tokens table td:last-child { text-align: right; font-variant-numeric: tabular-nums; }
.ctx { font-family: ui-monospace, Menlo, monospace; font-size: 12px; margin: 3px 0; white-space: pre-wrap; }
.ctx span.tok { border-radius: 2px; }
.ctx span.center { outline: 1px solid #333; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; padding: 0 16px 16px 16px; }
#token-results { font-size: 12px; max-height: 160px; overflow: auto; }
#token-results div { cursor: pointer; } #token-results div:hover { text-decoration: underline; }
"""

_JS = r"""
(function () {
  const D = window.DPN_EXPLORER;
  const state = { key: D.maps.length ? D.maps[0].key : null, pole: 'both', filter: '', sort: 'rank', asc: true, selected: null };
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  // Fixed decimals, except for small nonzero values (a tiny model's s), which keep 3 significant digits.
  const fmt = (x, n) => (x === null || x === undefined || Number.isNaN(x)) ? '–'
    : (x !== 0 && Math.abs(x) < 0.01 ? Number(x).toPrecision(3) : Number(x).toFixed(n === undefined ? 3 : n));
  const show = (t) => esc(t).replace(/\n/g, '\u21b5').replace(/ /g, '\u00b7');
  const PLOT = { displaylogo: false, responsive: true };

  function cards() { return D.cards[state.key] || []; }
  function mapInfo(key) { return D.maps.find((m) => m.key === key); }
  function matches(card, text) {
    if (!text) return true;
    const t = text.toLowerCase().trim();
    if (card.label.toLowerCase().includes(t)) return true;
    return card.promoted.some((p) => p[0].toLowerCase().trim() === t || p[0].toLowerCase().includes(t));
  }
  function visible() {
    let rows = cards().filter((c) => (state.pole === 'both' || c.pole === state.pole) && matches(c, state.filter));
    const k = state.sort, sign = state.asc ? 1 : -1;
    rows.sort((a, b) => {
      const x = k === 'label' ? a.layer * 1e6 + a.neuron : (k === 'promotes' ? (a.promoted[0] || [''])[0] : a[k]);
      const y = k === 'label' ? b.layer * 1e6 + b.neuron : (k === 'promotes' ? (b.promoted[0] || [''])[0] : b[k]);
      return (x < y ? -1 : x > y ? 1 : 0) * sign;
    });
    return rows;
  }
  function renderTable() {
    const rows = visible();
    const cols = [['label', 'neuron'], ['pole', 'pole'], ['s', 's'], ['d', 'd'], ['rank_in_layer', 'rank'], ['others', 'in other maps'], ['promotes', 'promotes']];
    let html = '<thead><tr>' + cols.map((c) => `<th data-sort="${c[0]}">${c[1]}${state.sort === c[0] ? (state.asc ? ' \u25b2' : ' \u25bc') : ''}</th>`).join('') + '</tr></thead><tbody>';
    for (const c of rows) {
      html += `<tr class="row${state.selected === c.label ? ' selected' : ''}" data-label="${c.label}"><td>${c.label}</td>` +
        `<td class="pole-${c.pole}">${c.pole}</td><td>${fmt(c.s)}</td><td>${fmt(c.d, 2)}</td><td>${c.rank_in_layer}</td>` +
        `<td>${c.in_maps.length}</td><td>${c.promoted.slice(0, 4).map((p) => show(p[0])).join(' ')}</td></tr>`;
    }
    $('neuron-table').innerHTML = html + '</tbody>';
    $('count').textContent = `${rows.length} of ${cards().length} neurons`;
    document.querySelectorAll('#neuron-table th').forEach((th) => th.addEventListener('click', () => {
      const k = th.dataset.sort === 'others' ? 'rank_in_layer' : th.dataset.sort;
      state.asc = state.sort === k ? !state.asc : true; state.sort = k; renderTable();
    }));
    document.querySelectorAll('#neuron-table tr.row').forEach((tr) => tr.addEventListener('click', () => openCard(state.key, tr.dataset.label)));
  }
  function colour(value, max) {
    if (value === null || Number.isNaN(value) || max <= 0) return 'transparent';
    const a = Math.max(-1, Math.min(1, value / max));
    return a >= 0 ? `rgba(220,60,40,${(0.85 * a).toFixed(3)})` : `rgba(40,90,220,${(-0.85 * a).toFixed(3)})`;
  }
  function contexts(list, title) {
    if (!list.length) return `<h3>${title}</h3><div class="muted">none recorded</div>`;
    const max = Math.max(...list.map((c) => c.value), 1e-9);
    return `<h3>${title}</h3>` + list.map((c) => '<div class="ctx">' + fmt(c.value, 2) + '  ' + c.tokens.map((t, i) =>
      `<span class="tok${i === c.center ? ' center' : ''}" title="${fmt(c.activations[i], 3)}" style="background:${colour(c.activations[i], max)}">${show(t)}</span>`).join('') + '</div>').join('');
  }
  function tokenTable(list, title) {
    return `<div><b>${title}</b><table>` + list.map((p) => `<tr><td>${show(p[0])}</td><td>${fmt(p[1], 3)}</td></tr>`).join('') + '</table></div>';
  }
  function effectText(e) {
    if (!e) return '<span class="muted">trait-margin shift of this neuron alone: not measured (dpn-lens cards --effects N)</span>';
    return `pushed alone (+${fmt(e.gamma, 3)}·s, the gamma that brings its whole map to KL ${e.target_kl}): margin shift ` +
      `${fmt(e.shift, 4)} [${fmt(e.ci_low, 4)}, ${fmt(e.ci_high, 4)}] nats/token over ${e.n_pairs} held-out pairs; the whole map: ${fmt(e.map_shift, 4)}`;
  }
  function openCard(key, label) {
    const card = (D.cards[key] || []).find((c) => c.label === label);
    if (!card) return;
    state.selected = label;
    document.querySelectorAll('#neuron-table tr.row').forEach((tr) => tr.classList.toggle('selected', tr.dataset.label === label));
    const stat = (m, s) => m === null ? '–' : `${fmt(m)} \u00b1 ${fmt(s)}`;
    $('card').innerHTML = `<h2 id="card-title">${card.label}</h2>` +
      `<div>${esc(card.trait)} \u00b7 rule <b>${esc(card.rule)}</b> \u00b7 <span class="pole-${card.pole}">${card.pole} pole</span></div>` +
      `<div>s = ${fmt(card.s)} \u00b7 d = ${fmt(card.d, 2)} \u00b7 rank ${card.rank_in_layer} in layer ${card.layer} by ${esc(card.rank_by)}</div>` +
      `<div>high prompts ${stat(card.mean_high, card.sd_high)} \u00b7 low prompts ${stat(card.mean_low, card.sd_low)}</div>` +
      `<div class="muted">also in: ${card.in_maps.length ? card.in_maps.map(esc).join(', ') : 'no other map'}</div>` +
      `<h3>What it writes</h3><div class="tokens">${tokenTable(card.promoted, 'promotes')}${tokenTable(card.suppressed, 'suppresses')}</div>` +
      `<div class="muted">${esc(card.lens_note)}</div>` +
      `<h3>What it reads</h3><div id="card-hist" style="height:220px"></div>` +
      contexts(card.prompt_contexts, 'Top contexts: contrastive prompts') + contexts(card.text_contexts, 'Top contexts: neutral text (WikiText-2)') +
      `<h3>What it does</h3><div>${effectText(card.effect)}</div>` +
      `<div class="muted">${card.capability ? `capability attribution: percentile ${fmt(100 * card.capability.percentile_in_layer, 1)} in its layer` +
        (card.capability.capability_neuron ? ' (a capability neuron: top 2%)' : '') : 'capability attribution: run dpn-lens study multifunction in this run folder'}</div>`;
    const h = card.histogram, mids = h.edges.slice(0, -1).map((e, i) => (e + h.edges[i + 1]) / 2);
    Plotly.newPlot('card-hist', [
      { x: mids, y: h.high, type: 'bar', name: 'high prompts', marker: { color: 'rgba(176,58,46,0.6)' } },
      { x: mids, y: h.low, type: 'bar', name: 'low prompts', marker: { color: 'rgba(31,97,141,0.6)' } }],
      { barmode: 'overlay', margin: { t: 10, r: 10, b: 35, l: 40 }, xaxis: { title: 'last-token activation' }, legend: { orientation: 'h' } }, PLOT);
  }
  function renderPlots() {
    const info = mapInfo(state.key);
    if (!info) return;
    const layers = Array.from({ length: D.n_layers }, (_, i) => i);
    Plotly.newPlot('layer-plot', ['high', 'low'].map((pole) => ({
      x: layers, y: layers.map((l) => (info.counts[l] || [0, 0])[pole === 'high' ? 0 : 1]), type: 'bar', name: pole,
      marker: { color: pole === 'high' ? '#b03a2e' : '#1f618d' } })),
      { barmode: 'stack', title: { text: `${info.trait} [${info.rule}]: neurons per layer`, font: { size: 13 } }, margin: { t: 35, r: 10, b: 35, l: 40 }, xaxis: { title: 'layer' } }, PLOT);
    const o = D.overlap[info.rule];
    if (o) {
      Plotly.newPlot('overlap-plot', [{ z: o.jaccard, x: o.traits, y: o.traits, type: 'heatmap', colorscale: 'Blues', reversescale: true, zmin: 0,
        text: o.jaccard.map((r) => r.map((v) => v.toFixed(3))), texttemplate: '%{text}' }],
        { title: { text: `overlap between traits (Jaccard, ${info.rule})`, font: { size: 13 } }, margin: { t: 35, r: 10, b: 60, l: 110 } }, PLOT);
    }
  }
  function tokenSearch(text) {
    const t = text.toLowerCase().trim();
    const out = $('token-results');
    if (!t) { out.innerHTML = ''; return; }
    const hits = [];
    for (const [key, list] of Object.entries(D.cards)) {
      for (const c of list) {
        const p = c.promoted.find((q) => q[0].toLowerCase().trim() === t);
        if (p) hits.push([p[1], key, c]);
      }
    }
    hits.sort((a, b) => b[0] - a[0]);
    out.innerHTML = hits.length ? `<b>${hits.length} neurons promote \u201c${esc(text.trim())}\u201d</b> (logit per unit activation; click one)` +
      hits.slice(0, 200).map((h) => `<div data-key="${h[1]}" data-label="${h[2].label}">${h[2].label} ${esc(h[2].trait)} [${esc(h[2].rule)}] ${h[2].pole}: +${fmt(h[0], 3)}</div>`).join('')
      : `<span class="muted">no neuron has \u201c${esc(text)}\u201d among its top ${D.lens_top} promoted tokens</span>`;
    out.querySelectorAll('div').forEach((div) => div.addEventListener('click', () => {
      state.key = div.dataset.key; $('map-select').value = state.key; renderTable(); renderPlots(); openCard(state.key, div.dataset.label);
    }));
  }
  function init() {
    $('title').textContent = `dpn-lens explorer: ${D.model}`;
    $('subtitle').textContent = `${D.run} \u00b7 ${D.maps.length} maps \u00b7 ${Object.values(D.cards).reduce((n, l) => n + l.length, 0)} cards`;
    $('map-select').innerHTML = D.maps.map((m) => `<option value="${m.key}">${esc(m.trait)} [${esc(m.rule)}] (${m.n} neurons)</option>`).join('');
    $('map-select').addEventListener('change', (e) => { state.key = e.target.value; state.selected = null; renderTable(); renderPlots(); });
    $('pole-select').addEventListener('change', (e) => { state.pole = e.target.value; renderTable(); });
    $('filter').addEventListener('input', (e) => { state.filter = e.target.value; renderTable(); });
    $('token-search').addEventListener('input', (e) => tokenSearch(e.target.value));
    renderTable(); renderPlots();
  }
  document.addEventListener('DOMContentLoaded', init);
})();
"""

PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dpn-lens explorer</title>
<style>{_CSS}</style>
<script src="plotly.min.js"></script>
<script src="data.js"></script>
</head><body>
<header><h1 id="title">dpn-lens explorer</h1><div class="sub" id="subtitle"></div></header>
<div class="controls">
  <label>map <select id="map-select"></select></label>
  <label>pole <select id="pole-select"><option value="both">both</option><option value="high">high</option>
    <option value="low">low</option></select></label>
  <label>filter <input id="filter" placeholder="L12.N345 or a token"></label>
  <label>neurons that promote <input id="token-search" placeholder="a token, e.g. party"></label>
  <span id="count" class="muted"></span>
</div>
<main>
  <div><div id="table-wrap"><table id="neuron-table"></table></div><div id="token-results"></div></div>
  <div id="card"><span class="muted">Click a neuron to open its card.</span></div>
</main>
<div class="plots"><div id="layer-plot" style="height:300px"></div><div id="overlap-plot" style="height:300px"></div></div>
<script>{_JS}</script>
</body></html>
"""
