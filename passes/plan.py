"""RewritePlan: what becomes what, what it costs before and after, and what was left alone and why.

Example:
    >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64))
    >>> plan = m2.plan(model, m2.ConvertConfig(seq_len=2048))
    >>> print(plan)                      # the table
    RewritePlan for BertModel: 2 site(s) to convert, 0 skipped, 0 excluded (FLOPs per sequence at N=2048)
    ...
    >>> plan.to_html("plan.html")        # table + before/after graph
    PosixPath('plan.html')
    >>> converted = plan.apply()         # the original is untouched
"""

from __future__ import annotations

import json
from pathlib import Path

from m2convert.config import ConvertConfig
from m2convert.errors import M2Error
from m2convert.layers.cost import evaluate
from m2convert.layers.recurrent import RECURRENT_MODEL_HOOKS, recurrent_fits
from m2convert.passes.formatting import change, growth, human
from m2convert.passes.diff import recurrent_text
from m2convert.passes.graph import within
from m2convert.passes.memory import KERNEL_BUFFERS, predicted_peak
from m2convert.passes.site import CONVERT, EXCLUDE, PLAN_VERSION, SKIP, Site


class RewritePlan:
    """The result of :func:`m2convert.plan`: sites with settings and costs; nothing is modified.

    Attributes:
        sites: every matched site, in module order (see :class:`Site`).
        config: the ConvertConfig it was made with.
        model_class: class name of the planned model.
        seq_len: N at which FLOPs are evaluated (``config.seq_len``; per sequence, B = 1).
        model_params: parameters of the whole model before conversion.
        notes: plain-language remarks (e.g. "no attention sites found").
    """

    def __init__(self, sites, config: ConvertConfig, model_class: str, model_params: int = 0, notes=(),
                 model=None, captured=None, results=()):
        self.sites: list[Site] = list(sites)
        self.config = config
        self.model_class = model_class
        self.model_params = model_params
        self.notes = list(notes)
        self.model = model
        self.captured = captured
        self.results = list(results)
        self._graphs = None                     # (before, after, diff) module graphs, built on demand

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.status == CONVERT]

    @property
    def skipped(self) -> list[Site]:
        """Sites that cannot be converted (``strict`` turns these into an error)."""
        return [s for s in self.sites if s.status == SKIP]

    @property
    def excluded(self) -> list[Site]:
        """Sites the configuration left out (sequence/dimension switches, overrides, filter_fn)."""
        return [s for s in self.sites if s.status == EXCLUDE]

    def flops(self, expr) -> int | None:
        """Evaluate a FLOP formula at this plan's N (B = 1)."""
        return None if expr is None else evaluate(expr, self.seq_len)

    def totals(self) -> dict:
        """Whole-model parameters and converted-site FLOPs before/after, at N = seq_len."""
        conv = self.converted
        saved = sum(s.params_before - s.params_after for s in conv)
        fb = sum(self.flops(s.flops_before) for s in conv)
        fa = sum(self.flops(s.flops_after) for s in conv)
        return {"params_before": self.model_params, "params_after": self.model_params - saved,
                "site_flops_before": fb, "site_flops_after": fa, "seq_len": self.seq_len,
                "convert": len(conv), "skip": len(self.skipped), "exclude": len(self.excluded)}

    def memory(self, seq_len: int | None = None, batch: int = 1, itemsize: int = 4) -> dict:
        """Predicted prefill memory at N (default ``seq_len``): the largest per-token activation count of any
        site (converted sites after, the others as they are), and the bytes of tensors alive at once it
        predicts (``passes/memory.py``), before and after conversion; None where no site has a layout.

        Example:
            >>> plan = m2.plan(transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2,
            ...     num_attention_heads=2, intermediate_size=256)))
            >>> m = plan.memory(4096)
            >>> m["elements_before"] // 64, m["elements_after"] // 64             # per token, in units of H
            (11, 6)
        """
        n = seq_len or self.seq_len
        sites = [s for s in self.sites if s.act_before]
        if not sites:
            return {"seq_len": n, "elements_before": None, "elements_after": None, "before": None, "after": None,
                    "kernel_buffers": 0}
        before = max(s.act_before for s in sites)
        after = max(s.act_after if s.status == CONVERT else s.act_before for s in sites)
        during = max((s.act_kernels or s.act_after) if s.status == CONVERT else s.act_before for s in sites)
        peak_after = predicted_peak(after, n, batch, itemsize, converted=bool(self.converted),
                                    kernel_elements_per_token=during)
        # The CPU kernels' working buffers are a fixed size: at short N they, not the activations, set the peak.
        fixed = KERNEL_BUFFERS if self.converted and peak_after == batch * n * itemsize * during + KERNEL_BUFFERS \
            and peak_after > batch * n * itemsize * after else 0
        return {"seq_len": n, "elements_before": before, "elements_after": after,
                "before": predicted_peak(before, n, batch, itemsize, converted=False), "after": peak_after,
                "kernel_buffers": fixed}

    def rows(self) -> list[dict]:
        """One display row per site (strings), shared by the text table and the HTML page."""
        out = []
        for i, s in enumerate(self.sites):
            fb, fa = self.flops(s.flops_before), self.flops(s.flops_after)
            out.append({
                "#": str(i), "module": s.fqn or "(model)", "kind": s.kind, "pattern": s.pattern,
                "mask": "-" if s.kind != "sequence" else {True: "causal", False: "bidirectional"}.get(s.causal, "?")
                + (f", window {s.layout.window}" if getattr(s.layout, "window", None) else ""),
                "status": s.status, "replacement": s.replacement or "-",
                "params": (f"{s.params_before:,} -> {s.params_after:,} ({change(s.params_before, s.params_after)})"
                           if s.status == CONVERT else f"{s.params_before:,}" if s.params_before else "-"),
                "flops": (f"{human(fb)} -> {human(fa)}" if fa is not None and s.status == CONVERT
                          else human(fb) if fb else "-"),
                "growth": (f"{growth(s.flops_before)} -> {growth(s.flops_after)}" if s.status == CONVERT
                           else growth(s.flops_before)),
                "memory": (f"{4 * s.act_before / 1024:.1f} -> {4 * s.act_after / 1024:.1f}" if s.status == CONVERT
                           and s.act_before else f"{4 * s.act_before / 1024:.1f}" if s.act_before else "-"),
                "reason": s.reason or "",
                "recurrent": recurrent_text(s.settings.get("recurrent")),
                "selection": selection_text(s.selection),
            })
        return out

    def table(self) -> str:
        """The sites as an aligned text table (FLOPs at N = seq_len, B = 1); a recurrent model's plan
        (see :func:`record_recurrent`) adds the state size and fit error of each site's filters."""
        cols = ["#", "module", "kind", "pattern", "mask", "replacement", "params", "flops", "growth", "memory"]
        cols += ["recurrent"] if any(s.settings.get("recurrent") for s in self.converted) else []
        cols += ["selection"] if any(s.selection for s in self.sites) else []
        heads = {"flops": f"FLOPs @N={self.seq_len}", "params": "params before -> after",
                 "memory": "fp32 KiB/token at peak", "selection": "keep score (rank)"}
        rows = [r for r in self.rows() if r["status"] == CONVERT]
        if not rows:
            return "(no sites to convert)"
        widths = {c: max(len(heads.get(c, c)), *(len(r[c]) for r in rows)) for c in cols}

        def line(r: dict) -> str:
            return "  ".join(r[c].ljust(widths[c]) for c in cols).rstrip()

        return "\n".join([line({c: heads.get(c, c) for c in cols}), line({c: "-" * widths[c] for c in cols}),
                          *(line(r) for r in rows)])

    def __str__(self) -> str:
        t = self.totals()
        head = (f"RewritePlan for {self.model_class}: {t['convert']} site(s) to convert, {t['skip']} skipped, "
                f"{t['exclude']} excluded (FLOPs per sequence at N={self.seq_len})")
        lines = [head, "", self.table(), ""]
        kept = sum(s.pattern == "subquadratic-mixer" for s in self.sites)
        if kept:
            lines.append(f"of the skipped sites, {kept} are sequence mixers that are not attention (Mamba, linear "
                         "attention, short convolutions), already sub-quadratic and kept as they are")
        lines.append(f"parameters: {t['params_before']:,} -> {t['params_after']:,} "
                     f"({change(t['params_before'], t['params_after'])})")
        if t["convert"]:
            lines.append(f"converted-site FLOPs at N={self.seq_len}: {human(t['site_flops_before'])} -> "
                         f"{human(t['site_flops_after'])} ({change(t['site_flops_before'], t['site_flops_after'])})")
        mem = self.memory()
        if mem["before"] is not None:
            lines.append(f"predicted prefill memory at N={self.seq_len} (B=1, fp32): {mem['before'] / 2**20:.0f} MiB -> "
                         f"{mem['after'] / 2**20:.0f} MiB ({change(mem['before'], mem['after'])})")
            if mem["kernel_buffers"] and mem["after"] > mem["before"]:
                lines[-1] += (f", of which {mem['kernel_buffers'] / 2**20:.0f} MiB are the CPU kernels' working buffers, "
                              "the same at every N; per token the converted sites hold what the memory column says")
        for title, group in (("skipped (cannot convert)", self.skipped), ("excluded (by config)", self.excluded)):
            if group:
                lines += ["", f"{title}:"]
                lines += [f"  {s.fqn or '(model)'} [{s.kind}, {s.pattern}]: {s.reason}" for s in group]
        if self.notes:
            lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        t = self.totals()
        return f"<RewritePlan {self.model_class}: {t['convert']} convert, {t['skip']} skip, {t['exclude']} exclude>"

    def to_dict(self) -> dict:
        """JSON-able dict: config, sites (with FLOP formulas as strings) and totals; round-trips."""
        sites = []
        for s in self.sites:
            d = s.to_dict()
            d["flops_before_at_n"], d["flops_after_at_n"] = self.flops(s.flops_before), self.flops(s.flops_after)
            sites.append(d)
        return {"format": "m2convert-plan", "version": PLAN_VERSION, "model_class": self.model_class,
                "model_params": self.model_params, "config": self.config.to_dict(), "sites": sites,
                "totals": self.totals(), "memory": self.memory(), "notes": self.notes}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "RewritePlan":
        """Rebuild a plan (without model or graph) from :meth:`to_dict` output."""
        if not isinstance(data, dict) or data.get("format") != "m2convert-plan":
            raise M2Error("not an m2convert plan dict (missing format: 'm2convert-plan')")
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
            raise M2Error(f"plan format version {version!r} is not one this m2convert reads (1 to "
                          f"{PLAN_VERSION}); it was written by a newer m2convert: upgrade m2convert")
        sites = [Site.from_dict(d) for d in data["sites"]]
        return cls(sites, ConvertConfig.from_dict(data["config"]), data["model_class"],
                   model_params=data.get("model_params", 0), notes=data.get("notes", ()))

    def apply(self, inplace: bool = False, *, model=None, seed: bool = True):
        """Return the converted model: same class, every converted site swapped for its M2 module.

        Args:
            inplace: convert the planned model itself; by default a deep copy is converted and the
                original is untouched (also when apply fails).
            model: the model to convert (default: the planned one; required for plans from from_dict).
            seed: initialise from the pretrained weights (False builds the structure only, e.g. on the
                meta device before loading a checkpoint).

        Raises:
            ConversionError: ``config.strict`` and a site was skipped; or a replacement failed to build.

        Example:
            >>> model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
            ...     num_attention_heads=2, intermediate_size=64))
            >>> converted = m2.plan(model).apply()
            >>> converted.m2convert_plan["sites"][0]["fqn"]
            'encoder.layer.0.attention'
        """
        from m2convert.passes.apply import apply_plan
        return apply_plan(self, model=model, inplace=inplace, seed=seed)

    def graph_diff(self):
        """networkx.DiGraph of the module-level graph, nodes marked kept/removed/replaced/added."""
        from m2convert.passes.diff import plan_graph_diff
        return plan_graph_diff(self)

    def to_html(self, path) -> Path:
        """Write a self-contained HTML page: the table, skipped sites and the before/after graph."""
        from m2convert.passes.html import render_plan
        path = Path(path)
        path.write_text(render_plan(self), encoding="utf-8")
        return path


def selection_text(selection) -> str:
    """A site's keep score and rank for the plan's table ("" when no budget chose the kept attention).

    Example:
        >>> from m2convert.passes.site import Selection
        >>> selection_text(Selection("kl", 0.01234, 1, True, "1 layer"))
        'kl 0.01234 (#1, kept)'
    """
    if selection is None:
        return ""
    if selection.groups:
        return f"{selection.method} heads " + ", ".join(
            f"{g['heads']} {'-' if g['score'] is None else format(g['score'], '.4g')} "
            f"(#{g['rank']}{', kept' if g['kept'] else ''})" for g in selection.groups)
    score = "-" if selection.score is None else f"{selection.score:.4g}"
    return f"{selection.method} {score} (#{selection.rank}{', kept' if selection.kept else ''})"


def recurrent_plan(plan: dict, fits: dict[str, dict]) -> dict:
    """A copy of plan dict ``plan`` whose converted attention sites record the recurrent form of their
    mixers (``settings["recurrent"]``: state size, horizon, fit errors; see
    :func:`m2convert.layers.recurrent.recurrent_fits`); sites without recurrent mixers record none.

    Example:
        >>> plan = {"sites": [{"fqn": "h.0.attn", "kind": "sequence", "status": "convert", "settings": {}}]}
        >>> fits = {"h.0.attn.mixer": {"state_size": 4, "horizon": 256, "filter_error": 1e-4}}
        >>> recurrent_plan(plan, fits)["sites"][0]["settings"]["recurrent"]["state_size"]
        4
    """
    sites = []
    for site in plan.get("sites", []):
        settings = {k: v for k, v in (site.get("settings") or {}).items() if k != "recurrent"}
        found = [fit for name, fit in fits.items() if within(name, site.get("fqn", ""))]
        if site.get("kind") == "sequence" and site.get("status") == CONVERT and found:
            settings["recurrent"] = dict(found[0])
        sites.append({**site, "settings": settings})
    return {**plan, "sites": sites}


def record_recurrent(model) -> None:
    """Make ``model.m2convert_plan`` (when it has one) record its recurrent mixers; run on every model
    ``m2.to_recurrent`` returns, and by ``m2.save_pretrained``.

    Example:
        >>> converted = m2.convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_layer=1,
        ...     n_embd=32, n_head=2)).eval(), filter_order=16)
        >>> recurrent = m2.to_recurrent(converted, state_size=4, horizon=256).model     # calls record_recurrent
        >>> print(RewritePlan.from_dict(recurrent.m2convert_plan).table())              # doctest: +ELLIPSIS
        #  module          ...  recurrent
        ...
        0  transformer.h.0.attn  ...  S=4, fit ...
        ...
    """
    plan = getattr(model, "m2convert_plan", None)
    if isinstance(plan, dict):
        model.m2convert_plan = recurrent_plan(plan, recurrent_fits(model))


RECURRENT_MODEL_HOOKS.append(record_recurrent)
