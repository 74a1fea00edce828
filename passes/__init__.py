"""Capture and graph passes (installed as ``m2convert.passes``).

capture.py    torch.export of a model, hook records of module calls and outputs
graph.py      GraphIndex: module paths, projection calls, small-subgraph evaluation
attention.py  passes finding attention sites (sdpa and eager matmul-softmax-matmul)
mlp.py        pass finding dense and gated MLP sites
select.py     passes applying the config (filters, overrides) and pricing each site
pipeline.py   the ordered pass list and plan_model()
plan.py       RewritePlan (table, JSON, HTML, apply);  site.py  Site
apply.py      building replacements and the one module walker
diff.py       module-level graphs, graph diffs, RewriteDiff;  html.py  the HTML page
lower.py      lowering converted models onto the fused m2:: kernels (rules in lower_rules.py)
"""
