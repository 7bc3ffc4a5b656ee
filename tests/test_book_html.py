"""Build the smoke book with warnings as errors and look at every page in headless Chromium.

The pages are the smoke-profile notebooks of tests/nbval (whose outputs nbval checks) and the book's
markdown pages. Chromium is driven through ChromeDriver's W3C WebDriver HTTP API (no extra Python package).
"""
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from aace.book import NOTEBOOKS as NOTEBOOK_PAGES

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PAGES = [*NOTEBOOK_PAGES, "gpu"]

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (make test installs them)")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke-book")
    for name in ("_config.yml", "_toc.yml", "references.bib"):
        shutil.copy(ROOT / name, root / name)
    (root / "book").mkdir()
    for page in (ROOT / "book").glob("*.md"):
        shutil.copy(page, root / "book" / page.name)
    for page in NOTEBOOK_PAGES:
        shutil.copy(ROOT / "tests" / "nbval" / f"{page}.ipynb", root / "book" / f"{page}.ipynb")
    (root / "benchmarks").mkdir()
    for included in (ROOT / "benchmarks").glob("*.md"):  # tables the markdown pages include
        shutil.copy(included, root / "benchmarks" / included.name)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run([str(jupyter_book), "build", str(root), "-W", "-n", "--keep-going"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root / "_build" / "html"


class WebDriver:
    def __init__(self, user_data_dir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={user_data_dir}"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]
        self._call("POST", f"/session/{self.session}/window/rect", {"width": 1280, "height": 1000})  # a desktop

    def _call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["value"]

    def get(self, url):
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def script(self, source):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": source, "args": []})

    def screenshot(self) -> bytes:
        """The whole page, not only the window (through Chromium's DevTools protocol), as PNG bytes."""
        import base64
        shot = self._call("POST", f"/session/{self.session}/goog/cdp/execute",
                          {"cmd": "Page.captureScreenshot", "params": {"captureBeyondViewport": True, "format": "png"}})
        return base64.b64decode(shot["data"])

    def quit(self):
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.process.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = WebDriver(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_with_its_figures_and_no_traceback(html, browser, page):
    file = html / "book" / f"{page}.html"
    assert file.is_file(), f"{file} was not built"
    browser.get(file.as_uri())
    for _ in range(100):  # until this page (not the last one) has loaded with all its images
        here = browser.script("return [document.location.href, document.readyState]")
        state = browser.script("return Array.from(document.images).map("
                               "i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])")
        pngs = [s for s in state if s[0] and s[0].endswith(".png")]
        if here == [file.as_uri(), "complete"] and all(c for _, c, _, _ in state) and \
                (pngs or page not in NOTEBOOK_PAGES):
            break
        time.sleep(0.1)
    text = browser.script("return document.body.innerText")
    assert browser.script("return document.querySelector('main h1') !== null"), f"{page}: no title"
    assert "Traceback" not in text and "Error" not in browser.script(
        "return Array.from(document.querySelectorAll('.output.traceback, .output_error')).map(e => 'Error').join('')")
    figures = [s for s in state if s[0] and s[0].endswith(".png")]
    if page in NOTEBOOK_PAGES:
        assert figures, f"{page}: no figure"
    for src, complete, width, height in figures:
        assert complete and width > 0 and height > 0, f"{page}: figure {src} did not load"
        assert (file.parent / src).stat().st_size > 0
    for _ in range(100):  # until MathJax has typeset what it will
        if not browser.script("return document.querySelector('main').innerText.includes('\\\\(')"):
            break
        time.sleep(0.1)
    main_text = browser.script("return document.querySelector('main').innerText")
    assert not any(raw in main_text for raw in ("\\(", "\\[", "$$")), f"{page}: raw LaTeX in the page"
    assert "injected-parameters" not in browser.script("return document.querySelector('main').innerHTML"), \
        f"{page}: papermill's parameter cell is shown"
    too_wide = browser.script(
        "const article = document.querySelector('article') || document.querySelector('main');"
        "return Array.from(document.querySelectorAll('main table')).filter(t => {"
        "  const box = t.closest('.cell_output') || article;"
        "  return t.getBoundingClientRect().width > box.clientWidth + 1; }).map(t => t.innerText.slice(0, 60));")
    assert not too_wide, f"{page}: table wider than the page: {too_wide}"
    if page in NOTEBOOK_PAGES and page != "own_training_loop":  # a how-to page, whose first line says what it offers
        first = browser.script("const p = Array.from(document.querySelectorAll('main p')).find("
                               "p => !p.closest('details, summary, .cell_input')); return p ? p.innerText : ''")
        assert first.startswith("Finding"), f"{page}: the first paragraph is not the finding: {first[:80]!r}"
    shot = browser.screenshot()
    (html / "screenshots").mkdir(exist_ok=True)
    (html / "screenshots" / f"{page}.png").write_bytes(shot)  # a full-page picture of what a reader sees


def test_formulas_render_without_internet(html, browser):
    """MathJax is served from the book itself: the formulas of the loss page are typeset, not shown raw."""
    file = html / "book" / "aace_loss.html"
    browser.get(file.as_uri())
    for _ in range(100):
        typeset = browser.script("return document.querySelectorAll('mjx-container').length")
        if typeset:
            break
        time.sleep(0.1)
    assert typeset > 0, "no formula was typeset (MathJax did not load)"
    assert browser.script("return Array.from(document.scripts).some(s => /mathjax/i.test(s.src) && "
                          "s.src.startsWith('file:'))")
    assert "\\(" not in browser.script("return document.querySelector('main').innerText")


# Raw Python a reader did not ask for, in the pages' prose (issue 32, item 4).
RAW_REPRS = ("[0, 1, 2", "{'", "fashion_mnist", "no_cutout", " None", " True", " False", "seed(s)", " 1 runs",
             "the The ")
# Pages whose code a reader would copy: the rest show no code outside a collapsed cell.
CODE_PAGES = {"aace_loss", "own_training_loop", "claims"}


@pytest.mark.parametrize("page", PAGES)
def test_prose_holds_no_raw_python_and_code_shows_only_where_a_reader_copies_it(html, browser, page):
    file = html / "book" / f"{page}.html"
    browser.get(file.as_uri())
    for _ in range(100):
        if browser.script("return document.readyState") == "complete":
            break
        time.sleep(0.1)
    prose = browser.script("return Array.from(document.querySelectorAll('main p, main li')).filter("
                           "p => !p.closest('.cell_input, pre, table')).map(p => { const c = p.cloneNode(true); "
                           "c.querySelectorAll('code').forEach(e => e.remove()); return c.textContent; }).join('\\n')")
    found = [raw.strip() for raw in RAW_REPRS if raw in prose]
    assert not found, f"{page}: raw Python in the prose: {found}"
    headers = browser.script("return Array.from(document.querySelectorAll('main th')).map(c => c.textContent)"
                             ".join('\\n')")   # a table's row and column names are read as words too
    found = [raw.strip() for raw in RAW_REPRS if raw in headers]
    assert not found, f"{page}: raw Python in a table's headers: {found}"
    visible = browser.script("return Array.from(document.querySelectorAll('main .cell_input')).filter("
                             "c => !c.closest('details') && c.offsetParent !== null).length")
    if page not in CODE_PAGES:
        assert visible == 0, f"{page}: {visible} code cell(s) shown that a reader did not ask for"
