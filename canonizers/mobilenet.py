'''Canonizers for torchvision MobileNetV2 and MobileNetV3, and the inverted-residual base shared with EfficientNet.'''
from typing import Tuple

import torch
from torchvision.models import mobilenetv2, mobilenetv3

from .blocks import FamilyCanonizer
from .cuts import BRANCHES, RESIDUAL, BlockCatalog, CutLike, ResolvedCut
from .gates import SqueezeExcitationCanonizer
from .merging import ExactMergeBatchNorm
from .patch import ModulePatch
from .resnet import ResidualSumCanonizer, residual_sum


class InvertedResidualCanonizer(ResidualSumCanonizer):
    '''Base of the canonizers for inverted-residual blocks (MobileNetV2, MobileNetV3, EfficientNet), which add their
    input to the transforming branch only when ``use_res_connect`` is set (stride 1 and as many output channels as
    input channels).

    Blocks with a residual connection add the input (the ``skip`` branch, an identity) and the transforming branch
    (``residual``) through a :py:class:`~canonizers.MaskedSum` named ``canonizer_sum``. Blocks without one are left
    alone; naming them in a cut is refused with an error that says so.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
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


class MobileNetV2InvertedResidualCanonizer(InvertedResidualCanonizer):
    '''Canonizer for torchvision's MobileNetV2 ``InvertedResidual``: if the block has a residual connection, its input
    and its transforming branch are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (mobilenetv2.InvertedResidual,)

    @staticmethod
    def forward(self: mobilenetv2.InvertedResidual, x: torch.Tensor) -> torch.Tensor:
        '''Modified InvertedResidual forward for MobileNetV2 (installed on blocks with a residual connection only).'''
        return residual_sum(self, x, self.conv(x))


class MobileNetV3InvertedResidualCanonizer(InvertedResidualCanonizer):
    '''Canonizer for torchvision's MobileNetV3 ``InvertedResidual``: if the block has a residual connection, its input
    and its transforming branch are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (mobilenetv3.InvertedResidual,)

    @staticmethod
    def forward(self: mobilenetv3.InvertedResidual, input: torch.Tensor) -> torch.Tensor:
        '''Modified InvertedResidual forward for MobileNetV3 (installed on blocks with a residual connection only).'''
        return residual_sum(self, input, self.block(input))


class MobileNetCanonizer(FamilyCanonizer):
    '''Canonizer for torchvision MobileNetV2 and MobileNetV3 (small and large) models.

    Merges every batch norm exactly into the convolution before it (also the last one of each MobileNetV2 block, which
    is not inside a ``Conv2dNormActivation``), rewrites the forward of ``InvertedResidual`` blocks with a residual
    connection to add input and transforming branch through a :py:class:`~canonizers.MaskedSum`, and treats the gates
    of MobileNetV3's squeeze-and-excitation blocks (hard sigmoid) as constants, see
    :py:class:`~canonizers.gates.SqueezeExcitationCanonizer`. Blocks without a residual connection are left alone.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance: block names (``"features.3"``) or glob patterns (``"features.1?"``) whose skip
        path is cut, or a mapping of them to ``"skip"`` or ``"residual"``. Only blocks with a residual connection can
        be named.
    '''
    def __init__(self, cut: CutLike = None) -> None:
        super().__init__([
            ExactMergeBatchNorm(),
            MobileNetV2InvertedResidualCanonizer(),
            MobileNetV3InvertedResidualCanonizer(),
            SqueezeExcitationCanonizer(),
        ], cut)

    def copy(self) -> 'MobileNetCanonizer':
        '''Return a copy of this canonizer with the same cut.'''
        return self.__class__(self.cut)
