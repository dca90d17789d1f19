"""Embedded demo: a compact torchvision-style ResNet and a small ViT trained on synthetic geometric shapes.

The package is self-contained (it imports nothing from the rest of :mod:`canonizers`) and provides

* :func:`make_dataset` / :func:`sample_images`: a seeded, deterministic generator of 64x64 RGB shape images
  (classes in :data:`CLASSES`), normalised as ``(rgb - 0.5) / 0.25``;
* :class:`DemoResNet` / :func:`load_demo_model`: the classifier and its shipped, trained weights
  (trained by ``scripts/train_demo.py``);
* :class:`DemoViT` / :func:`load_demo_vit`: a small torchvision Vision Transformer (8x8 patches, 4 layers) and its
  shipped, trained weights (trained by ``scripts/train_demo.py --model vit``).
"""
from .model import DEFAULT_WIDTHS, WEIGHTS_FILE, DemoResNet, load_demo_model
from .shapes import CLASSES, IMAGE_SIZE, MEAN, STD, denormalize, make_dataset, normalize, sample_images
from .vit import VIT_WEIGHTS_FILE, DemoViT, load_demo_vit

__all__ = [
    'CLASSES',
    'DEFAULT_WIDTHS',
    'IMAGE_SIZE',
    'MEAN',
    'STD',
    'VIT_WEIGHTS_FILE',
    'WEIGHTS_FILE',
    'DemoResNet',
    'DemoViT',
    'denormalize',
    'load_demo_model',
    'load_demo_vit',
    'make_dataset',
    'normalize',
    'sample_images',
]
