'''Blocks that add a shortcut to a transforming branch: the sum goes through a :py:class:`~canonizers.MaskedSum`, so
that either summand can be cut.'''
from typing import Tuple

import torch

from .blocks import BlockCanonizer
from .cuts import BRANCHES, RESIDUAL, SKIP, BlockCatalog, ResolvedCut
from .masked_sum import MaskedSum, stack_summands
from .patch import ModulePatch

#: the order of the summands stacked for the sum: the shortcut first, as zennit does
SUMMANDS = (SKIP, RESIDUAL)


def residual_sum(block: torch.nn.Module, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    '''Add the shortcut and the transforming branch of ``block`` through its masked sum.'''
    return block.canonizer_sum(stack_summands(shortcut, branch))


class ResidualSumCanonizer(BlockCanonizer):
    '''Base of the canonizers whose blocks add a shortcut to a transforming branch through a
    :py:class:`~canonizers.MaskedSum` named ``canonizer_sum``; the ``skip`` branch is the shortcut, the ``residual``
    branch the transforming one. Subclasses give the rewritten forward as the static method :py:meth:`forward`.'''
    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'forward', self.forward.__get__(module))
        patch.set_attribute(module, 'canonizer_sum', MaskedSum(dim=1).train(module.training))

    def update(self, cut: ResolvedCut) -> None:
        self.module.canonizer_sum.mask = cut.mask([[(self.name, branch)] for branch in SUMMANDS])

    @staticmethod
    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        '''The rewritten forward of the block; ``self`` is the block.'''
        raise NotImplementedError


class InvertedResidualCanonizer(ResidualSumCanonizer):
    '''Base of the canonizers for inverted-residual blocks (torchvision's MobileNetV2, MobileNetV3, EfficientNet),
    which add their input to the transforming branch only when ``use_res_connect`` is set (stride 1 and as many output
    channels as input channels).

    Blocks with a residual connection add the input (the ``skip`` branch, an identity) and the transforming branch
    (``residual``) through a :py:class:`~canonizers.MaskedSum` named ``canonizer_sum``. Blocks without one are left
    alone; naming them in a cut is refused with an error that says so.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance.
    '''
    def branches(self, name: str, module: torch.nn.Module) -> Tuple[str, ...]:
        return BRANCHES if module.use_res_connect else ()

    def refusal(self, name: str, module: torch.nn.Module) -> str:
        return (f'block {name!r} ({type(module).__name__}) has no residual connection (it changes the stride or the '
                'number of channels), so there is no skip path to cut: all relevance through it passes its layers, '
                'and conditions on them need no cut')

    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        # the shortcut is the identity: every layer of the block is in the transforming branch
        return RESIDUAL

    def catalog_of(self, root_module: torch.nn.Module) -> BlockCatalog:
        '''The cuttable blocks of ``root_module``; naming a layer inside a block without residual connection is
        refused with the reason, too (a CRP condition on such a layer needs no cut).'''
        catalog = super().catalog_of(root_module)
        refusals = dict(catalog.refusals)
        for name, module in self.blocks(root_module).items():
            if not self.branches(name, module):
                for layer, _ in module.named_modules(prefix=name):
                    if layer != name:
                        refusals[layer] = (f'{layer!r} is a layer inside block {name!r}, which has no residual '
                                           'connection: all relevance through the block passes its layers, so '
                                           'conditions on them need no cut')
        return BlockCatalog(catalog.blocks, catalog.module_names, refusals)

    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        if module.use_res_connect:
            super().rewrite(patch, module)

    def update(self, cut: ResolvedCut) -> None:
        if self.module.use_res_connect:
            super().update(cut)
