'''Canonizers for torchvision ResNet, ResNeXt and Wide ResNet.'''
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from .blocks import BlockCanonizer, FamilyCanonizer
from .cuts import RESIDUAL, SKIP, CutLike, ResolvedCut
from .masked_sum import MaskedSum
from .merging import ExactMergeBatchNorm
from .patch import ModulePatch

# the order of the summands stacked for the sum: the shortcut first, as zennit does
SUMMANDS = (SKIP, RESIDUAL)


def residual_sum(block: torch.nn.Module, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    '''Add the shortcut and the transforming branch of ``block`` through its masked sum.'''
    return block.canonizer_sum(torch.stack([shortcut, branch], dim=-1))


class ResidualSumCanonizer(BlockCanonizer):
    '''Base of the canonizers whose blocks add a shortcut to a transforming branch through a
    :py:class:`~canonizers.MaskedSum` named ``canonizer_sum``; the ``skip`` branch is the shortcut, the ``residual``
    branch the transforming one.'''
    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        patch.set_attribute(module, 'forward', self.forward.__get__(module))
        patch.set_attribute(module, 'canonizer_sum', MaskedSum(dim=-1).train(module.training))

    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        if layer == 'relu':
            # torchvision's blocks call their one ReLU inside the branch and again after the sum
            raise ValueError(f'{name}.relu is used both inside the residual branch and after the sum of block '
                             f'{name!r}, so no cut isolates it: condition on a convolution or batch norm instead')
        # the downsample path is the shortcut
        return SKIP if layer.split('.')[0] == 'downsample' else RESIDUAL

    def update(self, cut: ResolvedCut) -> None:
        self.module.canonizer_sum.mask = cut.mask([[(self.name, branch)] for branch in SUMMANDS])

    @staticmethod
    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        '''The rewritten forward of the block; ``self`` is the block.'''
        raise NotImplementedError


class ResNetBasicBlockCanonizer(ResidualSumCanonizer):
    '''Canonizer for torchvision's ResNet ``BasicBlock``: the shortcut (identity or downsample) and the residual branch
    are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (BasicBlock,)

    @staticmethod
    def forward(self: BasicBlock, x: torch.Tensor) -> torch.Tensor:
        '''Modified BasicBlock forward for ResNet.'''
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = residual_sum(self, identity, out)
        out = self.relu(out)

        return out


class ResNetBottleneckCanonizer(ResidualSumCanonizer):
    '''Canonizer for torchvision's ResNet ``Bottleneck`` (also ResNeXt and Wide ResNet): the shortcut (identity or
    downsample) and the residual branch are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (Bottleneck,)

    @staticmethod
    def forward(self: Bottleneck, x: torch.Tensor) -> torch.Tensor:
        '''Modified Bottleneck forward for ResNet.'''
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out = residual_sum(self, identity, out)
        out = self.relu(out)

        return out


class ResNetCanonizer(FamilyCanonizer):
    '''Canonizer for torchvision ResNet, ResNeXt and Wide ResNet models.

    Merges every batch norm exactly into the convolution before it, and rewrites ``BasicBlock`` and ``Bottleneck``
    forwards to add shortcut and residual branch through a :py:class:`~canonizers.MaskedSum`. Without a cut, it is a
    drop-in replacement for ``zennit.torchvision.ResNetCanonizer``, without its batch-norm epsilon error.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance: block names (``"layer3.0"``) or glob patterns (``"layer4.*"``) whose skip path
        is cut, or a mapping of them to ``"skip"`` or ``"residual"``.
    '''
    def __init__(self, cut: CutLike = None) -> None:
        super().__init__([ExactMergeBatchNorm(), ResNetBasicBlockCanonizer(), ResNetBottleneckCanonizer()], cut)

    def copy(self) -> 'ResNetCanonizer':
        '''Return a copy of this canonizer with the same cut.'''
        return self.__class__(self.cut)
