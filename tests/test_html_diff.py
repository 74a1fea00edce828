"""The HTML rewrite diff: parsed back, it names every site in the table and in the before/after graph."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

import m2convert as m2

pytestmark = pytest.mark.usefixtures("one_thread")


class Page(HTMLParser):
    """Collects site rows (data-fqn), graph cells (data-site), tags and URLs of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.rows, self.cells, self.tags, self.urls, self.title = {}, [], set(), [], ""
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self._in_title = tag == "title"
        if "data-fqn" in attrs:
            self.rows[attrs["data-fqn"]] = (attrs["data-kind"], attrs["data-status"])
        if "data-site" in attrs:
            self.cells.append(attrs["data-site"])
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]

    def handle_data(self, data):
        if self._in_title:
            self.title += data


@pytest.mark.slow
def test_minilm_html_names_every_site(minilm_plan, tmp_path):
    plan = minilm_plan
    page = Page(plan.to_html(tmp_path / "minilm.html").read_text())
    assert "BertModel" in page.title
    assert page.rows == {s.fqn: (s.kind, "convert") for s in plan.sites} and len(page.rows) == 12
    for site in plan.converted:
        expected = 1 if site.kind == "sequence" else len(site.replaces)        # one mixer cell / one per linear
        assert page.cells.count(site.fqn) == expected, site.fqn
    assert "script" not in page.tags and not page.urls                        # self-contained, offline


def test_html_shows_skipped_and_excluded(tiny_model, tmp_path):
    cfg = m2.ConvertConfig(filter_order=16, overrides={r"h\.1\.": None, r"h\.0\.mlp": {"nblocks": 64}})
    plan = m2.plan(tiny_model("gpt2"), cfg)
    text = plan.to_html(tmp_path / "gpt2.html").read_text()
    page = Page(text)
    assert page.rows["transformer.h.1.attn"] == ("sequence", "exclude")
    assert page.rows["transformer.h.0.mlp"] == ("dimension", "skip")
    assert "excluded by override" in text and "nblocks" in text
    assert page.cells == ["transformer.h.0.attn"]


def test_html_of_a_plan_loaded_from_dict_has_no_graph(tiny_model, tmp_path):
    plan = m2.plan(tiny_model("llama"), m2.ConvertConfig(filter_order=16))
    back = m2.RewritePlan.from_dict(plan.to_dict())
    page = Page(back.to_html(tmp_path / "loaded.html").read_text())
    assert set(page.rows) == {s.fqn for s in plan.sites} and page.cells == []
