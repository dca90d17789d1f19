'''CRP concepts of token-major layers: features on the last dimension.

CRP's ``ChannelConcept`` takes dimension 1 for the concepts, the channels of ``[batch, channels, height, width]``.
Transformers hold their signal as ``[batch, tokens, features]`` (ViT, DeiT, the MLPs of every transformer) or
``[batch, height, width, features]`` (Swin, ConvNeXt's MLP): there dimension 1 is the tokens, and a condition on
``ChannelConcept`` would select tokens, not features. :py:class:`FeatureConcept` takes the last dimension instead.

Attention heads are concepts as well (:py:class:`HeadConcept`): where a layer of the model outputs the heads side by
side on its last dimension, ``[batch, tokens, heads * head_dim]``, a head is the block of its features. In timm's
attention (ViT, DeiT, CaiT, Swin, ...) the output of the heads passes ``attn.norm`` (an identity, unless the model
normalizes it) before the projection ``attn.proj`` mixes them: ``HeadConcept(heads)`` on ``<block>.attn.norm`` takes
a head's output. On the fused projection ``attn.qkv``, ``HeadConcept(heads, chunks=3)`` takes a head's queries, keys
and values together; under CP-LRP only the values carry relevance. CRP addresses layers of the model only, so heads
need a module whose output holds them apart: torchvision's ``nn.MultiheadAttention`` computes its heads inside, and
the modules the graph canonizer adds (``<block>.canonizer_attention.weighting``) exist only inside the composite's
context, after CRP has looked its layers up.

:func:`concept_for` picks the concept of a layer from what it computes.
'''
import math
from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from crp.concepts import ChannelConcept
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

#: layers whose features are on the last dimension of their output, whatever its rank
_LAST_DIMENSION = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GELU)


def _features_first(tensor: torch.Tensor) -> torch.Tensor:
    '''``tensor`` with its last dimension moved to dimension 1 (``[batch, features, tokens...]``).'''
    return tensor.movedim(-1, 1) if tensor.dim() > 2 else tensor


class FeatureConcept(ChannelConcept):
    '''Concepts along the last dimension of a layer's output (``[batch, ..., features]``), for token-major layers; on
    a ``[batch, features]`` output it is ``ChannelConcept``. Neuron indices (``mask_rf``, receptive fields) count the
    positions (tokens) of one feature, as ``ChannelConcept`` counts the pixels of one channel.'''
    @staticmethod
    def mask(batch_id: int, concept_ids: List, layer_name=None):
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(grad[batch_id])
            mask[..., concept_ids] = 1
            grad[batch_id] = grad[batch_id] * mask
            return grad
        return mask_fct

    @staticmethod
    def mask_rf(batch_id: int, c_n_map: Dict[int, List], layer_name=None):
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            moved = _features_first(grad)
            flat = moved.reshape(*moved.shape[:2], -1)
            mask = torch.zeros_like(flat[batch_id])
            for feature, neurons in c_n_map.items():
                mask[feature, neurons] = 1
            flat = flat.clone()
            flat[batch_id] = flat[batch_id] * mask
            return flat.view(moved.shape).movedim(1, -1) if grad.dim() > 2 else flat.view(grad.shape)
        return mask_fct

    def get_rf_indices(self, output_shape, layer_name=None):
        return super().get_rf_indices(tuple(output_shape[-1:]) + tuple(output_shape[:-1]), layer_name)

    def attribute(self, relevance: torch.Tensor, mask=None, layer_name: str = None, abs_norm: bool = True):
        if isinstance(mask, torch.Tensor):
            relevance = relevance * mask
        return super().attribute(_features_first(relevance), None, layer_name, abs_norm)

    def reference_sampling(self, relevance: torch.Tensor, layer_name: str = None, max_target: str = 'sum',
                           abs_norm: bool = True):
        return super().reference_sampling(_features_first(relevance), layer_name, max_target, abs_norm)


class HeadConcept(ChannelConcept):
    '''Attention heads as concepts of a layer whose last dimension holds ``chunks`` equal blocks of ``heads`` heads
    each (``[batch, ..., chunks * heads * head_dim]``): concept ``h`` is head ``h`` in every block.

    Parameters
    ----------
    heads: int
        Number of heads.
    chunks: int
        Number of blocks of heads on the last dimension: 1 for the heads' output (timm's ``attn.norm``), 3 for a fused
        query, key and value projection (timm's ``attn.qkv``).

    Neuron indices (``mask_rf``, receptive fields) count the entries of one head: its positions (tokens), then its
    blocks, then its features.
    '''
    def __init__(self, heads: int, chunks: int = 1) -> None:
        for name, value in (('heads', heads), ('chunks', chunks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'HeadConcept: {name}={value!r} must be a positive int')
        self.heads, self.chunks = heads, chunks

    def __repr__(self) -> str:
        return f'HeadConcept(heads={self.heads}, chunks={self.chunks})'

    def _heads_first(self, tensor: torch.Tensor) -> torch.Tensor:
        '''A view of ``tensor`` as ``[batch, heads, ..., chunks, head_dim]``.'''
        features = tensor.shape[-1]
        if tensor.dim() < 2 or features % (self.chunks * self.heads):
            raise ValueError(f'{self!r}: a layer output of shape {tuple(tensor.shape)} has no {self.chunks} x '
                             f'{self.heads} heads on its last dimension ({features} features)')
        return tensor.unflatten(-1, (self.chunks, self.heads, features // (self.chunks * self.heads))).movedim(-2, 1)

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        '''``tensor`` as ``[batch, heads, entries of a head]`` (a copy).'''
        heads = self._heads_first(tensor)
        return heads.reshape(*heads.shape[:2], -1)

    def mask(self, batch_id: int, concept_ids: List, layer_name=None):
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(grad[batch_id:batch_id + 1])
            # a view: writing the heads writes their features
            self._heads_first(mask)[:, concept_ids] = 1
            grad[batch_id] = grad[batch_id] * mask[0]
            return grad
        return mask_fct

    def mask_rf(self, batch_id: int, c_n_map: Dict[int, List], layer_name=None):
        def mask_fct(grad: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros_like(grad[batch_id:batch_id + 1])
            heads = self._heads_first(mask)
            flat = torch.zeros(heads.shape[1], math.prod(heads.shape[2:]), dtype=grad.dtype, device=grad.device)
            for head, neurons in c_n_map.items():
                flat[head, neurons] = 1
            heads.copy_(flat.view(heads.shape[1:]).unsqueeze(0))
            grad[batch_id] = grad[batch_id] * mask[0]
            return grad
        return mask_fct

    def get_rf_indices(self, output_shape: Sequence[int], layer_name=None):
        return np.arange(0, math.prod(output_shape) // self.heads)

    def attribute(self, relevance: torch.Tensor, mask=None, layer_name: str = None, abs_norm: bool = True):
        if isinstance(mask, torch.Tensor):
            relevance = relevance * mask
        return super().attribute(self._flat(relevance), None, layer_name, abs_norm)

    def reference_sampling(self, relevance: torch.Tensor, layer_name: str = None, max_target: str = 'sum',
                           abs_norm: bool = True):
        return super().reference_sampling(self._flat(relevance), layer_name, max_target, abs_norm)


def token_major(module: torch.nn.Module, output: torch.Tensor) -> bool:
    '''Whether ``module`` (with this ``output``) holds its features on the last dimension: linear layers and
    LayerNorms on more than ``[batch, features]``, and every other layer but convolutions and batch norms whose output
    is ``[batch, tokens, features]`` (the blocks of a vision transformer; a CNN's activations are 4-D).'''
    if output.dim() <= 2 or isinstance(module, (_ConvNd, _BatchNorm)):
        return False
    return isinstance(module, _LAST_DIMENSION) or output.dim() == 3


def concept_for(model: torch.nn.Module, layer: str, data: torch.Tensor) -> Union[ChannelConcept, FeatureConcept]:
    '''The concept of ``layer`` of ``model``: :py:class:`FeatureConcept` where it is token-major
    (:func:`token_major`, from one forward pass of ``data`` without gradients), else CRP's ``ChannelConcept``.'''
    module = model.get_submodule(layer)
    outputs: List[torch.Tensor] = []
    handle = module.register_forward_hook(lambda module, input, output: outputs.append(output) if not outputs
                                          else None)
    try:
        with torch.no_grad():
            model(data)
    finally:
        handle.remove()
    if outputs and isinstance(outputs[0], torch.Tensor) and token_major(module, outputs[0]):
        return FeatureConcept()
    return ChannelConcept()
