'''CRP concepts of token-major layers: features on the last dimension.

CRP's ``ChannelConcept`` takes dimension 1 for the concepts, the channels of ``[batch, channels, height, width]``.
Transformers hold their signal as ``[batch, tokens, features]`` (ViT, DeiT, the MLPs of every transformer) or
``[batch, height, width, features]`` (Swin, ConvNeXt's MLP): there dimension 1 is the tokens, and a condition on
``ChannelConcept`` would select tokens, not features. :py:class:`FeatureConcept` takes the last dimension instead.

Attention heads are concepts as well: the weighting of the values the graph canonizer adds to every attention
(``<block>.canonizer_attention.weighting``, or ``<block>.canonizer_weighting`` and ``<block>.canonizer_product`` in
explicit attention) outputs ``[batch, heads, tokens, head_dim]``, each head's output apart, so ``ChannelConcept`` on
it takes heads.

:func:`concept_for` picks the concept of a layer from what it computes.
'''
from typing import Dict, List, Union

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
