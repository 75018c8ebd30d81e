"""JupyterLab in a real browser: a learner's first steps after `make lab`, tested end to end.

The module starts JupyterLab from .venv with the Makefile's own command (`LAB_CMD`, printed by
`make lab-cmd`, so the two cannot drift), plus what a test needs: no browser of its own,
127.0.0.1, a free port and a token, and the short mode. Headless Chromium (Debian's, driven by
Playwright) then does what a learner does: open a notebook, Run > Run All Cells, read the page,
move a slider, edit a cell. Every wait is on JupyterLab's own state (the kernel status, the
cells' execution counts, the rendered outputs), each with a bound; no fixed sleeps. Screenshots
of each step land in test-artifacts/.

`make test` runs it (it is in tests/); alone::

    .venv/bin/python -m pytest -p no:cacheprovider -q -m browser tests/test_browser.py

It is skipped, with the reason, where there is no Chromium or no playwright.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import loracore.env

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("LORACORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a test machine: no sandbox (root in a container), no GPU, and no connection of
# Chromium's own to anywhere (updates, sync, field trials): only 127.0.0.1 is reachable here.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps",
                 "--disable-features=Translate,OptimizationHints,MediaRouter"]
# The short mode, as CI runs the notebooks, less MPLBACKEND: a learner's kernel draws inline
# figures, and Agg would draw none.
SHORT_MODE = {k: v for k, v in loracore.env.SHORT_MODE.items() if k != "MPLBACKEND"}
NOTEBOOKS = ["lessons/00_tour.ipynb", "lessons/02_lora_layer.ipynb", "labs/lab01_lora_layer.ipynb"]

pytestmark = pytest.mark.browser

if CHROMIUM is None or not Path(CHROMIUM).is_file():
    pytest.skip(f"browser tests: no Chromium on this machine ({CHROMIUM or 'none on PATH'}; Debian: "
                "apt-get install chromium, or set LORACORE_CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="browser tests: playwright is not installed (make venv installs it)")
if shutil.which("make") is None:
    pytest.skip("browser tests: no `make` to ask for the Makefile's LAB_CMD", allow_module_level=True)


# ---- JupyterLab, started as `make lab` starts it -----------------------------------------------
def lab_command() -> list[str]:
    """The Makefile's `make lab` command line, as make expands it (nothing is built or run)."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "lab-cmd"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    cmd = shlex.split(out.strip())
    assert cmd[:2] == [".venv/bin/jupyter", "lab"], f"unexpected LAB_CMD in the Makefile: {out!r}"
    return cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: its address, token, process and log."""

    url: str
    token: str
    proc: subprocess.Popen
    log: Path
    runtime_dir: Path

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def shutdown_kernels(self) -> None:
        for kernel in self.api("/api/kernels"):
            with contextlib.suppress(urllib.error.URLError):
                self.api(f"/api/kernels/{kernel['id']}", method="DELETE")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (JupyterLab shuts its kernels down), then SIGKILL to its process group after 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab from .venv, serving the repository as `make lab` does, on 127.0.0.1."""
    if not (REPO / ".venv/bin/jupyter").exists():
        pytest.fail("no .venv/bin/jupyter: run `make venv` first")
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):  # this run's screenshots only
        old.unlink()
    home = tmp_path_factory.mktemp("jupyter")
    # The learner's own Jupyter settings, workspaces and config stay out of the test (and untouched):
    # JupyterLab gets empty ones, so what shows is what a new learner sees. Only autosave is off,
    # because the test runs notebooks in the repository itself and must leave them as they were.
    user_settings = home / "settings"
    (user_settings / "@jupyterlab/docmanager-extension").mkdir(parents=True)
    (user_settings / "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings").write_text(
        '{"autosave": false}')
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(SHORT_MODE, JUPYTERLAB_SETTINGS_DIR=str(user_settings),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"))
    port, token = free_port(), secrets.token_hex(16)
    cmd = lab_command() + ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"]
    before = {nb: (REPO / nb).read_bytes() for nb in NOTEBOOKS}
    log = ARTIFACTS / "jupyterlab.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, proc, log, home / "runtime")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                server.api("/api/status")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            try:  # the poll's interval, and a quick failure if JupyterLab exited
                proc.wait(timeout=0.25)
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{server.log_tail()}")
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {server.url} within 120 s:\n{server.log_tail()}")
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.shutdown_kernels()
        _stop(proc)
        changed = [nb for nb, data in before.items() if (REPO / nb).read_bytes() != data]
        for nb in changed:  # put them back before failing, so the repository is as it was
            (REPO / nb).write_bytes(before[nb])
        assert not changed, f"the browser session wrote to {changed} (restored)"


# ---- the browser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


PANEL = ".jp-NotebookPanel"
CELLS = f"{PANEL} .jp-Notebook .jp-Cell"
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
# The kernel is connected and idle: the status bar says so ("Python 3 (ipykernel) | Idle"), and so does
# the notebook's execution indicator. The indicator alone reads "idle" before any kernel is attached,
# and a Run All clicked then runs nothing.
KERNEL_IDLE = (f"""[...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /^Python 3 \\(ipykernel\\) \\| Idle$/"""
               f""".test(e.textContent.trim())) && document.querySelector('{PANEL} .jp-Notebook-ExecutionIndicator')"""
               f"""?.dataset.status === 'idle'""")


@dataclass
class Learner:
    """One browser tab on JupyterLab, with what its console said."""

    lab: Lab
    page: object
    console: list[str] = field(default_factory=list)

    def diagnostics(self) -> str:
        """What the browser's console said, the kernels' state and JupyterLab's last log lines."""
        log = "\n".join(self.console[-60:]) or "(empty)"
        try:
            kernels = self.lab.api("/api/kernels")
        except Exception as exc:  # the report must come out whatever state the server is in
            kernels = repr(exc)
        return (f"--- browser console ---\n{log}\n--- kernels: {kernels}\n"
                f"--- JupyterLab log ---\n{self.lab.log_tail(20)}")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A step of the test: on any failure, a screenshot, and the browser console in the message."""
        try:
            yield
        except Exception as exc:
            with contextlib.suppress(Exception):
                self.screenshot(f"{name}-FAILED")
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc}\n"
                                 f"(screenshot: test-artifacts/{name}-FAILED.png)\n{self.diagnostics()}") from exc

    def wait_for(self, js: str, what: str, timeout_s: float, arg: object = None) -> object:
        """Wait (bounded) until the page function `js` returns something truthy; return it."""
        try:
            return self.page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=250).json_value()
        except sync_api.TimeoutError:
            raise AssertionError(f"waited {timeout_s:g} s for {what}") from None

    def open(self, url: str, path: str) -> int:
        """Go to `url`, wait until `path` is shown with an idle kernel; return its number of cells."""
        self.page.goto(url)
        n_cells = len(json.loads((REPO / path).read_text())["cells"])
        self.wait_for(f"""n => document.querySelectorAll('{PANEL}').length === 1
                && document.querySelectorAll('{CELLS}').length === n && ({KERNEL_IDLE})""",
                      f"{path} to open with its {n_cells} cells and an idle kernel", 120, n_cells)
        title = self.page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current").text_content()
        assert title.strip() == Path(path).name, f"the open tab is {title!r}, not {path}"
        return n_cells

    def run_all(self, timeout_s: float) -> list[str]:
        """Run > Run All Cells from the menu bar; wait until the kernel is idle again with every code
        cell numbered, or stopped at an error. Returns the cells' prompts."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        return self.wait_until_idle(timeout_s, "Run All Cells")

    def wait_until_idle(self, timeout_s: float, what: str, *, first: int = 1) -> list[str]:
        """Wait until no cell is queued or running, the kernel is idle, and either every code cell has
        an execution count of at least `first` or one output is an error (JupyterLab skips the rest)."""
        return self.wait_for(f"""first => {{
            const prompts = [...document.querySelectorAll('{PANEL} .jp-CodeCell .jp-InputArea-prompt')]
                .map(p => p.textContent.trim());
            if (!({KERNEL_IDLE}) || prompts.some(p => p.includes('*'))) return null;
            const ran = prompts.every(p => {{ const m = p.match(/^\\[(\\d+)\\]:$/); return m && +m[1] >= first; }});
            return (ran || document.querySelector('{PANEL} {STDERR}')) ? prompts : null;
        }}""", f"{what} to finish", timeout_s, first)

    def cell(self, index: int):
        return self.page.locator(CELLS).nth(index)

    def errors(self) -> list[str]:
        """Texts of the outputs JupyterLab shows in red (errors and anything on stderr)."""
        return self.page.locator(f"{PANEL} {STDERR}").all_text_contents()

    def screenshot(self, name: str, element=None) -> Path:
        """The whole notebook in one picture: the window is made as tall as the notebook's cells.
        Given a cell (a locator), that cell alone: a whole tall notebook costs seconds of rendering."""
        path = ARTIFACTS / f"{name}.png"
        if element is not None:
            element.screenshot(path=str(path))
            return path
        size = self.page.viewport_size
        # How much of the cells lies below the notebook's visible area (0 when all fits), from the top.
        below = f"""() => {{
            const s = document.querySelector('{PANEL} .jp-WindowedPanel-outer');
            const cells = document.querySelectorAll('{CELLS}');
            if (!s || !cells.length) return 0;
            s.scrollTop = 0;
            return Math.ceil(cells[cells.length - 1].getBoundingClientRect().bottom - s.getBoundingClientRect().bottom + 16);
        }}"""
        for _ in range(4):  # cells drawn for the first time (content-visibility) may change height
            extra = self.page.evaluate(below)
            height = self.page.viewport_size["height"] + extra
            if extra <= 0 or height > 16000:
                break
            self.page.set_viewport_size({"width": size["width"], "height": height})
            self.page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        self.page.screenshot(path=str(path), full_page=True)
        self.page.set_viewport_size(size)
        return path


@pytest.fixture(scope="module")
def context(browser):
    """One browser profile for the module: JupyterLab's scripts come from its HTTP cache (and their
    compiled code from Chromium's code cache) after the first page, instead of being fetched from
    the server and compiled again for every test. Each test still gets its own page and kernel."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def learner(lab, context) -> Iterator[Learner]:
    page = context.new_page()
    page.set_default_timeout(30_000)
    learner = Learner(lab, page)
    page.on("console", lambda m: learner.console.append(f"[{m.type}] {m.text}"))
    page.on("pageerror", lambda e: learner.console.append(f"[pageerror] {e}"))
    try:
        yield learner
    finally:
        page.close()
        with contextlib.suppress(Exception):
            lab.shutdown_kernels()  # each step starts from a fresh kernel; frees the model's memory


def index_of(path: str, marker: str) -> int:
    """The index of the first cell of `path` whose source contains `marker`."""
    cells = json.loads((REPO / path).read_text())["cells"]
    found = [i for i, c in enumerate(cells) if marker in "".join(c["source"])]
    assert found, f"{path} has no cell containing {marker!r}: update tests/test_browser.py with the notebook"
    return found[0]


def open_url(lab: Lab) -> str:
    """The page `make lab` opens in the learner's browser: given a notebook to open, JupyterLab
    writes it to its runtime folder as jpserver-file-to-run-PID-open.html and opens that."""
    pages = list(lab.runtime_dir.glob("jpserver-file-to-run-*-open.html"))
    assert len(pages) == 1, f"expected one browser-open page in {lab.runtime_dir}, found {pages}"
    url = re.search(r'href="([^"]+)"', pages[0].read_text()).group(1).replace("&amp;", "&")
    assert url.startswith(lab.url), url
    return url


# ---- the learner's steps -------------------------------------------------------------------------
def test_make_lab_serves_the_repository_and_opens_lesson_00(lab):
    """`make lab` used to serve lessons/ only; labs/, solutions/ and data/ must be reachable too."""
    for folder in ("lessons", "labs", "solutions", "data"):
        listing = lab.api(f"/api/contents/{folder}?content=1")
        assert listing["type"] == "directory" and listing["content"], folder
    assert open_url(lab).split("?")[0] == f"{lab.url}/lab/tree/lessons/00_tour.ipynb"
    # The course's overrides.json (installed into .venv by the Makefile) becomes the schema's default.
    schema = lab.api("/lab/api/settings/@jupyterlab/apputils-extension:notification")["schema"]
    assert schema["properties"]["fetchNews"]["default"] == "false", "the course's overrides.json is not installed"


def test_lesson_00_runs_in_the_browser(learner):
    path = "lessons/00_tour.ipynb"
    with learner.step("00_tour"):
        n_cells = learner.open(open_url(learner.lab), path)
        prompts = learner.run_all(timeout_s=300)
        shot = learner.screenshot("00_tour")
        assert not learner.errors(), f"red output in {path}: {learner.errors()}"
        assert all(re.fullmatch(r"\[\d+\]:", p) for p in prompts), f"not every cell ran: {prompts}"
        figure = learner.cell(index_of(path, "plt.subplots")).locator(".jp-OutputArea-output img")
        assert figure.count() == 1, "no figure under the parameter-count cell"
        assert figure.evaluate("img => img.complete && img.naturalWidth > 300"), "figure not drawn"
        answer = learner.cell(index_of(path, "model.generate")).locator(".jp-OutputArea-output").text_content()
        assert "Paris" in answer, f"the model's answer on the page is {answer!r}"
        # The course's settings override: no "get notified about official Jupyter news?" over the lesson.
        toasts = learner.page.locator(".Toastify__toast").all_text_contents()
        assert not [t for t in toasts if "news" in t.lower()], f"news pop-up shown: {toasts}"
        assert n_cells == learner.page.locator(CELLS).count() and shot.exists()


def test_lesson_02_explorer_responds_to_its_rank_slider(learner):
    path = "lessons/02_lora_layer.ipynb"
    with learner.step("02_lora_layer"):
        learner.open(f"{learner.lab.url}/lab/workspaces/lesson02/tree/{path}?token={learner.lab.token}", path)
        learner.run_all(timeout_s=300)
        assert not learner.errors(), f"red output in {path}: {learner.errors()}"
        explorer = learner.cell(index_of(path, "interactive_output"))
        # `explore(r=64, lora_alpha=16, use_rslora=False)` in the next cell: the figure the explorer
        # must show, pixel for pixel, once its rank slider reads 64 (same seeds, same drawing code).
        r64 = learner.cell(index_of(path, "explore(r=64")).locator(".jp-OutputArea-output img").get_attribute("src")
        before = explorer.locator(".widget-output img").get_attribute("src")
        rank = explorer.locator(".widget-slider", has_text="rank r")
        assert rank.locator(".widget-readout").text_content().strip() == "8"
        assert before != r64, "the explorer at r = 8 already shows the r = 64 figure"
        learner.screenshot("02_lora_layer-before", explorer)  # the explorer's cell
        handle = rank.locator(".noUi-handle")
        handle.focus()
        for _ in range(3):  # 8 -> 16 -> 32 -> 64, one option per arrow key, as a learner would
            handle.press("ArrowRight")
        learner.wait_for("""([cell, want]) => {
            const out = document.querySelectorAll('.jp-Notebook .jp-Cell')[cell];
            const img = out && out.querySelector('.widget-output img');
            return img && img.getAttribute('src') === want; }""",
                         "the explorer to redraw for r = 64", 120, [index_of(path, "interactive_output"), r64])
        assert rank.locator(".widget-readout").text_content().strip() == "64"
        learner.wait_until_idle(60, "the explorer's callbacks")
        assert not learner.errors(), f"red output after moving the slider: {learner.errors()}"
        learner.screenshot("02_lora_layer-after", explorer)  # the explorer's cell


def test_lab01_self_check_speaks_to_the_learner(learner):
    path = "labs/lab01_lora_layer.ipynb"
    check = index_of(path, "checks.check_lora_forward")
    with learner.step("lab01"):
        learner.open(f"{learner.lab.url}/lab/workspaces/lab01/tree/{path}?token={learner.lab.token}", path)
        prompts = learner.run_all(timeout_s=300)
        # Every stub is unsolved; JupyterLab's Run All goes on past a red cell, so every check fails.
        shown = learner.cell(check).locator(STDERR).all_text_contents()
        assert len(shown) == 1 and "lora_forward is not written yet" in shown[0], f"the first check shows {shown}"
        assert_not_raw(shown[0])
        for text in learner.errors():  # no check anywhere shows a traceback through loracore's own code
            assert "/loracore/" not in text and "selfcheck.py" not in text, f"a raw traceback:\n{text}"
        learner.screenshot("lab01-unsolved")
        # A learner's wrong answer (the scaling forgotten): FAIL with expected, got and a hint.
        count = max(int(m) for p in prompts for m in re.findall(r"\d+", p))
        learner.cell(check - 1).locator(".cm-content").click()
        learner.page.keyboard.press("ControlOrMeta+a")
        learner.page.keyboard.insert_text(
            "def lora_forward(x, W, b, A, B, scaling):\n    return x @ W.T + b + (x @ A.T) @ B.T")
        learner.page.keyboard.press("Shift+Enter")  # runs the solution cell, then selects the check
        learner.page.keyboard.press("Shift+Enter")
        learner.wait_for("""([cell, after]) => {
            const p = document.querySelectorAll('.jp-Notebook .jp-Cell')[cell].querySelector('.jp-InputArea-prompt');
            const m = p.textContent.trim().match(/^\\[(\\d+)\\]:$/); return m && +m[1] > after; }""",
                         "the check to run again", 60, [check, count + 1])
        learner.wait_until_idle(60, "the check")
        text = learner.cell(check).locator(".jp-OutputArea").text_content()
        for words in ("FAIL", "expected:", "got:", "hint:", "ok    B = 0", "lora_forward: 1 of 2 checks failed"):
            assert words in text, f"{words!r} not shown; the learner sees:\n{text}"
        assert_not_raw(learner.cell(check).locator(STDERR).text_content())
        learner.screenshot("lab01-wrong-answer")


def assert_not_raw(shown: str) -> None:
    """A failed self-check reads as its message, not as a Python traceback through loracore's code:
    no 'Traceback' header, no frames (files, line numbers, code) and one line."""
    assert "Traceback" not in shown and "loracore/" not in shown and not re.search(r"line \d+", shown), \
        f"the learner sees a raw traceback:\n{shown}"
    assert len([line for line in shown.splitlines() if line.strip()]) == 1, f"more than the message:\n{shown}"
