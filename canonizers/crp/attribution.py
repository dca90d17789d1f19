'''The attribution class: :py:class:`IsolatingCondAttribution`, CRP's ``CondAttribution`` with isolated conditional
heatmaps for any mix of conditions, from one forward pass per distinct input sample (see :py:mod:`canonizers.crp`).

Needs ``zennit-crp`` (``pip install zennit-canonizers[crp]``).
'''
import contextlib
import math
import warnings
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from zennit.core import Composite

try:
    from crp.attribution import CondAttribution, attrResult
    from crp.concepts import ChannelConcept
    from tqdm import tqdm
except ImportError as error:
    raise ImportError(
        f'canonizers.crp needs zennit-crp, an optional dependency of zennit-canonizers ({error}): install it with '
        '`pip install zennit-canonizers[crp]`'
    ) from error

from ..partial_backward import Condition as EngineCondition
from ..partial_backward import Mask, PartialBackward, Recorder
from .planning import Condition


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


class _Gradient(NamedTuple):
    '''What ``CondAttribution.heatmap_modifier`` reads of the input: its gradient (so that a subclass's modifier
    applies to the isolated heatmaps too).'''
    grad: torch.Tensor


def _mask_of(mask_map: Union[Callable, Dict[str, Callable]], layer: str, concept_ids: Sequence[int]) -> Mask:
    '''The engine's mask of a condition on ``layer``: CRP's ``mask_map`` with all but the batch row bound.'''
    make = mask_map if callable(mask_map) else mask_map[layer]
    return lambda batch_id: make(batch_id, concept_ids, layer)


class IsolatingCondAttribution(CondAttribution):
    '''CRP's ``CondAttribution`` whose conditional heatmaps are isolated as with ``exclude_parallel=True`` (all
    relevance reaching the input passed through every conditioned layer), for any mix of conditions, in condition
    order, at the cost floor: one forward pass per distinct input sample, one backward pass from the output down to
    the conditioned layers shared by the conditions (per distinct initial relevance), and per condition only the
    backward pass below its layers (:py:mod:`canonizers.partial_backward`).

    Isolation needs no canonizer of this package: a backward pass that starts at a layer's output never propagates
    the relevance that goes around the layer. So any composite and any model CRP handles works (GoogLeNet, timm
    models, ...); the canonizers' cuts (:py:func:`cuts_for`, :py:class:`~canonizers.PerSampleCut`) remain the way to
    isolate with attributors other than CRP.

    The arguments are those of ``CondAttribution``. ``exclude_parallel`` keeps its meaning: ``True`` (the default)
    isolates the conditions, as described here; ``False`` computes CRP's plain conditional heatmaps (relevance also
    flows around the conditioned layers), exactly as ``CondAttribution`` does. So this class is a drop-in
    replacement, also where CRP itself passes ``exclude_parallel=False`` (e.g. ``AttributionGraph``).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model.
    device: :py:obj:`torch.device`, optional
        Where the model and computation are; that of the model's parameters by default.
    overwrite_data_grad: bool, optional
        If True, ``data.grad`` is set to None before each call (the isolated heatmaps do not use it).
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
        '''Compute isolated conditional heatmaps for any mix of conditions, with one forward pass.

        Data and conditions are broadcast as by ``CondAttribution``: pairwise if equally many, else every data sample
        with every condition (sample-major). Equal data samples are passed forward once.

        Parameters
        ----------
        data: :py:obj:`torch.Tensor`
            Input samples; must require gradients.
        conditions: list of dict
            CRP conditions, mapping layer names (and ``"y"``, the model output) to concept ids; the layers may differ
            between conditions, and one condition may name several layers, in any order.
        composite: :py:obj:`zennit.core.Composite`, optional
            The rules, with the canonizers the model needs.
        record_layer: list of str, optional
            Layers whose activations and relevances to return (with the conditioned layers and ``start_layer``, as
            CRP records them).
        mask_map: callable or dict of str to callable, optional
            How conditions mask the relevance at a layer (CRP's ``ChannelConcept.mask`` by default).
        start_layer: str, optional
            Layer where the backward pass starts instead of the output.
        init_rel: :py:obj:`torch.Tensor`, int or callable, optional
            Initial relevance, as for ``CondAttribution`` (for the broadcast batch).
        on_device: str, optional
            Device on which to return heatmaps, activations and relevances.
        exclude_parallel: bool, optional
            True (default): isolate the conditions. False: CRP's plain conditional heatmaps, see the class.

        Returns
        -------
        :py:obj:`crp.attribution.attrResult`
            ``heatmap`` (one per broadcast condition, in their order), ``activations`` and ``relevances`` of the
            recorded layers (the relevance that reached them in each condition's backward passes, as CRP's
            ``exclude_parallel=True`` records it), and ``prediction`` (of ``start_layer`` if given).

        Raises
        ------
        ValueError
            If ``conditions`` is empty, a condition names a layer the model does not have or does not run, two layers
            on parallel paths, a layer no relevance reaches, or a concept that is not a channel of its layer; the
            model is left as it was.
        '''
        record_layer = list(record_layer or [])
        mask_map = _checked_masks(mask_map)
        if not exclude_parallel:
            return super().__call__(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                    on_device, False)
        if not conditions:
            raise ValueError('conditions is empty: give at least one condition')
        self._check_arguments(data, conditions, start_layer, False, init_rel)
        if len(data) == len(conditions):
            broadcast, rows = list(conditions), list(range(len(data)))
        else:
            broadcast = list(conditions) * len(data)
            rows = [sample for sample in range(len(data)) for _ in conditions]
        unique, rows = _distinct(data, rows)
        with self._forward(unique, broadcast, composite, record_layer, start_layer) as engine:
            engine_conditions = self._engine_conditions(engine, broadcast, rows, mask_map, start_layer, init_rel)
            records = self._records(engine, broadcast, record_layer, start_layer)
            return self._isolated(engine, engine_conditions, records, on_device)

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
        '''Compute isolated conditional heatmaps of one sample for many conditions, ``batch_size`` at a time, from
        one forward pass for all of them.

        As in CRP, the initial relevance of the last batch is computed for ``batch_size`` samples (so that a tensor
        ``init_rel`` fits every batch), and only its real conditions are returned. Unlike CRP, the layers may differ
        between conditions, and the heatmaps are moved to ``on_device`` too. Everything is validated before the
        first pass.

        Parameters
        ----------
        data: :py:obj:`torch.Tensor`
            One input sample, shape ``[1, ...]``; must require gradients.
        conditions: list of dict
            CRP conditions, any mix of layers.
        composite: :py:obj:`zennit.core.Composite`, optional
            The rules, with the canonizers the model needs.
        record_layer: list of str, optional
            Layers whose activations and relevances to return (with the layers of all conditions, as CRP).
        mask_map: callable or dict of str to callable, optional
            How conditions mask the relevance at a layer.
        start_layer: str, optional
            Layer where the backward pass starts instead of the output.
        init_rel: :py:obj:`torch.Tensor`, int or callable, optional
            Initial relevance, as for ``CondAttribution`` (for ``batch_size`` samples).
        batch_size: int, optional
            Conditions per batch of results.
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
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive integer, not {batch_size!r}')
        self._check_arguments(data, conditions, start_layer, False, init_rel)
        # every batch records the layers of all conditions, as CRP's generate does
        for condition in conditions:
            record_layer += [name for name in condition if name != self.MODEL_OUTPUT_NAME and name not in record_layer]
        batch_size = min(batch_size, len(conditions))
        batches = math.ceil(len(conditions) / batch_size)
        with self._forward(data, conditions, composite, record_layer, start_layer) as engine, \
                tqdm(total=batches, dynamic_ncols=True, disable=not verbose) as progress:
            spans = [slice(index * batch_size, (index + 1) * batch_size) for index in range(batches)]
            # all checked before the first backward pass, which is shared by all batches
            batched = [self._engine_conditions(engine, conditions[span], [0] * len(conditions[span]), mask_map,
                                               start_layer, init_rel, padded=batch_size) for span in spans]
            records = self._records(engine, conditions, record_layer, start_layer)
            engine.share([condition for batch in batched for condition in batch], records)
            for batch in batched:
                yield self._isolated(engine, batch, records, on_device)
                progress.update(1)

    def _layers_of(self, condition: Mapping[str, Sequence[int]], start_layer: Optional[str]) -> List[str]:
        # as CRP: the start layer is where the backward pass starts, not a layer it passes through
        return [name for name in condition if name not in (self.MODEL_OUTPUT_NAME, start_layer)]

    @contextlib.contextmanager
    def _forward(
        self,
        data: torch.Tensor,
        conditions: Sequence[Condition],
        composite: Optional[object],
        record_layer: Sequence[str],
        start_layer: Optional[str],
    ) -> Iterator[PartialBackward]:
        '''Check the layer names, run the forward pass under the composite with the layers' outputs recorded, and
        give the engine for its backward passes; the composite and the hooks are removed on leaving, also on error.'''
        modules = dict(self.model.named_modules())
        if self.MODEL_OUTPUT_NAME in modules:
            raise ValueError(f'the model has a layer named {self.MODEL_OUTPUT_NAME!r}, the name of the model output '
                             'in conditions: change MODEL_OUTPUT_NAME of the attribution')
        for index, condition in enumerate(conditions):
            unknown = [name for name in self._layers_of(condition, None) if name not in modules]
            if unknown:
                raise ValueError(f'condition {index} {dict(condition)!r}: not modules of the model: '
                                 f'{", ".join(map(repr, unknown))}')
        if start_layer is not None and start_layer not in modules:
            raise ValueError(f'start_layer {start_layer!r} is not a module of the model')
        missing = [name for name in record_layer if name not in modules]
        if missing:
            warnings.warn(f'record_layer names no modules of the model: {missing}; they are not recorded', stacklevel=4)
        conditioned = list(dict.fromkeys(name for condition in conditions for name in self._layers_of(condition, None)))
        names = [name for name in [*conditioned, *record_layer, *([start_layer] if start_layer else [])]
                 if name in modules]
        if composite is None:
            composite = Composite()
        with composite.context(self.model) as modified:
            # registered after the composite's hooks: the outputs as the rules return them
            recorder = Recorder(self.model, names)
            try:
                input = data.detach().clone().requires_grad_(True)
                output = modified(input)
                for name in [*conditioned, *([start_layer] if start_layer else [])]:
                    calls = recorder.calls.get(name, 0)
                    if calls != 1:
                        raise ValueError(
                            f'layer {name!r} ran {calls} times in the forward pass: a condition or start_layer needs '
                            'a module that runs once (give each use of a shared module its own module)')
                root = output if start_layer is None else recorder.outputs[start_layer]
                yield PartialBackward(recorder, root, input, start_layer)
            finally:
                recorder.remove()

    def _engine_conditions(
        self,
        engine: PartialBackward,
        conditions: Sequence[Condition],
        rows: Sequence[int],
        mask_map: Union[Callable, Dict[str, Callable]],
        start_layer: Optional[str],
        init_rel: Union[None, torch.Tensor, int, Callable],
        padded: Optional[int] = None,
    ) -> List[EngineCondition]:
        '''``conditions`` on the forward batch's ``rows`` for the engine, with CRP's initial relevance (of the
        broadcast batch, ``padded`` to that many samples as CRP's ``generate`` pads its last batch).'''
        count = len(conditions)
        rows = list(rows)
        targets = None
        if not start_layer:
            targets = [condition[self.MODEL_OUTPUT_NAME] for condition in conditions
                       if self.MODEL_OUTPUT_NAME in condition]
            if padded is not None and targets:
                targets += [targets[0]] * (padded - count)
        if padded is not None and padded > count:
            rows += [rows[0]] * (padded - count)
        starts = self.relevance_init(engine.root.detach()[rows].clone(), targets, init_rel)
        engine_conditions = []
        for index, condition in enumerate(conditions):
            layers = engine.order(self._layers_of(condition, start_layer))
            self._check_chain(engine, index, condition, layers)
            engine_conditions.append(EngineCondition(
                rows[index], starts[index].to(engine.root), layers,
                tuple(_mask_of(mask_map, layer, condition[layer]) for layer in layers)))
        return engine_conditions

    def _records(self, engine: PartialBackward, conditions: Sequence[Condition], record_layer: Sequence[str],
                 start_layer: Optional[str]) -> List[str]:
        '''The layers to record, as CRP records them: the conditioned layers too, and the start layer, in the order
        of the forward pass.'''
        wanted = {*record_layer, *(name for condition in conditions for name in self._layers_of(condition, None)),
                  *([start_layer] if start_layer else [])}
        return [name for name in engine.recorder.outputs if name in wanted]

    def _isolated(
        self,
        engine: PartialBackward,
        conditions: Sequence[EngineCondition],
        records: Sequence[str],
        on_device: Optional[str],
    ) -> attrResult:
        '''The isolated heatmaps, recorded activations and relevances, and predictions of ``conditions``.'''
        rows = [condition.sample for condition in conditions]
        heatmaps, relevances = engine(conditions, records)
        heatmap = self.heatmap_modifier(_Gradient(heatmaps), on_device)
        outputs = engine.recorder.outputs
        activations = {name: outputs[name].detach()[rows] for name in records}
        if on_device:
            activations = {name: value.to(on_device) for name, value in activations.items()}
            relevances = {name: value.to(on_device) for name, value in relevances.items()}
        return attrResult(heatmap, activations, relevances, engine.root.detach()[rows])

    @staticmethod
    def _check_chain(engine: PartialBackward, index: int, condition: Condition, layers: Sequence[str]) -> None:
        '''Refuse two layers of one condition on parallel paths (no relevance passes through both).'''
        for upper, lower in zip(layers, layers[1:]):
            if not engine.depends(upper, lower):
                raise ValueError(f'condition {index} {dict(condition)!r}: layers {lower!r} and {upper!r} lie on '
                                 'parallel paths, no relevance passes through both')


def _distinct(data: torch.Tensor, rows: Sequence[int]) -> Tuple[torch.Tensor, List[int]]:
    '''The distinct samples of ``data`` that ``rows`` use, and each row's index among them.'''
    kept: List[int] = []
    index: Dict[int, int] = {}
    for row in dict.fromkeys(rows):
        match = next((position for position, other in enumerate(kept) if torch.equal(data[other], data[row])), None)
        if match is None:
            kept.append(row)
            match = len(kept) - 1
        index[row] = match
    return data[kept], [index[row] for row in rows]
