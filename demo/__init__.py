"""The pack's main job as a headless demo: ``bash demo/run.sh`` (see forget_concepts.py)."""
