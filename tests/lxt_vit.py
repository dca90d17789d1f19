'''The LXT 2.1 reference on torchvision's ``vit_b_16``: CP-LRP as LXT computes it (its efficient rules for
torchvision's vision transformer: attention weights constant, LayerNorm with its standard deviation constant, the
identity rule on GELU; the relevance is ``x * x.grad``), and AttnLRP from LXT's rules (:func:`attnlrp_patches`).

LXT patches torchvision's classes for the whole process, so the test runs this file in a process of its own::

    python tests/lxt_vit.py OUT.pt [cp-lrp|attnlrp]

writes the input relevance of :func:`build`'s model and input there. The test builds the same model and input with
:func:`build` (the same seeds, the same torch) and compares.
'''
import sys
from typing import Tuple

import torch
import torchvision

#: the explained class
TARGET = 3


def build() -> Tuple[torch.nn.Module, torch.Tensor]:
    '''``vit_b_16`` at 64x64 with random weights, LayerNorm parameters, position embedding and class token made random
    (fresh ones are 1, 0 and 0, which test nothing), in float64; and an input.'''
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=64).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and 'ln' in name:
                scale = 1.0 if name.endswith('weight') else 0.0
                parameter.copy_(scale + 0.2 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
        model.encoder.pos_embedding.normal_(0, 0.2, generator=generator)
        model.class_token.normal_(0, 0.2, generator=generator)
        model.heads.head.weight.normal_(0, 0.05, generator=generator)
    data = torch.randn(1, 3, 64, 64, generator=generator, dtype=torch.float64)
    return model, data


def attnlrp_patches() -> dict:
    '''LXT's AttnLRP rules for torchvision's vision transformer, from LXT's own efficient rules: LXT 2.1 maps
    torchvision's ViT to CP-LRP only, and applies AttnLRP to attention by dividing the gradient of queries and keys by
    4 and of values by 2 (``lxt.efficient.patches.wrap_attention_forward``: the uniform rule on ``q @ k^T`` and on
    ``weights @ v``, the gradient through the softmax being its rule). Dividing before the input projection is the same
    (it is linear).'''
    from functools import partial

    from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
    from lxt.efficient.rules import divide_gradient
    from torchvision.models import vision_transformer

    def attention_forward(self, query, key, value, *args, **kwargs):
        return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                                     *args, **kwargs)

    return {
        vision_transformer.nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
        vision_transformer.nn.LayerNorm: partial(patch_method, layer_norm_forward),
        vision_transformer.nn.MultiheadAttention: partial(patch_method, attention_forward, keep_original=True),
    }


def lxt_relevance(rules: str = 'cp-lrp') -> torch.Tensor:
    '''The input relevance of LXT's CP-LRP (``rules="cp-lrp"``, LXT's map for torchvision's ViT) or AttnLRP
    (``"attnlrp"``, :func:`attnlrp_patches`) for :data:`TARGET`.'''
    from lxt.efficient import monkey_patch
    from torchvision.models import vision_transformer

    monkey_patch(vision_transformer, attnlrp_patches() if rules == 'attnlrp' else None)
    model, data = build()
    data.requires_grad_()
    output = model(data)
    output[0, TARGET].backward()
    return (data * data.grad).detach()


if __name__ == '__main__':
    torch.save(lxt_relevance(sys.argv[2] if len(sys.argv) > 2 else 'cp-lrp'), sys.argv[1])
