'''What the graph canonizer finds in a traced model: the nodes that carry the input signal, which nodes depend on
which, the sums, concatenations and gates of parallel paths, and the functional operations zennit needs as modules.

Dependencies are bit sets over the nodes (Python integers): bit ``i`` of ``ancestors[node]`` is set when the node
numbered ``i`` lies on a path into ``node`` (the node itself included).
'''
import operator
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from zennit.layer import Sum

from ..core.tracing import is_size, modules_of
from .functional import call_argument, functional_layer
from .modules import FoldSum, FunctionalLayer, GlobalMeanPool, SumReduction

_SUMS = {operator.add, operator.iadd, torch.add, 'add', 'add_'}
#: differences of two paths, which are sums of the first and the negated second (not in place)
_DIFFERENCES = {operator.sub, torch.sub, 'sub'}
_CONCATENATIONS = {torch.cat, torch.concat, torch.stack}
PRODUCTS = {operator.mul, operator.imul, torch.mul, 'mul', 'mul_'}
_QUOTIENTS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, 'div', 'div_', 'true_divide'}
_IN_PLACE = {operator.iadd, 'add_', operator.imul, 'mul_', operator.itruediv, 'div_'}
_SIGMOIDS = {torch.sigmoid, F.sigmoid, 'sigmoid'}
#: methods whose second argument gives only a shape or dtype, no signal
_SHAPE_ONLY_SECOND = {'expand_as', 'view_as', 'reshape_as', 'type_as'}
#: statistics of a signal that normalize it: the variance, standard deviation and norms (RMS norms are the mean of
#: a square, see :py:meth:`Analysis.statistic`)
_STATISTICS = {torch.var, 'var', torch.std, 'std', torch.norm, 'norm', torch.linalg.vector_norm, torch.linalg.norm}
_MEANS = {torch.mean, 'mean', torch.sum, 'sum'}
_SQUARES = {torch.square, 'square', torch.pow, 'pow', operator.pow}
_ADAPTIVE_POOLS = (torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
                   torch.nn.AdaptiveMaxPool1d, torch.nn.AdaptiveMaxPool2d, torch.nn.AdaptiveMaxPool3d)


def _activation(factory: Callable[..., torch.nn.Module], names: Sequence[str] = ()) -> Callable:
    '''A converter of a functional activation ``f(input, *names, inplace=...)`` to ``factory(*values)``.'''
    def convert(node: torch.fx.Node) -> Optional[torch.nn.Module]:
        values = [call_argument(node, index + 1, name) for index, name in enumerate(names)]
        values = [value for value in values if value is not None]
        return factory(*values)
    return convert


def _pool(factory: Callable[..., torch.nn.Module], names: Sequence[str]) -> Callable:
    '''A converter of a functional pooling ``f(input, *names)`` to ``factory(**values)``.'''
    def convert(node: torch.fx.Node) -> Optional[torch.nn.Module]:
        values = {name: call_argument(node, index + 1, name) for index, name in enumerate(names)}
        if values.get('return_indices'):
            return None
        return factory(**{name: value for name, value in values.items() if value is not None})
    return convert


def _global_mean(node: torch.fx.Node) -> Optional[torch.nn.Module]:
    dims = call_argument(node, 1, 'dim')
    if not _spatial(dims):
        return None
    return GlobalMeanPool(dims, bool(call_argument(node, 2, 'keepdim', False)))


def _sum_reduction(node: torch.fx.Node) -> Optional[torch.nn.Module]:
    dims = call_argument(node, 1, 'dim')
    if call_argument(node, 3, 'dtype') is not None or not (
            dims is None or isinstance(dims, int) or (isinstance(dims, (tuple, list)) and all(
                isinstance(dim, int) for dim in dims))):
        return None
    return SumReduction(dims, bool(call_argument(node, 2, 'keepdim', False)))


def _fold(node: torch.fx.Node) -> Optional[torch.nn.Module]:
    options = {name: call_argument(node, index + 2, name, default) for index, (name, default) in enumerate(
        (('kernel_size', None), ('dilation', 1), ('padding', 0), ('stride', 1)))}
    return None if options['kernel_size'] is None else FoldSum(**options)


def _spatial(dims) -> bool:
    '''Whether ``dims`` are the spatial dimensions of an image batch, (2, 3) or (-2, -1) in any order.'''
    if not isinstance(dims, (tuple, list)) or not all(isinstance(dim, int) for dim in dims):
        return False
    return set(dims) in ({2, 3}, {-1, -2})


#: functional operations that become modules, so that zennit's rules apply to them
CONVERSIONS: Dict[object, Callable[[torch.fx.Node], Optional[torch.nn.Module]]] = {
    **{target: _activation(torch.nn.ReLU) for target in (F.relu, torch.relu, torch.relu_, F.relu_, 'relu', 'relu_')},
    F.relu6: _activation(torch.nn.ReLU6),
    F.silu: _activation(torch.nn.SiLU),
    F.gelu: lambda node: torch.nn.GELU(approximate=node.kwargs.get('approximate', 'none')),
    **{target: _activation(torch.nn.Sigmoid) for target in (torch.sigmoid, F.sigmoid, 'sigmoid')},
    F.hardsigmoid: _activation(torch.nn.Hardsigmoid),
    F.hardswish: _activation(torch.nn.Hardswish),
    **{target: _activation(torch.nn.Tanh) for target in (torch.tanh, F.tanh, 'tanh')},
    F.leaky_relu: _activation(torch.nn.LeakyReLU, ('negative_slope',)),
    F.adaptive_avg_pool2d: _pool(torch.nn.AdaptiveAvgPool2d, ('output_size',)),
    F.avg_pool2d: _pool(torch.nn.AvgPool2d, ('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad',
                                             'divisor_override')),
    F.max_pool2d: _pool(torch.nn.MaxPool2d, ('kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode',
                                             'return_indices')),
    'mean': _global_mean,
    torch.mean: _global_mean,
    # a sum over a dimension of one tensor (the gated branches of selective-kernel and split attention)
    'sum': _sum_reduction,
    torch.sum: _sum_reduction,
    F.fold: _fold,
}
#: conversions whose module takes further inputs of the call, which the traced forward computes: their names and
#: positions (fold's output size, from the signal's shape)
_RUNTIME_ARGUMENTS = {F.fold: (('output_size', 1),)}
_INPLACE = {torch.relu_, F.relu_, 'relu_'}
#: conversions whose last positional argument may be ``inplace``
_ACTIVATIONS = {F.relu, F.relu6, F.silu, F.hardsigmoid, F.hardswish, F.leaky_relu}


def target_name(node: torch.fx.Node) -> str:
    '''A readable name of what a node computes.'''
    if node.op == 'call_module':
        return str(node.target)
    target = node.target
    return target if isinstance(target, str) else getattr(target, '__name__', str(target))


class Merge(NamedTuple):
    '''A sum or concatenation of tensors from parallel paths, which gets a gradient mask per input.

    Attributes
    ----------
    node: :py:obj:`torch.fx.Node`
        The node that computes it (the last of a chain of sums).
    kind: str
        ``"sum"`` or ``"concatenation"``.
    inputs: tuple of :py:obj:`torch.fx.Node`
        Summands or concatenated tensors, in order.
    absorbed: tuple of :py:obj:`torch.fx.Node`
        Sums of the chain before ``node`` (``a + b`` of ``a + b + c``), replaced with it.
    holder: str
        The innermost module whose forward computes it (``""`` for the model's own).
    dim: int
        The dimension of a concatenation.
    stack: bool
        Whether the concatenation is a ``torch.stack``.
    summed: bool
        Whether it is a stack that only :py:obj:`zennit.layer.Sum` modules read: the summands of a sum written for
        zennit (``Sum()(torch.stack([identity, out], dim=-1))``), whose rule stays the module's.
    negated: tuple of int
        The inputs that are subtracted (``a - b`` is the sum of ``a`` and ``-b``).
    '''
    node: torch.fx.Node
    kind: str
    inputs: Tuple[torch.fx.Node, ...]
    absorbed: Tuple[torch.fx.Node, ...]
    holder: str
    dim: int = 0
    stack: bool = False
    summed: bool = False
    negated: Tuple[int, ...] = ()


class Gate(NamedTuple):
    '''A product ``signal * gate`` whose gate is computed through a global pooling that the signal does not pass (a
    channel or spatial weighting), or through a statistic of the signal that normalizes it (the ``rsqrt(var(x) +
    eps)`` of a norm written out, whose normalizing factor is held constant as LayerNorm's is).'''
    node: torch.fx.Node
    signal: torch.fx.Node
    gate: torch.fx.Node
    holder: str


class Analysis:
    '''The data flow of a traced model, as the graph canonizer needs it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The traced model (only read).
    graph: :py:obj:`torch.fx.Graph`
        Its graph.
    '''
    def __init__(self, model: torch.nn.Module, graph: torch.fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.nodes = list(graph.nodes)
        self.index = {node: index for index, node in enumerate(self.nodes)}
        # a leaf may be on the module stack already: once is enough
        self.scope = {node: tuple(dict.fromkeys(modules_of(node))) for node in self.nodes}
        self.signals: Set[torch.fx.Node] = set()
        self.ancestors: Dict[torch.fx.Node, int] = {}
        for node in self.nodes:
            sources = self.dependencies(node)
            bits = 1 << self.index[node]
            for source in sources:
                bits |= self.ancestors[source]
            self.ancestors[node] = bits
            if node.op == 'placeholder' or (not is_size(node) and any(source in self.signals for source in sources)):
                self.signals.add(node)
        self.calls: Dict[str, int] = {}
        for node in self.nodes:
            if node.op == 'call_module':
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.pools = {node for node in self.nodes if self.global_pool(node)}
        self.statistics = {node for node in self.nodes if node in self.signals and self.statistic(node)}
        self.merges: List[Merge] = []
        self.gates: List[Gate] = []
        #: products and quotients of the signal and a factor without signal: the node, the input, the factor, and
        #: whether it divides
        self.scales: Dict[torch.fx.Node, Tuple[torch.fx.Node, object, bool]] = {}
        #: products x * sigmoid(x): the node, x and the sigmoid
        self.swishes: Dict[torch.fx.Node, Tuple[torch.fx.Node, torch.fx.Node]] = {}
        #: multi-path operations nothing here handles: (node, reason, its signal inputs as traced)
        self.unsupported: List[Tuple[torch.fx.Node, str, Tuple[torch.fx.Node, ...]]] = []
        self._find_merges()
        #: the input of a conversion where it is not the first argument (the x of x * sigmoid(x))
        self.conversion_inputs: Dict[torch.fx.Node, torch.fx.Node] = {}
        #: the keyword inputs of a conversion's module that the forward computes (``_RUNTIME_ARGUMENTS``)
        self.conversion_arguments: Dict[torch.fx.Node, Dict[str, object]] = {}
        self.conversions = self._find_conversions()

    def release(self) -> None:
        '''Drop the references to the model and its modules, keeping their names.'''
        self.model = None
        self.modules = dict.fromkeys(self.modules)

    # --- data flow -----------------------------------------------------------------------------------------------
    def dependencies(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        '''The inputs of ``node`` that its value depends on (not those giving a shape only, nor sizes).'''
        if is_size(node):
            return []
        inputs = list(node.all_input_nodes)
        if node.op == 'call_method' and node.target in _SHAPE_ONLY_SECOND and len(node.args) > 1:
            inputs = [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
        return [source for source in inputs if not is_size(source)]

    def signal_inputs(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        '''The distinct inputs of ``node`` that carry the signal, in order.'''
        inputs: List[torch.fx.Node] = []
        for source in self.dependencies(node):
            if source in self.signals and source not in inputs:
                inputs.append(source)
        return inputs

    def users(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        '''The users of ``node``, except those that only read its shape.'''
        return [user for user in node.users if not is_size(user)]

    def depends(self, node: torch.fx.Node, on: torch.fx.Node) -> bool:
        '''Whether ``node`` depends on ``on`` (or is it).'''
        return bool(self.ancestors[node] >> self.index[on] & 1)

    def holder(self, node: torch.fx.Node) -> str:
        '''The innermost module whose forward computes ``node``; ``""`` for the model's own forward.'''
        scope = self.scope[node]
        if node.op == 'call_module':
            scope = scope[:-1]
        return scope[-1] if scope else ''

    def module(self, node: torch.fx.Node) -> Optional[torch.nn.Module]:
        '''The module a ``call_module`` node calls, else None.'''
        return self.modules.get(node.target) if node.op == 'call_module' else None

    def global_pool(self, node: torch.fx.Node) -> bool:
        '''Whether ``node`` pools over all positions (as the squeeze of a squeeze-and-excitation gate does).'''
        module = self.module(node)
        if module is not None:
            size = getattr(module, 'output_size', None)
            return isinstance(module, _ADAPTIVE_POOLS) and size in (1, (1, 1), (1, 1, 1), [1, 1])
        if node.op == 'call_function' and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            return call_argument(node, 1, 'output_size') in (1, (1, 1), [1, 1])
        if node.target in ('mean', 'amax', torch.mean, torch.amax) and node.op in ('call_method', 'call_function'):
            return _spatial(call_argument(node, 1, 'dim'))
        return False

    def statistic(self, node: torch.fx.Node) -> bool:
        '''Whether ``node`` computes a variance, standard deviation or norm of a tensor, or the mean (or sum) of its
        square: the statistic a normalization divides by (timm's ``SimpleNorm2d``, ``RmsNorm2d``).'''
        if node.op not in ('call_function', 'call_method'):
            return False
        if node.target in _STATISTICS:
            return True
        if node.target not in _MEANS or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        square = node.args[0]
        if square.op not in ('call_function', 'call_method'):
            return False
        if square.target in _SQUARES:
            return square.target in (torch.square, 'square') or (len(square.args) > 1 and square.args[1] == 2)
        # x * x
        return square.target in PRODUCTS and len(square.args) == 2 and square.args[0] is square.args[1]

    # --- merges ----------------------------------------------------------------------------------------------------
    def _find_merges(self) -> None:
        chains: Dict[torch.fx.Node, Tuple[Tuple[torch.fx.Node, ...], Tuple[torch.fx.Node, ...]]] = {}
        for node in self.nodes:
            if node.op not in ('call_function', 'call_method'):
                continue
            target = node.target
            if target in _SUMS:
                self._sum(node, chains)
            elif target in _CONCATENATIONS and node.op == 'call_function':
                self._concatenation(node)
            elif target in _DIFFERENCES and self._difference(node):
                continue
            elif target in PRODUCTS:
                self._product(node)
            elif target in _QUOTIENTS and len(self.signal_inputs(node)) == 1 and node in self.signals:
                self._scale(node)
            elif len(self.signal_inputs(node)) >= 2 and target not in (operator.getitem,):
                self._unsupported(node, f'{target_name(node)} of {len(self.signal_inputs(node))} paths')
        absorbed = {node for _, (_, chain) in chains.items() for node in chain}
        self.merges = [merge for merge in self.merges if merge.node not in absorbed]
        self.merges.sort(key=lambda merge: self.index[merge.node])

    def _aliased(self, node: torch.fx.Node) -> bool:
        '''Whether ``node`` changes its first input in place while a later node still reads it: replaced by an
        operation that is not in place, it would change what that node sees.'''
        if node.target not in _IN_PLACE or not isinstance(node.args[0], torch.fx.Node):
            return False
        later = self.index[node]
        return any(self.index[user] > later and not is_size(user) for user in node.args[0].users)

    def _unsupported(self, node: torch.fx.Node, reason: str) -> None:
        # the inputs as traced: rewriting the graph later replaces them in the node's arguments
        self.unsupported.append((node, reason, tuple(self.signal_inputs(node))))

    def _sum(self, node: torch.fx.Node, chains: Dict) -> None:
        inputs = self.signal_inputs(node)
        if len(inputs) < 2:
            return
        if set(node.kwargs) - {'other'} or len(node.args) != 2 or not all(
                isinstance(arg, torch.fx.Node) for arg in node.args):
            self._unsupported(node, f'{target_name(node)} with a scale (alpha) or constants')
            return
        if self._aliased(node):
            self._unsupported(node, f'in-place {target_name(node)} whose input is used again after it')
            return
        summands: List[torch.fx.Node] = []
        absorbed: List[torch.fx.Node] = []
        holder = self.holder(node)
        for arg in node.args:
            # a + b + c is one sum of three: zennit's sum rule then sees all summands at once
            if arg in chains and len(arg.users) == 1 and self.holder(arg) == holder:
                summands.extend(chains[arg][0])
                absorbed.extend(chains[arg][1] + (arg,))
            else:
                summands.append(arg)
        chains[node] = (tuple(summands), tuple(absorbed))
        self.merges.append(Merge(node, 'sum', tuple(summands), tuple(absorbed), holder))

    def _difference(self, node: torch.fx.Node) -> bool:
        '''Record ``a - b`` of two paths as the sum of ``a`` and ``-b`` (PoolFormer's ``pool(x) - x``); False if it
        is none.'''
        inputs = self.signal_inputs(node)
        if len(inputs) != 2 or node.kwargs or len(node.args) != 2 or tuple(node.args) != tuple(inputs):
            return False
        self.merges.append(Merge(node, 'sum', tuple(inputs), (), self.holder(node), negated=(1,)))
        return True

    def _concatenation(self, node: torch.fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get('tensors')
        if len(self.signal_inputs(node)) < 2:
            return
        dim = call_argument(node, 1, 'dim', 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(arg, torch.fx.Node) for arg in tensors) or (
                not isinstance(dim, int)) or set(node.kwargs) - {'dim', 'tensors'}:
            self._unsupported(node, f'{target_name(node)} of tensors it cannot mask')
            return
        stack = node.target is torch.stack
        summed = stack and all(isinstance(self.module(user), Sum) for user in self.users(node))
        self.merges.append(Merge(node, 'concatenation', tuple(tensors), (), self.holder(node), dim, stack, summed))

    def _scale(self, node: torch.fx.Node) -> None:
        '''Record ``input * factor`` or ``input / factor`` with a factor that carries no signal.'''
        if len(node.args) != 2 or node.kwargs or self._aliased(node):
            return
        first, second = node.args
        if node.target in _QUOTIENTS:
            if first in self.signals and not (isinstance(second, torch.fx.Node) and second in self.signals):
                self.scales[node] = (first, second, True)
            return
        for input, factor in ((first, second), (second, first)):
            if isinstance(input, torch.fx.Node) and input in self.signals and not (
                    isinstance(factor, torch.fx.Node) and factor in self.signals):
                if isinstance(factor, (int, float)) or isinstance(factor, torch.fx.Node):
                    self.scales[node] = (input, factor, False)
                return

    def _product(self, node: torch.fx.Node) -> None:
        inputs = self.signal_inputs(node)
        if len(inputs) == 1 and node in self.signals:
            self._scale(node)
        if len(inputs) < 2:
            return
        if len(node.args) == 2 and not node.kwargs and set(node.args) == set(inputs) and not self._aliased(node):
            first, second = node.args
            for signal, other in ((first, second), (second, first)):
                # x * sigmoid(x) is SiLU (swish) written out: one activation, no merge
                if other.op in ('call_function', 'call_method') and other.target in _SIGMOIDS and (
                        len(other.args) == 1 and other.args[0] is signal and not other.kwargs):
                    self.swishes[node] = (signal, other)
                    return
            for signal, gate in ((first, second), (second, first)):
                if self._gates(signal, gate):
                    self.gates.append(Gate(node, signal, gate, self.holder(node)))
                    return
        self._unsupported(node, 'product of two paths that is no gate (a factor computed through a global pooling '
                                'or a normalizing statistic the other does not pass)')

    def _gates(self, signal: torch.fx.Node, gate: torch.fx.Node) -> bool:
        '''Whether ``gate`` is computed through a global pooling or a normalizing statistic that ``signal`` does not
        pass: a channel (or spatial) weighting, as in squeeze-and-excitation and ECA, also where the gate comes from
        the block's input; or the normalizing factor of a norm written out.'''
        return any(self.depends(gate, pool) and not self.depends(signal, pool)
                   for pool in self.pools | self.statistics)

    # --- functional operations as modules --------------------------------------------------------------------------
    def _find_conversions(self) -> Dict[torch.fx.Node, Union[torch.nn.Module, FunctionalLayer]]:
        conversions: Dict[torch.fx.Node, Union[torch.nn.Module, FunctionalLayer]] = {}
        gate_nodes = {gate.node for gate in self.gates}
        # the sigmoid of a swish goes with its product, unless something else uses it too
        swish_sigmoids = {sigmoid for _, sigmoid in self.swishes.values() if len(sigmoid.users) == 1}
        for node, (input, _) in self.swishes.items():
            conversions[node] = torch.nn.SiLU()
            self.conversion_inputs[node] = input
        for node in self.nodes:
            if node.op not in ('call_function', 'call_method') or node in gate_nodes or node not in self.signals or (
                    node in conversions or node in swish_sigmoids):
                continue
            layer = functional_layer(node, self.signals)
            if layer is not None:
                conversions[node] = layer
                continue
            convert = CONVERSIONS.get(node.target)
            if convert is None:
                continue
            input = node.args[0] if node.args else None
            if not isinstance(input, torch.fx.Node):
                continue
            inplace = node.target in _INPLACE or node.kwargs.get('inplace') is True or (
                node.target in _ACTIVATIONS and len(node.args) > 1 and node.args[-1] is True)
            # an in-place operation changes its input for the other users too: as a module it would not
            if inplace and len(input.users) > 1:
                continue
            inputs = _RUNTIME_ARGUMENTS.get(node.target, ())
            runtime = {name: call_argument(node, position, name) for name, position in inputs}
            options = [arg for position, arg in enumerate(node.args[1:], 1) if position not in dict(inputs).values()]
            options += [value for key, value in node.kwargs.items() if key not in runtime]
            if any(isinstance(arg, torch.fx.Node) for arg in options):
                continue
            module = convert(node)
            if module is not None:
                conversions[node] = module
                if runtime:
                    self.conversion_arguments[node] = runtime
        return conversions
