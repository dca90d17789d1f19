"""Small torchvision Vision Transformer for the synthetic shapes and its embedded weights.

:class:`DemoViT` is a configuration of :class:`torchvision.models.VisionTransformer` (it inherits its modules, names
and forward unchanged), so whatever holds for torchvision's ViT under :class:`canonizers.GraphCanonizer` (torch.fx
tracing, constant attention weights, LayerNorms with constant standard deviation) holds for the demo ViT too, and
its layer names are torchvision's (``encoder.layers.encoder_layer_3.mlp.0``, ...).
"""
from __future__ import annotations

import torch
from torchvision.models import VisionTransformer

from .model import load_shipped
from .shapes import CLASSES, IMAGE_SIZE

__all__ = ['VIT_WEIGHTS_FILE', 'DemoViT', 'load_demo_vit']

VIT_WEIGHTS_FILE: str = 'vit_weights.pt'


class DemoViT(VisionTransformer):
    """A 4-layer ViT with 8x8 patches for 64x64 RGB inputs: 64 patch tokens and a class token.

    The forward is torchvision's: ``conv_proj`` (the patch embedding) -> class token and position embedding ->
    ``encoder.layers.encoder_layer_0..3`` (pre-norm blocks of ``nn.MultiheadAttention`` and a GELU MLP, each with a
    residual connection) -> ``encoder.ln`` -> the class token -> ``heads.head``. Every encoder layer outputs
    ``[batch, 65, hidden_dim]``, features on the last dimension (see :class:`canonizers.crp.FeatureConcept`).

    Parameters
    ----------
    num_classes : int, optional
        Number of output logits; defaults to the number of shape classes.
    hidden_dim : int, optional
        Width of the tokens.
    num_heads : int, optional
        Attention heads per layer; must divide ``hidden_dim``.
    mlp_dim : int, optional
        Hidden width of each MLP.
    num_layers : int, optional
        Number of encoder layers.
    patch_size : int, optional
        Height and width of a patch; must divide 64.
    """

    def __init__(
        self,
        num_classes: int = len(CLASSES),
        hidden_dim: int = 128,
        num_heads: int = 4,
        mlp_dim: int = 256,
        num_layers: int = 4,
        patch_size: int = 8,
    ) -> None:
        # no dropout: the training data are generated afresh and plentiful, and eval mode would drop it anyway
        super().__init__(
            image_size=IMAGE_SIZE,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            num_classes=num_classes,
        )


def load_demo_vit(device: str | torch.device = 'cpu') -> DemoViT:
    """Load the demo ViT with the weights shipped in this package (trained by ``scripts/train_demo.py --model vit``).

    Parameters
    ----------
    device : str or torch.device, optional
        Device to put the model on.

    Returns
    -------
    DemoViT
        The trained model in eval mode.
    """
    return load_shipped(DemoViT(), VIT_WEIGHTS_FILE, device)
