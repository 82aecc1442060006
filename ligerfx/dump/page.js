// The `ligerfx dump -f html` page's script: draws each graph model in window.LIGERFX_DUMP as SVG,
// with module groups collapsed to boxes or expanded in place (click), search by node or module
// name, and a details pane (source line, shapes, FLOPs, rewrite or near-miss reason).
// The geometry is svg.py's (same constants, handed over in the data), so the first picture
// is the one `ligerfx dump -f svg` writes.
(function () {
  "use strict";
  const D = window.LIGERFX_DUMP, G = D.geom, SVGNS = "http://www.w3.org/2000/svg";
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => "&#" + c.charCodeAt(0) + ";");
  const short = (s, n) => (s.length <= n ? s : s.slice(0, n - 1) + "\u2026");
  const $ = (sel, root) => (root || document).querySelector(sel);

  // Per graph: ancestors of each group (top level first), expansion state, name lookups.
  D.graphs.forEach((g) => {
    g.open = new Set(g.expanded);
    g.anc = g.groups.map((_, i) => {
      const chain = [];
      for (let j = i; j !== null && j !== undefined && j >= 0; j = g.groups[j][1]) chain.push(j);
      return chain.reverse();
    });
    g.byName = new Map(g.nodes.map((n, i) => [n[0], i]));
    g.byPath = new Map(g.groups.map((gr, i) => [gr[0], i]));
  });

  function visible(g, ni) {
    for (const j of g.anc[g.nodes[ni][3]]) if (!g.open.has(j)) return -(j + 1);
    return ni;
  }

  function layout(g) {
    const size = new Map(), pos = new Map();
    function sz(u) {
      let s;
      if (u >= 0) s = [G.NODE_W, G.NODE_H];
      else if (!g.open.has(-u - 1)) s = [G.GROUP_W, G.GROUP_H];
      else {
        const rows = g.groups[-u - 1][2];
        let w = 0, h = 0;
        for (const row of rows) {
          const ss = row.map(sz);
          w = Math.max(w, ss.reduce((a, b) => a + b[0], 0) + G.HGAP * (row.length - 1));
          h += Math.max(...ss.map((b) => b[1]));
        }
        h += G.VGAP * Math.max(rows.length - 1, 0);
        s = [Math.max(w, G.GROUP_W - 2 * G.PAD) + 2 * G.PAD, h + G.HEAD + G.PAD];
      }
      size.set(u, s);
      return s;
    }
    function place(u, x, y) {
      const [w, h] = size.get(u);
      pos.set(u, [x, y, w, h]);
      if (u >= 0 || !g.open.has(-u - 1)) return;
      let cy = y + G.HEAD;
      for (const row of g.groups[-u - 1][2]) {
        const rw = row.reduce((a, c) => a + size.get(c)[0], 0) + G.HGAP * (row.length - 1);
        const rh = Math.max(...row.map((c) => size.get(c)[1]));
        let cx = x + (w - rw) / 2;
        for (const c of row) {
          place(c, cx, cy + (rh - size.get(c)[1]) / 2);
          cx += size.get(c)[0] + G.HGAP;
        }
        cy += rh + G.VGAP;
      }
    }
    sz(-1);
    place(-1, 0, 0);
    return pos;
  }

  const where = (l) => (l && l[0] ? l[0].split("/").pop() + ":" + l[1] : "");
  const regionsOf = (g, ids) => ids.map((r) => g.regions[r]);

  function groupSvg(g, j, [x, y, w, h]) {
    const [path, , , size, regs] = g.groups[j];
    const rs = regionsOf(g, regs), rw = rs.filter((r) => r[0] === "rewrite");
    const nm = rs.filter((r) => r[0] === "near_miss"), open = g.open.has(j);
    const cls = "grp" + (open ? " open" : "") + (rw.length ? " has-rw" : "") + (nm.length ? " has-nm" : "");
    const name = path || "(top level)";
    let s = `<g class="${cls}" data-group="${esc(path)}" data-gi="${j}"><title>${esc(name + ": " + size + " nodes" +
      (open ? " (click the header to collapse)" : " (click to expand)"))}</title>` +
      `<rect class="frame" x="${x}" y="${y}" width="${w}" height="${h}" rx="6"/>`;
    if (open) return s + `<text x="${x + 6}" y="${y + 15}" class="ghead">${esc(short(name, 60))}</text></g>`;
    const tail = path ? path.split(".").pop() : name;
    s += `<text x="${x + 8}" y="${y + 17}" class="gname">${esc(short(tail, 18))} <tspan class="gsize">${size} nodes</tspan></text>`;
    const counts = new Map();
    for (const r of rw) counts.set(r[1], (counts.get(r[1]) || 0) + 1);
    let bx = x + 8;
    for (const [pat, k] of counts) {
      const label = short(pat, 14) + (k > 1 ? " \u00d7" + k : ""), bw = 7 * label.length + 8;
      s += `<rect class="badge" x="${bx}" y="${y + 25}" width="${bw}" height="14" rx="3" fill="${D.palette[pat] || "#eee"}"/>` +
        `<text class="btext" x="${bx + 4}" y="${y + 36}">${esc(label)}</text>`;
      bx += bw + 4;
    }
    if (nm.length) s += `<text class="nmtext" x="${x + w - 8}" y="${y + 17}" text-anchor="end">\u26a0 ${nm.length}</text>`;
    return s + "</g>";
  }

  function nodeSvg(g, i, [x, y]) {
    const [name, label, target, , shape, dtype, loc, regs] = g.nodes[i];
    const rs = regionsOf(g, regs), rw = rs.filter((r) => r[0] === "rewrite");
    const nm = rs.filter((r) => r[0] === "near_miss"), l = D.locs[loc];
    const tip = [`${name} = ${target}  ${shape} ${dtype}`.trim()];
    if (l && l[0]) tip.push(where(l) + "  " + l[2].trim());
    for (const r of rw) tip.push(`replaced by ${r[2] || r[1]} (${r[1]})`);
    for (const r of nm) tip.push(`near miss ${r[1]}: ${r[4]}`);
    const cls = "node" + (rw.length ? " rw" : "") + (nm.length ? " nm" : "");
    const fill = rw.length ? ` style="fill:${D.palette[rw[0][1]] || "#fff"}"` : "";
    let s = `<g class="${cls}" data-node="${esc(name)}" data-ni="${i}"><title>${esc(tip.join("\n"))}</title>` +
      `<rect x="${x}" y="${y}" width="${G.NODE_W}" height="${G.NODE_H}" rx="3"${fill}/>` +
      `<text x="${x + 6}" y="${y + 14}" class="nname">${esc(short(name, 24))}</text>` +
      `<text x="${x + 6}" y="${y + 27}" class="nop">${esc(short(label, 14))} <tspan class="nshape">${esc(short(shape, 14))}</tspan></text>`;
    for (const r of rw) {
      if (r[6][0] === i) {
        const lab = r[2] ? `${r[1]} \u2192 ${r[2]}` : r[1];
        s += `<text class="rlabel" x="${x + G.NODE_W - 4}" y="${y - 3}" text-anchor="end">${esc(short(lab, 70))}</text>`;
      }
    }
    if (nm.length) s += `<text class="nmtext" x="${x + G.NODE_W - 5}" y="${y + 14}" text-anchor="end">\u26a0</text>`;
    return s + "</g>";
  }

  function render(gi) {
    const g = D.graphs[gi], pos = layout(g), [, , W, H] = pos.get(-1), out = [];
    const seen = new Set();
    for (let k = 0; k < g.edges.length; k += 2) {
      const a = visible(g, g.edges[k]), b = visible(g, g.edges[k + 1]), key = a + "," + b;
      if (a === b || seen.has(key)) continue;
      seen.add(key);
      const [x1, y1, w1, h1] = pos.get(a), [x2, y2, w2] = pos.get(b);
      const sx = x1 + w1 / 2, sy = y1 + h1, tx = x2 + w2 / 2, ty = y2, my = (sy + ty) / 2;
      out.push(`<path class="edge" d="M${sx},${sy} C${sx},${my} ${tx},${my} ${tx},${ty}"/>`);
    }
    const units = [...pos.entries()].sort((p, q) => q[1][2] * q[1][3] - p[1][2] * p[1][3]);
    for (const [u, p] of units) out.push(u < 0 ? groupSvg(g, -u - 1, p) : nodeSvg(g, u, p));
    const box = $("#graph-" + gi);
    box.innerHTML = `<svg xmlns="${SVGNS}" class="lfx" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">${out.join("")}</svg>`;
    box.dataset.boxes = String(pos.size);
  }

  function details(gi, html) {
    $("#details").innerHTML = html;
  }

  function nodeDetails(gi, i) {
    const g = D.graphs[gi], [name, label, target, grp, shape, dtype, loc, regs, flops, bytes] = g.nodes[i];
    const l = D.locs[loc] || ["", 0, "", ""];
    let h = `<h3>${esc(name)}</h3><p><code>${esc(target)}</code> ${esc(shape)} ${esc(dtype)}</p>` +
      `<p>module <code>${esc(g.groups[grp][0] || "(top level)")}</code></p>`;
    if (l[0]) h += `<p class="src">${esc(l[0])}:${l[1]}<br><code>${esc(l[2].trim())}</code></p>`;
    h += `<p>${flops.toLocaleString()} FLOPs, ${bytes.toLocaleString()} bytes (estimate)</p>`;
    for (const r of regionsOf(g, regs)) h += regionHtml(r);
    details(gi, h);
  }

  function regionHtml(r) {
    const l = D.locs[r[5]] || ["", 0, ""];
    const src = l[0] ? `<br>${esc(where(l))} <code>${esc(l[2].trim())}</code>` : "";
    if (r[0] === "rewrite")
      return `<p class="rwbox"><b>${esc(r[1])}</b> \u2192 <code>${esc(r[2])}</code>${r[3] ? " (" + esc(r[3]) + ")" : ""}, ${r[6].length} nodes replaced${src}</p>`;
    return `<p class="nmbox"><b>near miss ${esc(r[1])}</b>: ${esc(r[4])}${src}</p>`;
  }

  function reveal(gi, i, groupIdx) {
    const g = D.graphs[gi];
    const chain = i >= 0 ? g.anc[g.nodes[i][3]] : g.anc[groupIdx].slice(0, -1);
    for (const j of chain) g.open.add(j);
    render(gi);
    const el = i >= 0 ? $(`#graph-${gi} [data-ni="${i}"]`) : $(`#graph-${gi} [data-gi="${groupIdx}"]`);
    if (!el) return;
    document.querySelectorAll(".hit").forEach((e) => e.classList.remove("hit"));
    el.classList.add("hit");
    if (el.scrollIntoView) el.scrollIntoView({ block: "center", inline: "center" });
    if (i >= 0) nodeDetails(gi, i);
  }

  function onClick(ev) {
    const box = ev.currentTarget, gi = +box.dataset.graph, g = D.graphs[gi];
    const node = ev.target.closest("[data-ni]"), grp = ev.target.closest("[data-gi]");
    if (node) return nodeDetails(gi, +node.dataset.ni);
    if (!grp) return;
    const j = +grp.dataset.gi;
    if (!g.open.has(j)) g.open.add(j);
    else if (j !== 0 && ev.target.classList.contains("ghead")) g.open.delete(j);
    else return;
    render(gi);
    const r = regionsOf(g, g.groups[j][4]).map(regionHtml).join("");
    details(gi, `<h3>${esc(g.groups[j][0] || "(top level)")}</h3><p>${g.groups[j][3]} nodes</p>${r}`);
  }

  function search(q) {
    const out = [], ql = q.trim().toLowerCase();
    if (ql) {
      D.graphs.forEach((g, gi) => {
        g.groups.forEach((gr, j) => { if (gr[0].toLowerCase().includes(ql) && out.length < 40) out.push([gi, -1, j, gr[0]]); });
        g.nodes.forEach((n, i) => { if (n[0].toLowerCase().includes(ql) && out.length < 80) out.push([gi, i, -1, n[0]]); });
      });
    }
    $("#results").innerHTML = out.map((r, k) =>
      `<li data-k="${k}">${r[1] < 0 ? "module " : ""}<code>${esc(r[3])}</code>${D.graphs.length > 1 ? " (graph " + r[0] + ")" : ""}</li>`).join("");
    $("#results").onclick = (ev) => { const li = ev.target.closest("li"); if (li) { const r = out[+li.dataset.k]; reveal(r[0], r[1], r[2]); } };
    return out;
  }

  D.graphs.forEach((g, gi) => {
    const box = $("#graph-" + gi);
    box.dataset.graph = String(gi);
    box.addEventListener("click", onClick);
    render(gi);
  });
  $("#search").addEventListener("input", (ev) => search(ev.target.value));
  $("#search").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { const r = search(ev.target.value)[0]; if (r) reveal(r[0], r[1], r[2]); }
  });
  document.querySelectorAll("[data-reveal]").forEach((el) => el.addEventListener("click", () => {
    const [gi, name, path] = JSON.parse(el.dataset.reveal), g = D.graphs[gi];
    if (name !== null && g.byName.has(name)) reveal(gi, g.byName.get(name), -1);
    else if (g.byPath.has(path)) reveal(gi, -1, g.byPath.get(path));
  }));
  document.querySelectorAll("[data-all]").forEach((el) => el.addEventListener("click", () => {
    D.graphs.forEach((g, gi) => {
      g.open = new Set(el.dataset.all === "open" ? g.groups.map((_, j) => j) : el.dataset.all === "close" ? [0] : g.expanded);
      render(gi);
    });
  }));
  window.ligerfxDump = { render, reveal, search, data: D };  // for tests and the console
})();
