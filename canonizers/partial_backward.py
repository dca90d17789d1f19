'''Conditional relevance by partial backward passes: one forward pass, one backward pass from the output down to
the conditioned layers that all conditions share, and per condition only the part of the backward pass below its
layers.

A conditional heatmap isolated as CRP's ``exclude_parallel=True`` isolates it is a chain of vector-Jacobian
products: the relevance at the output, propagated to the output of the condition's last layer (the one nearest the
output), masked there, propagated from there to the next layer of the condition, masked, ..., and from its first
layer to the input. Starting each link at a layer's output also isolates: relevance that goes around the layer is
never propagated, so no path needs cutting. The links from the output to the layers are the same for every
condition with the same initial relevance, so they are computed once; only the links below the layers are computed
per condition, and conditions with the same layers share one batched pass (``is_grads_batched``).

The engine knows nothing of CRP: :py:mod:`canonizers.crp` builds the conditions (initial relevance, layers, masks)
and the result from CRP's own functions.
'''
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch

#: how autograd says that it cannot batch a backward pass over the rows of its gradients
_UNBATCHABLE = re.compile(r'vmap|[Bb]atching rule|[Bb]atched')

#: a mask: given the row of the batch it applies to, a function of the relevance at a layer (CRP's ``mask_map``
#: calling convention, ``mask_map(batch_id, concept_ids, layer_name)`` with the other two arguments bound)
Mask = Callable[[int], Callable[[torch.Tensor], torch.Tensor]]


class Recorder:
    '''Forward hooks that keep the outputs of named layers as zennit's rule hooks return them, and the order in
    which the layers finished.

    The hooks must be registered after the composite's: the output a rule's hook returns is the one whose
    gradient passes through the layer's own rule (zennit 1.0 wraps the raw output in an identity whose backward hook
    stores the relevance the rule distributes).
    '''
    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        self.outputs: Dict[str, torch.Tensor] = {}
        self.calls: Dict[str, int] = {}
        self.finished: Dict[str, int] = {}
        self._clock = 0
        # the graph canonizer calls a layer called at several places through copies (one rule each): count those
        copies: Dict[int, List[torch.nn.Module]] = {}
        for module in modules.values():
            original = module.__dict__.get('canonizer_copy_of')
            if original is not None:
                copies.setdefault(id(original), []).append(module)
        self.handles = [module.register_forward_hook(self._hook(name)) for name in dict.fromkeys(names)
                        for module in [modules[name]] + copies.get(id(modules[name]), [])]

    def _hook(self, name: str) -> Callable:
        def record(module: torch.nn.Module, input: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # as CRP: a module called several times keeps its last output
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
            self.calls[name] = self.calls.get(name, 0) + 1
            self._clock += 1
            self.finished[name] = self._clock
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class Condition(NamedTuple):
    '''One condition of the engine.

    sample: the row of the forward batch it explains; start: its initial relevance at the root (one row);
    layers: its layers, nearest the output first; masks: one per layer.
    '''
    sample: int
    start: torch.Tensor
    layers: Tuple[str, ...]
    masks: Tuple[Mask, ...]


def _depends(tensor: torch.Tensor, on: torch.Tensor, cache: Dict[Tuple[int, int], bool]) -> bool:
    '''Whether ``tensor`` is computed from ``on``: its autograd graph reaches ``on``'s node.'''
    key = (id(tensor), id(on))
    if key not in cache:
        target, seen, stack = on.grad_fn, set(), [tensor.grad_fn]
        found = False
        while stack and target is not None:
            node = stack.pop()
            if node is None or node in seen:
                continue
            if node is target:
                found = True
                break
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
        cache[key] = found
    return cache[key]


def _rows(conditions: Sequence[int]) -> List[int]:
    '''For conditions on the given samples, the row of a batched pass each takes: conditions on different samples
    share a row (samples are independent), so a row holds at most one condition per sample.'''
    count: Dict[int, int] = {}
    rows = []
    for sample in conditions:
        rows.append(count.get(sample, 0))
        count[sample] = rows[-1] + 1
    return rows


class PartialBackward:
    '''Relevance of many conditions from one forward pass.

    Parameters
    ----------
    recorder: :py:class:`Recorder`
        The outputs of the layers, recorded in the forward pass.
    root: :py:obj:`torch.Tensor`
        Where the backward pass starts: the model output, or a layer's output.
    input: :py:obj:`torch.Tensor`
        The input of the forward pass (a leaf that requires gradients).
    root_layer: str, optional
        The layer whose output is the root, if not the model output.
    '''
    #: whether rows of gradients go through one batched backward pass (set to False where autograd cannot batch)
    batched = True

    def __init__(
        self, recorder: Recorder, root: torch.Tensor, input: torch.Tensor, root_layer: Optional[str] = None
    ) -> None:
        self.recorder = recorder
        self.root = root
        self.input = input
        self.root_layer = root_layer
        self.root_name = 'the model output' if root_layer is None else f'start_layer {root_layer!r}'
        self._dependencies: Dict[Tuple[int, int], bool] = {}
        self._cache: List[Tuple[int, torch.Tensor, Dict[str, Optional[torch.Tensor]]]] = []

    def order(self, layers: Sequence[str]) -> Tuple[str, ...]:
        '''``layers`` nearest the output first (the last to finish in the forward pass).'''
        return tuple(sorted(layers, key=lambda name: -self.recorder.finished[name]))

    def depends(self, layer: str, on: str) -> bool:
        '''Whether the output of ``layer`` is computed from the output of layer ``on``.'''
        outputs = self.recorder.outputs
        return _depends(outputs[layer], outputs[on], self._dependencies)

    def _grad(
        self, output: torch.Tensor, inputs: List[torch.Tensor], gradients: torch.Tensor
    ) -> List[Optional[torch.Tensor]]:
        '''Vector-Jacobian products of ``output`` with the rows of ``gradients`` (shape ``[rows, *output.shape]``),
        batched where autograd can batch the backward pass, else one row at a time.'''
        if len(gradients) > 1 and self.batched:
            try:
                return list(torch.autograd.grad(output, inputs, gradients, retain_graph=True, allow_unused=True,
                                                is_grads_batched=True))
            except RuntimeError as error:
                if not _UNBATCHABLE.search(str(error)):
                    raise
                # an operation of the rules without a batching rule: the same, one row at a time
                self.batched = False
        per_row = [torch.autograd.grad(output, inputs, row, retain_graph=True, allow_unused=True)
                   for row in gradients]
        return [None if per_row[0][index] is None else torch.stack([row[index] for row in per_row])
                for index in range(len(inputs))]

    def _on_pass(self, record: str, top: Optional[str], bottom: Optional[str]) -> bool:
        '''Whether the pass from layer ``top`` (None: the root) to layer ``bottom`` (None: the input) records the
        relevance at layer ``record``: at its start, or between start and end. Not at its end: a conditioned layer
        is recorded as the start of the next pass, masked (CRP's ``exclude_parallel=True`` records it at both, so
        twice the relevance that passes the layer).'''
        if record == bottom:
            return False
        if record == (top or self.root_layer):
            return True
        outputs = self.recorder.outputs
        tensor = outputs[record]
        above = _depends(self.root if top is None else outputs[top], tensor, self._dependencies)
        below = bottom is None or _depends(tensor, outputs[bottom], self._dependencies)
        return above and below

    def __call__(
        self, conditions: Sequence[Condition], records: Sequence[str] = ()
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        '''The gradient at the input, and the relevance at each recorded layer, of each condition.

        Returns
        -------
        :py:obj:`torch.Tensor`
            Shape ``[len(conditions), *input.shape[1:]]``, in condition order.
        dict of str to :py:obj:`torch.Tensor`
            Per recorded layer, shape ``[len(conditions), *output.shape[1:]]``: the relevance that reached its output
            in the passes of each condition, as CRP records it with ``exclude_parallel=True``.
        '''
        outputs = self.recorder.outputs
        records = [name for name in records if name in outputs]
        heatmaps = self.input.new_zeros((len(conditions),) + self.input.shape[1:])
        recorded = {name: outputs[name].new_zeros((len(conditions),) + outputs[name].shape[1:]) for name in records}

        tops = self._shared(conditions, records, recorded)
        groups: Dict[Tuple[str, ...], List[int]] = {}
        for index, condition in enumerate(conditions):
            groups.setdefault(condition.layers, []).append(index)
        for layers, members in groups.items():
            self._partial(layers, [conditions[index] for index in members], members, tops, records, recorded,
                          heatmaps)
        return heatmaps, recorded

    def share(self, conditions: Sequence[Condition], records: Sequence[str] = ()) -> None:
        '''Run the backward pass from the root to the layers of ``conditions`` ahead, for all of them at once, so that
        later calls on any of them (the batches of ``generate``) take their part of it from the cache.'''
        self._shared(conditions, [name for name in records if name in self.recorder.outputs])

    def _entry(self, condition: Condition) -> Dict[str, torch.Tensor]:
        '''The cached relevance from the root, at layers, for the sample and initial relevance of ``condition``.'''
        for sample, start, values in self._cache:
            if sample == condition.sample and torch.equal(start, condition.start):
                return values
        self._cache.append((condition.sample, condition.start, {}))
        return self._cache[-1][2]

    def _shared(
        self,
        conditions: Sequence[Condition],
        records: Sequence[str],
        recorded: Optional[Dict[str, torch.Tensor]] = None,
    ) -> List[Optional[torch.Tensor]]:
        '''The backward pass from the root to the last layer of every condition, one row per distinct initial
        relevance of a sample (the relevance at a layer from the root depends on nothing else, so it is cached): per
        condition, the (unmasked) relevance at its last layer.'''
        entries = [self._entry(condition) for condition in conditions]
        # per condition with layers: its last layer, and the recorded layers its pass from the root reaches
        needs = [[condition.layers[0]] + [name for name in records if name != self.root_layer
                                          and self._on_pass(name, None, condition.layers[0])]
                 if condition.layers else [] for condition in conditions]
        missing = {}
        for condition, entry, need in zip(conditions, entries, needs):
            if any(name not in entry for name in need):
                missing.setdefault(id(entry), (condition, entry, set()))[2].update(need)
        if missing:
            self._compute(list(missing.values()))
        tops = []
        for index, (condition, entry, need) in enumerate(zip(conditions, entries, needs)):
            if not condition.layers:
                # its whole pass is the partial one, from the root to the input
                tops.append(None)
                continue
            if entry[condition.layers[0]] is None:
                raise ValueError(f'no relevance reaches layer {condition.layers[0]!r} from {self.root_name}: a '
                                 f'conditioned layer must lie between the input and {self.root_name}, outside parts '
                                 'the backward pass skips (such as a gate the canonizer makes constant)')
            tops.append(entry[condition.layers[0]])
            if recorded is None:
                continue
            if self.root_layer in recorded:
                recorded[self.root_layer][index] += condition.start
            for name in need[1:]:
                if entry[name] is not None:
                    recorded[name][index] += entry[name]
        return tops

    def _compute(self, missing: List[Tuple[Condition, Dict[str, torch.Tensor], Set[str]]]) -> None:
        '''One (batched) backward pass from the root for the cache entries that miss layers: a row per entry, as
        many rows as a sample has entries.'''
        rows = _rows([condition.sample for condition, _, _ in missing])
        gradients = self.root.new_zeros((max(rows) + 1,) + self.root.shape)
        for (condition, _, _), row in zip(missing, rows):
            gradients[row, condition.sample] = condition.start
        names = list(dict.fromkeys(name for _, _, need in missing for name in sorted(need)))
        outputs = self.recorder.outputs
        results = self._grad(self.root, [outputs[name] for name in names], gradients)
        for (condition, entry, _), row in zip(missing, rows):
            for name, values in zip(names, results):
                entry[name] = None if values is None else values[row, condition.sample]

    def _partial(
        self,
        layers: Tuple[str, ...],
        conditions: Sequence[Condition],
        members: Sequence[int],
        tops: Sequence[Optional[torch.Tensor]],
        records: Sequence[str],
        recorded: Dict[str, torch.Tensor],
        heatmaps: torch.Tensor,
    ) -> None:
        '''The backward passes below ``layers``, shared by the conditions on them: masked at each layer, chained
        from the last layer to the first, then to the input.'''
        outputs = self.recorder.outputs
        rows = _rows([condition.sample for condition in conditions])
        start = self.root if not layers else outputs[layers[0]]
        gradients = start.new_zeros((max(rows) + 1,) + start.shape)
        for condition, member, row in zip(conditions, members, rows):
            gradients[row, condition.sample] = condition.start if tops[member] is None else tops[member]
        # the links of the chain: root (only without layers) or each layer, down to the next layer or the input
        links = list(zip(layers, list(layers[1:]) + [None])) if layers else [(None, None)]
        for depth, (top, bottom) in enumerate(links):
            if top is not None:
                for condition, row in zip(conditions, rows):
                    gradients[row] = condition.masks[depth](condition.sample)(gradients[row])
            output = self.root if top is None else outputs[top]
            target = self.input if bottom is None else outputs[bottom]
            passing = [name for name in records if name != self.root_layer and self._on_pass(name, top, bottom)]
            results = self._grad(output, [target] + [outputs[name] for name in passing], gradients)
            if results[0] is None:
                raise ValueError(f'layers {top!r} and {bottom!r} of one condition lie on parallel paths: no relevance '
                                 'passes through both')
            if top is None and self.root_layer in records:
                for condition, member, row in zip(conditions, members, rows):
                    recorded[self.root_layer][member] += gradients[row, condition.sample]
            for name, values in zip(passing, results[1:]):
                if values is not None:
                    for condition, member, row in zip(conditions, members, rows):
                        recorded[name][member] += values[row, condition.sample]
            gradients = results[0]
        for condition, member, row in zip(conditions, members, rows):
            heatmaps[member] = gradients[row, condition.sample]
