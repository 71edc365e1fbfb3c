"""MkDocs hook: links between chapters point at ``NN_name.ipynb``, and from a chapter to a docs page at
``../docs/page.md`` (they work in Jupyter and on a code host); on the site they must point at the rendered
page. Docstrings are plain text for ``help()`` and
``--help``: Sphinx roles (``:class:`X```) lose their role name here, and placeholders such as
``DIR/<class>/<image>``, which Markdown passes on as HTML tags (``<image>`` becomes an empty ``<img>``),
are shown as text. mkdocs-jupyter builds a notebook's table of contents from Markdown that drops code from
headings: "Why not a" for "Why not a `dict`", and an anchor the page does not have; each entry takes
its title and anchor from the rendered heading instead (same headings, same order)."""

from __future__ import annotations

import posixpath
import re

NOTEBOOK_LINK = re.compile(r'href="(?P<target>[^"#:]+\.ipynb)(?P<anchor>#[^"]*)?"')
# a chapter's link to a docs page, relative to notebooks/ in the repository (the site has no docs/ prefix)
DOCS_LINK = re.compile(r'href="\.\./docs/(?P<target>[^"#:]+\.md)(?P<anchor>#[^"]*)?"')
SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(?=<code)")
HEADING = re.compile(r'<h(?P<level>[1-6])[^>]*\bid="(?P<id>[^"]+)"[^>]*>(?P<body>.*?)</h(?P=level)>', re.S)
ANCHOR = re.compile(r'<a class="anchor-link".*?</a>', re.S)
TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)(?=[\s/>])")
# the elements Markdown, mkdocstrings and the theme write into an API page
HTML_ELEMENTS = set(
    "a abbr b blockquote br button code dd del details div dl dt em h1 h2 h3 h4 h5 h6 hr i img input kbd "
    "label li ol p pre s small span strong sub summary sup svg path table tbody td th thead tr u ul".split()
)


def _placeholders_as_text(html: str) -> str:
    return TAG.sub(lambda m: m[0] if m[2].lower() in HTML_ELEMENTS else f"&lt;{m[1]}{m[2]}", html)


def _flatten(items) -> list:
    return [entry for item in items for entry in (item, *_flatten(item.children))]


def on_page_content(html, page, config, files):
    def to_page(match: re.Match, here: str) -> str:
        target = files.get_file_from_path(posixpath.normpath(posixpath.join(here, match["target"])))
        if target is None:
            return match[0]  # mkdocs reports links to missing files itself
        return f'href="{target.url_relative_to(page.file)}{match["anchor"] or ""}"'

    html = NOTEBOOK_LINK.sub(lambda m: to_page(m, posixpath.dirname(page.file.src_uri)), html)
    if page.file.src_uri.endswith(".ipynb"):
        html = DOCS_LINK.sub(lambda m: to_page(m, ""), html)
    if page.file.src_uri.startswith("api/"):
        html = _placeholders_as_text(SPHINX_ROLE.sub("", html))
    return html


def on_page_context(context, page, config, nav):
    # after every plugin's on_page_content, so mkdocs-jupyter's table of contents is in place
    if page.file.src_uri.endswith(".ipynb"):
        entries = _flatten(page.toc)
        headings = list(HEADING.finditer(page.content))[: len(entries)]
        if len(headings) == len(entries):
            for entry, heading in zip(entries, headings, strict=True):
                entry.id = heading["id"]
                entry.title = re.sub(r"<[^>]+>", "", ANCHOR.sub("", heading["body"])).strip()
    return context
