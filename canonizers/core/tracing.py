'''Where parallel paths of a model meet, found by tracing its forward with ``torch.fx``.

The family canonizers know their blocks; this module knows what they do not: which sums, concatenations and gated
products of a model merge parallel paths, and whether relevance can go around a layer through one of them. It lets
the package say "not supported" for a model or layer instead of "nothing to isolate".
'''
import operator
import weakref
from typing import Dict, FrozenSet, Iterable, List, NamedTuple, Set, Tuple, Union

import torch
import torch.fx

#: operations that merge tensors from several paths, by the kind of merge
_MERGES = {
    operator.add: 'sum', operator.iadd: 'sum', torch.add: 'sum', 'add': 'sum', 'add_': 'sum',
    torch.cat: 'concatenation', torch.concat: 'concatenation', torch.stack: 'concatenation',
    operator.mul: 'product', operator.imul: 'product', torch.mul: 'product', 'mul': 'product', 'mul_': 'product',
}
#: operations whose results are sizes, not signals
_SHAPES = {'size', 'dim', 'numel', 'shape', 'ndim', 'dtype', 'device'}


class TracingError(RuntimeError):
    '''The model cannot be traced by ``torch.fx``, so where its paths meet is unknown.'''


class Merge(NamedTuple):
    '''A place where parallel paths meet.

    Attributes
    ----------
    kind: str
        ``"sum"``, ``"concatenation"`` or ``"product"`` (a gate).
    module: str
        The innermost module whose forward holds the merge (``""`` for the model's own forward).
    modules: tuple of str
        All modules whose forwards hold it, outermost first.
    '''
    kind: str
    module: str
    modules: Tuple[str, ...]


def _is_size(node: torch.fx.Node) -> bool:
    '''Whether ``node`` computes a size or other non-signal value (``x.shape[1] * 2``) rather than a tensor.'''
    if node.op == 'call_method' and node.target in _SHAPES:
        return True
    if node.op == 'call_function' and node.target is getattr and len(node.args) > 1 and node.args[1] in _SHAPES:
        return True
    if node.op == 'call_function' and node.target in (operator.getitem, operator.mul, operator.add,
                                                      operator.floordiv, operator.sub):
        sources = [arg for arg in node.args if isinstance(arg, torch.fx.Node)]
        return bool(sources) and all(_is_size(source) for source in sources)
    return False


def _signal_inputs(node: torch.fx.Node, signals: Set[torch.fx.Node]) -> List[torch.fx.Node]:
    '''The inputs of ``node`` among ``signals``, also those inside a list (as ``torch.cat`` takes them).'''
    inputs: List[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: inputs.append(arg) or arg)
    return [arg for arg in inputs if arg in signals]


def _modules_of(node: torch.fx.Node) -> Tuple[str, ...]:
    stack = node.meta.get('nn_module_stack') or {}
    names = tuple(value[0] if isinstance(value, tuple) else key for key, value in stack.items())
    if node.op == 'call_module':
        names += (str(node.target),)
    return names


#: public names of the helpers the graph canonizer shares
is_size = _is_size
modules_of = _modules_of


class ParallelPaths:
    '''The traced data flow of a model: its merges of parallel paths, and which of them relevance can take around a
    layer.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model; it is traced, not changed.

    Raises
    ------
    TracingError
        If ``torch.fx`` cannot trace the model; the message quotes the tracing error.
    '''
    def __init__(self, model: torch.nn.Module) -> None:
        try:
            self.graph = torch.fx.Tracer().trace(model)
        except Exception as error:
            raise TracingError(f'torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: '
                               f'{str(error).splitlines()[0] if str(error) else ""})') from error
        # the nodes that carry the input signal: computed from the model's input, and not sizes (a parameter, such
        # as a class token or a layer scale, is no path of the input)
        self.signals: Set[torch.fx.Node] = set()
        for node in self.graph.nodes:
            if node.op == 'placeholder' or (
                    not _is_size(node) and any(source in self.signals for source in node.all_input_nodes)):
                self.signals.add(node)
        self.merges: Dict[torch.fx.Node, Merge] = {}
        for node in self.graph.nodes:
            kind = _MERGES.get(node.target) if node.op in ('call_function', 'call_method') else None
            if kind is None:
                continue
            sources = _signal_inputs(node, self.signals)
            if len(set(sources)) >= 2:
                modules = _modules_of(node)
                self.merges[node] = Merge(kind, modules[-1] if modules else '', modules)

    def uncovered(self, covered: Iterable[str]) -> List[Merge]:
        '''The merges that no module of ``covered`` (e.g. the blocks a canonizer rewrites) holds.'''
        covered = set(covered)
        return [merge for merge in self.merges.values() if not covered.intersection(merge.modules)]

    def _nodes_of(self, layer: str) -> Set[torch.fx.Node]:
        return {node for node in self.graph.nodes if layer in _modules_of(node)}

    def bypasses(self, layer: str, covered: Iterable[str] = ()) -> List[Merge]:
        '''The merges, outside the modules ``covered``, through which relevance can go around ``layer``: merges
        downstream of it with an input that does not depend on it.

        Parameters
        ----------
        layer: str
            Name of a module of the model.
        covered: iterable of str
            Modules whose merges a canonizer handles (those are left out).

        Returns
        -------
        list of :py:class:`Merge`
            The merges, in the order of the forward pass; empty if ``layer`` does not appear in the trace.
        '''
        inside = self._nodes_of(layer)
        downstream: Set[torch.fx.Node] = set()
        frontier = [user for node in inside for user in node.users if user not in inside]
        while frontier:
            node = frontier.pop()
            if node not in downstream:
                downstream.add(node)
                frontier.extend(node.users)
        covered = set(covered)
        return [
            merge for node, merge in self.merges.items()
            if node in downstream and not covered.intersection(merge.modules)
            and any(source not in downstream and source not in inside
                    for source in _signal_inputs(node, self.signals))
        ]


_CACHE: 'weakref.WeakKeyDictionary[torch.nn.Module, Tuple[FrozenSet[int], ParallelPaths]]' = (
    weakref.WeakKeyDictionary())


def parallel_paths(model: torch.nn.Module) -> ParallelPaths:
    ''':py:class:`ParallelPaths` of ``model``, traced once per model (again if its modules change).'''
    key = frozenset(id(module) for module in model.modules())
    cached = _CACHE.get(model)
    if cached is None or cached[0] != key:
        cached = (key, ParallelPaths(model))
        _CACHE[model] = cached
    return cached[1]


def describe(merges: List[Merge], limit: int = 3) -> str:
    '''A short description of merges for messages: how many of which kind, and where the first ones are.'''
    kinds: Dict[str, int] = {}
    for merge in merges:
        kinds[merge.kind] = kinds.get(merge.kind, 0) + 1
    counts = ', '.join(f'{count} {kind}{"s" if count > 1 else ""}' for kind, count in kinds.items())
    places: List[str] = []
    for merge in merges:
        place = repr(merge.module) if merge.module else 'the model\'s own forward'
        if place not in places:
            places.append(place)
    more = ', ...' if len(places) > limit else ''
    return f'{counts} of parallel paths (in {", ".join(places[:limit])}{more})'


def traced_merges(model: torch.nn.Module) -> Union[List[Merge], TracingError]:
    '''The merges of parallel paths of ``model``, in the order of the forward pass, or the error if it cannot be
    traced: what messages about a model no canonizer fits are built from.'''
    try:
        return list(parallel_paths(model).merges.values())
    except TracingError as error:
        return error
