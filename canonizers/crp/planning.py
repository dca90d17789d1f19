'''The cut planner: the cuts of this package's canonizers that isolate CRP conditions in one ordinary backward pass.

:py:func:`cuts_for` gives them per condition, :py:func:`layer_cut` for one set of conditioned layers. The rules are
those of the family canonizers that fit the model (:py:data:`canonizers.registry.FAMILIES`), or of
:py:class:`~canonizers.GraphCanonizer` on any other model torch.fx can trace.
'''
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..core.family import FamilyCanonizer
from ..core.tracing import ParallelPaths, TracingError, describe, parallel_paths
from ..registry import families_for

#: CRP's name of the model output in conditions (``CondAttribution.MODEL_OUTPUT_NAME``)
MODEL_OUTPUT_NAME = 'y'

Condition = Mapping[str, Sequence[int]]


class _LayerCuts:
    '''The cuts for the layer sets of a model a family canonizer fits, computed once per distinct set of layers.

    The cuts come from the ``layer_cuts`` of the family canonizers that fit the model (a family may know better than
    the generic rule, e.g. DenseNet's dense layers). Each family places layers in its own blocks; the cuts are their
    union.
    '''
    def __init__(self, model: torch.nn.Module, families: List[FamilyCanonizer]) -> None:
        self.model = model
        self.sources = families
        self.cache: Dict[frozenset, Dict[str, str]] = {}
        # the merges of parallel paths the families handle; the others are found by tracing the model
        self.covered = {block for source in self.sources for part in source._rewrites
                        for block in part.blocks(model)}
        try:
            self.paths: Optional[ParallelPaths] = parallel_paths(model)
        except TracingError:
            # a model a family fits has its parallel paths in the family's blocks
            self.paths = None

    def check_bypasses(self, layers: Sequence[str]) -> None:
        '''Refuse layers around which relevance can flow through a merge no canonizer of this package handles.'''
        model = type(self.model).__name__
        for layer in layers:
            bypasses = self.paths.bypasses(layer, self.covered) if self.paths is not None else []
            if bypasses:
                raise ValueError(
                    f'relevance can go around {layer!r} through {describe(bypasses)}, which no canonizer of this '
                    f'package covers for {model}: not supported (yet), no cut isolates it; '
                    "canonizers.crp.IsolatingCondAttribution (as crp's exclude_parallel=True) isolates conditions "
                    'on any model')

    def cut_of(self, layers: Sequence[str]) -> Dict[str, str]:
        '''The cut for one set of conditioned layers (computed once per set).'''
        key = frozenset(layers)
        if key not in self.cache:
            union: Dict[str, str] = {}
            for source in self.sources:
                union.update(source.layer_cuts(self.model, layers))
            self.check_bypasses(layers)
            self.cache[key] = union
        return dict(self.cache[key])

    def __call__(self, conditions: Sequence[Condition], output_name: str) -> List[Dict[str, str]]:
        cuts = []
        for index, condition in enumerate(conditions):
            try:
                cuts.append(self.cut_of([name for name in condition if name != output_name]))
            except ValueError as error:
                raise ValueError(f'condition {index} {dict(condition)!r}: {error}') from error
        return cuts


def cuts_for(
    model: torch.nn.Module,
    conditions: Sequence[Condition],
    output_name: str = MODEL_OUTPUT_NAME,
    input_shape: Optional[Sequence[int]] = None,
) -> List[Dict[str, str]]:
    '''The cuts that isolate each CRP condition: all relevance reaching the input passes through every conditioned
    layer.

    A layer in the transforming branch of a block cuts the block's skip (ResNet residual branches, the layers of a
    DenseNet dense layer, the layers of an EfficientNet or MobileNet residual block); a layer in a ResNet downsample
    path cuts the block's residual branch; the block itself, and layers outside blocks with parallel paths, cut
    nothing (but a DenseNet dense layer, whose output is its transforming branch alone, cuts its own skip). The
    layers of one condition cut the union of their cuts. The rules are the ``layer_cuts`` of the family canonizers of
    this package that fit the model (:py:func:`canonizers.registry.families_for`); on any other model torch.fx can
    trace, those of :py:class:`~canonizers.GraphCanonizer` (:py:func:`canonizers.graph.graph_cuts_for`: every input
    of a merge after a conditioned layer that does not depend on it).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model.
    conditions: sequence of dict
        CRP conditions, mapping layer names (and ``output_name``) to concept ids, e.g.
        ``{"layer3.0.conv1": [5], "y": [3]}``.
    output_name: str, optional
        The key of the model output in the conditions, which is not a layer (CRP's ``MODEL_OUTPUT_NAME``).
    input_shape: sequence of int, optional
        The ``input_shape`` of :py:class:`~canonizers.GraphCanonizer` for models whose forward branches on shapes
        (the cuts are then those of the model traced for that shape).

    Returns
    -------
    list of dict of str to str
        Per condition, the blocks to cut and the branch (``"skip"`` or ``"residual"``) to cut; ``{}`` where nothing
        needs cutting. Each can be passed as the ``cut`` of the family canonizer (of GraphCanonizer on other models),
        or all together as a :py:class:`~canonizers.PerSampleCut`.

    Raises
    ------
    ValueError
        If a condition names a layer that is not a module of the model, or two layers in parallel branches of one
        block (no cut makes relevance pass through both); the message names the condition, the layers and the block.
    '''
    families = families_for(model)
    if not families:
        # any other model torch.fx can trace: the general rule of the graph canonizer
        from ..graph import graph_cuts_for

        return graph_cuts_for(model, conditions, output_name, input_shape=input_shape)
    return _LayerCuts(model, families)(conditions, output_name)


def layer_cut(model: torch.nn.Module, layers: Sequence[str]) -> Dict[str, str]:
    '''The cut that isolates a condition on ``layers``, as :py:func:`cuts_for` gives it for one condition; errors name
    the layers without the condition around them.'''
    families = families_for(model)
    if not families:
        from ..graph import GraphCanonizer

        return GraphCanonizer().layer_cuts(model, list(layers))
    return _LayerCuts(model, families).cut_of(list(layers))
