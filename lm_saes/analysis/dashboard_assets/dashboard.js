"use strict";
// Plain JS over the inline JSON (see lm_saes/analysis/dashboard.py for its layout). No network, no framework.
const DATA = JSON.parse(document.getElementById("data").textContent);
const VOCAB = DATA.vocab, META = DATA.meta, EDGES = DATA.edges;
const ID = 0, FREQ = 1, MAX = 2, MEAN = 3, HIST = 4, TOPL = 5, BOTL = 6, TOP = 7, QUANT = 8;
const byId = new Map(DATA.latents.map(l => [l[ID], l]));
const dead = new Set(DATA.dead);
let sortKey = FREQ, sortDesc = true, query = "";

function esc(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}
function show(tok) { return tok.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
function fmt(x) { return x === 0 ? "0" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? String(x) : x.toExponential(2); }
function pct(f) { const p = 100 * f; return (p >= 1e-3 ? String(Number(p.toPrecision(3))) : p.toExponential(1)) + "%"; }

// What a text search matches: the tokens at the latent's top peaks and the tokens it promotes most.
const searchText = new Map(DATA.latents.map(l => {
  const peaks = l[TOP].map(e => VOCAB[e[2][e[1]]]);
  const logits = l[TOPL].map(p => VOCAB[p[0]]);
  return [l[ID], peaks.concat(logits).join("\u0001").toLowerCase()];
}));
function topToken(l) { return l[TOP].length ? show(VOCAB[l[TOP][0][2][l[TOP][0][1]]]) : ""; }

function filtered() {
  const q = query.trim().toLowerCase();
  let rows = DATA.latents;
  if (q) {
    rows = /^\d+$/.test(q) ? rows.filter(l => String(l[ID]).startsWith(q))
                           : rows.filter(l => searchText.get(l[ID]).includes(q));
  }
  return rows.slice().sort((a, b) => (sortDesc ? b[sortKey] - a[sortKey] : a[sortKey] - b[sortKey]) || a[ID] - b[ID]);
}

function renderList() {
  const rows = filtered();
  const selected = currentLatent();
  document.querySelector("#latent-list tbody").innerHTML = rows.map(l =>
    `<tr class="row${l[ID] === selected ? " selected" : ""}" data-latent="${l[ID]}"><td>${l[ID]}</td><td>${pct(l[FREQ])}</td>` +
    `<td>${fmt(l[MAX])}</td><td>${fmt(l[MEAN])}</td><td>${esc(topToken(l))}</td></tr>`).join("");
  document.getElementById("count").textContent =
    `${rows.length} of ${DATA.latents.length} live latents shown; ${META.n_dead} dead (never fired) not listed`;
  document.querySelectorAll("#latent-list th").forEach(th => {
    th.classList.toggle("asc", Number(th.dataset.key) === sortKey && !sortDesc);
    th.classList.toggle("desc", Number(th.dataset.key) === sortKey && sortDesc);
  });
}

function currentLatent() {
  const m = /latent=(\d+)/.exec(location.hash);
  return m ? Number(m[1]) : null;
}

function histogram(l) {
  const first = l[HIST][0], counts = l[HIST].slice(1);
  if (!counts.length) return "<p class='note'>no activations</p>";
  const w = 360, h = 90, bw = w / counts.length, top = Math.max(...counts);
  const bars = counts.map((c, i) => {
    const bh = c ? Math.max(1, (h - 14) * c / top) : 0;
    return `<rect x="${i * bw}" y="${h - 14 - bh}" width="${Math.max(bw - 1, 1)}" height="${bh}">` +
      `<title>${fmt(EDGES[first + i])} to ${fmt(EDGES[first + i + 1])}: ${c}</title></rect>`;
  }).join("");
  return `<svg class="hist" width="${w}" height="${h}">${bars}<text x="0" y="${h - 2}">${fmt(EDGES[first])}</text>` +
    `<text x="${w}" y="${h - 2}" text-anchor="end">${fmt(EDGES[first + counts.length])}</text></svg>` +
    `<p class="note">activations where the latent fires, log-spaced bins</p>`;
}

function logitTable(l) {
  if (!META.logit_effects_applicable) return `<p class="note">${esc(META.logit_effects)}</p>`;
  const n = Math.max(l[TOPL].length, l[BOTL].length);
  let rows = "";
  for (let i = 0; i < n; i++) {
    const p = l[TOPL][i], q = l[BOTL][i];
    rows += "<tr>" + (p ? `<td class="pos">${esc(show(VOCAB[p[0]]))}</td><td class="v">${fmt(p[1])}</td>` : "<td></td><td></td>") +
      (q ? `<td class="neg">${esc(show(VOCAB[q[0]]))}</td><td class="v">${fmt(q[1])}</td>` : "<td></td><td></td>") + "</tr>";
  }
  return `<table class="logits"><tr><th colspan="2">promoted</th><th colspan="2">suppressed</th></tr>${rows}</table>`;
}

function example(e, max) {
  const [peak, at, toks, acts] = e;
  const spans = toks.map((t, i) => {
    const a = acts[i], alpha = max > 0 ? Math.min(1, Math.max(0, a / max)) : 0;
    const bg = a > 0 ? ` style="background:rgba(255,128,0,${alpha.toFixed(2)})"` : "";
    return `<span class="tok${i === at ? " peak" : ""}"${bg} title="${esc(fmt(a))}">${esc(show(VOCAB[t]))}</span>`;
  }).join("");
  return `<div class="example"><span class="peak-val">${fmt(peak)}</span>${spans}</div>`;
}

function renderDetail() {
  const id = currentLatent(), box = document.getElementById("detail");
  document.querySelectorAll("#latent-list tr.row").forEach(tr => tr.classList.toggle("selected", Number(tr.dataset.latent) === id));
  if (id === null) return;
  const l = byId.get(id);
  box.dataset.latent = id;
  if (!l) {
    box.innerHTML = `<h2>Latent ${id}</h2><p>${dead.has(id) ? "Dead: it never fired on the analysed tokens." : "No such latent."}</p>`;
    return;
  }
  const n = l[QUANT].length;
  box.innerHTML =
    `<h2>Latent ${id}</h2><p class="stats"><span>fires on ${pct(l[FREQ])} of tokens</span><span>max ${fmt(l[MAX])}</span>` +
    `<span>mean when firing ${fmt(l[MEAN])}</span></p>` +
    `<div class="panels"><div><h3>Activation histogram</h3>${histogram(l)}</div>` +
    `<div><h3>Logit effects</h3>${logitTable(l)}</div></div>` +
    `<h3>Top activations</h3><div id="top-examples">${l[TOP].map(e => example(e, l[MAX])).join("") || "<p class='note'>none</p>"}</div>` +
    `<h3>Sampled activations</h3><p class="note">${esc(META.quantile_examples)}; ${n} shown, strongest first (hover a token for its activation)</p>` +
    `<div id="quantile-examples">${l[QUANT].map(e => example(e, l[MAX])).join("")}</div>`;
  box.scrollTop = 0;
}

document.getElementById("summary").textContent =
  `${META.hook_point_out !== META.hook_point_in ? META.hook_point_in + " \u2192 " + META.hook_point_out : META.hook_point_in}` +
  ` \u00b7 ${META.act_fn} \u00b7 ${META.d_sae} latents (${META.n_dead} dead) \u00b7 ${Number(META.n_tokens).toLocaleString()} tokens${META.dataset ? " of " + META.dataset : ""}`;
document.getElementById("search").addEventListener("input", ev => { query = ev.target.value; renderList(); });
document.querySelectorAll("#latent-list th[data-key]").forEach(th => th.addEventListener("click", () => {
  const key = Number(th.dataset.key);
  sortDesc = key === sortKey ? !sortDesc : key !== ID;
  sortKey = key;
  renderList();
}));
document.querySelector("#latent-list tbody").addEventListener("click", ev => {
  const tr = ev.target.closest("tr.row");
  if (tr) location.hash = "latent=" + tr.dataset.latent;
});
window.addEventListener("hashchange", renderDetail);
renderList();
renderDetail();
