'''What the graph canonizer finds of transformers in a traced model: normalizations, attention, and constants added
to the signal, each to become a module that zennit's rules attach to (:py:mod:`canonizers.core.normalization`,
:py:mod:`canonizers.core.attention`).

- **Normalizations**: LayerNorm, GroupNorm, RMSNorm as modules or functions (``F.layer_norm`` of timm's LayerNorm
  and LayerNorm2d, also between permutes), and batch norms that cannot be merged, become affine maps with their
  normalizing factor constant.
- **Attention**: ``nn.MultiheadAttention``, ``F.scaled_dot_product_attention``, torchvision's
  ``shifted_window_attention`` (Swin, Swin V2) and the explicit ``softmax(...) @ v`` (with masks, biases, windows,
  class and pooling attention: whatever the weights are, they come through a softmax the values do not pass) get
  constant attention weights: CP-LRP.
- **Learned constants added to the signal** (position embeddings) are biases: ``x + c`` becomes a
  :py:class:`~canonizers.core.attention.ConstantShift`, which absorbs its share of the relevance as a bias does.
'''
import operator
from typing import Dict, List, NamedTuple, Optional, Set

import torch
import torch.fx
import torch.nn.functional as F

from ..core.attention import unsupported_attention
from ..core.normalization import (
    ConstantRMSNorm,
    ConstantStdGroupNorm,
    ConstantStdLayerNorm,
    FrozenBatchNorm,
    normalized_dims,
)
from .modules import attribute_at

SOFTMAXES = {F.softmax, torch.softmax, 'softmax'}
MATMULS = {operator.matmul, torch.matmul, 'matmul', torch.bmm, 'bmm', torch.einsum}
_ADDITIONS = {operator.add, torch.add, 'add'}
#: torchvision's window attention, which torch.fx keeps as a leaf
WINDOW_ATTENTION = 'torchvision.models.swin_transformer.shifted_window_attention'
#: the products of two signals that get the uniform rule, by target
_PRODUCT_OPERATIONS = {operator.mul: 'mul', torch.mul: 'mul', 'mul': 'mul', operator.matmul: 'matmul',
                       torch.matmul: 'matmul', 'matmul': 'matmul', torch.bmm: 'bmm', 'bmm': 'bmm'}
_RMS_NORM = getattr(torch.nn, 'RMSNorm', ())
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


class NormSpec(NamedTuple):
    '''A normalization to become an affine map with its normalizing factor constant.

    Attributes
    ----------
    kind: str
        ``"layer"``, ``"group"``, ``"rms"`` or ``"batch"``.
    weight, bias: str or None
        The names of its parameters in the model (``get_attr`` targets).
    eps: float or None
        Its epsilon.
    dims: int
        The number of normalized dimensions (LayerNorm, RMSNorm).
    groups: int
        The number of groups (GroupNorm).
    running: tuple of str
        The names of the running mean and variance (batch norms).
    module: str
        The module it is, if it is one.
    after: tuple of str
        Modules to call on its output (the dropout and activation of timm's ``BatchNormAct2d``).
    '''
    kind: str
    weight: Optional[str]
    bias: Optional[str]
    eps: Optional[float]
    dims: int = 1
    groups: int = 1
    running: tuple = ()
    module: str = ''
    after: tuple = ()


def _argument(node: torch.fx.Node, position: int, name: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _target(value) -> Optional[str]:
    '''The ``get_attr`` target of an argument, None for None; raises for anything else (computed parameters).'''
    if value is None:
        return None
    if isinstance(value, torch.fx.Node) and value.op == 'get_attr':
        return str(value.target)
    raise LookupError


def _module_norm(name: str, module: torch.nn.Module, unmerged: Set[str]) -> Optional[NormSpec]:
    weight = f'{name}.weight' if getattr(module, 'weight', None) is not None else None
    bias = f'{name}.bias' if getattr(module, 'bias', None) is not None else None
    if isinstance(module, torch.nn.LayerNorm):
        return NormSpec('layer', weight, bias, module.eps, len(module.normalized_shape), module=name)
    if isinstance(module, torch.nn.GroupNorm):
        return NormSpec('group', weight, bias, module.eps, groups=module.num_groups, module=name)
    if _RMS_NORM and isinstance(module, _RMS_NORM):
        return NormSpec('rms', weight, bias, module.eps, len(module.normalized_shape), module=name)
    # torch's own batch norms, and timm's BatchNormAct2d (the normalization, then its dropout and activation
    # modules); other subclasses may compute more than the normalization
    after = ('drop', 'act') if _timm_batch_norm_act(module) else ()
    if (type(module) in _BATCH_NORMS or after) and name in unmerged and module.track_running_stats and (
            module.running_mean is not None):
        return NormSpec('batch', weight, bias, module.eps, running=(f'{name}.running_mean', f'{name}.running_var'),
                        module=name, after=tuple(f'{name}.{part}' for part in after))
    return None


def _timm_batch_norm_act(module: torch.nn.Module) -> bool:
    '''Whether ``module`` is timm's ``BatchNormAct2d`` (batch norm, dropout, activation).'''
    return type(module).__name__ == 'BatchNormAct2d' and type(module).__module__.startswith('timm.') and all(
        isinstance(getattr(module, part, None), torch.nn.Module) for part in ('drop', 'act'))


def _function_norm(node: torch.fx.Node) -> Optional[NormSpec]:
    try:
        if node.target is F.layer_norm:
            shape = _argument(node, 1, 'normalized_shape')
            return NormSpec('layer', _target(_argument(node, 2, 'weight')), _target(_argument(node, 3, 'bias')),
                            _argument(node, 4, 'eps', 1e-5), normalized_dims(shape))
        if node.target is F.group_norm:
            return NormSpec('group', _target(_argument(node, 2, 'weight')), _target(_argument(node, 3, 'bias')),
                            _argument(node, 4, 'eps', 1e-5), groups=_argument(node, 1, 'num_groups'))
        if node.target is getattr(F, 'rms_norm', None):
            shape = _argument(node, 1, 'normalized_shape')
            return NormSpec('rms', _target(_argument(node, 2, 'weight')), None, _argument(node, 3, 'eps'),
                            normalized_dims(shape))
    except LookupError:
        return None
    return None


class Transformer:
    '''The normalizations, attention and constant shifts of a traced model (see the module's description).

    Parameters
    ----------
    analysis: :py:class:`~canonizers.graph.analysis.Analysis`
        The traced model.
    unmerged: set of str
        The batch norms the canonizer cannot merge.

    Attributes
    ----------
    norms: dict of :py:obj:`torch.fx.Node` to :py:class:`NormSpec`
        The normalizations.
    attentions: dict of :py:obj:`torch.fx.Node` to str
        The attentions: ``"module"`` (``nn.MultiheadAttention``), ``"sdpa"`` or ``"window"``.
    weightings: dict of :py:obj:`torch.fx.Node` to (:py:obj:`torch.fx.Node`, :py:obj:`torch.fx.Node`, bool, str)
        The products ``weights @ values`` of explicit attention: the values, the weights, whether the weights are
        the left factor, and the ``einsum`` equation if it is one (else None).
    shifts: dict of :py:obj:`torch.fx.Node` to (:py:obj:`torch.fx.Node`, :py:obj:`torch.fx.Node`)
        Sums of the signal and a tensor that does not depend on the input: the signal and the constant.
    constant_inputs: dict of :py:obj:`torch.fx.Node` to set of :py:obj:`torch.fx.Node`
        Inputs of these nodes that carry no relevance (attention weights, queries and keys).
    refused: dict of :py:obj:`torch.fx.Node` to str
        Attention modules left as they are, and why.
    products: dict of :py:obj:`torch.fx.Node` to (str, str, :py:obj:`torch.fx.Node`, :py:obj:`torch.fx.Node`)
        Products of two signals that are no gate, to get the uniform rule: the operation (one of
        :py:data:`canonizers.core.products.OPERATIONS`), the ``einsum`` equation or None, and the two factors. Under
        AttnLRP these include the products of explicit attention (``q @ k^T``, ``weights @ values``).
    softmaxes: dict of :py:obj:`torch.fx.Node` to (int, dtype or None)
        Under AttnLRP, the softmaxes on the signal, to get the softmax rule: dimension and dtype.
    '''
    def __init__(self, analysis, unmerged: Set[str], attention: str = 'cp-lrp') -> None:
        self.attention = attention
        self.products: Dict[torch.fx.Node, tuple] = {}
        self.softmaxes: Dict[torch.fx.Node, tuple] = {}
        self.norms: Dict[torch.fx.Node, NormSpec] = {}
        self.attentions: Dict[torch.fx.Node, str] = {}
        self.weightings: Dict[torch.fx.Node, tuple] = {}
        self.shifts: Dict[torch.fx.Node, tuple] = {}
        self.constant_inputs: Dict[torch.fx.Node, Set[torch.fx.Node]] = {}
        self.refused: Dict[torch.fx.Node, str] = {}
        softmaxes = [node for node in analysis.nodes if node in analysis.signals and self._softmax(analysis, node)]
        softmax_set = set(softmaxes)
        for node in analysis.nodes:
            if node not in analysis.signals:
                continue
            module = analysis.module(node)
            if module is not None:
                self._module(analysis, node, module, unmerged)
            elif node.op == 'call_function' and node.target is F.scaled_dot_product_attention:
                self.attentions[node] = 'sdpa'
                if attention == 'cp-lrp':
                    self.constant_inputs[node] = set(node.all_input_nodes) - {_argument(node, 2, 'value')}
            elif node.op == 'call_function' and _qualified(node.target) == WINDOW_ATTENTION:
                self.attentions[node] = 'window'
            elif node.op in ('call_function', 'call_method'):
                spec = _function_norm(node) if node.op == 'call_function' else None
                if spec is not None:
                    self.norms[node] = spec
                elif node.target in MATMULS and attention == 'cp-lrp':
                    self._weighting(analysis, node, softmaxes)
                elif node.target in _ADDITIONS:
                    self._shift(analysis, node)
            if node not in self.weightings:
                self._product(analysis, node)
            if attention == 'attnlrp' and node in softmax_set:
                self._softmax_rule(analysis, node)

    @staticmethod
    def _softmax(analysis, node: torch.fx.Node) -> bool:
        if node.op == 'call_module':
            return isinstance(analysis.module(node), torch.nn.Softmax)
        return node.op in ('call_function', 'call_method') and node.target in SOFTMAXES

    def _module(self, analysis, node: torch.fx.Node, module: torch.nn.Module, unmerged: Set[str]) -> None:
        if isinstance(module, torch.nn.MultiheadAttention):
            reason = unsupported_attention(module)
            if reason is not None:
                self.refused[node] = reason
                return
            self.attentions[node] = 'module'
            if self.attention == 'cp-lrp':
                self.constant_inputs[node] = set(node.all_input_nodes) - {_argument(node, 2, 'value')}
            return
        spec = _module_norm(str(node.target), module, unmerged)
        if spec is not None:
            self.norms[node] = spec

    def _weighting(self, analysis, node: torch.fx.Node, softmaxes: List[torch.fx.Node]) -> None:
        args, equation = node.args, None
        if node.target is torch.einsum and len(args) == 3 and isinstance(args[0], str):
            equation, args = args[0], args[1:]
        if len(args) != 2 or node.kwargs or len(analysis.signal_inputs(node)) != 2 or not all(
                isinstance(arg, torch.fx.Node) for arg in args):
            return
        first, second = args
        for weights, values, left in ((first, second, True), (second, first, False)):
            if any(analysis.depends(weights, softmax) and not analysis.depends(values, softmax)
                   for softmax in softmaxes):
                self.weightings[node] = (values, weights, left, equation)
                self.constant_inputs[node] = {weights}
                return

    def _product(self, analysis, node: torch.fx.Node) -> None:
        '''Record a product of two distinct signals that is no gate and no swish, with its operation.'''
        if node.op not in ('call_function', 'call_method') or node.kwargs or node in analysis.swishes or any(
                gate.node is node for gate in analysis.gates):
            return
        args, equation = node.args, None
        if node.target is torch.einsum and len(args) == 3 and isinstance(args[0], str):
            equation, args = args[0], args[1:]
            operation = 'einsum'
        else:
            operation = _PRODUCT_OPERATIONS.get(node.target)
        if operation is None or len(args) != 2 or not all(isinstance(arg, torch.fx.Node) for arg in args) or (
                args[0] is args[1]) or not all(arg in analysis.signals for arg in args):
            return
        self.products[node] = (operation, equation, args[0], args[1])

    def _softmax_rule(self, analysis, node: torch.fx.Node) -> None:
        module = analysis.module(node)
        if module is not None:
            dim, dtype = module.dim, None
        else:
            dim, dtype = _argument(node, 1, 'dim'), node.kwargs.get('dtype')
            if len(node.args) > 3 and node.target is F.softmax:
                dtype = node.args[3]
        if isinstance(dim, int) and (dtype is None or isinstance(dtype, torch.dtype)) and len(
                analysis.signal_inputs(node)) == 1:
            self.softmaxes[node] = (dim, dtype)

    def _shift(self, analysis, node: torch.fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs or not all(isinstance(arg, torch.fx.Node) for arg in node.args):
            return
        signals = analysis.signal_inputs(node)
        if len(signals) != 1:
            return
        signal, = signals
        constant = node.args[1] if node.args[0] is signal else node.args[0]
        if constant is not signal:
            self.shifts[node] = (signal, constant)

    def handled(self) -> Set[torch.fx.Node]:
        '''The nodes that become modules with rules.'''
        return set(self.norms) | set(self.attentions) | set(self.weightings) | set(self.shifts) | set(
            self.products) | set(self.softmaxes)


def _qualified(target: object) -> str:
    return f'{getattr(target, "__module__", "")}.{getattr(target, "__qualname__", "")}'


def learned_constants(analysis, transformer: Transformer) -> List[str]:
    '''The parameters and buffers that reach the signal as constants (position embeddings, class and register
    tokens): the ``get_attr`` targets behind constant shifts and behind tensors concatenated with the signal.'''
    sources: List[torch.fx.Node] = [constant for _, constant in transformer.shifts.values()]
    for node in analysis.nodes:
        if node.op == 'call_function' and node.target in (torch.cat, torch.concat, torch.stack) and (
                node in analysis.signals):
            tensors = node.args[0] if node.args else node.kwargs.get('tensors', ())
            sources.extend(tensor for tensor in tensors if isinstance(tensor, torch.fx.Node)
                           and tensor not in analysis.signals)
    names: Dict[str, None] = {}
    for source in sources:
        for node in analysis.nodes:
            if node.op == 'get_attr' and analysis.depends(source, node):
                names[str(node.target)] = None
    return list(names)


def build_norm(spec: NormSpec, root: torch.nn.Module) -> torch.nn.Module:
    '''The affine module with a constant normalizing factor for ``spec``, holding ``root``'s own parameters.'''
    weight, bias = attribute_at(root, spec.weight), attribute_at(root, spec.bias)
    if spec.kind == 'layer':
        return ConstantStdLayerNorm(weight, bias, spec.eps, spec.dims)
    if spec.kind == 'group':
        return ConstantStdGroupNorm(weight, bias, spec.eps, spec.groups)
    if spec.kind == 'rms':
        return ConstantRMSNorm(weight, bias, spec.eps, spec.dims)
    mean, var = (attribute_at(root, name) for name in spec.running)
    return FrozenBatchNorm(weight, bias, spec.eps, mean, var)
