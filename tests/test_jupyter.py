"""`make lab` serves the notebooks, and a chapter runs top to bottom in its kernel.

The test starts the very command a reader types, `make lab`, on 127.0.0.1 with a free
port and a random token (Jupyter reads them from JUPYTER_PORT and JUPYTER_TOKEN), in a
process group of its own, with Jupyter's and IPython's configuration and runtime files
in a temporary folder. It waits for the server to answer and checks that the JupyterLab
page and the `python3` kernel are served. Then it opens a session for
notebooks/01_data.ipynb, as JupyterLab does (REST API), and runs every code cell of
chapter 1 in order through the kernel's websocket: each reply must be "ok", with no
error and no stderr output. A first request checks that the kernel is the venv's Python
and imports transformer_lib from this repository. The server is always shut down (REST,
then SIGTERM, then SIGKILL), and so is the kernel. Every wait is bounded, and nothing
leaves 127.0.0.1. Nothing here is skipped: whatever is missing fails the test, with a
message that says how to install it.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
CHAPTER = ROOT / "notebooks" / "01_data.ipynb"
START_TIMEOUT = 60       # s for `make lab` until the server answers
CELL_TIMEOUT = 60        # s for one cell of chapter 1 (all of them take a few seconds)
INSTALL = "make .venv/.installed (it installs requirements.txt into .venv)"

# no proxy, whatever the environment says: every request goes to 127.0.0.1
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def require_modules():
    """Fail (never skip) when what the test needs is missing."""
    missing = []
    for module in ("jupyterlab", "jupyter_server", "websocket"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        pytest.fail(f"{', '.join(missing)} not importable by {sys.executable}: "
                    f"JupyterLab is pinned in requirements.txt; run {INSTALL}",
                    pytrace=False)
    if not (VENV / "bin" / "jupyter").exists():
        pytest.fail(f"{VENV}/bin/jupyter is missing; run {INSTALL}", pytrace=False)
    stale = subprocess.run(["make", "-s", "-q", ".venv/.installed"], cwd=ROOT)
    if stale.returncode != 0:
        pytest.fail(".venv is older than requirements.txt or pyproject.toml; "
                    f"run {INSTALL}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`make lab` in a subprocess, and requests to it."""

    def __init__(self, tmp: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "server.log"
        env = dict(os.environ, JUPYTER_PORT=str(self.port), JUPYTER_TOKEN=self.token,
                   JUPYTER_PORT_RETRIES="0",   # that port or fail, never another one
                   JUPYTER_CONFIG_DIR=str(tmp / "config"),
                   JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
                   JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
                   IPYTHONDIR=str(tmp / "ipython"))
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            ["make", "-s", "lab"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def request(self, method: str, path: str, body=None, timeout: float = 10):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"token {self.token}",
                     "Content-Type": "application/json"})
        with OPENER.open(req, timeout=timeout) as response:
            text = response.read().decode()
            return response.status, text

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"`make lab` exited with status {self.process.returncode} "
                            f"before answering:\n{self.output()}", pytrace=False)
            try:
                if self.request("GET", "/api/status", timeout=2)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        pytest.fail(f"`make lab` did not answer on {self.base} within "
                    f"{START_TIMEOUT} s:\n{self.output()}", pytrace=False)

    def stop(self) -> None:
        """REST shutdown (which also stops its kernels), then SIGTERM, then SIGKILL."""
        try:
            if self.process.poll() is None:
                self.request("POST", "/api/shutdown", timeout=5)
        except (urllib.error.URLError, OSError):
            pass
        for sig, wait in ((None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if sig is not None:
                try:
                    os.killpg(self.process.pid, sig)     # make, its shell and Jupyter
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


class Kernel:
    """The kernel behind a notebook session, spoken to over the server's websocket."""

    def __init__(self, server: Server, session_id: str, kernel_id: str):
        import websocket

        self.session = session_id
        url = (f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"
               f"?session_id={session_id}")
        self.ws = websocket.create_connection(
            url, timeout=CELL_TIMEOUT, http_no_proxy=["127.0.0.1"],
            header=[f"Authorization: token {server.token}"])

    def execute(self, code: str) -> tuple[dict, list[dict]]:
        """Run code; return the execute_reply content and the cell's iopub messages."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request",
                       "session": self.session, "username": "test", "version": "5.3",
                       "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False,
                        "stop_on_error": True}}))
        reply, outputs, idle = None, [], False
        deadline = time.monotonic() + CELL_TIMEOUT
        while reply is None or not idle:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete reply within {CELL_TIMEOUT} s")
            msg = json.loads(self.ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                reply = msg["content"]
            elif msg["channel"] == "iopub":
                if kind == "status":
                    idle = msg["content"]["execution_state"] == "idle"
                elif kind in ("stream", "error", "execute_result", "display_data"):
                    outputs.append(msg)
        return reply, outputs

    def close(self) -> None:
        self.ws.close()


PROBE = """\
import os, sys
import transformer_lib
print(sys.prefix)
print(transformer_lib.__file__)
print(os.getpid())
print(os.getcwd())
"""


def text_of(outputs: list[dict]) -> str:
    return "".join(m["content"].get("text", "") for m in outputs
                   if m["msg_type"] == "stream")


def errors_of(outputs: list[dict]) -> list[str]:
    """Tracebacks and stderr text, the outputs a reader would see as errors."""
    found = []
    for m in outputs:
        if m["msg_type"] == "error":
            found.append(f"{m['content']['ename']}: {m['content']['evalue']}")
        elif m["msg_type"] == "stream" and m["content"]["name"] == "stderr":
            found.append("stderr: " + m["content"]["text"][:500])
    return found


def stop_kernel(pid: int) -> None:
    """The server stops its kernels; if this one (in a session of its own) outlived it,
    end it, after checking that the process is still that kernel."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return                           # gone, as it should be
    if b"ipykernel_launcher" in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_make_lab_runs_chapter_1_through_the_server_kernel(tmp_path):
    require_modules()
    server = Server(tmp_path)
    kernel, kernel_pid = None, None
    try:
        server.wait_until_ready()
        status, page = server.request("GET", "/lab")
        assert status == 200 and "JupyterLab" in page, "no JupyterLab page at /lab"
        specs = json.loads(server.request("GET", "/api/kernelspecs")[1])
        assert "python3" in specs["kernelspecs"], specs

        # a session for the chapter, as JupyterLab opens one (its kernel runs in
        # notebooks/)
        path = CHAPTER.relative_to(ROOT).as_posix()
        status, body = server.request("POST", "/api/sessions", {
            "path": path, "type": "notebook", "name": CHAPTER.name,
            "kernel": {"name": "python3"}}, timeout=CELL_TIMEOUT)
        assert status == 201, body
        session = json.loads(body)
        kernel = Kernel(server, session["id"], session["kernel"]["id"])

        reply, outputs = kernel.execute(PROBE)
        assert reply["status"] == "ok", reply
        prefix, package, pid, cwd = text_of(outputs).split()
        kernel_pid = int(pid)
        assert Path(cwd) == CHAPTER.parent, f"the kernel runs in {cwd}"
        assert Path(prefix) == VENV, f"the kernel's Python is in {prefix}, not {VENV}"
        assert Path(package).resolve() == ROOT / "transformer_lib" / "__init__.py", \
            f"the kernel imports transformer_lib from {package}, not from {ROOT}"

        cells = [c for c in nbformat.read(CHAPTER, as_version=4).cells
                 if c.cell_type == "code"]
        assert len(cells) > 10
        for i, cell in enumerate(cells, 1):
            reply, outputs = kernel.execute(cell.source)
            problems = errors_of(outputs)
            assert reply["status"] == "ok" and not problems, (
                f"{CHAPTER.name}, code cell {i} of {len(cells)}: status "
                f"{reply['status']!r}, {problems or reply}\n{cell.source[:300]}")
        server.request("DELETE", f"/api/sessions/{session['id']}")
    finally:
        if kernel is not None:
            kernel.close()
        server.stop()
        if kernel_pid is not None:
            stop_kernel(kernel_pid)
    assert server.process.returncode is not None, "the server did not stop"
