'''The names under which the merges of a traced model can be cut, and the cuts that isolate layers.

Names:

- every sum or concatenation is named by the innermost module whose forward computes it (``"layer3.0"``), followed by
  ``:k`` where that module computes several (``"features.denseblock1:0"``; ``":k"`` for the model's own forward). Its
  branches are its inputs, ``"0"``, ``"1"``, ...; where the inputs split into the module's own input (the identity,
  ``"skip"``) and what the module computes (``"residual"``), or a sum of two adds a shortcut with fewer layers to a
  branch with more (a ResNet downsample path), ``"skip"`` and ``"residual"`` name those groups, as the family
  canonizers do;
- a module whose output enters the merges of several modules, or enters a merge and merges its own inputs (a DenseNet
  dense layer), is named by itself: ``"skip"`` cuts every input of a merge after it that does not depend on it (all
  relevance reaching the paths before it passes through it), ``"residual"`` cuts its output from every merge it
  enters.

On torchvision's ResNet, DenseNet, EfficientNet and MobileNet this gives the family canonizers' names and meanings.
'''
import difflib
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from zennit.types import Linear

from ..core.cuts import RESIDUAL, SKIP, BlockCatalog
from .analysis import Analysis, Merge, target_name

#: a merge input, as (merge number, input number)
Place = Tuple[int, int]
Branches = Union[str, Tuple[str, ...]]


class CutTable:
    '''The cuttable names of a traced model, the (name, branch) pairs that cut each merge input, and the regions of
    the modules, for the isolation rule.

    Parameters
    ----------
    analysis: :py:class:`~canonizers.graph.analysis.Analysis`
        The traced model.
    replaced: mapping of str to str
        Modules the canonized model no longer calls under their name, with the reason.
    '''
    def __init__(self, analysis: Analysis, replaced: Mapping[str, str]) -> None:
        self.analysis = analysis
        self.merges = analysis.merges
        self.replaced = dict(replaced)
        self.module_names = list(analysis.modules)
        #: batch norms called whole with an activation of their own (timm's BatchNormAct2d)
        self.batch_norms_with_activation = {
            name for name in analysis.calls
            if isinstance(analysis.modules[name], _BatchNorm) and hasattr(analysis.modules[name], 'act')}
        self._regions(analysis)
        self._name_merges(analysis)
        self._find_producers(analysis)
        self.pairs: List[List[FrozenSet[Tuple[str, str]]]] = [
            [frozenset(self._pairs_of(number, index)) for index in range(len(merge.inputs))]
            for number, merge in enumerate(self.merges)
        ]
        self.gate_refusals = self._gate_refusals(analysis)

    # --- regions ---------------------------------------------------------------------------------------------------
    def _regions(self, analysis: Analysis) -> None:
        #: bits of the nodes computed inside each module
        self.region: Dict[str, int] = {}
        for node in analysis.nodes:
            for module in analysis.scope[node]:
                self.region[module] = self.region.get(module, 0) | 1 << analysis.index[node]
        #: the nodes of each module whose values leave it
        self.exits: Dict[str, List[torch.fx.Node]] = {}
        for node in analysis.nodes:
            for module in analysis.scope[node]:
                if any(module not in analysis.scope[user] or user.op == 'output' for user in node.users):
                    self.exits.setdefault(module, []).append(node)

    def inside(self, node: torch.fx.Node, module: str) -> bool:
        '''Whether ``node`` is computed inside ``module``.'''
        return bool(self.region.get(module, 0) >> self.analysis.index[node] & 1)

    def depends(self, node: torch.fx.Node, module: str) -> bool:
        '''Whether ``node`` depends on anything computed inside ``module``.'''
        return bool(self.analysis.ancestors[node] & self.region.get(module, 0))

    def downstream(self, merge: Merge, module: str) -> bool:
        '''Whether ``merge`` lies after ``module`` (depends on it, outside it).'''
        return self.depends(merge.node, module) and not self.inside(merge.node, module)

    # --- names -----------------------------------------------------------------------------------------------------
    def _name_merges(self, analysis: Analysis) -> None:
        counts: Dict[str, int] = {}
        for merge in self.merges:
            counts[merge.holder] = counts.get(merge.holder, 0) + 1
        seen: Dict[str, int] = {}
        self.names: List[str] = []
        for merge in self.merges:
            index = seen.get(merge.holder, 0)
            seen[merge.holder] = index + 1
            single = counts[merge.holder] == 1 and merge.holder
            self.names.append(merge.holder if single else f'{merge.holder}:{index}')
        self.depth = self._depths(analysis)
        self.aliases = [self._aliases(analysis, merge) for merge in self.merges]

    def _depths(self, analysis: Analysis) -> Dict[torch.fx.Node, int]:
        # the number of linear layers on the longest path into each node
        depth: Dict[torch.fx.Node, int] = {}
        for node in analysis.nodes:
            own = int(isinstance(analysis.module(node), Linear))
            depth[node] = own + max((depth[source] for source in analysis.dependencies(node)), default=0)
        return depth

    def _aliases(self, analysis: Analysis, merge: Merge) -> Dict[str, FrozenSet[int]]:
        if merge.holder:
            identity = {index for index, input in enumerate(merge.inputs) if not self.inside(input, merge.holder)}
        else:
            identity = {index for index, input in enumerate(merge.inputs) if input.op == 'placeholder'}
        count = len(merge.inputs)
        if 0 < len(identity) < count:
            return {SKIP: frozenset(identity), RESIDUAL: frozenset(set(range(count)) - identity)}
        if count == 2 and (merge.kind == 'sum' or merge.summed):
            first, second = (self.depth[input] for input in merge.inputs)
            if first != second:
                shortcut = 0 if first < second else 1
                return {SKIP: frozenset({shortcut}), RESIDUAL: frozenset({1 - shortcut})}
        return {}

    def _find_producers(self, analysis: Analysis) -> None:
        #: modules named by themselves: their single exit node
        self.producers: Dict[str, torch.fx.Node] = {}
        own_aliases = {name for name, aliases in zip(self.names, self.aliases) if aliases}
        # modules that merge their own inputs (a dense layer concatenating the features before it)
        merged_inputs = {merge.holder for merge, aliases in zip(self.merges, self.aliases) if not aliases}
        for module, exits in self.exits.items():
            if len(exits) != 1 or module in own_aliases:
                continue
            entered = {merge.holder for merge in self.merges if exits[0] in merge.inputs}
            if len(entered) >= 2 or (entered and module in merged_inputs):
                self.producers[module] = exits[0]
        # of modules with one output (a dense layer and its last convolution), the outermost names it
        outermost: Dict[torch.fx.Node, str] = {}
        for module, exit in self.producers.items():
            if exit not in outermost or len(module) < len(outermost[exit]):
                outermost[exit] = module
        self.producers = {module: exit for exit, module in outermost.items()}

    def _pairs_of(self, number: int, index: int) -> Set[Tuple[str, str]]:
        merge, name = self.merges[number], self.names[number]
        pairs = {(name, str(index))}
        pairs.update((name, alias) for alias, indices in self.aliases[number].items() if index in indices)
        input = merge.inputs[index]
        for producer, exit in self.producers.items():
            if input is exit:
                pairs.add((producer, RESIDUAL))
            if self.downstream(merge, producer) and not self.depends(input, producer):
                pairs.add((producer, SKIP))
        return pairs

    def catalog(self) -> BlockCatalog:
        '''The names and branches that cuts may use.'''
        blocks: Dict[str, Tuple[str, ...]] = {}
        for name, merge, aliases in zip(self.names, self.merges, self.aliases):
            blocks[name] = tuple(aliases) + tuple(str(index) for index in range(len(merge.inputs)))
        for producer in self.producers:
            blocks[producer] = (SKIP, RESIDUAL) + tuple(
                branch for branch in blocks.get(producer, ()) if branch not in (SKIP, RESIDUAL))
        refusals = {holder: (f'{holder!r} holds only a gate, which is constant in the backward pass: there is no '
                             'path to cut') for holder in {gate.holder for gate in self.analysis.gates}
                    if holder not in blocks}
        return BlockCatalog(blocks, self.module_names, refusals)

    def _gate_refusals(self, analysis: Analysis) -> Dict[str, str]:
        refusals = {}
        for gate in analysis.gates:
            branch = analysis.ancestors[gate.gate] & ~analysis.ancestors[gate.signal]
            for module, bits in self.region.items():
                if bits and bits & branch == bits:
                    refusals[module] = (f'{module!r} computes the gate of {target_name(gate.node)!r} in '
                                        f'{gate.holder or "the model"!r}, which is constant in the backward pass: no '
                                        'relevance flows into it, so a condition on it has none; condition on a '
                                        'layer before the gate instead')
        return refusals

    # --- isolation -------------------------------------------------------------------------------------------------
    def check_layer(self, layer: str) -> str:
        '''Refuse a layer a CRP condition cannot name on the canonized model, with the reason; return the name of the
        module whose place in the graph it takes (itself, or the batch norm whose activation it is).'''
        if layer not in self.analysis.modules:
            closest = difflib.get_close_matches(layer, self.module_names, n=3)
            raise ValueError(f'{layer!r} is not a module of this model (closest: '
                             f'{", ".join(map(repr, closest)) or "none"})')
        if layer in self.gate_refusals:
            raise ValueError(self.gate_refusals[layer])
        if layer in self.replaced:
            raise ValueError(self.replaced[layer])
        if not self.region.get(layer):
            leaf = next((name for name in self.analysis.calls if layer.startswith(name + '.')), None)
            if leaf is None:
                raise ValueError(f'{layer!r} is not called in the forward of the model (as traced in eval mode)')
            if leaf not in self.batch_norms_with_activation:
                raise ValueError(f'{layer!r} is called inside {leaf!r}, which the canonized forward calls whole: '
                                 f'where relevance goes inside it is unknown, condition on {leaf!r} instead')
            # the activation of timm's BatchNormAct2d: the last step of the batch norm, in its place
            layer = leaf
        if len(self.exits.get(layer, ())) != 1 or self.analysis.calls.get(layer, 1) != 1:
            raise ValueError(f'{layer!r} is called at several places in the forward, or its output leaves it at '
                             'several places: a condition on it mixes them, and no cut isolates it')
        return layer

    def isolating(self, layer: str) -> Set[Place]:
        '''The merge inputs to cut so that all relevance reaching the input passes through ``layer``: every input of
        a merge after ``layer`` that does not depend on it.

        Raises
        ------
        ValueError
            If relevance can go around ``layer`` through an operation that cannot be cut.
        '''
        layer = self.check_layer(layer)
        for node, reason, inputs in self.analysis.unsupported:
            if self.depends(node, layer) and not self.inside(node, layer) and any(
                    not self.depends(source, layer) for source in inputs):
                raise ValueError(f'relevance can go around {layer!r} through a {reason} in '
                                 f'{self.analysis.holder(node) or "the model"!r}, which cannot be cut')
        return {
            (number, index) for number, merge in enumerate(self.merges) if self.downstream(merge, layer)
            for index, input in enumerate(merge.inputs) if not self.depends(input, layer)
        }

    def spec(self, places: Set[Place], layer: Optional[str] = None) -> Dict[str, Branches]:
        '''The cut specification of ``places``: the name of ``layer`` or one enclosing it with ``"skip"`` where that
        is exactly it, else per merge its aliases or input numbers.'''
        if not places:
            return {}
        if layer is not None:
            parts = layer.split('.')
            for end in range(len(parts), 0, -1):
                candidate = '.'.join(parts[:end])
                if candidate in self.producers and self._cut_by(candidate, SKIP) == places:
                    return {candidate: SKIP}
        grouped: Dict[int, Set[int]] = {}
        for number, index in places:
            grouped.setdefault(number, set()).add(index)
        spec: Dict[str, Branches] = {}
        for number, indices in sorted(grouped.items()):
            alias = [name for name, members in self.aliases[number].items() if members == indices]
            branches = tuple(str(index) for index in sorted(indices))
            spec[self.names[number]] = alias[0] if alias else branches[0] if len(branches) == 1 else branches
        return spec

    def _cut_by(self, name: str, branch: str) -> Set[Place]:
        return {(number, index) for number, inputs in enumerate(self.pairs)
                for index, pairs in enumerate(inputs) if (name, branch) in pairs}

    def layer_cuts(self, layers: Sequence[str]) -> Dict[str, Branches]:
        '''The cut that makes all relevance reaching the input pass through every one of ``layers``.

        Raises
        ------
        ValueError
            If a layer cannot be named (see :py:meth:`check_layer`), or two layers lie in parallel paths.
        '''
        layers = list(dict.fromkeys(layers))
        places = {layer: self.isolating(layer) for layer in layers}
        for position, first in enumerate(layers):
            for second in layers[position + 1:]:
                if not (self._follows(first, second) or self._follows(second, first)):
                    raise ValueError(f'layers {first!r} and {second!r} lie in parallel paths: relevance cannot pass '
                                     'through both, so no cut isolates them together')
        specs = [self.spec(places[layer], layer) for layer in layers]
        combined: Dict[str, Branches] = {}
        for spec in specs:
            for name, branches in spec.items():
                if combined.setdefault(name, branches) != branches:
                    return self.spec(set().union(*places.values()))
        return combined

    def _follows(self, later: str, earlier: str) -> bool:
        exit = self.exits[self.check_layer(later)][0]
        return self.depends(exit, self.check_layer(earlier))

