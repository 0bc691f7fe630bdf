"use strict";
// The dashboard (see lm_saes/analysis/dashboard.py and dashboard_data.py for the files and their layout).
// Data files are scripts calling LM_SAES.index / .block / .search: a file:// page may add scripts but not read files.
// Plain JS, no network, no framework. The list is virtual: only the rows in view are in the DOM.
const LM_SAES = (() => {
  const ROW = 22, blocks = new Map(), shards = new Map(), resolvers = new Map(), loading = new Map();
  let X = null, view = new Uint32Array(0), sortKey = "freq", sortDesc = true, query = "", searchExtra = null;

  // --- decoding ------------------------------------------------------------------------------------------
  function half(u16) {
    const out = new Float32Array(u16.length);
    for (let i = 0; i < u16.length; i++) {
      const h = u16[i], s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
      out[i] = e === 0 ? s * m * 2 ** -24 : e === 31 ? s * Infinity : s * (1 + m / 1024) * 2 ** (e - 15);
    }
    return out;
  }
  function unpack([dtype, b64]) {
    const s = atob(b64), bytes = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
    const b = bytes.buffer;
    return dtype === "u8" ? bytes : dtype === "u16" ? new Uint16Array(b) : dtype === "u32" ? new Uint32Array(b)
      : dtype === "f32" ? new Float32Array(b) : half(new Uint16Array(b));
  }
  const NONE = { u16: 0xffff, u32: 0xffffffff };
  function decodeBlock(d) {
    const out = { ...d, sentinel: NONE[d.tokens[0]] };
    for (const k of ["tokens", "peaks", "acts", "hist", "logit_top_ids", "logit_top", "logit_bottom_ids", "logit_bottom",
                     "neighbour_ids", "neighbour_cosine"]) if (d[k]) out[k] = unpack(d[k]);
    return out;
  }

  // --- loading data scripts on demand --------------------------------------------------------------------
  function load(kind, n) {
    const store = kind === "block" ? blocks : shards, key = kind + n;
    if (store.has(n)) return Promise.resolve(store.get(n));
    if (!loading.has(key)) {
      const path = kind === "block" ? `blocks/${String(n).padStart(5, "0")}.js` : `search/${String(n).padStart(4, "0")}.js`;
      loading.set(key, new Promise((resolve, reject) => {
        resolvers.set(key, resolve);
        const s = document.createElement("script");
        s.src = path;
        s.onerror = () => reject(new Error(`cannot load ${path}`));
        document.head.appendChild(s);
      }));
    }
    return loading.get(key);
  }
  function register(kind, n, value) {
    (kind === "block" ? blocks : shards).set(n, value);
    const r = resolvers.get(kind + n);
    if (r) r(value);
  }

  // --- formatting ----------------------------------------------------------------------------------------
  const esc = s => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  const show = t => t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  const num = x => Number(x.toPrecision(3));
  const fmt = x => x === 0 ? "0" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? String(num(x)) : x.toExponential(2);
  const pct = f => { const p = 100 * f; return (p >= 1e-3 ? String(num(p)) : p.toExponential(1)) + "%"; };
  function fnv1a(s) {
    let h = 0x811c9dc5;
    for (const b of new TextEncoder().encode(s)) h = Math.imul(h ^ b, 0x01000193) >>> 0;
    return h >>> 0;
  }

  // --- the list ------------------------------------------------------------------------------------------
  function topToken(r) { const t = X.top[r]; return t === X.topNone ? "" : show(X.topVocab[t]); }
  function matches() {
    const q = query.trim().toLowerCase(), n = X.ids.length;
    if (!q) return Uint32Array.from({ length: n }, (_, i) => i);
    const keep = [];
    if (/^\d+$/.test(q)) {
      for (let r = 0; r < n; r++) if (String(X.ids[r]).startsWith(q)) keep.push(r);
    } else {
      const hit = X.topVocab.map(t => t.toLowerCase().includes(q));
      const extra = new Set(searchExtra && searchExtra.q === q ? searchExtra.rows : []);
      for (let r = 0; r < n; r++) if ((X.top[r] !== X.topNone && hit[X.top[r]]) || extra.has(r)) keep.push(r);
    }
    return Uint32Array.from(keep);
  }
  function refilter() {
    const col = X[sortKey], sign = sortDesc ? -1 : 1;
    view = matches().sort((a, b) => sign * (col[a] - col[b]) || X.ids[a] - X.ids[b]);
    document.getElementById("list-body").style.height = `${view.length * ROW}px`;
    document.getElementById("count").textContent = `${view.length.toLocaleString()} of ${X.ids.length.toLocaleString()} ` +
      `live latents shown; ${X.meta.n_dead.toLocaleString()} dead (never fired) not listed`;
    document.querySelectorAll("#list-head span[data-key]").forEach(s => {
      s.classList.toggle("asc", s.dataset.key === sortKey && !sortDesc);
      s.classList.toggle("desc", s.dataset.key === sortKey && sortDesc);
    });
    renderRows();
  }
  function renderRows() {
    const scroll = document.getElementById("list-scroll"), selected = currentLatent();
    const first = Math.max(0, Math.floor(scroll.scrollTop / ROW) - 10);
    const last = Math.min(view.length, first + Math.ceil(scroll.clientHeight / ROW) + 30);
    const rows = document.getElementById("rows");
    rows.style.top = `${first * ROW}px`;
    let html = "";
    for (let i = first; i < last; i++) {
      const r = view[i], id = X.ids[r];
      html += `<div class="row grid${id === selected ? " selected" : ""}" data-latent="${id}"><span>${id}</span>` +
        `<span>${pct(X.freq[r])}</span><span>${fmt(X.max[r])}</span><span>${fmt(X.mean[r])}</span>` +
        `<span>${esc(topToken(r))}</span></div>`;
    }
    rows.innerHTML = html;
  }
  function setQuery(q) {
    query = q;
    refilter();
    const key = q.trim().toLowerCase();
    if (!key || /^\d+$/.test(key)) return;
    load("search", fnv1a(key) % X.meta.n_shards).then(shard => {
      if (query.trim().toLowerCase() !== key) return;  // the user typed on
      searchExtra = { q: key, rows: (shard[key] || []).map(id => X.rowOf[id]).filter(r => r >= 0) };
      refilter();
    });
  }

  // --- the detail pane -----------------------------------------------------------------------------------
  function currentLatent() { const m = /latent=(\d+)/.exec(location.hash); return m ? Number(m[1]) : null; }
  function bars(cls, counts, labelLeft, labelRight, titles) {
    const w = 360, h = 90, bw = w / counts.length, top = Math.max(...counts, 1);
    const rects = counts.map((c, i) => { const bh = c ? Math.max(1, (h - 14) * c / top) : 0;
      return `<rect x="${i * bw}" y="${h - 14 - bh}" width="${Math.max(bw - 1, 1)}" height="${bh}"><title>${titles(i, c)}</title></rect>`; });
    return `<svg class="${cls}" width="${w}" height="${h}">${rects.join("")}<text x="0" y="${h - 2}">${labelLeft}</text>` +
      `<text x="${w}" y="${h - 2}" text-anchor="end">${labelRight}</text></svg>`;
  }
  function histogram(b, i) {
    const H = X.edges.length - 1, all = Array.from(b.hist.subarray(i * H, (i + 1) * H));
    const first = all.findIndex(c => c > 0), last = H - [...all].reverse().findIndex(c => c > 0);
    if (first < 0) return "<p class='note'>no activations</p>";
    const E = X.edges;
    return bars("hist", all.slice(first, last), fmt(E[first]), fmt(E[last]), (j, c) => `${fmt(E[first + j])} to ${fmt(E[first + j + 1])}: ${c}`) +
      `<p class="note">activations where the latent fires, log-spaced bins</p>`;
  }
  function tok(b, t) { return t === b.sentinel ? null : show(b.vocab[t]); }
  function logitTable(b, i) {
    if (!X.meta.logit_effects_applicable || !b.logit_top_ids) return `<p class="note">${esc(X.meta.logit_effects)}</p>`;
    let rows = "";
    for (let j = 0; j < b.n_logits; j++) {
      const k = i * b.n_logits + j, p = tok(b, b.logit_top_ids[k]), q = tok(b, b.logit_bottom_ids[k]);
      rows += "<tr>" + (p === null ? "<td></td><td></td>" : `<td class="pos">${esc(p)}</td><td class="v">${fmt(b.logit_top[k])}</td>`) +
        (q === null ? "<td></td><td></td>" : `<td class="neg">${esc(q)}</td><td class="v">${fmt(b.logit_bottom[k])}</td>`) + "</tr>";
    }
    return `<table class="logits"><tr><th colspan="2">promoted</th><th colspan="2">suppressed</th></tr>${rows}</table>`;
  }
  function examples(b, i, from, to, max) {
    let out = "";
    for (let j = from; j < to; j++) {
      const peak = b.peaks[i * b.n_examples + j];
      if (!(peak > 0)) continue;
      const base = (i * b.n_examples + j) * b.window;
      let spans = "";
      for (let w = 0; w < b.window; w++) {
        const t = tok(b, b.tokens[base + w]);
        if (t === null) continue;
        const a = b.acts[base + w], alpha = max > 0 ? Math.min(1, Math.max(0, a / max)) : 0;
        const bg = a > 0 ? ` style="background:rgba(255,128,0,${alpha.toFixed(2)})"` : "";
        spans += `<span class="tok${w === X.meta.window_before ? " peak" : ""}"${bg} title="${esc(fmt(a))}">${esc(t)}</span>`;
      }
      out += `<div class="example"><span class="peak-val">${fmt(peak)}</span>${spans}</div>`;
    }
    return out;
  }
  function neighbours(b, i) {
    if (!b.neighbour_ids) return "<p class='note'>not computed (analysis.n_neighbours=0)</p>";
    let rows = "";
    for (let j = 0; j < b.n_neighbours; j++) {
      const k = i * b.n_neighbours + j, id = b.neighbour_ids[k];
      rows += `<tr><td><a href="#latent=${id}">${id}</a>${X.rowOf[id] < 0 ? " (dead)" : ""}</td><td class="v">${fmt(b.neighbour_cosine[k])}</td></tr>`;
    }
    return `<table class="logits neighbours"><tr><th>latent</th><th>cosine</th></tr>${rows}</table>`;
  }
  function overview() {
    const d = X.meta, den = X.density;
    return `<h2>${d.d_sae.toLocaleString()} latents</h2><p class="stats"><span>${d.n_live.toLocaleString()} live</span>` +
      `<span>${d.n_dead.toLocaleString()} dead</span></p><h3>Firing frequency density</h3>` +
      bars("density", den.counts, `10^${den.edges[0]}`, "1", (j, c) => `10^${den.edges[j]} to 10^${den.edges[j + 1]}: ${c} latents`) +
      `<p class="note">live latents by log10 of the fraction of tokens they fire on</p>` +
      `<p class="hint">Pick a latent from the list (or open <code>#latent=N</code>; search with <code>#q=TEXT</code>).</p>`;
  }
  function renderDetail() {
    const id = currentLatent(), box = document.getElementById("detail");
    document.querySelectorAll("#rows .row").forEach(el => el.classList.toggle("selected", Number(el.dataset.latent) === id));
    if (id === null) { box.innerHTML = overview(); return; }
    const r = id < X.meta.d_sae ? X.rowOf[id] : -1;
    box.dataset.latent = id;
    if (r < 0) {
      box.innerHTML = `<h2>Latent ${id}</h2><p>${id < X.meta.d_sae ? "Dead: it never fired on the analysed tokens." : "No such latent."}</p>`;
      return;
    }
    const n = Math.floor(id / X.meta.block_size);
    box.innerHTML = `<h2>Latent ${id}</h2><p class="note">loading…</p>`;
    const t0 = performance.now();
    load("block", n).then(raw => {
      if (currentLatent() !== id) return;
      if (!raw.decoded) raw.decoded = decodeBlock(raw);
      const b = raw.decoded, i = id - b.start, max = X.max[r];
      box.innerHTML = `<h2>Latent ${id}</h2><p class="stats"><span>fires on ${pct(X.freq[r])} of tokens</span>` +
        `<span>max ${fmt(max)}</span><span>mean when firing ${fmt(X.mean[r])}</span></p>` +
        `<div class="panels"><div><h3>Activation histogram</h3>${histogram(b, i)}</div>` +
        `<div><h3>Logit effects</h3>${logitTable(b, i)}</div><div><h3>Nearest by decoder cosine</h3>${neighbours(b, i)}</div></div>` +
        `<h3>Top activations</h3><div id="top-examples">${examples(b, i, 0, b.n_top, max) || "<p class='note'>none</p>"}</div>` +
        `<h3>Sampled activations</h3><p class="note">${esc(X.meta.quantile_examples)}; strongest first (hover a token for its activation)</p>` +
        `<div id="quantile-examples">${examples(b, i, b.n_top, b.n_examples, max)}</div>`;
      box.scrollTop = 0;
      box.dataset.openMs = Math.round(performance.now() - t0);  // read by scripts/bench_dashboard.py
    }, err => { box.innerHTML = `<h2>Latent ${id}</h2><p>${esc(err.message)}</p>`; });
  }
  function onHash() {
    const m = /[#&]q=([^&]*)/.exec(location.hash), q = m ? decodeURIComponent(m[1]) : null;
    if (q !== null && q !== query) { document.getElementById("search").value = q; setQuery(q); }
    renderDetail();
  }

  // --- start ---------------------------------------------------------------------------------------------
  function index(d) {
    const live = unpack(d.live), ids = [];
    for (let i = 0; i < d.meta.d_sae; i++) if (live[i >> 3] & (1 << (i & 7))) ids.push(i);
    X = { meta: d.meta, edges: d.edges, density: d.density, ids: Uint32Array.from(ids), freq: unpack(d.freq),
          max: unpack(d.max), mean: unpack(d.mean), top: unpack(d.top), topNone: NONE[d.top[0]], topVocab: d.top_vocab,
          rowOf: new Int32Array(d.meta.d_sae).fill(-1) };
    X.id = X.ids;  // the "latent" column sorts by X[sortKey] like the others
    X.ids.forEach((id, r) => { X.rowOf[id] = r; });
    const m = d.meta;
    document.getElementById("summary").textContent = `${m.hook_point_out !== m.hook_point_in ? m.hook_point_in + " \u2192 " + m.hook_point_out : m.hook_point_in}` +
      ` \u00b7 ${m.act_fn} \u00b7 ${m.d_sae.toLocaleString()} latents (${m.n_dead.toLocaleString()} dead) \u00b7 ${Number(m.n_tokens).toLocaleString()} tokens${m.dataset ? " of " + m.dataset : ""}`;
    document.getElementById("search").addEventListener("input", ev => setQuery(ev.target.value));
    document.getElementById("list-scroll").addEventListener("scroll", () => requestAnimationFrame(renderRows));
    document.querySelectorAll("#list-head span[data-key]").forEach(s => s.addEventListener("click", () => {
      sortDesc = s.dataset.key === sortKey ? !sortDesc : s.dataset.key !== "id";
      sortKey = s.dataset.key;
      refilter();
    }));
    document.getElementById("rows").addEventListener("click", ev => {
      const el = ev.target.closest(".row");
      if (el) location.hash = "latent=" + el.dataset.latent;
    });
    window.addEventListener("hashchange", onHash);
    refilter();
    document.documentElement.dataset.listMs = Math.round(performance.now());  // since navigation started
    const selected = currentLatent(), at = selected === null ? -1 : view.indexOf(X.rowOf[selected]);
    if (at >= 0) { document.getElementById("list-scroll").scrollTop = Math.max(0, (at - 5) * ROW); renderRows(); }
    onHash();
  }
  return { index, block: (n, d) => register("block", n, d), search: (n, d) => register("search", n, d) };
})();
