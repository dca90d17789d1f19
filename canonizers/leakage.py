'''How much of a CRP conditional heatmap leaks through parallel paths: the leaky, isolated and reference heatmaps of
one condition, side by side.'''
from typing import Callable, Dict, List, Mapping, Sequence

import torch

from .blocks import FamilyCanonizer

MODEL_OUTPUT = 'y'


def condition_layers(condition: Mapping[str, Sequence[int]]) -> List[str]:
    '''The layer names of a CRP condition (all keys but the model output ``"y"``).'''
    return [name for name in condition if name != MODEL_OUTPUT]


def compare_heatmaps(
    model: torch.nn.Module,
    data: torch.Tensor,
    conditions: Sequence[Mapping[str, Sequence[int]]],
    family: Callable[..., FamilyCanonizer],
    composite: Callable[..., object],
) -> List[Dict[str, object]]:
    '''For each condition, the leaky heatmap (CRP without isolation), ours (the skip paths around the conditioned layers
    cut) and CRP's ``exclude_parallel=True`` reference.

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

    Returns
    -------
    list of dict
        Per condition: ``condition``, ``cut``, the heatmaps ``leaky``, ``isolated``, ``reference`` (each ``[H, W]``),
        and ``deviation``, the relative max abs difference of isolated and reference.
    '''
    from crp.attribution import CondAttribution

    attribution = CondAttribution(model, no_param_grad=False)
    rows = []
    for condition in conditions:
        cut = family().layer_cuts(model, condition_layers(condition))

        leaky, isolated, reference = (
            attribution(data.detach().clone().requires_grad_(True), [dict(condition)],
                        composite(canonizers=[canonizer]), exclude_parallel=exclude_parallel).heatmap[0].detach()
            for canonizer, exclude_parallel in ((family(), False), (family(cut=cut), False), (family(), True))
        )
        scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
        rows.append({
            'condition': dict(condition),
            'cut': cut,
            'leaky': leaky,
            'isolated': isolated,
            'reference': reference,
            'deviation': ((isolated - reference).abs().max() / scale).item(),
        })
    return rows
