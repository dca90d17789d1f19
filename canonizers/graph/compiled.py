'''Everything the graph canonizer derives from a model's structure, computed once per model and cached.'''
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..core.lifecycle import REWRITTEN
from .analysis import Analysis
from .batchnorms import BatchNormPlan
from .conservation import Operation, find, relevance_path
from .cutting import CutTable
from .functional import split_computed_biases
from .modules import elementwise_activation, leaf_activation
from .program import Program
from .tracer import TraceFailure, trace
from .transformer import Transformer, learned_constants

#: the family canonizers, named in messages about models the graph canonizer cannot trace
FAMILIES = 'ResNetCanonizer, DenseNetCanonizer, EfficientNetCanonizer or MobileNetCanonizer'


class Compiled:
    '''The canonized forward of one model, its batch-norm merges, and its cut table, found from the traced graph.

    Holds names, not the model's modules, so that caching it per model keeps no model alive.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (in its uncanonized state); it is traced, not changed.
    attention: str
        The treatment of attention (:py:data:`canonizers.graph.canonizer.ATTENTION_RULES`).
    input_shape: tuple of int, optional
        The shape of the inputs to specialize the graph to where the forward branches on shapes (``input_shape``
        of :py:class:`~canonizers.GraphCanonizer`).

    Attributes
    ----------
    specialized: (:py:obj:`torch.Size`, :py:obj:`torch.dtype`) or None
        The shape and dtype of the only inputs the compiled forward takes, where the graph is specialized to them.

    Raises
    ------
    ValueError
        If ``torch.fx`` cannot trace the model; the message quotes the tracing error.
    '''
    def __init__(self, model: torch.nn.Module, attention: str = 'cp-lrp',
                 input_shape: Optional[Tuple[int, ...]] = None) -> None:
        example = None if input_shape is None else example_input(model, input_shape)
        try:
            graph, self.constants, opaque, specialized = trace(model, example)
        except TraceFailure as failure:
            raise ValueError(f'GraphCanonizer cannot canonize {type(model).__name__}: {failure}. Make its forward '
                             f'traceable (no control flow on tensor values), or use a family canonizer if one fits '
                             f'({FAMILIES})') from failure.cause
        self.specialized = (example.shape, example.dtype) if specialized and example is not None else None
        split_computed_biases(graph)
        analysis = Analysis(model, graph)
        #: modules kept whole, with parallel paths inside them out of reach
        self.whole = [node.target for node in analysis.nodes if isinstance(analysis.module(node), opaque)
                      and not isinstance(analysis.module(node), (_BatchNorm, _ConvNd))]
        self.batch_norms = BatchNormPlan(analysis)
        #: normalizations, attention and constant shifts that become modules with rules
        transformer = Transformer(analysis, set(self.batch_norms.unmerged), attention)
        # under CP-LRP, products that attention weights enter are linear maps now, and those computing the weights
        # (q @ k^T) carry no relevance: neither is a parallel path
        path = relevance_path(analysis, transformer)
        on_path = set(path)
        transformer.products = {node: product for node, product in transformer.products.items() if node in on_path}
        analysis.unsupported = [entry for entry in analysis.unsupported
                                if entry[0] not in transformer.weightings and entry[0] in on_path]
        # products get the uniform rule, which sends relevance into both factors: for cuts they stay operations of
        # two paths that cannot be cut
        merges = [entry for entry in analysis.unsupported if entry[0] not in transformer.products]
        #: the activations of batch norms called whole (timm's BatchNormAct2d) that zennit does not know, to be
        #: declared activations while canonized
        self.activations = [f'{node.target}.act' for node in analysis.nodes if isinstance(
            analysis.module(node), _BatchNorm) and elementwise_activation(getattr(analysis.module(node), 'act', None))]
        # and timm's activations the tracer keeps whole
        self.activations += sorted({str(node.target) for node in analysis.nodes
                                    if node.op == 'call_module' and leaf_activation(analysis.module(node))})
        #: the batch norms that cannot be merged and become affine layers of their own
        self.frozen = sorted({spec.module for spec in transformer.norms.values() if spec.kind == 'batch'})
        #: the parameters and buffers that join the signal as constants (position embeddings, class tokens)
        self.learned = learned_constants(analysis, transformer)
        self.merged = sorted({plan.after[0] for plan in self.batch_norms.linears.values() if plan.after}
                             | set(self.batch_norms.pre_activations))
        replaced = {
            f'{parent}.{attribute}' if parent else attribute: (
                f'{parent}.{attribute}' if parent else attribute) + ' is replaced by a threshold ReLU while '
            'canonized (its batch norm is merged into the layer after it), so the canonized model never calls it: '
            'condition on the batch norm or the layer after it instead'
            for parent, attribute in (plan.attribute for plan in self.batch_norms.pre_activations.values()
                                      if plan.attribute is not None)
        }
        self.table = CutTable(analysis, replaced)
        self.catalog = self.table.catalog()
        hooked = self._hooked(analysis, self.table)
        #: the inlined modules whose forward hooks the canonized forward calls
        self.hooked = [name for name, _, _ in hooked]
        #: the operations on the relevance path that the rules of a zennit composite do not conserve relevance through
        #: (found before the program rewrites the graph)
        self.operations: List[Operation] = find(analysis, self.merged, self.batch_norms.unmerged, self.whole,
                                                transformer, path)
        self.program = Program(analysis, self.batch_norms, hooked, transformer)
        self.unsupported = [(analysis.holder(node), reason) for node, reason, _ in merges]
        # keep names only: the cache must not keep the model alive
        analysis.release()

    @staticmethod
    def _hooked(analysis: Analysis, table: CutTable) -> List[Tuple[str, torch.fx.Node, List[torch.fx.Node]]]:
        '''The inlined modules (called once, one output) whose forward hooks the canonized forward calls.'''
        hooked = []
        for name, exits in table.exits.items():
            if not name or name in analysis.calls or len(exits) != 1:
                continue
            inputs: List[torch.fx.Node] = []
            for node in analysis.nodes:
                if table.inside(node, name):
                    for source in analysis.dependencies(node):
                        if source in analysis.signals and not table.inside(source, name) and source not in inputs:
                            inputs.append(source)
            hooked.append((name, exits[0], inputs))
        return hooked


_CACHE: 'weakref.WeakKeyDictionary[torch.nn.Module, Tuple[Any, Dict[str, Compiled]]]' = weakref.WeakKeyDictionary()


def example_input(model: torch.nn.Module, shape: Tuple[int, ...]) -> torch.Tensor:
    '''A random input of ``shape`` in the dtype and on the device of the model's parameters (float32 on the CPU
    where it has none), from a generator of its own: the global random state is left alone.'''
    tensors = [tensor for tensor in list(model.parameters()) + list(model.buffers()) if tensor.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    device = tensors[0].device if tensors else torch.device('cpu')
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def compiled_for(model: torch.nn.Module, attention: str = 'cp-lrp',
                 input_shape: Optional[Tuple[int, ...]] = None) -> Compiled:
    '''The :py:class:`Compiled` of ``model`` under the treatment of attention ``attention`` (for inputs of
    ``input_shape`` where the graph must be specialized to one), computed once per model (again when its modules
    change).'''
    variant = (attention, None if input_shape is None else tuple(input_shape))
    cached = _CACHE.get(model)
    if cached is not None and model in REWRITTEN:
        # canonized by a graph canonizer (which claims the model itself): its modules are not the model's own now
        if input_shape is None:
            # the one in use, whatever input shape it was given
            variant = next((entry for entry in cached[1] if entry[0] == attention), variant)
        if variant not in cached[1]:
            attention_in_use, shape_in_use = next(iter(cached[1]))
            raise RuntimeError(f'{type(model).__name__} is canonized by a GraphCanonizer with attention='
                               f'{attention_in_use!r}, input_shape={shape_in_use!r}: remove it before asking for '
                               f'attention={attention!r}, input_shape={variant[1]!r}')
        return cached[1][variant]
    key = tuple((id(module), type(module)) for module in model.modules())
    if cached is None or cached[0] != key:
        cached = (key, {})
        _CACHE[model] = cached
    if variant not in cached[1]:
        cached[1][variant] = Compiled(model, attention, variant[1])
    return cached[1][variant]


def clear_cache(model: torch.nn.Module) -> None:
    '''Forget the compiled forward of ``model`` (e.g. after changing attributes its forward branches on).'''
    _CACHE.pop(model, None)
