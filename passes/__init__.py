"""Capture and graph passes (installed as ``m2convert.passes``).

capture.py    torch.export of a model, hook records of module calls and outputs
graph.py      GraphIndex: module paths, projection calls, small-subgraph evaluation
attention.py  the attention pass and its pattern registry (sdpa, matmul-softmax-matmul, ...)
mlp.py        the MLP pass and its pattern registry (act, gated)
sharing.py    the pass skipping shared modules and tied weights
select.py     the pass applying the config (filters, overrides)
costs.py      the pass pricing each site (params, sympy FLOPs)
pipeline.py   the ordered pass list and plan_model()
plan.py       RewritePlan (table, JSON, HTML, apply);  site.py  Site and its typed layouts
apply.py      building replacements and the one module walker
diff.py       module-level graphs, graph diffs, RewriteDiff;  html.py  the HTML page
lower.py      lowering converted models onto the fused m2:: kernels (rules in lower_rules.py)
"""

if __name__ != "m2convert.passes":         # loaded from the repository root as `passes`
    from m2convert.kernels._toplevel import hand_over
    hand_over(__name__, __file__)
