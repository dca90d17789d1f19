'''The canonized forward of a traced model, compiled once per model: the graph with its merges routed through masked
modules, its gates constant, its functional operations as modules, and the forward hooks of the blocks it inlines
still called.'''
import copy
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.fx
from zennit.types import Activation

from ..core.attention import (
    ATTENTIONS,
    ConstantShift,
    ConstantWeighting,
    multi_head_attention,
    scaled_dot_product_attention,
    window_attention,
)
from ..core.gates import ConstantGate
from ..core.masked_sum import MaskedSum, stack_summands
from ..core.products import SoftmaxRule, UniformProduct
from .analysis import Analysis
from .batchnorms import BatchNormPlan
from .modules import FunctionalLayer, MaskedConcatenation, Scale, call_forward_hooks, call_unhooked
from .transformer import NormSpec, Transformer


class Slot(NamedTuple):
    '''A module the canonized forward calls that the model does not hold, added while canonized.

    Attributes
    ----------
    holder: str
        Name of the module it is added to (``""``: the model).
    attribute: str
        Its attribute name there.
    kind: str
        ``"sum"``, ``"concatenation"``, ``"gate"``, ``"module"`` (a copy of ``prototype``), ``"threshold"`` (the
        threshold ReLU of the pre-activation batch norm ``source``), ``"call"`` (the module ``source`` again, for
        one more place the forward calls it: :py:func:`~canonizers.graph.modules.call_copy`), ``"norm"`` (the
        normalization ``spec`` with its factor constant), ``"projections"`` (the input projections of the
        attention module ``source``) or ``"functional"`` (the layer ``spec`` on the model's weight).
    merge: int
        The number of the merge whose mask it holds (sums and concatenations), else -1.
    prototype: :py:obj:`torch.nn.Module`, optional
        The module to copy (kind ``"module"``), or the concatenation's settings.
    source: str
        The batch norm whose threshold ReLU this is (kind ``"threshold"``), or the module called again (``"call"``).
    spec: :py:class:`~canonizers.graph.transformer.NormSpec` or :py:class:`~canonizers.graph.modules.FunctionalLayer`
        The normalization (kind ``"norm"``) or the functional layer (``"functional"``).
    '''
    holder: str
    attribute: str
    kind: str
    merge: int = -1
    prototype: Optional[torch.nn.Module] = None
    source: str = ''
    spec: Optional[Union[NormSpec, FunctionalLayer]] = None

    @property
    def path(self) -> str:
        '''The name of the module in the model while canonized.'''
        return f'{self.holder}.{self.attribute}' if self.holder else self.attribute

    def build(self) -> torch.nn.Module:
        '''A fresh module for this slot (threshold ReLUs are built from the batch norm's values instead).'''
        if self.kind == 'sum':
            return MaskedSum(dim=1)
        if self.kind == 'gate':
            return ConstantGate()
        return copy.deepcopy(self.prototype)


class Program:
    '''The canonized forward of one model and the modules it needs.

    Parameters
    ----------
    analysis: :py:class:`~canonizers.graph.analysis.Analysis`
        The traced model; its graph is rewritten in place.
    batch_norms: :py:class:`~canonizers.graph.batchnorms.BatchNormPlan`
        The batch-norm merges (their ReLUs become threshold ReLUs).
    hooked: sequence of (str, :py:obj:`torch.fx.Node`, list of :py:obj:`torch.fx.Node`)
        The inlined modules whose forward hooks the forward calls: name, exit node and input nodes.

    Attributes
    ----------
    forward: callable
        The forward, to be bound to the model.
    slots: list of :py:class:`Slot`
        The modules to add.
    '''
    def __init__(self, analysis: Analysis, batch_norms: BatchNormPlan,
                 hooked: List[Tuple[str, torch.fx.Node, List[torch.fx.Node]]], transformer: Transformer) -> None:
        self.analysis = analysis
        self.graph = analysis.graph
        self.slots: List[Slot] = []
        self._taken: Dict[str, set] = {}
        self.scope = dict(analysis.scope)
        self.current: Dict[torch.fx.Node, torch.fx.Node] = {}
        thresholds = {plan.relu: name for name, plan in batch_norms.pre_activations.items()
                      if plan.relu is not None and plan.attribute is None}
        self._calls(transformer)
        self._transformer(transformer)
        self._conversions(thresholds)
        self._scales()
        self._gates()
        self._merges()
        self._hooks(hooked)
        self.forward = self._compile()

    def _slot(self, holder: str, base: str, kind: str, **fields: Any) -> Slot:
        module = self.analysis.modules[holder]
        taken = self._taken.setdefault(holder, set())
        attribute, number = base, 0
        while attribute in taken or hasattr(module, attribute):
            number += 1
            attribute = f'{base}_{number}'
        taken.add(attribute)
        slot = Slot(holder, attribute, kind, **fields)
        self.slots.append(slot)
        return slot

    def _node(self, node: torch.fx.Node) -> torch.fx.Node:
        while node in self.current:
            node = self.current[node]
        return node

    def _replace(self, old: torch.fx.Node, new: torch.fx.Node) -> None:
        self.scope[new] = self.scope[old]
        old.replace_all_uses_with(new)
        self.graph.erase_node(old)
        self.current[old] = new

    def _call(self, before: torch.fx.Node, slot: Slot, args: tuple, kwargs: Optional[dict] = None) -> torch.fx.Node:
        with self.graph.inserting_before(before):
            return self.graph.call_module(slot.path, args, kwargs or {})

    def _calls(self, transformer: Transformer) -> None:
        analysis, seen = self.analysis, set()
        for node in list(self.graph.nodes):
            module = analysis.module(node)
            if isinstance(module, torch.nn.MultiheadAttention) and node in transformer.refused:
                with self.graph.inserting_before(node):
                    holder = self.graph.get_attr(node.target)
                    unhooked = self.graph.call_function(call_unhooked, (holder,) + tuple(node.args), dict(node.kwargs))
                self.scope[holder] = self.scope[unhooked] = self.scope[node]
                self._replace(node, unhooked)
            elif module is not None and analysis.calls[node.target] > 1 and not isinstance(module, Activation):
                # every call but the first gets a module of its own: zennit's rules keep one call's tensors
                if node.target in seen:
                    node.target = self._slot(analysis.holder(node), 'canonizer_call', 'call', source=node.target).path
                seen.add(node.target)

    def _function(self, node: torch.fx.Node, function: Callable, modules: Tuple[str, ...]) -> None:
        '''Replace ``node`` by ``function(*modules, *node.args, **node.kwargs)``, the modules by name.'''
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self._node)
        with self.graph.inserting_before(node):
            holders = tuple(self.graph.get_attr(name) for name in modules)
            new = self.graph.call_function(function, holders + tuple(args), dict(kwargs))
        for holder in holders:
            self.scope[holder] = self.scope[node]
        self._replace(node, new)

    def _transformer(self, transformer: Transformer) -> None:
        '''Normalizations, attention and constant shifts as modules with rules (:py:mod:`.transformer`).'''
        holder = self.analysis.holder
        for node, spec in transformer.norms.items():
            slot = self._slot(holder(node), 'canonizer_norm', 'norm', spec=spec)
            new = self._call(node, slot, (self._node(node.args[0]),))
            for after in spec.after:
                with self.graph.inserting_before(node):
                    new = self.graph.call_module(after, (new,))
                self.scope[new] = self.scope[node]
            self._replace(node, new)
        for node, kind in transformer.attentions.items():
            attention = self._slot(holder(node), 'canonizer_attention', 'module',
                                   prototype=ATTENTIONS[transformer.attention]())
            if kind == 'module':
                projections = self._slot(holder(node), 'canonizer_projections', 'projections',
                                         source=str(node.target))
                self._function(node, multi_head_attention, (str(node.target), projections.path, attention.path))
            elif kind == 'sdpa':
                self._function(node, scaled_dot_product_attention, (attention.path,))
            else:
                self._function(node, window_attention, (holder(node), attention.path))
        for node, (operation, equation, first, second) in transformer.products.items():
            slot = self._slot(holder(node), 'canonizer_product', 'module',
                              prototype=UniformProduct(operation, equation))
            self._replace(node, self._call(node, slot, (self._node(first), self._node(second))))
        for node, (dim, dtype) in transformer.softmaxes.items():
            slot = self._slot(holder(node), 'canonizer_softmax', 'module', prototype=SoftmaxRule(dim, dtype))
            self._replace(node, self._call(node, slot, (self._node(node.args[0]),)))
        for node, (values, weights, left, equation) in transformer.weightings.items():
            slot = self._slot(holder(node), 'canonizer_weighting', 'module',
                              prototype=ConstantWeighting(left, equation))
            self._replace(node, self._call(node, slot, (self._node(values),), {'operand': self._node(weights)}))
        for node, (signal, constant) in transformer.shifts.items():
            slot = self._slot(holder(node), 'canonizer_shift', 'module', prototype=ConstantShift())
            self._replace(node, self._call(node, slot, (self._node(signal),), {'operand': self._node(constant)}))

    def _conversions(self, thresholds: Dict[torch.fx.Node, str]) -> None:
        analysis = self.analysis
        for node in thresholds:
            if node.op == 'call_module':
                # a ReLU module called at several places: only this call becomes a threshold ReLU
                slot = self._slot(analysis.holder(node), 'canonizer_relu', 'threshold', source=thresholds[node])
                node.target = slot.path
        for node, module in analysis.conversions.items():
            if node in thresholds:
                slot = self._slot(analysis.holder(node), 'canonizer_relu', 'threshold', source=thresholds[node])
            elif isinstance(module, FunctionalLayer):
                slot = self._slot(analysis.holder(node), f'canonizer_{module.kind}', 'functional', spec=module)
            else:
                slot = self._slot(analysis.holder(node), f'canonizer_{type(module).__name__.lower()}', 'module',
                                  prototype=module)
            input = analysis.conversion_inputs.get(node, node.args[0])
            arguments = torch.fx.node.map_arg(analysis.conversion_arguments.get(node, {}), self._node)
            self._replace(node, self._call(node, slot, (self._node(input),), arguments))
        for _, sigmoid in analysis.swishes.values():
            # the sigmoid of x * sigmoid(x), now computed by the SiLU module, unless something else reads it
            if not sigmoid.users:
                self.graph.erase_node(sigmoid)

    def _scales(self) -> None:
        for node, (input, factor, divide) in self.analysis.scales.items():
            slot = self._slot(self.analysis.holder(node), 'canonizer_scale', 'module', prototype=Scale(divide))
            if isinstance(factor, torch.fx.Node):
                factor = self._node(factor)
            self._replace(node, self._call(node, slot, (self._node(input),), {'factor': factor}))

    def _gates(self) -> None:
        for gate in self.analysis.gates:
            slot = self._slot(gate.holder, 'canonizer_gate', 'gate')
            new = self._call(gate.node, slot, (self._node(gate.signal),), {'gate': self._node(gate.gate)})
            self._replace(gate.node, new)

    def _merges(self) -> None:
        for number, merge in enumerate(self.analysis.merges):
            inputs = tuple(self._node(input) for input in merge.inputs)
            for index in merge.negated:
                # relevance passes a negation unchanged (the z-rule of the map -1)
                negation = self._slot(merge.holder, 'canonizer_negation', 'module', prototype=Scale())
                inputs = inputs[:index] + (self._call(merge.node, negation, (inputs[index],), {'factor': -1}),) + (
                    inputs[index + 1:])
                self.scope[inputs[index]] = self.scope[merge.node]
            if merge.kind == 'sum':
                slot = self._slot(merge.holder, 'canonizer_sum', 'sum', merge=number)
                with self.graph.inserting_before(merge.node):
                    stacked = self.graph.call_function(stack_summands, inputs)
                self.scope[stacked] = self.scope[merge.node]
                new = self._call(merge.node, slot, (stacked,))
            else:
                slot = self._slot(merge.holder, 'canonizer_concatenation', 'concatenation', merge=number,
                                  prototype=MaskedConcatenation(len(inputs), merge.dim, merge.stack))
                new = self._call(merge.node, slot, inputs)
            self._replace(merge.node, new)
            for node in reversed(merge.absorbed):
                self.graph.erase_node(node)

    def _hooks(self, hooked: List[Tuple[str, torch.fx.Node, List[torch.fx.Node]]]) -> None:
        # innermost first: the hooks of a block run before those of the blocks around it, as in the eager forward
        for name, exit, inputs in sorted(hooked, key=lambda item: -item[0].count('.')):
            exit = self._node(exit)
            outside = [user for user in exit.users if name not in self.scope.get(user, ())]
            if not outside:
                continue
            with self.graph.inserting_after(exit):
                module = self.graph.get_attr(name)
            with self.graph.inserting_after(module):
                hooks = self.graph.call_function(
                    call_forward_hooks, (module, tuple(self._node(input) for input in inputs), exit))
            self.scope[module] = self.scope[hooks] = tuple(part for part in self.scope[exit] if part != name)
            for user in outside:
                user.replace_input_with(exit, hooks)
            # a block around this one with the same output takes it after these hooks ran
            self.current[exit] = hooks

    def _compile(self) -> Callable:
        code = self.graph.python_code(root_module='self')
        namespace = dict(code.globals)
        exec(compile(code.src, '<canonizers.graph>', 'exec'), namespace)
        return namespace['forward']
