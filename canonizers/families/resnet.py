'''Canonizers for torchvision ResNet, ResNeXt and Wide ResNet.'''
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..core.cuts import RESIDUAL, SKIP
from ..core.family import FamilyCanonizer
from ..core.merging import ExactMergeBatchNorm
from ..core.residual import ResidualSumCanonizer, residual_sum


class ResNetBlockCanonizer(ResidualSumCanonizer):
    '''Base of the canonizers for torchvision's ResNet blocks: the ``skip`` branch is the identity or the
    ``downsample`` path, the ``residual`` branch the convolutions; the block's one ReLU is used inside the residual
    branch and after the sum, so no condition can name it.'''
    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        if layer == 'relu':
            # torchvision's blocks call their one ReLU inside the branch and again after the sum
            raise ValueError(f'{name}.relu is used both inside the residual branch and after the sum of block '
                             f'{name!r}, so no cut isolates it: condition on a convolution or batch norm instead')
        # the downsample path is the shortcut
        return SKIP if layer.split('.')[0] == 'downsample' else RESIDUAL


class ResNetBasicBlockCanonizer(ResNetBlockCanonizer):
    '''Canonizer for torchvision's ResNet ``BasicBlock``: the shortcut (identity or downsample) and the residual branch
    are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
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


class ResNetBottleneckCanonizer(ResNetBlockCanonizer):
    '''Canonizer for torchvision's ResNet ``Bottleneck`` (also ResNeXt and Wide ResNet): the shortcut (identity or
    downsample) and the residual branch are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
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
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance: block names (``"layer3.0"``) or glob patterns (``"layer4.*"``) whose skip path
        is cut, or a mapping of them to ``"skip"`` or ``"residual"``.
    '''
    parts = (ExactMergeBatchNorm, ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer)
