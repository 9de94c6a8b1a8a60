"""Test-only custom-node package that ``devkit.server.ComfyServer`` installs into a test
server's ``custom_nodes`` (never shipped): registers the tiny test models
(``devkit.zoo``) and the toy model (``devkit.toy.model``) for checkpoint detection, so
CheckpointLoaderSimple loads their checkpoints. ``devkit`` is importable in that server
through the PYTHONPATH entry ComfyServer sets."""
from devkit import zoo
from devkit.toy import model as toy_model

zoo.register_tiny_models_for_detection()
toy_model.register_for_detection()

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
