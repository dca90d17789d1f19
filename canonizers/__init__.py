'''zennit canonizers that cut named parallel paths, for isolated CRP conditional heatmaps.'''
from .cuts import PerSampleCut
from .masked_sum import MaskedSum
from .merging import ExactMergeBatchNorm
from .resnet import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer, ResNetCanonizer

__all__ = [
    'ExactMergeBatchNorm',
    'MaskedSum',
    'PerSampleCut',
    'ResNetBasicBlockCanonizer',
    'ResNetBottleneckCanonizer',
    'ResNetCanonizer',
]
