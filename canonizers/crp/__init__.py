'''Isolated CRP conditional heatmaps for any mix of conditions, from one forward pass.

CRP's ``CondAttribution(exclude_parallel=True)`` isolates a condition by a partial backward pass, which needs the same
layer names in all conditions of a batch: it runs one forward and backward pass per group of conditions with the same
layers, refuses mixed layers in ``generate``, and returns the heatmaps grouped rather than in condition order.

:py:class:`IsolatingCondAttribution` gives the same heatmaps in condition order for any mix of conditions, from one
forward pass per distinct input sample: the backward pass from the output down to the conditioned layers is shared by
the conditions, and only the part below each condition's layers is computed per condition
(:py:mod:`canonizers.partial_backward`). It works with any composite and any model CRP works with.

:py:func:`cuts_for` turns conditions into the cuts of this package's canonizers that isolate them the other way: all
relevance reaching the input passes through each conditioned layer, in one ordinary backward pass (for attributors
other than CRP, and as an independent check of the partial backward passes).

The cut planner lives in :py:mod:`canonizers.crp.planning`, the attribution class in
:py:mod:`canonizers.crp.attribution`, the concepts of token-major layers (features on the last dimension, and
attention heads, for transformers) in :py:mod:`canonizers.crp.concepts`; import them from here.

Needs ``zennit-crp`` (``pip install zennit-canonizers[crp]``); ``import canonizers`` works without it.

Examples
--------
>>> from zennit.composites import EpsilonPlusFlat
>>> from canonizers import ResNetCanonizer
>>> from canonizers.crp import IsolatingCondAttribution
>>> attribution = IsolatingCondAttribution(model)
>>> composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
>>> conditions = [{'layer2.0.conv1': [5], 'y': [3]}, {'layer4.1.conv2': [17], 'layer1.0.conv3': [2], 'y': [3]}]
>>> heatmaps = attribution(data, conditions, composite).heatmap  # [2, height, width], in condition order
'''
from .attribution import IsolatingCondAttribution
from .concepts import FeatureConcept, HeadConcept
from .planning import MODEL_OUTPUT_NAME, cuts_for, layer_cut

__all__ = ['FeatureConcept', 'HeadConcept', 'IsolatingCondAttribution', 'cuts_for', 'layer_cut', 'MODEL_OUTPUT_NAME']
