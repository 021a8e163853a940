"""Vision: synthetic ground-truth images, small trained models, a pretrained ImageNet model, image I/O, overlays.

Submodules are imported on use (``from whatmatters.vision.shapes import make_shapes``), so
``import whatmatters`` stays fast.
"""
