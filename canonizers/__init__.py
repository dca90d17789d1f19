'''zennit canonizers that cut named parallel paths, for isolated CRP conditional heatmaps.'''
__version__ = '0.1.0'

from .core.cuts import PerSampleCut
from .core.gates import ConstantGate, SqueezeExcitationCanonizer
from .core.layers import ThresholdReLU
from .core.masked_sum import MaskedSum
from .core.merging import ExactMergeBatchNorm, LinearMerge
from .core.reuse import ReuseForward
from .families.densenet import DenseBlockCanonizer, DenseLayerCanonizer, DenseNetCanonizer, DenseNetHeadCanonizer
from .families.efficientnet import EfficientNetCanonizer, MBConvCanonizer
from .families.mobilenet import (
    MobileNetCanonizer,
    MobileNetV2InvertedResidualCanonizer,
    MobileNetV3InvertedResidualCanonizer,
)
from .families.resnet import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer
from .graph import GraphCanonizer
from .graph.conservation import NotConservedWarning
from .registry import FAMILIES  # noqa: F401 (the families' misfit warnings name the families that fit)
from .support import SupportReport, check

__all__ = [
    '__version__',
    'ConstantGate',
    'DenseBlockCanonizer',
    'DenseLayerCanonizer',
    'DenseNetCanonizer',
    'DenseNetHeadCanonizer',
    'EfficientNetCanonizer',
    'ExactMergeBatchNorm',
    'GraphCanonizer',
    'LinearMerge',
    'MBConvCanonizer',
    'MaskedSum',
    'MobileNetCanonizer',
    'MobileNetV2InvertedResidualCanonizer',
    'MobileNetV3InvertedResidualCanonizer',
    'NotConservedWarning',
    'PerSampleCut',
    'ResNetBasicBlockCanonizer',
    'ResNetBottleneckCanonizer',
    'ResNetCanonizer',
    'ReuseForward',
    'SqueezeExcitationCanonizer',
    'SupportReport',
    'ThresholdReLU',
    'check',
]
