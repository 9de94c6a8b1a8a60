"""A small, trainable stand-in for Stable Diffusion used by the FIA benchmark and demo.

- data.py:       procedural 16x16 images of shapes (the concepts) in places (the contexts)
- model.py:      the model built from ComfyUI's own classes (SD15 config, UNet, SD1 CLIP,
                 TAESD-shaped VAE), checkpoint save/load and model-detection registration
- train.py:      seeded training recipe that writes weights/fia_toy_sd15.safetensors
- classifier.py: the judge (which concept an image shows), weights/fia_toy_classifier.safetensors
- evaluate.py:   the forget/preserve benchmark through the pack's nodes
"""
