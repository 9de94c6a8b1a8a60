"""Shared fixtures: a real, in-process ComfyUI and tiny models built through its classes.

Fixtures (all cheap: ComfyUI is imported once per session, ~2-7 s; each tiny model
builds in well under a second):

* ``comfy`` (session): the namespace of :func:`devkit.comfyui.import_comfy` (``nodes``,
  ``comfy``, ``folder_paths``, ``args``, ``path``); folder_paths points at
  ``comfy_base_dir``. Skips the test when ComfyUI cannot be found or imported, or fails
  it when ``FIA_REQUIRE_COMFY=1`` (set by ``.ci/run``).
* ``comfy_base_dir`` (session): temporary ComfyUI base directory (models/, input/,
  output/, temp/, user/, custom_nodes/) so tests never write into ComfyUI's tree.
* ``tiny_sd15``, ``tiny_sdxl`` (per test): a fresh ``clone()`` of a session-built
  ModelPatcher (seed 0). Clones share the nn.Module: patch through add_patches on
  the clone, remove hooks in ``finally``.
* ``tiny_clip``, ``tiny_sdxl_clip`` (per test): clones of session-built tiny CLIPs.
* ``tiny_vae`` (session), ``tiny_checkpoint`` (session: path of a tiny SD15
  all-in-one safetensors, see devkit.zoo.save_tiny_checkpoint).

``OMP_NUM_THREADS`` defaults to 1 for the session (see below).

Tests using ``comfy`` (directly or through another fixture) get the ``comfy`` marker;
tests in the modules of ``ALL_VERSIONS_MODULES`` get ``all_versions`` (what .ci/run runs
on ComfyUI 0.8.0 too).
Server tests should request ``comfy`` too (to skip cleanly without ComfyUI) and use
``H.ComfyServer`` (``from devkit import harness as H``).
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

# One intra-op thread unless the caller says otherwise: on a small shared CPU, tiny
# models run 10-15x faster with 1 thread than with 2 oversubscribed ones. Set before
# torch is imported; inherited by ComfyServer subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from devkit import harness as H  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent


def pytest_configure(config):
    # `pytest -c tests/pytest.ini` from the repository root without paths would collect
    # the root folder, whose __init__.py makes it a package that pytest imports (the
    # pack outside ComfyUI). Collect tests/ instead in exactly that case.
    if (config.args_source == config.ArgsSource.INVOCATION_DIR
            and Path(config.invocation_params.dir).resolve() == TESTS_DIR.parent):
        config.args[:] = [str(TESTS_DIR)]


#: Test modules that .ci/run also runs on ComfyUI 0.8.0 (marker ``all_versions``, added
#: here by file name): the harness, the nodes, the runner, the real server and editor,
#: quantized weights, SD2 and saving erased checkpoints. The rest (the pure library, the
#: toy benchmark, the demo, the performance benchmark) runs on 0.3.75 only.
ALL_VERSIONS_MODULES = ("test_harness.py", "test_nodes.py", "test_nodes_*.py", "test_runner_*.py",
                        "test_workflows_server.py", "test_browser.py", "test_quant_*.py",
                        "test_sd2*.py", "test_checkpoint_save*.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "comfy" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfy)
        if any(fnmatch.fnmatch(item.path.name, pat) for pat in ALL_VERSIONS_MODULES):
            item.add_marker(pytest.mark.all_versions)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # item.rep_setup / rep_call / rep_teardown: lets fixtures see whether the test failed
    # (test_browser reloads the editor after a failure).
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_runtest_setup(item):
    if item.get_closest_marker("browser") and H.chromium_path() is None:
        msg = "no chromium executable (install Debian's chromium or set FIA_CHROMIUM)"
        if os.environ.get("FIA_REQUIRE_BROWSER") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def comfy_base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_base")


@pytest.fixture(scope="session")
def comfy(comfy_base_dir):
    try:
        ns = H.import_comfy(comfy_base_dir)
    except H.ComfyUINotFound as e:
        if os.environ.get("FIA_REQUIRE_COMFY") == "1":
            pytest.fail(f"ComfyUI is required (FIA_REQUIRE_COMFY=1): {e}", pytrace=False)
        pytest.skip(f"ComfyUI not available: {e}")
    ns.comfy.utils.PROGRESS_BAR_ENABLED = False  # no tqdm bars in test output
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # if torch came first
    return ns


@pytest.fixture(scope="session")
def _tiny_sd15_base(comfy):
    return H.tiny_sd15_model(seed=0)


@pytest.fixture(scope="session")
def _tiny_sdxl_base(comfy):
    return H.tiny_sdxl_model(seed=0)


@pytest.fixture(scope="session")
def _tiny_clip_base(comfy):
    return H.tiny_clip(seed=0)


@pytest.fixture(scope="session")
def _tiny_sdxl_clip_base(comfy):
    return H.tiny_sdxl_clip(seed=0)


@pytest.fixture
def tiny_sd15(_tiny_sd15_base):
    return _tiny_sd15_base.clone()


@pytest.fixture
def tiny_sdxl(_tiny_sdxl_base):
    return _tiny_sdxl_base.clone()


@pytest.fixture
def tiny_clip(_tiny_clip_base):
    return _tiny_clip_base.clone()


@pytest.fixture
def tiny_sdxl_clip(_tiny_sdxl_clip_base):
    return _tiny_sdxl_clip_base.clone()


@pytest.fixture(scope="session")
def tiny_vae(comfy):
    return H.tiny_vae(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy, tmp_path_factory) -> Path:
    return H.save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "fia_tiny_sd15.safetensors", seed=0)
