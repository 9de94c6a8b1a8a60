"""A real ComfyUI server (``python main.py`` in a subprocess) and its HTTP client, and a
chromium executable for the editor tests. Stdlib only.

:class:`ComfyServer` starts the ComfyUI of :func:`devkit.comfyui.comfyui_path` with this
repository symlinked into ``BASE/custom_nodes`` (as :data:`PACK_DIR_NAME`), plus, with
``tiny_models=True`` (the default), ``devkit/server_plugin`` as a custom-node package that
registers the tiny test models and the toy model for checkpoint detection (so
CheckpointLoaderSimple loads the tiny checkpoints of :mod:`devkit.zoo` and the toy
checkpoint of :mod:`devkit.toy.model`). That plugin imports ``devkit``: the server gets a
``PYTHONPATH`` entry holding only a ``devkit`` link (no other package of this repository,
so the pack's ``fia_core`` and ``nodes`` stay invisible to the server except as the
custom node ComfyUI loads). Nothing of it lives in the ComfyUI tree or ships with the pack.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from .comfyui import REPO_ROOT, comfyui_path, use_cpu

log = logging.getLogger(__name__)

DEVKIT_DIR = Path(__file__).resolve().parent
#: Folder name the pack gets inside ``BASE/custom_nodes`` of a test server (the key of
#: the pack in ``/api/workflow_templates`` and in ``/extensions/<name>/``).
PACK_DIR_NAME = os.environ.get("FIA_PACK_DIR_NAME", "ComfyUI-FIA")
#: Folder name of ``devkit/server_plugin`` inside ``BASE/custom_nodes``.
TINY_MODELS_PACKAGE = "fia_test_tiny_models"


class ComfyServerError(RuntimeError):
    """A ComfyServer request, start or prompt failed (message holds the log tail)."""


def chromium_path() -> str | None:
    """A chromium executable for browser tests: ``$FIA_CHROMIUM``, else ``chromium``,
    ``chromium-browser``, ``google-chrome`` on PATH; None when there is none."""
    env = os.environ.get("FIA_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py`` of the test ComfyUI as a context manager.

    ::

        with ComfyServer(tmp_path, models={"checkpoints/tiny.safetensors": ckpt},
                         wait_for="/object_info/CheckpointLoaderSimple") as srv:
            history = srv.wait(srv.post_prompt(graph))

    base_dir: ``--base-directory`` (custom_nodes/, models/, input/, output/, temp/,
        user/ are created there; the ComfyUI tree is not written).
    custom_nodes: packages symlinked into ``base_dir/custom_nodes``: a mapping
        ``{folder name: path}`` or paths (named by their basename). Default: this repo
        as ``PACK_DIR_NAME``. Pass ``()`` for none.
    tiny_models: also install ``devkit/server_plugin`` (as ``fia_test_tiny_models``),
        which registers the tiny and toy model configs for checkpoint detection.
    models: ``{"checkpoints/x.safetensors": source path}`` placed (symlinked) under
        ``base_dir/models``; ``files``: the same relative to ``base_dir`` (e.g. input/).
    wait_for: path polled until HTTP 200 (default ``/object_info``); startup_timeout
        seconds (generous: cold machines were 10x slower).
    The server log goes to ``log_path`` (default ``base_dir/comfyui-server.log``); every
    :class:`ComfyServerError` carries its tail.
    """

    def __init__(self, base_dir: str | os.PathLike,
                 custom_nodes: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None = None,
                 *, tiny_models: bool = True,
                 models: Mapping[str, str | os.PathLike] | None = None,
                 files: Mapping[str, str | os.PathLike] | None = None,
                 wait_for: str = "/object_info", startup_timeout: float = 240.0,
                 port: int | None = None, extra_args: Iterable[str] = (),
                 python: str | None = None, log_path: str | os.PathLike | None = None,
                 comfy_dir: str | os.PathLike | None = None):
        self.base_dir = Path(base_dir).resolve()
        if custom_nodes is None:
            custom_nodes = {PACK_DIR_NAME: REPO_ROOT}
        if not isinstance(custom_nodes, Mapping):
            custom_nodes = {Path(p).name: p for p in custom_nodes}
        self.custom_nodes = {k: Path(v).resolve() for k, v in custom_nodes.items()}
        self.tiny_models = tiny_models
        self.models = dict(models or {})
        self.files = dict(files or {})
        self.wait_for = wait_for
        self.startup_timeout = startup_timeout
        self.port = port
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui-server.log"
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_path()
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_base(self) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cn = self.base_dir / "custom_nodes"
        for name, src in self.custom_nodes.items():
            _place(cn / name, src)
        if self.tiny_models:
            _place(cn / TINY_MODELS_PACKAGE, DEVKIT_DIR / "server_plugin")
            # the plugin imports devkit: a PYTHONPATH folder holding only devkit
            _place(self.base_dir / ".pythonpath" / "devkit", DEVKIT_DIR)
        for rel, src in self.models.items():
            _place(self.base_dir / "models" / rel, src)
        for rel, src in self.files.items():
            _place(self.base_dir / rel, src)

    def start(self) -> "ComfyServer":
        self._prepare_base()
        self.port = self.port or free_port()
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        if use_cpu():
            cmd.insert(2, "--cpu")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        if self.tiny_models:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.base_dir / ".pythonpath"), env.get("PYTHONPATH", "")) if p)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ (cd {self.comfy_dir}; {' '.join(cmd)})\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_dir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._error(f"ComfyUI exited with {self.proc.returncode} during startup")
            try:
                status, _, _ = self.request("GET", self.wait_for, timeout=10)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = repr(e)
            time.sleep(0.25)
        raise self._error(f"ComfyUI not ready after {self.startup_timeout:.0f} s "
                          f"(GET {self.wait_for}: {last})")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT to the server's process group, then SIGKILL if it hangs."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI did not stop on SIGINT; killing it")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- diagnostics ---------------------------------------------------------------
    def log_tail(self, chars: int = 6000) -> str:
        try:
            if self._log_file is not None:
                self._log_file.flush()
            data = self.log_path.read_bytes()
        except OSError:
            return "<no server log>"
        return data[-chars:].decode("utf-8", "replace")

    def _error(self, msg: str) -> ComfyServerError:
        return ComfyServerError(f"{msg}\n--- ComfyUI log ({self.log_path}), tail ---\n{self.log_tail()}")

    # -- HTTP --------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0
                ) -> tuple[int, Mapping[str, str], bytes]:
        """Low-level request; returns (status, headers, body bytes) for any status."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers or {}), e.read()

    def get(self, path: str, raw: bool = False, timeout: float = 60.0) -> Any:
        """GET ``path``; decoded JSON (or bytes when ``raw``). Raises on non-2xx."""
        status, _, data = self.request("GET", path, timeout=timeout)
        if not 200 <= status < 300:
            raise self._error(f"GET {path} -> HTTP {status}: {data[:2000]!r}")
        return data if raw else json.loads(data)

    def post(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        status, _, data = self.request("POST", path, body, timeout=timeout)
        if not 200 <= status < 300:
            raise self._error(f"POST {path} -> HTTP {status}: {data[:4000]!r}")
        return json.loads(data) if data else None

    def post_prompt(self, api_graph: Mapping[str, Any]) -> str:
        """Queue an API-format graph; returns prompt_id. An invalid graph (HTTP 400)
        raises ComfyServerError with ComfyUI's ``error`` and ``node_errors``."""
        status, _, data = self.request("POST", "/prompt",
                                       {"prompt": api_graph, "client_id": self.client_id})
        if status != 200:
            try:
                info = json.loads(data)
                detail = json.dumps({"error": info.get("error"), "node_errors": info.get("node_errors")}, indent=1)
            except ValueError:
                detail = data[:4000].decode("utf-8", "replace")
            raise self._error(f"POST /prompt -> HTTP {status}:\n{detail}")
        return json.loads(data)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt finished; returns its history
        entry (``outputs[node_id]`` holds each node's UI output). Raises
        ComfyServerError on an execution error, a dead server or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self._error(f"ComfyUI is not running (waiting for {prompt_id})")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry is not None:
                st = entry.get("status") or {}
                if st.get("status_str") == "error":
                    msgs = [m for m in st.get("messages", []) if m and m[0] == "execution_error"]
                    raise self._error(f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}")
                if st.get("completed", True):
                    return entry
            time.sleep(poll)
        raise self._error(f"prompt {prompt_id} not finished after {timeout:.0f} s")

    def run(self, api_graph: Mapping[str, Any], timeout: float = 300.0) -> dict:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(api_graph), timeout)


def _place(dst: Path, src: str | os.PathLike) -> None:
    """Symlink ``src`` at ``dst`` (replacing an existing link/file), or copy if links fail."""
    src = Path(src).resolve()
    if not src.exists():
        raise FileNotFoundError(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    try:
        dst.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def sd15_api_graph(ckpt_name: str, positive: str = "a cat", negative: str = "blurry",
                   seed: int = 0, steps: int = 3, cfg: float = 5.0, size: int = 64,
                   save_prefix: str | None = "fia_test") -> dict:
    """API-format graph CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler ->
    VAEDecode -> SaveImage (or PreviewImage when ``save_prefix`` is None). Node ids:
    "ckpt", "pos", "neg", "latent", "ksampler", "decode", "image"."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "ksampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["ckpt", 2]}},
    }
    if save_prefix is None:
        g["image"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    else:
        g["image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": save_prefix}}
    return g
