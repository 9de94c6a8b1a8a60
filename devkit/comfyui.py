"""Locating upstream ComfyUI and importing it into this process (stdlib only at module level).

Where ComfyUI comes from (:func:`comfyui_path`)
    1. the ComfyUI this pack is installed in (repo at ``<ComfyUI>/custom_nodes/<pack>``),
    2. ``$COMFYUI_PATH``,
    3. ``${FIA_CACHE:-~/.cache/fia-comfyui}/ComfyUI-<version>``, set up by
       ``tests/setup_env.sh`` (0.3.75 is fetched when missing).
The version of 3. is :func:`comfyui_version`: ``$FIA_COMFYUI_VERSION``, else the one the
running venv was built for (``tests/setup_env.sh`` writes ``<venv>/fia-comfyui-version``),
else :data:`DEFAULT_VERSION`.

The ComfyUI tree is never written: bytecode writing is switched off and every
folder_paths directory (models, input, output, temp, user, custom_nodes) is moved to a
temporary base directory (:func:`set_base_directory`).
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
# The repository as imported (symlinks kept): a pack symlinked into custom_nodes.
_REPO_AS_IMPORTED = Path(os.path.abspath(__file__)).parent.parent
#: The ComfyUI versions the test setup provides (tests/setup_env.sh).
SUPPORTED_VERSIONS = ("0.3.75", "0.8.0")
DEFAULT_VERSION = "0.3.75"
#: File in the venv (sys.prefix) naming the ComfyUI version that venv was set up for.
VENV_VERSION_FILE = "fia-comfyui-version"


class ComfyUINotFound(RuntimeError):
    """ComfyUI could not be located or imported."""


def cache_dir() -> Path:
    """``$FIA_CACHE`` or ``~/.cache/fia-comfyui``: the venvs and ComfyUI trees live there."""
    return Path(os.environ.get("FIA_CACHE") or Path.home() / ".cache" / "fia-comfyui")


def comfyui_version() -> str:
    """The cached ComfyUI version to use when neither an enclosing ComfyUI nor
    ``$COMFYUI_PATH`` decides (see the module docstring)."""
    env = os.environ.get("FIA_COMFYUI_VERSION", "").strip()
    if env:
        return env
    try:
        return (Path(sys.prefix) / VENV_VERSION_FILE).read_text().strip() or DEFAULT_VERSION
    except OSError:
        return DEFAULT_VERSION


#: The cached version this process asks for (what benchmark reports record).
COMFYUI_VERSION = comfyui_version()


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_path(fetch: bool = True) -> Path:
    """The ComfyUI directory tests run against (see the module docstring).

    When the cached tree is missing and ``fetch`` is true, runs ``tests/setup_env.sh`` for
    :func:`comfyui_version`. Raises :class:`ComfyUINotFound`.
    """
    for repo in (_REPO_AS_IMPORTED, REPO_ROOT):
        if repo.parent.name == "custom_nodes" and _is_comfyui(repo.parent.parent):
            return repo.parent.parent
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        if not _is_comfyui(p):
            raise ComfyUINotFound(f"$COMFYUI_PATH={env} holds no ComfyUI (main.py + comfy/)")
        return p
    version = comfyui_version()
    p = cache_dir() / f"ComfyUI-{version}"
    if not _is_comfyui(p) and fetch:
        log.info("ComfyUI not found at %s; running tests/setup_env.sh", p)
        r = subprocess.run(["bash", str(TESTS_DIR / "setup_env.sh")],
                           env=dict(os.environ, FIA_COMFYUI_VERSION=version),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise ComfyUINotFound(f"tests/setup_env.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if not _is_comfyui(p):
        raise ComfyUINotFound(f"no ComfyUI at {p} (run: FIA_COMFYUI_VERSION={version} bash tests/setup_env.sh)")
    return p


def installed_version(path: str | os.PathLike | None = None) -> str:
    """``__version__`` of the ComfyUI at ``path`` (default :func:`comfyui_path`), read from
    its ``comfyui_version.py`` without importing it; "" when absent."""
    root = Path(path) if path is not None else comfyui_path(fetch=False)
    try:
        text = (root / "comfyui_version.py").read_text()
    except OSError:
        return ""
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else ""


def version_tuple(version: str) -> tuple[int, ...]:
    """"0.8.0" -> (0, 8, 0); non-numeric parts are dropped."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def use_cpu() -> bool:
    """Tests force ComfyUI onto the CPU unless ``FIA_TEST_GPU=1``."""
    return os.environ.get("FIA_TEST_GPU", "") not in ("1", "true", "yes")


_COMFY: types.SimpleNamespace | None = None


def import_comfy(base_directory: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """Import upstream ComfyUI into this process, once; later calls return the same.

    Follows the order ComfyUI needs: ComfyUI root first on sys.path (the one place this
    package touches sys.path: ComfyUI's own modules import each other as top-level
    names), ``args.cpu = True`` (unless ``FIA_TEST_GPU=1``) before
    ``comfy.model_management``, ``utils.install_util`` before ``nodes`` (``nodes`` puts
    ``comfy/`` first on sys.path, after which ``utils`` would be ``comfy/utils.py``).
    Bytecode writing is switched off so the ComfyUI tree stays untouched.
    ``init_extra_nodes`` is not run: only the core nodes of ``nodes.py`` are registered.

    ``base_directory``: see :func:`set_base_directory` (call it before anything writes).

    Returns a namespace with ``nodes``, ``comfy`` (the package, submodules imported:
    sd, sample, samplers, model_base, model_patcher, model_management, supported_models,
    sd1_clip, sdxl_clip, utils, patcher_extension, weight_adapter, lora), ``folder_paths``,
    ``args``, ``path`` (the ComfyUI directory) and ``version`` (its ``__version__``).
    Raises :class:`ComfyUINotFound` when ComfyUI is missing or fails to import.
    """
    global _COMFY
    if _COMFY is None:
        _COMFY = _do_import_comfy()
    if base_directory is not None:
        set_base_directory(base_directory)
    return _COMFY


def _do_import_comfy() -> types.SimpleNamespace:
    root = comfyui_path()
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    rs = str(root)
    while rs in sys.path:
        sys.path.remove(rs)
    sys.path.insert(0, rs)
    try:
        # The pack has a nodes/ package: an earlier `import nodes` would have found it.
        stale = sys.modules.get("nodes")
        if stale is not None and not str(getattr(stale, "__file__", "")).startswith(rs):
            raise ComfyUINotFound(f"'nodes' was already imported from {stale.__file__}, not ComfyUI")
        import comfy.options  # noqa: F401  (args parsing stays off: parse_args([]))
        from comfy.cli_args import args
        if use_cpu():
            args.cpu = True
        import comfy.model_management  # noqa: F401
        import utils.install_util  # noqa: F401
        import folder_paths
        import nodes
        import comfy.lora
        import comfy.model_base
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.sd1_clip
        import comfy.sdxl_clip
        import comfy.supported_models
        import comfy.supported_models_base
        import comfy.taesd.taesd
        import comfy.utils
        import comfy.weight_adapter
    except ComfyUINotFound:
        raise
    except Exception as e:  # ImportError, missing deps, a broken tree
        raise ComfyUINotFound(f"importing ComfyUI from {root} failed: {e!r}") from e
    if not str(nodes.__file__).startswith(rs):
        raise ComfyUINotFound(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    return types.SimpleNamespace(nodes=nodes, comfy=comfy, folder_paths=folder_paths,
                                 args=args, path=root, version=installed_version(root))


def set_base_directory(path: str | os.PathLike) -> Path:
    """Point ComfyUI's folder_paths at ``path`` (what ``--base-directory`` does at start).

    Every registered folder under the current base (models/*, custom_nodes, input,
    output, temp, user) is moved under ``path``; paths registered elsewhere (e.g. by
    a pack) stay. Creates ``path`` with input/output/temp/user/models. Returns it.
    """
    ns = import_comfy()
    fp = ns.folder_paths
    new = Path(path).resolve()
    for sub in ("input", "output", "temp", "user", "models", "custom_nodes"):
        (new / sub).mkdir(parents=True, exist_ok=True)
    old = fp.base_path

    def move(p: str) -> str:
        rel = os.path.relpath(p, old)
        return p if rel == ".." or rel.startswith(".." + os.sep) else str(new / rel)

    for name, (paths, exts) in list(fp.folder_names_and_paths.items()):
        fp.folder_names_and_paths[name] = ([move(p) for p in paths], exts)
    fp.models_dir = move(fp.models_dir)
    fp.output_directory = move(fp.output_directory)
    fp.temp_directory = move(fp.temp_directory)
    fp.input_directory = move(fp.input_directory)
    fp.user_directory = move(fp.user_directory)
    fp.base_path = str(new)
    fp.filename_list_cache.clear()
    ns.args.base_directory = str(new)
    return new


def pack_module_name(path: str | os.PathLike = REPO_ROOT) -> str:
    """The module name ComfyUI gives a custom-node package folder."""
    return str(Path(path).resolve()).replace(".", "_x_")


def load_pack(path: str | os.PathLike = REPO_ROOT) -> types.ModuleType:
    """Load a custom-node package exactly as ComfyUI does (``nodes.load_custom_node``):
    under a mangled module name, its NODE_CLASS_MAPPINGS merged into
    ``nodes.NODE_CLASS_MAPPINGS``. Loads once per process; returns the module.

    The pack's own objects are attributes of the result: ``pack.fia_core``,
    ``pack.nodes.comfy_adapter``, ... (each subpackage is an attribute of its parent once
    imported). That ``fia_core`` is not the top-level ``import fia_core`` of the pure-library
    tests: see the rule in the ``devkit`` docstring."""
    ns = import_comfy()
    path = str(Path(path).resolve())
    name = pack_module_name(path)
    if name in sys.modules and path in ns.nodes.LOADED_MODULE_DIRS.values():
        return sys.modules[name]
    ok = asyncio.run(ns.nodes.load_custom_node(path))
    if not ok or name not in sys.modules:
        raise RuntimeError(f"ComfyUI could not load the custom node package at {path} (see log)")
    return sys.modules[name]
