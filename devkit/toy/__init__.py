"""The toy text-to-image model: a small, trainable stand-in for Stable Diffusion that the
demo (``demo/``), the toy benchmark (``benchmarks/toy``) and the tests share.

- data.py:       procedural 16x16 images of shapes (the concepts) in places (the contexts)
- model.py:      the model built from ComfyUI's own classes (SD15 config, UNet, SD1 CLIP,
                 TAESD-shaped VAE), checkpoint save/load and model-detection registration
- classifier.py: the judge (which concept an image shows); ``python -m devkit.toy.classifier``
                 retrains it
The training recipe (``python -m benchmarks.toy.train``) and the forget/preserve benchmark
(``python -m benchmarks.toy.evaluate``) stay in benchmarks/toy, with the weights.
"""
