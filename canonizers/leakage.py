'''How much of a CRP conditional heatmap leaks through parallel paths: the leaky, isolated and reference heatmaps of
one condition, side by side, and the numbers that summarise them.

The numbers are defined as follows (the command line, its CSV and its pictures use the same definitions):

relevance of a heatmap
    the sum of its pixels.
leaked heatmap
    ``leaky - isolated``: what relevance passed through the paths parallel to the conditioned layers (CRP masks the
    conditioned layers, but not the shortcuts around them).
leaked share
    ``sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|)``: the share of the absolute relevance mass of
    the leaky heatmap, split into its isolated and its leaked part, that is leaked. It lies in ``[0, 1]``, is 0 for a
    condition without leak and 1 for one whose relevance all went around the conditioned layers, and, unlike
    ``1 - sum(isolated) / sum(leaky)``, stays meaningful when positive and negative relevance cancel.
deviation
    ``max|isolated - reference| / max|reference|``: how far the isolated heatmap is from CRP's
    ``exclude_parallel=True`` reference (0 up to rounding).
'''
import copy
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .core.family import FamilyCanonizer

MODEL_OUTPUT = 'y'
#: the largest deviation of an isolated float32 heatmap from CRP's reference that float32 rounding explains; above
#: it, :py:func:`compare_heatmaps` measures the deviation again in float64
FLOAT32_ROUNDING = 1e-4


def condition_layers(condition: Mapping[str, Sequence[int]]) -> List[str]:
    '''The layer names of a CRP condition (all keys but the model output ``"y"``).'''
    return [name for name in condition if name != MODEL_OUTPUT]


def leaked_share(leaky: torch.Tensor, isolated: torch.Tensor) -> float:
    '''The share of a leaky heatmap's absolute relevance mass that leaked through parallel paths.

    Parameters
    ----------
    leaky: :py:obj:`torch.Tensor`
        Heatmap of a condition without isolation.
    isolated: :py:obj:`torch.Tensor`
        Heatmap of the same condition with the parallel paths cut.

    Returns
    -------
    float
        ``sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|)``, in ``[0, 1]``; NaN if both heatmaps are
        0 (no relevance, so nothing that could have leaked: undefined, not 0%).
    '''
    leaked = (leaky - isolated).abs().sum().item()
    total = isolated.abs().sum().item() + leaked
    return leaked / total if total > 0. else math.nan


def relative_deviation(value: torch.Tensor, reference: torch.Tensor) -> float:
    '''``max|value - reference| / max|reference|``, the largest difference relative to the reference's range.'''
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return ((value - reference).abs().max() / scale).item()


def attribute_class(
    model: torch.nn.Module,
    data: torch.Tensor,
    target: int,
    family: Callable[..., FamilyCanonizer],
    composite: Callable[..., object],
    layer: Optional[str] = None,
    concept: Optional[object] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    '''The heatmap of a class and, optionally, the relevance of each channel (concept) of one layer for it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model, in eval mode.
    data: :py:obj:`torch.Tensor`
        One input sample, shape ``[1, ...]``.
    target: int
        The class (output index).
    family: callable
        The family canonizer class, e.g. :py:class:`canonizers.ResNetCanonizer`.
    composite: callable
        zennit composite class taking ``canonizers=[...]``.
    layer: str, optional
        Name of the layer whose channel relevances to record.
    concept: CRP concept, optional
        What the concepts of ``layer`` are: CRP's ``ChannelConcept`` (dimension 1, the default), or e.g.
        :py:class:`canonizers.crp.FeatureConcept` (the last dimension, for token-major layers of transformers).

    Returns
    -------
    heatmap: :py:obj:`torch.Tensor`
        The class heatmap, ``[H, W]``.
    relevances: :py:obj:`torch.Tensor` or None
        The relevance of each concept (channel) of ``layer`` (summed over its other dimensions), ``[concepts]``; None
        without ``layer``.
    '''
    from crp.attribution import CondAttribution

    from .crp.concepts import concept_for

    attribution = CondAttribution(model, no_param_grad=False)
    result = attribution(
        data.detach().clone().requires_grad_(True), [{MODEL_OUTPUT: [target]}], composite(canonizers=[family()]),
        record_layer=[layer] if layer else [], exclude_parallel=False,
    )
    relevances = None
    if layer:
        # features on the last dimension of token-major layers (transformers), channels on dimension 1 otherwise
        concept = concept_for(model, layer, data)
        relevances = concept.attribute(result.relevances[layer].detach(), abs_norm=False)[0]
    return result.heatmap[0].detach(), relevances


def _float64_deviations(model: torch.nn.Module, data: torch.Tensor, conditions: Sequence[Mapping[str, Sequence[int]]],
                        family: Callable[..., FamilyCanonizer], composite: Callable[..., object],
                        masks: Dict[str, Callable]) -> List[float]:
    ''':py:func:`relative_deviation` of the isolated heatmaps from CRP's reference, each condition computed in
    float64 on a copy of the model.'''
    from crp.attribution import CondAttribution

    from .crp import IsolatingCondAttribution

    exact = copy.deepcopy(model).double()
    sample = data.detach().double().requires_grad_(True)
    isolated = IsolatingCondAttribution(exact, no_param_grad=False)(
        sample, [dict(condition) for condition in conditions], composite(canonizers=[family()]),
        mask_map=masks).heatmap.detach()
    attribution = CondAttribution(exact, no_param_grad=False)
    return [relative_deviation(isolated[index], attribution(
        sample, [dict(condition)], composite(canonizers=[family()]), exclude_parallel=True,
        mask_map=masks).heatmap.detach()[0]) for index, condition in enumerate(conditions)]


def concept_masks(model: torch.nn.Module, conditions: Sequence[Mapping[str, Sequence[int]]],
                  data: torch.Tensor) -> Dict[str, Callable]:
    '''CRP's ``mask_map`` for the conditioned layers: each layer's concept mask (features on the last dimension of
    token-major layers, see :py:func:`canonizers.crp.concepts.concept_for`).'''
    from .crp.concepts import concept_for

    layers = dict.fromkeys(layer for condition in conditions for layer in condition_layers(condition))
    return {layer: concept_for(model, layer, data).mask for layer in layers}


def compare_heatmaps(
    model: torch.nn.Module,
    data: torch.Tensor,
    conditions: Sequence[Mapping[str, Sequence[int]]],
    family: Callable[..., FamilyCanonizer],
    composite: Callable[..., object],
    reference: bool = True,
    concept: Optional[object] = None,
) -> List[Dict[str, object]]:
    '''For each condition, the leaky heatmap (CRP without isolation), ours (isolated by
    :py:class:`~canonizers.crp.IsolatingCondAttribution`: one forward pass, partial backward passes) and CRP's
    ``exclude_parallel=True`` reference. The leaky heatmaps of all conditions take one forward and backward pass of
    one sample per condition; the isolated ones one forward pass in all.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model, in eval mode.
    data: :py:obj:`torch.Tensor`
        One input sample, shape ``[1, ...]``.
    conditions: sequence of dict
        CRP conditions, e.g. ``{"layer3.0.conv1": [5], "y": [3]}``.
    family: callable
        The family canonizer class, e.g. :py:class:`canonizers.ResNetCanonizer`.
    composite: callable
        zennit composite class taking ``canonizers=[...]``, e.g. ``zennit.composites.EpsilonPlusFlat``.
    reference: bool, optional
        Whether to compute CRP's reference too (one more forward and backward pass per set of conditioned layers).
    concept: CRP concept, optional
        What the concept ids of the conditions select: CRP's ``ChannelConcept`` (dimension 1, the default), or e.g.
        :py:class:`canonizers.crp.FeatureConcept` (the last dimension, for token-major layers of transformers).

    Returns
    -------
    list of dict
        Per condition: ``condition``, ``cut``, the heatmaps ``leaky``, ``isolated``, ``reference`` (each ``[H, W]``;
        ``reference`` None without ``reference``), ``deviation``, the relative max abs difference of isolated and
        reference (None without reference; where it is above :py:data:`FLOAT32_ROUNDING` in float32, as it can be
        on deep transformers, it is the same condition's in float64), and ``leaked_share``, see
        :py:func:`leaked_share`.
    '''
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept

    from .crp import IsolatingCondAttribution, cuts_for

    # the same masks for all three heatmaps, so that they differ in the isolation only
    masks = {'mask_map': ChannelConcept.mask if concept is None else concept.mask}
    conditions = [dict(condition) for condition in conditions]
    sample = data.detach().clone().requires_grad_(True)
    engine = IsolatingCondAttribution(model, no_param_grad=False)
    masks = concept_masks(model, conditions, sample)
    # all conditions at once: one batch for the leaky heatmaps, one forward pass for the isolated ones
    leaky = engine(sample, conditions, composite(canonizers=[family()]), exclude_parallel=False,
                   mask_map=masks).heatmap.detach()
    isolated = engine(sample, conditions, composite(canonizers=[family()]), mask_map=masks).heatmap.detach()
    references: List[Optional[torch.Tensor]] = [None] * len(conditions)
    if reference:
        # CRP's exclude_parallel=True takes conditions with the same layers together and returns them grouped
        groups: Dict[frozenset, List[int]] = {}
        for index, condition in enumerate(conditions):
            groups.setdefault(frozenset(condition_layers(condition)), []).append(index)
        attribution = CondAttribution(model, no_param_grad=False)
        for indices in groups.values():
            heatmaps = attribution(sample, [conditions[index] for index in indices], composite(canonizers=[family()]),
                                   exclude_parallel=True, mask_map=masks).heatmap.detach()
            for index, heatmap in zip(indices, heatmaps):
                references[index] = heatmap

    deviations = [relative_deviation(isolated[index], reference_heatmap) if reference_heatmap is not None else None
                  for index, reference_heatmap in enumerate(references)]
    rounded = [index for index, deviation in enumerate(deviations) if deviation is not None and deviation > (
        FLOAT32_ROUNDING) and sample.dtype == torch.float32]
    if rounded:
        # a small isolated heatmap of a deep model (a transformer) can differ from CRP's by more than float32
        # rounding of the larger leaky one: the same in float64 tells rounding from a wrong heatmap
        remeasured = _float64_deviations(model, sample, [conditions[index] for index in rounded], family, composite,
                                         masks)
        for index, deviation in zip(rounded, remeasured):
            deviations[index] = deviation

    rows = []
    for index, (condition, cut) in enumerate(zip(conditions, cuts_for(model, conditions))):
        crp_reference = references[index]
        rows.append({
            'condition': condition,
            'cut': cut,
            'leaky': leaky[index],
            'isolated': isolated[index],
            'reference': crp_reference,
            'deviation': deviations[index] if reference else None,
            'leaked_share': leaked_share(leaky[index], isolated[index]),
        })
    return rows
