'''Squeeze-and-excitation gates treated as constants in the backward pass.

A squeeze-and-excitation block computes ``y = s(x) * x``, a gate ``s(x)`` (pooling, two 1x1 convolutions and a
sigmoid or hard sigmoid) that scales the signal ``x`` channel-wise. Left alone, zennit multiplies the relevance by the
gate on its way through the product (the product is no module, so the relevance, which travels as the gradient, passes
through its Jacobian) and sends more relevance into the gate branch, so it is not conserved. Following Motzkus et al.
(ICIP 2022), the canonizer here treats the gate as a constant: the relevance passes through the gated signal unchanged,
and none enters the gate branch.
'''
from typing import List, Tuple

import torch
from torchvision.ops.misc import SqueezeExcitation
from zennit.canonizers import Canonizer
from zennit.types import Activation

from .patch import ModulePatch


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


class SqueezeExcitationCanonizer(Canonizer):
    '''Canonizer that treats the gate of torchvision's ``SqueezeExcitation`` as a constant in the backward pass.

    The forward of each block is rewritten to multiply by the gate through a :py:class:`ConstantGate` submodule named
    ``canonizer_gate``; the forward value is bitwise unchanged. Under a zennit composite the relevance passes through
    the gated signal unchanged and none enters the gate branch (the treatment of Motzkus et al., ICIP 2022); without
    one, the gradient is the true gradient with the gate held constant. This holds for the sigmoid gate of EfficientNet
    and the hard-sigmoid gate of MobileNetV3 alike.

    The gate branch has no cut: it carries no relevance. Removal restores the blocks exactly.
    '''
    #: module types whose forward this canonizer rewrites; they must compute ``self._scale(input) * input``
    block_types: Tuple[type, ...] = (SqueezeExcitation,)

    def __init__(self) -> None:
        self.module = None
        self.patch = ModulePatch()

    def blocks(self, root_module: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
        '''The squeeze-and-excitation blocks of ``root_module``, with their names.'''
        return [(name, module) for name, module in root_module.named_modules() if isinstance(module, self.block_types)]

    def check(self, root_module: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
        '''Validate that this canonizer can be applied to ``root_module``, without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of (str, :py:obj:`torch.nn.Module`)
            The blocks to rewrite, with their names.

        Raises
        ------
        RuntimeError
            If a block's forward is rewritten already.
        '''
        blocks = self.blocks(root_module)
        for name, module in blocks:
            if 'forward' in vars(module) or 'canonizer_gate' in module._modules:
                raise RuntimeError(
                    f'squeeze-and-excitation block {name!r} already has a rewritten forward (is another canonizer '
                    'still registered on this model? nested composite contexts are not supported): remove it first'
                )
        return blocks

    def apply(self, root_module: torch.nn.Module) -> List['SqueezeExcitationCanonizer']:
        '''Rewrite all squeeze-and-excitation blocks of ``root_module``; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:class:`SqueezeExcitationCanonizer`
            One registered instance per rewritten block.
        '''
        instances = []
        try:
            for _, module in self.check(root_module):
                instance = self.copy()
                instances.append(instance)
                instance.register(module)
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
        return instances

    def register(self, module: torch.nn.Module) -> None:
        '''Rewrite the forward of one block.

        Parameters
        ----------
        module: :py:obj:`torch.nn.Module`
            The squeeze-and-excitation block.
        '''
        self.module = module
        try:
            self.patch.set_attribute(module, 'canonizer_gate', ConstantGate().train(module.training))
            self.patch.set_attribute(module, 'forward', gated_forward.__get__(module))
        except BaseException:
            self.patch.undo()
            raise

    def remove(self) -> None:
        '''Restore the block's original forward and remove the added module.'''
        self.patch.undo()

    def copy(self) -> 'SqueezeExcitationCanonizer':
        '''Return an unregistered copy of this canonizer.'''
        return self.__class__()
