'''Canonizers for torchvision EfficientNet B0-B7 and EfficientNetV2 S/M/L.'''
import torch
from torchvision.models.efficientnet import FusedMBConv, MBConv

from ..core.family import FamilyCanonizer
from ..core.gates import SqueezeExcitationCanonizer
from ..core.merging import ExactMergeBatchNorm
from ..core.residual import InvertedResidualCanonizer, residual_sum


class MBConvCanonizer(InvertedResidualCanonizer):
    '''Canonizer for torchvision's EfficientNet ``MBConv`` and ``FusedMBConv``: if the block has a residual
    connection, its input and its transforming branch are added by a :py:class:`~canonizers.MaskedSum`, so either can
    be cut.

    Stochastic depth is applied as in eval mode, where it is the identity: an explanation must not drop paths at
    random, and the batch norms can only be merged in eval mode anyway.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance.
    '''
    block_types = (MBConv, FusedMBConv)

    @staticmethod
    def forward(self: MBConv, input: torch.Tensor) -> torch.Tensor:
        '''Modified MBConv and FusedMBConv forward (installed on blocks with a residual connection only).'''
        return residual_sum(self, input, self.block(input))


class EfficientNetCanonizer(FamilyCanonizer):
    '''Canonizer for torchvision EfficientNet B0-B7 and EfficientNetV2 S/M/L models.

    Merges every batch norm exactly into the convolution before it, rewrites the forward of ``MBConv`` and
    ``FusedMBConv`` blocks with a residual connection to add input and transforming branch through a
    :py:class:`~canonizers.MaskedSum` (stochastic depth as in eval mode), and treats the gates of the
    squeeze-and-excitation blocks as constants, see :py:class:`~canonizers.SqueezeExcitationCanonizer`. Blocks
    without a residual connection are left alone.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance: block names (``"features.3.1"``) or glob patterns (``"features.6.*"``) whose
        skip path is cut, or a mapping of them to ``"skip"`` or ``"residual"``. Only blocks with a residual connection
        can be named.
    '''
    parts = (ExactMergeBatchNorm, MBConvCanonizer, SqueezeExcitationCanonizer)
