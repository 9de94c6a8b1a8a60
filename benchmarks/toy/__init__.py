"""The toy benchmark: training and evaluating the toy model of ``devkit.toy``.

- train.py:    seeded training recipe that writes weights/fia_toy_sd15.safetensors
               (``python -m benchmarks.toy.train``)
- evaluate.py: the forget/preserve benchmark through the pack's nodes
               (``python -m benchmarks.toy.evaluate``)
- weights/:    the trained toy model and its judge (devkit.toy.model.CHECKPOINT / CLASSIFIER)
"""
