'''Squeeze-and-excitation gates treated as constants in the backward pass.

A squeeze-and-excitation block computes ``y = s(x) * x``, a gate ``s(x)`` (pooling, two 1x1 convolutions and a
sigmoid or hard sigmoid) that scales the signal ``x`` channel-wise. Left alone, zennit multiplies the relevance by the
gate on its way through the product (the product is no module, so the relevance, which travels as the gradient, passes
through its Jacobian) and sends more relevance into the gate branch, so it is not conserved. Following Motzkus et al.
(ICIP 2022), the canonizer here treats the gate as a constant: the relevance passes through the gated signal unchanged,
and none enters the gate branch.
'''
from typing import Tuple

import torch
from torchvision.ops.misc import SqueezeExcitation
from zennit.types import Activation

from .patch import ModulePatch
from .rewrites import ForwardRewrite


class ConstantGate(torch.nn.Module, Activation):
    '''The gated product ``input * gate``, with the gate treated as a constant in the backward pass.

    The forward value is exactly the product. No gradient flows into the gate. For the gradient of the input there are
    two cases:

    * **Without a zennit composite**, the gradient is the true gradient with the gate held constant:
      ``gate * grad_output``.
    * **Under a zennit composite**, relevance travels as the gradient, and the product is LRP-decomposed as a linear
      map with the constant diagonal weight ``gate``: ``R_input = input * gate * R_output / (input * gate)``, i.e.
      ``R_input = R_output``. The module therefore declares itself an activation (it subclasses
      :py:class:`zennit.types.Activation`), so that every composite that passes relevance through activations
      unchanged (all LRP composites of zennit map activations to :py:class:`zennit.rules.Pass`) passes it through
      the product unchanged, too. Composites without a rule for activations (e.g. ``ExcitationBackprop``) see the
      plain gradient, as they do for every other activation.

    The gate is passed as a keyword argument on purpose: zennit's hooks see positional arguments only, and a rule that
    replaced the gradient of two positional inputs with the single gradient of the output would fail.
    '''
    def forward(self, input: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
        '''Multiply ``input`` by the detached ``gate``.

        Parameters
        ----------
        input: :py:obj:`torch.Tensor`
            The signal.
        gate: :py:obj:`torch.Tensor`
            The gate, broadcastable to ``input``; no gradient flows into it.

        Returns
        -------
        :py:obj:`torch.Tensor`
            ``input * gate``, bitwise the same as ``gate * input``.
        '''
        return input * gate.detach()


def gated_forward(self: SqueezeExcitation, input: torch.Tensor) -> torch.Tensor:
    '''The rewritten forward of a squeeze-and-excitation block; ``self`` is the block.'''
    scale = self._scale(input)
    return self.canonizer_gate(input, gate=scale)


class SqueezeExcitationCanonizer(ForwardRewrite):
    '''Canonizer that treats the gate of torchvision's ``SqueezeExcitation`` as a constant in the backward pass.

    The forward of each block is rewritten to multiply by the gate through a :py:class:`ConstantGate` submodule named
    ``canonizer_gate``; the forward value is bitwise unchanged. Under a zennit composite the relevance passes through
    the gated signal unchanged and none enters the gate branch (the treatment of Motzkus et al., ICIP 2022); without
    one, the gradient is the true gradient with the gate held constant. This holds for the sigmoid gate of EfficientNet
    and the hard-sigmoid gate of MobileNetV3 alike.

    The gate branch carries no relevance, so there is nothing to cut. Removal restores the blocks exactly.
    '''
    #: module types whose forward this canonizer rewrites; they must compute ``self._scale(input) * input``
    block_types: Tuple[type, ...] = (SqueezeExcitation,)

    def layer_refusal(self, name: str, module: torch.nn.Module, layer: str) -> str:
        return (f'{name}.{layer} computes the gate of squeeze-and-excitation block {name!r}, which is constant in the '
                'backward pass: no relevance flows into it by construction, so a condition on it has none; condition '
                f'on {name!r} itself or on a layer before it instead')

    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'canonizer_gate', ConstantGate().train(module.training))
        patch.set_attribute(module, 'forward', gated_forward.__get__(module))
