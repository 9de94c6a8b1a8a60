"""devkit: the pack's development tooling (tests, benchmarks, the demo). Not shipped:
excluded from the registry package by ``.comfyignore``; the pack never imports it.

Modules (one concern each; importing ``devkit`` itself imports nothing):

- ``devkit.comfyui``   locate upstream ComfyUI (enclosing install, ``$COMFYUI_PATH``, or the
                       cached 0.3.75 / 0.8.0 of ``tests/setup_env.sh``, chosen by
                       ``$FIA_COMFYUI_VERSION``), import it in-process, load the pack as
                       ComfyUI does (``load_pack``)
- ``devkit.zoo``       tiny models through ComfyUI's own classes (the one CLIP factory
                       ``clip_model_class``, model configs for checkpoint detection,
                       tiny checkpoints) and helpers to run them (``encode``, ``sample``,
                       ``ffn2_keys``, ``effective_weight``)
- ``devkit.server``    ``ComfyServer``: a real ``main.py`` server in a subprocess and its
                       HTTP client; ``chromium_path`` for the editor tests
- ``devkit.server_plugin``  the custom-node package a test server loads to register the
                       tiny and toy models (installed by ComfyServer, never imported here)
- ``devkit.workflow_convert``  editor (UI) workflow -> API prompt, as the frontend does it
- ``devkit.toy``       the toy text-to-image model of the demo and the toy benchmark
- ``devkit.oracles``   independent slow references of the method's equations
- ``devkit.harness``   the one entry point for tests: ``from devkit import harness as H``
                       re-exports the public names of comfyui, zoo and server

Rules
- Imports go one way: ``devkit`` <- ``tests``, ``devkit`` <- ``benchmarks`` / ``demo``.
  devkit never imports tests, benchmarks or the demo; tests never import benchmarks or the
  demo (they run them as ``python -m benchmarks.x`` / ``python -m demo.forget_concepts`` in a
  subprocess). Nothing edits ``sys.path`` except :func:`devkit.comfyui.import_comfy`
  (ComfyUI's root must come first for its own top-level modules); scripts run as modules
  from the repository root, and ``tests/pytest.ini`` puts the root on the path.
- One fia_core per question. The pack as ComfyUI loads it (``H.load_pack()``) carries its
  own copy under a mangled module name; the pure-library tests ``import fia_core``. Tests
  of the pack's nodes and adapters take every pack object from the loaded pack
  (``pack.fia_core.build_prompt_pairs``, ``pack.nodes.comfy_adapter``), never from the
  top-level ``fia_core``; tests of the library import ``fia_core`` and never touch the
  pack. A test never passes an object of one copy to the other or compares their classes
  (``isinstance`` across copies is always False); compare values (tensors, dicts, names)
  instead.
- Test against the real ComfyUI; nothing here mocks ``comfy.*``. Helpers that compute a
  reference (``effective_weight``, ``oracles``) use ComfyUI's or their own code, never the
  pack's, so a test can fail.
"""
