"""The book as a reader meets it: build it, open every chapter in headless Chromium, look.

The test builds the book from scratch into a temporary folder (`jupyter-book build --all -W`,
so any warning fails), serves it on 127.0.0.1, and lets Chromium load each chapter page inside
a small checker page that reports, per chapter: the page title, every image (loaded? size?)
and any error output. It also leaves two screenshots in `_build/screenshots/` for a person to
look at. Chromium comes from the distribution (`apt-get install chromium`); `.ci/run` installs it.
"""

import functools
import html as html_lib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = [ch["file"] for part in yaml.safe_load((ROOT / "_toc.yml").read_text())["parts"]
            for ch in part["chapters"] if ch["file"].startswith("notebooks/")]

CHECKER = """<!doctype html><meta charset="utf-8"><title>checker</title>
<pre id="result">pending</pre>
<script>
const pages = %s;
const results = [];
function check(i) {
  if (i == pages.length) {
    document.getElementById("result").textContent = JSON.stringify(results);
    return;
  }
  const frame = document.createElement("iframe");
  frame.style.width = "1280px"; frame.style.height = "20000px";
  frame.onload = async () => {
    const mj = frame.contentWindow.MathJax;
    if (mj && mj.startup && mj.startup.promise) await mj.startup.promise;  // equations typeset
    const doc = frame.contentDocument;
    const main = doc.querySelector("main") || doc.body;
    const h1 = main.querySelector("h1");
    results.push({
      page: pages[i],
      title: h1 ? h1.textContent.replace(/#$/, "").trim() : null,
      images: [...main.querySelectorAll(".cell_output img, img")].map(img => ({
        src: img.getAttribute("src"), complete: img.complete,
        width: img.naturalWidth, height: img.naturalHeight,
        output: !!img.closest(".cell_output")})),
      tracebacks: main.querySelectorAll(".output.traceback, .traceback").length,
      stderr: [...main.querySelectorAll(".output.stderr")].map(e => e.textContent.slice(0, 300)),
      traceback_text: main.textContent.includes("Traceback (most recent call last)"),
      math: main.querySelectorAll(".math").length,
      typeset: main.querySelectorAll("mjx-container").length,
    });
    frame.remove();
    check(i + 1);
  };
  frame.src = pages[i];
  document.body.appendChild(frame);
}
check(0);
</script>"""


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the browser test and was not found: "
                "install it with `apt-get install chromium` (or set CHROMIUM=/path/to/chrome)")


def chromium(*args: str, timeout: int = 120) -> str:
    cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-quic", "--hide-scrollbars", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Build the book from scratch and serve it on 127.0.0.1; yields (html folder, base URL)."""
    out = tmp_path_factory.mktemp("book")
    build = subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", "--all",
                            "-W", "--path-output", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (f"the book does not build cleanly:\n{build.stdout[-3000:]}\n"
                                   f"{build.stderr[-3000:]}")
    html = out / "_build" / "html"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield html, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def report(site):
    html, base = site
    (html / "checker.html").write_text(CHECKER % json.dumps([f"{c}.html" for c in CHAPTERS]))
    dom = chromium("--virtual-time-budget=60000", "--dump-dom", f"{base}/checker.html")
    found = re.search(r'<pre id="result">(\[.*?\])</pre>', dom, re.S)
    assert found, f"the checker page did not finish; Chromium printed:\n{dom[-2000:]}"
    return {r["page"]: r for r in json.loads(html_lib.unescape(found.group(1)))}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_in_browser(report, chapter):
    page = report[f"{chapter}.html"]
    prefix = Path(chapter).name[:2]
    # a chapter's title is 'N. Title'; an appendix notebook's (A1_x) is unnumbered
    title = rf"{int(prefix)}\. \S" if prefix.isdigit() else r"[A-Z]"
    assert page["title"] and re.match(title, page["title"]), \
        f"{chapter}: expected a title matching {title!r}, the page shows {page['title']!r}"
    figures = [img for img in page["images"] if img["output"]]
    assert figures, f"{chapter}: no figure in the rendered page (every chapter shows at least one)"
    broken = [img["src"] for img in page["images"]
              if not (img["complete"] and img["width"] > 0 and img["height"] > 0)]
    assert not broken, f"{chapter}: images that did not load or have no size: {broken}"
    assert page["tracebacks"] == 0 and not page["traceback_text"], \
        f"{chapter}: the page shows a traceback"
    assert not page["stderr"], f"{chapter}: the page shows error output (stderr): {page['stderr']}"
    assert page["typeset"] >= page["math"], \
        (f"{chapter}: {page['math']} equations but only {page['typeset']} typeset by MathJax "
         "(is it served locally?)")


def test_screenshots(site):
    """Two pages a person should look at after a change: the intro and the evaluation chapter."""
    html, base = site
    shots = ROOT / "_build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = [("intro", f"{base}/book/intro.html"), ("chapter", f"{base}/{CHAPTERS[-1]}.html")]
    for name, url in pages:
        target = shots / f"{name}.png"
        target.unlink(missing_ok=True)
        chromium("--window-size=1280,1600", "--virtual-time-budget=10000",
                 f"--screenshot={target}", url)
        assert target.exists() and target.stat().st_size > 10_000, f"no screenshot of {url}"
