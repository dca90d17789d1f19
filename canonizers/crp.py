'''Isolated CRP conditional heatmaps for any mix of conditions, in one forward and one backward pass per batch.

CRP's ``CondAttribution(exclude_parallel=True)`` isolates a condition by a partial backward pass, which needs the same
layer names in all conditions of a batch: it runs one forward and backward pass per group of conditions with the same
layers, refuses mixed layers in ``generate``, and returns the heatmaps grouped rather than in condition order.

Here every condition is turned into the cuts that make all relevance reaching the input pass through each of its
layers (:py:func:`cuts_for`), and :py:class:`IsolatingCondAttribution` sets them per sample
(:py:class:`~canonizers.PerSampleCut`) on the canonizer of this package in the composite, so that one batch holds any
mix of conditions.

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
import contextlib
import math
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from zennit.canonizers import CompositeCanonizer

try:
    from crp.attribution import CondAttribution, attrResult
    from crp.concepts import ChannelConcept
    from tqdm import tqdm
except ImportError as error:
    raise ImportError(
        f'canonizers.crp needs zennit-crp, an optional dependency of zennit-canonizers ({error}): install it with '
        '`pip install zennit-canonizers[crp]`'
    ) from error

from .blocks import BlockCanonizer
from .cuts import PerSampleCut
from .family import FamilyCanonizer
from .registry import FAMILIES, families_for
from .tracing import ParallelPaths, TracingError, describe, parallel_paths, traced_merges

#: CRP's name of the model output in conditions (``CondAttribution.MODEL_OUTPUT_NAME``)
MODEL_OUTPUT_NAME = 'y'

Condition = Mapping[str, Sequence[int]]
PackageCanonizer = Union[FamilyCanonizer, BlockCanonizer]


class _LayerCuts:
    '''The cuts for the layer sets of one model, computed once per distinct set of layers.

    The cuts come from the ``layer_cuts`` of the family canonizers that fit the model (a family may know better than
    the generic rule, e.g. DenseNet's dense layers), and of block canonizers that no such family holds. Each source
    places layers in its own blocks; the cuts are their union.
    '''
    def __init__(self, model: torch.nn.Module, canonizers: Sequence[PackageCanonizer] = ()) -> None:
        self.model = model
        self.sources: List[FamilyCanonizer] = families_for(model)
        known = {type(part) for source in self.sources for part in source._block_canonizers}
        families = {type(source) for source in self.sources}
        loose: List[BlockCanonizer] = []
        for canonizer in canonizers:
            if isinstance(canonizer, FamilyCanonizer):
                if type(canonizer) not in families:
                    self.sources.append(canonizer)
                    known.update(type(part) for part in canonizer._block_canonizers)
            elif type(canonizer) not in known:
                loose.append(canonizer.copy())
                known.add(type(canonizer))
        fitted = bool(self.sources)
        # also without any source: unknown layer names are still refused
        if loose or not self.sources:
            self.sources.append(FamilyCanonizer(parts=loose))
        self.cache: Dict[frozenset, Dict[str, str]] = {}
        # the merges of parallel paths the sources handle; the others are found by tracing the model
        self.covered = {block for source in self.sources for part in source._rewrites
                        for block in part.blocks(model)}
        self.untraceable: Optional[TracingError] = None
        try:
            self.paths: Optional[ParallelPaths] = parallel_paths(model)
        except TracingError as error:
            self.paths = None
            # a model a family fits has its parallel paths in the family's blocks; of any other nothing is known
            self.untraceable = None if fitted else error

    def check_bypasses(self, layers: Sequence[str]) -> None:
        '''Refuse layers around which relevance can flow through a merge no canonizer of this package handles.'''
        model = type(self.model).__name__
        if self.untraceable is not None and layers:
            raise ValueError(f'{self.untraceable}, and no family canonizer of this package fits {model}: whether '
                             'relevance can go around the conditioned layers is unknown, so no cut is given; '
                             "crp's CondAttribution(exclude_parallel=True) isolates conditions on any model")
        for layer in layers:
            bypasses = self.paths.bypasses(layer, self.covered) if self.paths is not None else []
            if bypasses:
                raise ValueError(
                    f'relevance can go around {layer!r} through {describe(bypasses)}, which no canonizer of this '
                    f'package covers for {model}: not supported (yet), no cut isolates it; '
                    "crp's CondAttribution(exclude_parallel=True) isolates conditions on any model")

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
) -> List[Dict[str, str]]:
    '''The cuts that isolate each CRP condition: all relevance reaching the input passes through every conditioned
    layer.

    A layer in the transforming branch of a block cuts the block's skip (ResNet residual branches, the layers of a
    DenseNet dense layer, the layers of an EfficientNet or MobileNet residual block); a layer in a ResNet downsample
    path cuts the block's residual branch; the block itself, and layers outside blocks with parallel paths, cut
    nothing (but a DenseNet dense layer, whose output is its transforming branch alone, cuts its own skip). The
    layers of one condition cut the union of their cuts. The rules are the ``layer_cuts`` of the family canonizers of
    this package that fit the model (:py:func:`canonizers.registry.families_for`).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model.
    conditions: sequence of dict
        CRP conditions, mapping layer names (and ``output_name``) to concept ids, e.g.
        ``{"layer3.0.conv1": [5], "y": [3]}``.
    output_name: str, optional
        The key of the model output in the conditions, which is not a layer (CRP's ``MODEL_OUTPUT_NAME``).

    Returns
    -------
    list of dict of str to str
        Per condition, the blocks to cut and the branch (``"skip"`` or ``"residual"``) to cut; ``{}`` where nothing
        needs cutting. Each can be passed as the ``cut`` of the family canonizer, or all together as a
        :py:class:`~canonizers.PerSampleCut`.

    Raises
    ------
    ValueError
        If a condition names a layer that is not a module of the model, or two layers in parallel branches of one
        block (no cut makes relevance pass through both); the message names the condition, the layers and the block.
    '''
    return _LayerCuts(model)(conditions, output_name)


def layer_cut(model: torch.nn.Module, layers: Sequence[str]) -> Dict[str, str]:
    '''The cut that isolates a condition on ``layers``, as :py:func:`cuts_for` gives it for one condition; errors name
    the layers without the condition around them.'''
    return _LayerCuts(model).cut_of(list(layers))


def _broadcast_conditions(samples: int, conditions: Sequence[Condition]) -> List[Condition]:
    '''The condition of every sample of the batch that ``CondAttribution.broadcast`` builds: each data sample with
    every condition, or the data and conditions pairwise if they are equally many.'''
    conditions = list(conditions)
    if samples == len(conditions) or samples == 1:
        return conditions
    return conditions * samples


def _package_canonizers(composite: object) -> List[PackageCanonizer]:
    '''The canonizers of this package in ``composite``, also inside zennit's composite canonizers.'''
    found: List[PackageCanonizer] = []

    def visit(canonizers: Iterable[object]) -> None:
        for canonizer in canonizers:
            if isinstance(canonizer, (FamilyCanonizer, BlockCanonizer)):
                found.append(canonizer)
            elif isinstance(canonizer, CompositeCanonizer):
                visit(canonizer.canonizers)

    visit(getattr(composite, 'canonizers', None) or [])
    return found


def _public_name(cls: type) -> str:
    import canonizers

    if getattr(canonizers, cls.__name__, None) is cls:
        return f'canonizers.{cls.__name__}'
    return f'{cls.__module__}.{cls.__name__}'


def _suggestion(model: torch.nn.Module) -> str:
    fitting = [_public_name(type(instance)) for instance in families_for(model)]
    if fitting:
        return (f'pass a composite whose canonizers include one that does, for this model {" or ".join(fitting)}, '
                f'e.g. EpsilonPlusFlat(canonizers=[{fitting[0]}()])')
    known = ', '.join(_public_name(cls) for cls in FAMILIES.values()) or '(none)'
    model_name = type(model).__name__
    merges = traced_merges(model)
    if isinstance(merges, TracingError):
        return (f'and none of the family canonizers ({known}) rewrites blocks of {model_name}, and {merges}: whether '
                "it has parallel paths is unknown; crp's CondAttribution(exclude_parallel=True) isolates conditions "
                'on any model')
    if merges:
        return (f'and none of the family canonizers ({known}) rewrites blocks of {model_name}, which has '
                f"{describe(merges)}: not supported (yet); crp's CondAttribution(exclude_parallel=True) isolates "
                'conditions on any model')
    return (f'and none of the family canonizers ({known}) rewrites blocks of {model_name}, which has no parallel paths '
            "(traced with torch.fx): its conditional heatmaps need no isolation, crp's CondAttribution gives them")


class _Plan:
    '''The canonizers of this package in a composite, and how to split the per-sample cuts of a batch among them.

    Everything is validated here, before any canonizer, hook or model changes.
    '''
    def __init__(self, model: torch.nn.Module, composite: object) -> None:
        self.canonizers = _package_canonizers(composite)
        if not self.canonizers:
            where = 'no composite was given' if composite is None else 'its composite holds none'
            raise ValueError(
                'IsolatingCondAttribution isolates conditions by cutting paths with a canonizer of zennit-canonizers, '
                f'but {where}; {_suggestion(model)}'
            )
        self.model = model
        self.owners: Dict[str, PackageCanonizer] = {}
        for canonizer in self.canonizers:
            for block in canonizer.catalog_of(model).blocks:
                self.owners.setdefault(block, canonizer)
        # the families that fit the model too, so that a block no canonizer in the composite rewrites is refused,
        # not left uncut
        self.layer_cuts = _LayerCuts(model, self.canonizers)

    def cuts(self, conditions: Sequence[Condition], output_name: str) -> List[Dict[str, str]]:
        '''The cuts of each condition, checked to be made by a canonizer of the composite.'''
        cuts = self.layer_cuts(conditions, output_name)
        for index, cut in enumerate(cuts):
            missing = [block for block in cut if block not in self.owners]
            if missing:
                raise ValueError(
                    f'condition {index} {dict(conditions[index])!r} needs the {cut[missing[0]]!r} branch of block '
                    f'{missing[0]!r} cut, but no canonizer in the composite rewrites that block; '
                    f'{_suggestion(self.model)}'
                )
        return cuts

    @contextlib.contextmanager
    def cutting(self, cuts: Sequence[Dict[str, str]]) -> Iterator[None]:
        '''Set one cut per sample on the canonizers, each the part of the blocks it rewrites; restore their previous
        cuts on leaving, also on error.'''
        previous = [canonizer.cut for canonizer in self.canonizers]
        for canonizer, cut in zip(self.canonizers, previous):
            if cut:
                warnings.warn(
                    f'the cut {cut!r} of {type(canonizer).__name__} in the composite is replaced by the cuts that '
                    'isolate the conditions while IsolatingCondAttribution runs, and restored afterwards',
                    stacklevel=4,
                )
        try:
            for canonizer in self.canonizers:
                canonizer.cut = PerSampleCut([
                    {block: branch for block, branch in cut.items() if self.owners[block] is canonizer}
                    for cut in cuts
                ])
            yield
        finally:
            for canonizer, cut in zip(self.canonizers, previous):
                canonizer.cut = cut


def _checked_channel_mask(batch_id: int, concept_ids: Sequence[int], layer_name: Optional[str] = None) -> Callable:
    '''CRP's ``ChannelConcept.mask``, refusing concept ids that are no channel of the layer with a ``ValueError``
    that names them (CRP's own mask fails with an ``IndexError`` deep in the backward pass).'''
    mask = ChannelConcept.mask(batch_id, concept_ids, layer_name)

    def checked(gradient: torch.Tensor) -> torch.Tensor:
        channels = gradient.shape[1]
        wrong = [concept for concept in concept_ids if not 0 <= concept < channels]
        if wrong:
            raise ValueError(f'concept {wrong[0]} out of range: layer {layer_name!r} has {channels} channels '
                             f'(0..{channels - 1})')
        return mask(gradient)
    return checked


def _checked_masks(mask_map: Union[Callable, Dict[str, Callable]]) -> Union[Callable, Dict[str, Callable]]:
    '''``mask_map`` with CRP's default channel masks replaced by ones that check the concept ids.'''
    if isinstance(mask_map, dict):
        return {layer: _checked_masks(mask) for layer, mask in mask_map.items()}
    return _checked_channel_mask if mask_map == ChannelConcept.mask else mask_map


class IsolatingCondAttribution(CondAttribution):
    '''CRP's ``CondAttribution`` whose conditional heatmaps are isolated: all relevance reaching the input passed
    through every conditioned layer, as with ``exclude_parallel=True``, but for any mix of conditions in one forward
    and one backward pass per batch, returned in condition order.

    Each condition is isolated by cutting the parallel paths around its layers (:py:func:`cuts_for`), one cut per
    sample of the batch (:py:class:`~canonizers.PerSampleCut`), on the canonizer of this package in the composite
    (a :py:class:`~canonizers.family.FamilyCanonizer` such as :py:class:`~canonizers.ResNetCanonizer`, or a
    :py:class:`~canonizers.blocks.BlockCanonizer`). The canonizer's own cut is replaced during a call (with a warning
    if it had one) and restored afterwards, also on error.

    The arguments are those of ``CondAttribution``. ``exclude_parallel`` keeps its meaning: ``True`` (the default)
    isolates the conditions, as described here; ``False`` computes CRP's plain conditional heatmaps (relevance also
    flows around the conditioned layers), exactly as ``CondAttribution`` does, leaving the canonizer's cut as it is.
    So this class is a drop-in replacement, also where CRP itself passes ``exclude_parallel=False`` (e.g.
    ``AttributionGraph``).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model.
    device: :py:obj:`torch.device`, optional
        Where the model and computation are; that of the model's parameters by default.
    overwrite_data_grad: bool, optional
        If True, ``data.grad`` is set to None before each call.
    no_param_grad: bool, optional
        If True, the model's parameters are set to not require gradients (saves memory).
    '''
    def __call__(
        self,
        data: torch.Tensor,
        conditions: List[Dict[str, List[int]]],
        composite: Optional[object] = None,
        record_layer: Optional[List[str]] = None,
        mask_map: Union[Callable, Dict[str, Callable]] = ChannelConcept.mask,
        start_layer: Optional[str] = None,
        init_rel: Union[None, torch.Tensor, int, Callable] = None,
        on_device: Optional[str] = None,
        exclude_parallel: bool = True,
    ) -> attrResult:
        '''Compute isolated conditional heatmaps for any mix of conditions, in one forward and backward pass.

        Data and conditions are broadcast as by ``CondAttribution``: pairwise if equally many, else every data sample
        with every condition (sample-major).

        Parameters
        ----------
        data: :py:obj:`torch.Tensor`
            Input samples; must require gradients.
        conditions: list of dict
            CRP conditions, mapping layer names (and ``"y"``, the model output) to concept ids; the layers may differ
            between conditions, and one condition may name several layers, in any order.
        composite: :py:obj:`zennit.core.Composite`
            The rules; its canonizers must include one of this package that rewrites the model's blocks.
        record_layer: list of str, optional
            Layers whose activations and relevances to return.
        mask_map: callable or dict of str to callable, optional
            How conditions mask the relevance at a layer (CRP's ``ChannelConcept.mask`` by default).
        start_layer: str, optional
            Layer where the backward pass starts instead of the output.
        init_rel: :py:obj:`torch.Tensor`, int or callable, optional
            Initial relevance, as for ``CondAttribution``.
        on_device: str, optional
            Device on which to return heatmaps, activations and relevances.
        exclude_parallel: bool, optional
            True (default): isolate the conditions. False: CRP's plain conditional heatmaps, see the class.

        Returns
        -------
        :py:obj:`crp.attribution.attrResult`
            ``heatmap`` (one per sample, in the order of the broadcast conditions), ``activations`` and ``relevances``
            of the recorded layers (keys and shapes as ``CondAttribution`` with ``exclude_parallel=False``), and
            ``prediction``.

        Raises
        ------
        ValueError
            If the composite holds no canonizer of this package, a condition names an unknown layer, two layers in
            parallel branches of one block, or a layer in a block that no canonizer in the composite rewrites;
            nothing is changed then.
        '''
        record_layer = list(record_layer or [])
        mask_map = _checked_masks(mask_map)
        if not exclude_parallel:
            return super().__call__(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                    on_device, False)
        if not conditions:
            raise ValueError('conditions is empty: give at least one condition')
        plan = _Plan(self.model, composite)
        cuts = plan.cuts(_broadcast_conditions(len(data), conditions), self.MODEL_OUTPUT_NAME)
        with self._removing_hooks(), plan.cutting(cuts):
            return self._attribute(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                   on_device, False)

    def generate(
        self,
        data: torch.Tensor,
        conditions: List[Dict[str, List[int]]],
        composite: Optional[object] = None,
        record_layer: Optional[List[str]] = None,
        mask_map: Union[Callable, Dict[str, Callable]] = ChannelConcept.mask,
        start_layer: Optional[str] = None,
        init_rel: Union[None, torch.Tensor, int, Callable] = None,
        batch_size: int = 10,
        on_device: Optional[str] = None,
        exclude_parallel: bool = True,
        verbose: bool = True,
    ) -> Iterator[attrResult]:
        '''Compute isolated conditional heatmaps of one sample for many conditions, ``batch_size`` at a time, with
        one forward and one backward pass per batch.

        As in CRP, the last batch is padded to ``batch_size`` samples (so that a tensor ``init_rel`` fits every
        batch), and only its real samples are returned. Unlike CRP, the layers may differ between conditions, and
        the heatmaps are moved to ``on_device`` too. Everything is validated before the first pass.

        Parameters
        ----------
        data: :py:obj:`torch.Tensor`
            One input sample, shape ``[1, ...]``; must require gradients.
        conditions: list of dict
            CRP conditions, any mix of layers.
        composite: :py:obj:`zennit.core.Composite`
            The rules; its canonizers must include one of this package that rewrites the model's blocks.
        record_layer: list of str, optional
            Layers whose activations and relevances to return.
        mask_map: callable or dict of str to callable, optional
            How conditions mask the relevance at a layer.
        start_layer: str, optional
            Layer where the backward pass starts instead of the output.
        init_rel: :py:obj:`torch.Tensor`, int or callable, optional
            Initial relevance, as for ``CondAttribution``.
        batch_size: int, optional
            Conditions per forward and backward pass.
        on_device: str, optional
            Device on which to return heatmaps, activations and relevances.
        exclude_parallel: bool, optional
            True (default): isolate the conditions. False: CRP's ``generate`` unchanged.
        verbose: bool, optional
            Whether to show a progress bar.

        Yields
        ------
        :py:obj:`crp.attribution.attrResult`
            The results of each batch of conditions, in condition order.
        '''
        record_layer = list(record_layer or [])
        mask_map = _checked_masks(mask_map)
        if not exclude_parallel:
            yield from super().generate(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                        batch_size, on_device, False, verbose)
            return
        if not conditions:
            raise ValueError('conditions is empty: give at least one condition')
        if len(data) != 1:
            raise ValueError(f'generate explains one sample, but data holds {len(data)}: call it per sample, or use '
                             '__call__ for a batch')
        self._check_arguments(data, conditions, start_layer, False, init_rel)
        plan = _Plan(self.model, composite)
        cuts = plan.cuts(conditions, self.MODEL_OUTPUT_NAME)

        # every batch records the layers of all conditions, as CRP's generate does
        for condition in conditions:
            record_layer += [name for name in condition if name != self.MODEL_OUTPUT_NAME and name not in record_layer]
        batch_size = min(batch_size, len(conditions))
        batches = math.ceil(len(conditions) / batch_size)
        with tqdm(total=batches, dynamic_ncols=True, disable=not verbose) as progress:
            for index in range(batches):
                span = slice(index * batch_size, (index + 1) * batch_size)
                batch, batch_cuts = list(conditions[span]), cuts[span]
                count = len(batch)
                # as CRP: padded with the batch's first target and no mask; the padded samples need no cut
                padding = {} if start_layer or self.MODEL_OUTPUT_NAME not in batch[0] else {
                    self.MODEL_OUTPUT_NAME: batch[0][self.MODEL_OUTPUT_NAME]}
                batch += [padding] * (batch_size - count)
                batch_cuts += [{}] * (batch_size - count)
                # a fresh tensor per batch: its gradient is the heatmap, and must not accumulate over batches
                data_batch = torch.repeat_interleave(data, batch_size, dim=0)
                with self._removing_hooks(), plan.cutting(batch_cuts):
                    result = self._attribute(data_batch, batch, composite, record_layer, mask_map, start_layer,
                                             init_rel, on_device, False)
                progress.update(1)
                yield attrResult(
                    result.heatmap[:count],
                    {name: value[:count] for name, value in result.activations.items()},
                    {name: value[:count] for name, value in result.relevances.items()},
                    result.prediction[:count],
                )

    @contextlib.contextmanager
    def _removing_hooks(self) -> Iterator[None]:
        '''Remove the recording hooks that ``CondAttribution._attribute`` adds, also when it fails (it leaves them on
        the model then).'''
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _append_recording_layer_hooks(
        self, record_l_names: List[str], start_layer: Optional[str], cond_l_names: List[str]
    ) -> Tuple[list, dict]:
        handles, layer_out = super()._append_recording_layer_hooks(record_l_names, start_layer, cond_l_names)
        getattr(self, '_handles', []).extend(handles)
        return handles, layer_out
