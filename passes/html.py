"""A self-contained HTML page for a RewritePlan: summary, sites table, skipped sites, and the module-level
graph before and after side by side (removed nodes red, new modules green, re-typed linears amber).

No scripts and no network resources: one file that opens anywhere.
"""

from __future__ import annotations

import re
from html import escape
from itertools import groupby

from m2convert.passes.diff import plan_graphs
from m2convert.passes.formatting import change, growth, human

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1f2328; margin: 24px auto;
       max-width: 1280px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.summary { color: #444; margin: 0 0 12px; } .summary b { color: #111; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e5e7eb; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; position: sticky; top: 0; }
td.num, td.nowrap { font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .path { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
.bar { height: 6px; background: #9ca3af; margin-top: 3px; border-radius: 3px; }
.bar.after { background: #16a34a; }
.status-skip td { background: #fff7ed; } .status-exclude td { color: #6b7280; }
.legend span { display: inline-block; padding: 1px 8px; margin-right: 8px; border-radius: 4px; }
details { border: 1px solid #e5e7eb; border-radius: 6px; margin: 8px 0; }
summary { padding: 6px 10px; background: #f6f8fa; cursor: pointer; font-weight: 600; }
.graph td { width: 50%; padding: 3px 10px; }
.kept { color: #57606a; } .removed { background: #fde2e2; } .removed .path { text-decoration: line-through; }
.added { background: #dcfce7; border-left: 4px solid #16a34a; } .replaced { background: #fef3c7; }
.type { font-weight: 600; margin-left: 6px; } .ops, .inputs { color: #6b7280; font-size: 12px; }
.arrow { color: #16a34a; font-weight: 700; }
"""


def _block(path: str) -> str:
    """Group a module path by its first numbered container: 'encoder.layer.3.attention' -> 'encoder.layer.3'."""
    if path.startswith(("input:", "output")):
        return "inputs and outputs"
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if parts else "(model)"


def _short(path: str, block: str) -> str:
    if path == block or not path:
        return path or "(model)"
    return path[len(block) + 1:] if path.startswith(block + ".") else path


def _node_html(key: str, data: dict, block: str, preds: list[str]) -> str:
    ops = ", ".join(f"{k}" + (f"&times;{v}" if v > 1 else "") for k, v in list(data["ops"].items())[:6])
    inputs = ", ".join(escape(_short(p, block)) for p in preds[:4])
    return (f'<span class="path">{escape(_short(data["path"], block))}</span>'
            f'<span class="type">{escape(str(data["before_type"]))}</span>'
            + (f'<div class="ops">{ops}</div>' if ops else "")
            + (f'<div class="inputs">&larr; {inputs}</div>' if inputs else ""))


def _graph_section(plan) -> str:
    before, after, diff = plan_graphs(plan)
    rows = sorted((k for k, d in diff.nodes(data=True) if d["change"] != "added"), key=lambda k: diff.nodes[k]["order"])
    counts = {c: sum(d["change"] == c for _, d in diff.nodes(data=True)) for c in ("removed", "added", "replaced")}
    out = [f'<p class="summary">Module-level graph: <b>{before.number_of_nodes()}</b> nodes before, '
           f'<b>{after.number_of_nodes()}</b> after ({counts["removed"]} removed, {counts["added"]} added, '
           f'{counts["replaced"]} re-typed). Each row is one module call; &larr; lists where its inputs come from.</p>',
           '<p class="legend"><span class="removed">removed</span><span class="added">new M2 module</span>'
           '<span class="replaced">re-typed (dense &rarr; Monarch)</span><span class="kept">kept</span></p>']
    tables = _GraphTables(plan, before, after, diff)
    for block, group in groupby(rows, key=lambda k: _block(diff.nodes[k]["path"])):     # runs of one block
        out.append(tables.block_table(block, list(group)))
    return "\n".join(out)


class _GraphTables:
    """The before/after module graphs of a plan, rendered one block (e.g. 'encoder.layer.3') at a time."""

    def __init__(self, plan, before, after, diff):
        self.before, self.after, self.diff = before, after, diff
        self.new_nodes = {d["site"]: k for k, d in diff.nodes(data=True) if d["change"] == "added"}
        self.by_site = {s.fqn: s for s in plan.converted}

    def block_table(self, block: str, group: list) -> str:
        """A <details> table of the block's nodes: before on the left, after on the right."""
        n_sites = len({self.diff.nodes[k]["site"] for k in group if self.diff.nodes[k]["site"]})
        label = f"{escape(block)} &middot; {len(group)} nodes"
        if n_sites:
            label += f" &middot; {n_sites} site(s) rewritten"
        out = [f'<details open><summary>{label}</summary><table class="graph">'
               '<tr><th>before</th><th>after</th></tr>']
        k = 0
        while k < len(group):
            data = self.diff.nodes[group[k]]
            run = 1
            if data["change"] == "removed":          # the site's removed nodes share one new-module cell
                while k + run < len(group) and self.diff.nodes[group[k + run]]["site"] == data["site"]:
                    run += 1
            out.append(f"<tr>{self._before_cell(group[k], block)}{self._after_cell(data, block, run)}</tr>")
            out += [f"<tr>{self._before_cell(extra, block, 'removed')}</tr>" for extra in group[k + 1: k + run]]
            k += run
        out.append("</table></details>")
        return "\n".join(out)

    def _before_cell(self, key, block: str, change: str | None = None) -> str:
        data = self.diff.nodes[key]
        preds = [self.diff.nodes[p]["path"] for p in self.before.predecessors(key)]
        return f'<td class="{change or data["change"]}">{_node_html(key, data, block, preds)}</td>'

    def _after_cell(self, data: dict, block: str, run: int) -> str:
        if data["change"] == "removed":
            site = self.by_site[data["site"]]
            new_key = self.new_nodes[data["site"]]
            inputs = ", ".join(escape(_short(self.after.nodes[p]["path"], block))
                               for p in self.after.predecessors(new_key))
            return (f'<td class="added" rowspan="{run}" data-site="{escape(site.fqn)}">'
                    f'<span class="arrow">&rarr;</span> '
                    f'<span class="path">{escape(_short(site.fqn, block))}</span>'
                    f'<span class="type">{escape(site.replacement)}</span>'
                    f'<div class="ops">replaces {run} node(s); params {site.params_before:,} &rarr; '
                    f'{site.params_after:,}; cost grows as '
                    f'{_arrow(growth(site.flops_before) + " -> " + growth(site.flops_after))}</div>'
                    f'<div class="inputs">&larr; {inputs}</div></td>')
        if data["change"] == "replaced":
            site = self.by_site[data["site"]]
            return (f'<td class="replaced" data-site="{escape(site.fqn)}"><span class="path">'
                    f'{escape(_short(data["path"], block))}</span>'
                    f'<span class="type">{escape(data["after_type"])}</span>'
                    f'<div class="ops">nblocks={site.settings["nblocks"]}, rank={site.settings["rank"]} '
                    f'({escape(site.pattern)})</div></td>')
        return f'<td class="kept"><span class="path">{escape(_short(data["path"], block))}</span></td>'


def _sites_table(plan) -> str:
    rows = plan.rows()
    top = max([s.params_before for s in plan.sites] + [1])
    out = ['<table class="sites"><tr><th>#</th><th>module</th><th>kind</th><th>pattern</th><th>mask</th>'
           f'<th>status</th><th>replacement</th><th>params before &rarr; after</th><th>FLOPs @N={plan.seq_len}</th>'
           '<th>growth in N</th></tr>']
    for site, r in zip(plan.sites, rows):
        bars = ""
        if site.params_before:
            bars = f'<div class="bar" style="width:{100 * site.params_before / top:.1f}%"></div>'
            if site.status == "convert":
                bars += f'<div class="bar after" style="width:{100 * site.params_after / top:.1f}%"></div>'
        reason = f'<div class="ops">{escape(r["reason"])}</div>' if r["reason"] else ""
        if r["selection"]:
            reason += f'<div class="ops selection">keep score: {escape(r["selection"])}</div>'
        linears = ""
        if site.kind == "dimension":
            names = ", ".join(escape(_short(p, site.fqn)) for p in site.replaces)
            linears = f'<div class="ops">{names}</div>'
        anchor = re.sub(r"[^A-Za-z0-9_.-]", "_", r["module"])
        out.append(f'<tr class="site status-{site.status}" id="site-{anchor}" '
                   f'data-fqn="{escape(site.fqn)}" data-kind="{site.kind}" data-status="{site.status}">'
                   f'<td>{r["#"]}</td><td><span class="path">{escape(r["module"])}</span>{linears}</td>'
                   f'<td>{r["kind"]}</td><td class="nowrap">{escape(r["pattern"])}</td><td>{r["mask"]}</td>'
                   f'<td>{site.status}{reason}</td><td>{escape(r["replacement"]).replace("(", "<wbr>(")}</td>'
                   f'<td class="num">{_arrow(r["params"])}{bars}</td><td class="num">{_arrow(r["flops"])}</td>'
                   f'<td>{_arrow(r["growth"])}</td></tr>')
    out.append("</table>")
    out.append('<p class="ops">Bars: parameters before (grey) and after (green), to the scale of the largest site. '
               f'FLOPs are forward FLOPs of one sequence of N={plan.seq_len} tokens.</p>')
    return "\n".join(out)


def _arrow(text: str) -> str:
    text = escape(text).replace(" -&gt; ", " &rarr; ")
    return re.sub(r"N\^([0-9.]+)", r"N<sup>\1</sup>", text)


def render_plan(plan) -> str:
    """The HTML page for ``plan`` (see :meth:`RewritePlan.to_html`).

    Example:
        >>> config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        ...                                  intermediate_size=64)
        >>> page = render_plan(m2.plan(transformers.BertModel(config)))
        >>> page.startswith("<!doctype html>"), "Graph before and after" in page
        (True, True)
    """
    t = plan.totals()
    summary = (f'<b>{t["convert"]}</b> site(s) to convert, <b>{t["skip"]}</b> skipped, <b>{t["exclude"]}</b> excluded'
               f' &middot; parameters <b>{t["params_before"]:,}</b> &rarr; <b>{t["params_after"]:,}</b> '
               f'({change(t["params_before"], t["params_after"])})')
    if t["convert"]:
        summary += (f' &middot; converted-site FLOPs at N={plan.seq_len}: <b>{human(t["site_flops_before"])}</b> '
                    f'&rarr; <b>{human(t["site_flops_after"])}</b> '
                    f'({change(t["site_flops_before"], t["site_flops_after"])})')
    notes = "".join(f"<li>{escape(n)}</li>" for n in plan.notes)
    cfg = ", ".join(f"{k}={v!r}" for k, v in plan.config.to_dict().items() if k != "overrides")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>m2convert plan: {escape(plan.model_class)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(plan.model_class)} &rarr; Monarch Mixer</h1>",
        f'<p class="summary">{summary}</p>',
        f'<p class="summary">config: <code>{escape(cfg)}</code></p>',
        "<h2>Sites</h2>", _sites_table(plan),
    ]
    if notes:
        parts += ["<h2>Notes</h2>", f"<ul>{notes}</ul>"]
    if plan.captured is not None:
        parts += ["<h2>Graph before and after</h2>", _graph_section(plan)]
    parts.append("</body></html>")
    return "\n".join(parts)
