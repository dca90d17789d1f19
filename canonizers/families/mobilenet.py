'''Canonizers for torchvision MobileNetV2 and MobileNetV3.'''
import torch
from torchvision.models import mobilenetv2, mobilenetv3

from ..core.family import FamilyCanonizer
from ..core.gates import SqueezeExcitationCanonizer
from ..core.merging import ExactMergeBatchNorm
from ..core.residual import InvertedResidualCanonizer, residual_sum


class MobileNetV2InvertedResidualCanonizer(InvertedResidualCanonizer):
    '''Canonizer for torchvision's MobileNetV2 ``InvertedResidual``: if the block has a residual connection, its input
    and its transforming branch are added by a :py:class:`~canonizers.MaskedSum`, so either can be cut.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
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
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
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
    :py:class:`~canonizers.SqueezeExcitationCanonizer`. Blocks without a residual connection are left alone.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance: block names (``"features.3"``) or glob patterns (``"features.1?"``) whose skip
        path is cut, or a mapping of them to ``"skip"`` or ``"residual"``. Only blocks with a residual connection can
        be named.
    '''
    parts = (
        ExactMergeBatchNorm,
        MobileNetV2InvertedResidualCanonizer,
        MobileNetV3InvertedResidualCanonizer,
        SqueezeExcitationCanonizer,
    )
