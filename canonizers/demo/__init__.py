"""Embedded demo: a compact torchvision-style ResNet trained on synthetic geometric shapes.

The package is self-contained (it imports nothing from the rest of :mod:`canonizers`) and provides

* :func:`make_dataset` / :func:`sample_images`: a seeded, deterministic generator of 64x64 RGB shape images
  (classes in :data:`CLASSES`), normalised as ``(rgb - 0.5) / 0.25``;
* :class:`DemoResNet` / :func:`load_demo_model`: the classifier and its shipped, trained weights
  (trained by ``scripts/train_demo.py``).
"""
from .model import DEFAULT_WIDTHS, WEIGHTS_FILE, DemoResNet, load_demo_model
from .shapes import CLASSES, IMAGE_SIZE, MEAN, STD, denormalize, make_dataset, normalize, sample_images

__all__ = [
    'CLASSES',
    'DEFAULT_WIDTHS',
    'IMAGE_SIZE',
    'MEAN',
    'STD',
    'WEIGHTS_FILE',
    'DemoResNet',
    'denormalize',
    'load_demo_model',
    'make_dataset',
    'normalize',
    'sample_images',
]
