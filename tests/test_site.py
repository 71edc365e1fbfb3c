"""The rendered site, checked as a reader meets it: every page of ``site/`` opened in headless Chromium.

``make docs`` builds ``site/`` from the notebooks executed into ``build/`` (``make test`` runs it before
pytest; the fixture below runs it again, a no-op when nothing changed). Each page is served over
``http://127.0.0.1`` and fails the test on a console error or uncaught exception, an image whose
``naturalWidth`` is 0, a link into the site that answers 404, or a link to an anchor its page lacks.
The browser is Debian's ``chromium`` (``.ci/run`` installs it), driven by Playwright through
``executable_path``: Playwright's own browser download needs a network CI does not have. Without
Chromium the test fails, naming the package.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
from conftest import REPO

# Chromium, and the `site` fixture executes every notebook when build/ is stale: not for make test-fast
pytestmark = pytest.mark.slow

SITE = REPO / "site"
SCREENSHOTS = REPO / "build" / "screenshots"
CHAPTERS = [
    "01_convert",
    "02_dataset",
    "03_sampler_and_loader",
    "04_collate",
    "05_launch",
    "06_object_storage",
    "07_which_loader",
    "08_data_evolves",
]
PAGE_TIMEOUT_MS = 20_000

# After load: make lazy images load now, wait for every image to decode (or fail), then report.
PAGE_REPORT_JS = """
async () => {
  const images = [...document.images];
  for (const img of images) img.loading = "eager";
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  return {
    brokenImages: images
      .filter((img) => img.naturalWidth === 0)
      .map((img) => (img.currentSrc || img.src).slice(0, 120)),
    images: images.length,
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href),
    ids: [...document.querySelectorAll("[id]")].map((e) => e.id),
  };
}
"""


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "Chromium not found: install Debian's package (`apt-get install -y chromium`; .ci/run does) "
            "or set CHROMIUM=/path/to/chromium",
            pytrace=False,
        )
    return path


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) in a thread; yield the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # the browser closing a connection early (a page closed mid-load) is not a site problem
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def page_urls(site: Path, base: str) -> list[str]:
    """Every HTML page of the site, as a browser would ask for it (``dir/`` for ``dir/index.html``)."""
    urls = []
    for html in sorted(site.rglob("*.html")):
        rel = html.relative_to(site).as_posix()
        urls.append(base + (rel.removesuffix("index.html") if rel.endswith("index.html") else rel))
    return urls


def link_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def check_site(site: Path, screenshots: dict[str, Path] | None = None) -> tuple[dict[str, list[str]], dict]:
    """Open every page of ``site`` in Chromium; return ``({page: [problems]}, stats)``.

    ``screenshots`` maps a page path (``""`` for the index, ``"chapters/04_collate/"``) to a PNG to write.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    problems: dict[str, list[str]] = {}
    stats: dict = {"pages": 0, "images": 0, "links": 0, "seconds_per_page": []}
    with serve(site) as base, sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"], headless=True)
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        local_links: dict[str, str] = {}  # link -> first page that has it
        anchors: dict[str, str] = {}  # link with a #fragment -> first page that has it
        ids: dict[str, set[str]] = {}  # page URL -> the ids its elements carry
        try:
            for url in page_urls(site, base):
                name = url.removeprefix(base) or "index"
                found: list[str] = []
                page = context.new_page()
                page.on(
                    "console",
                    lambda msg, found=found: (
                        found.append(f"console error: {msg.text}") if msg.type == "error" else None
                    ),
                )
                page.on("pageerror", lambda exc, found=found: found.append(f"uncaught exception: {exc}"))
                start = time.perf_counter()
                response = page.goto(url, wait_until="load", timeout=PAGE_TIMEOUT_MS)
                if response is None or response.status >= 400:
                    found.append(f"answers {response.status if response else 'nothing'}")
                report = page.evaluate(PAGE_REPORT_JS)
                page.wait_for_timeout(100)  # console messages of late scripts
                stats["seconds_per_page"].append(time.perf_counter() - start)
                found += [f"image with naturalWidth 0: {src}" for src in report["brokenImages"]]
                ids[url] = set(report["ids"])
                for link in report["links"]:
                    target, fragment = urldefrag(link)
                    if target.startswith(base):
                        local_links.setdefault(target, name)
                        if fragment:
                            anchors.setdefault(link, name)
                if screenshots and url.removeprefix(base) in screenshots:
                    page.screenshot(path=str(screenshots[url.removeprefix(base)]))
                page.close()
                stats["pages"] += 1
                stats["images"] += report["images"]
                if found:
                    problems[name] = found
        finally:
            browser.close()
        for link, name in local_links.items():
            status = link_status(link)
            if status == 404:
                problems.setdefault(name, []).append(f"link answers 404: {urlsplit(link).path}")
        for link, name in anchors.items():
            target, fragment = urldefrag(link)
            if target in ids and unquote(fragment) not in ids[target]:
                problems.setdefault(name, []).append(
                    f"link to a missing anchor: {urlsplit(link).path}#{fragment}"
                )
        stats["links"] = len(local_links)
        stats["anchors"] = len(anchors)
    return problems, stats


@pytest.fixture(scope="session")
def site() -> Path:
    """The built site; ``make docs`` rebuilds it (and executes the notebooks) only when out of date."""
    subprocess.run(["make", "--no-print-directory", "docs"], cwd=REPO, check=True)
    assert (SITE / "index.html").is_file()
    return SITE


def test_site_has_every_page(site: Path):
    expected = ["index.html", "benchmark/index.html", "scale/index.html"]
    expected += [f"chapters/{c}/index.html" for c in CHAPTERS]
    expected += ["api/lance_cookbook/index.html", "api/data_prep/index.html"]
    missing = [p for p in expected if not (site / p).is_file()]
    assert not missing, f"pages missing from site/: {missing}"


def test_chapters_show_their_outputs(site: Path):
    """The chapters are rendered from executed notebooks: outputs and figures, not bare code."""
    for chapter in CHAPTERS:
        html = (site / "chapters" / chapter / "index.html").read_text(encoding="utf-8")
        assert "jp-OutputArea-output" in html, f"{chapter}: no cell outputs (was build/ executed?)"
        if chapter not in (
            "03_sampler_and_loader",
            "06_object_storage",
            "07_which_loader",
        ):  # print, not plot
            assert 'src="data:image/png;base64,' in html, f"{chapter}: no figure"


def test_api_reference_is_generated(site: Path):
    html = (site / "api" / "lance_cookbook" / "index.html").read_text(encoding="utf-8")
    for name in ("make_loader", "ImageCollate", "open_dataset", "ShardSampler", "to_device"):
        assert f'id="lance_cookbook.{name}"' in html, f"{name} missing from the API reference"
    html = (site / "api" / "data_prep" / "index.html").read_text(encoding="utf-8")
    assert 'id="data_prep.convert.convert"' in html


def test_every_page_in_chromium(site: Path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shots = {"": SCREENSHOTS / "index.png", "chapters/04_collate/": SCREENSHOTS / "chapter-04.png"}
    problems, stats = check_site(site, shots)
    seconds = stats["seconds_per_page"]
    print(
        f"\n{stats['pages']} pages, {stats['images']} images, {stats['links']} local links, "
        f"{stats['anchors']} anchors; "
        f"{sum(seconds):.1f} s in pages, slowest {max(seconds):.1f} s"
    )
    assert stats["pages"] >= 11
    assert not problems, "\n".join(f"{page}: {p}" for page, found in problems.items() for p in found)
    assert all(path.stat().st_size > 10_000 for path in shots.values())


def test_the_check_catches_what_it_should(tmp_path: Path):
    """A page with a console error, a broken image, a dead link and a link to a missing anchor, and a
    clean one: the check must report all four on the first and nothing on the second."""
    head = '<!doctype html><html><head><link rel="icon" href="data:,"></head>'  # no /favicon.ico request
    (tmp_path / "index.html").write_text(
        head + "<body><p>bad</p>"
        '<img src="missing.png"><a href="nowhere/">dead</a><a href="good.html#gone">gone</a>'
        "<script>console.error('boom')</script></body></html>"
    )
    (tmp_path / "good.html").write_text(
        head + '<body><h1 id="top">good</h1><a href="./#">home</a></body></html>'
    )
    problems, stats = check_site(tmp_path)
    assert stats["pages"] == 2 and "good.html" not in problems
    found = "\n".join(problems["index"])
    assert "console error: boom" in found
    assert "naturalWidth 0" in found and "missing.png" in found
    assert "link answers 404: /nowhere/" in found
    assert "link to a missing anchor: /good.html#gone" in found
