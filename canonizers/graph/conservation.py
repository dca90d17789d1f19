'''Where relevance is not conserved in a canonized model: every operation on the relevance path is either one that
the rules of a zennit LRP composite conserve relevance through, or it is named here, by kind.

zennit propagates relevance as a modified gradient: a module with a rule (linear layers and convolutions, sums,
average pools, activations) turns the relevance of its output into that of its input; anything else passes it on
as the plain gradient, through its Jacobian. That conserves relevance where the Jacobian moves values without
scaling them (reshaping, slicing, padding, copying, pooling by maximum, averaging), and not otherwise (a LayerNorm,
a softmax, a product of two signals, a linear map without a rule). The list below is what is known to conserve;
everything else is reported, so that nothing on the relevance path goes unnamed. A bias-free model in float64 under
:py:func:`canonizers.evaluation.conservation_composite` then conserves relevance to rounding exactly when nothing is
reported (:py:func:`canonizers.check` measures it).
'''
import operator
import warnings
from typing import Dict, Iterable, List, NamedTuple, Sequence, Set, Sized, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, Linear

from .analysis import PRODUCTS, Analysis, target_name
from .modules import elementwise_activation

#: the kinds of operations without a conserving rule, and what each means, for warnings and reports
KINDS: Dict[str, str] = {
    'batch norm': 'batch norms that cannot be merged into a linear layer',
    'normalization': 'normalizations (LayerNorm, GroupNorm, ...), which zennit has no rule for',
    'softmax': 'softmaxes, which zennit has no rule for',
    'attention': 'attention, which zennit has no rule for',
    'product': 'products the uniform rule does not reach (matrix products with a weight, in-place products), which '
               'zennit has no rule for',
    'merge': 'operations on several paths that no rule applies to and that cannot be cut',
    'recurrent': 'recurrent layers, which zennit has no rule for',
    'whole': 'modules kept whole (torch.fx cannot trace through them), whose inside has no rules',
    'leaf function': 'functions torch.fx keeps as a leaf (wrapped), whose inside has no rules',
    'detached': 'detached signals: no relevance flows back through them',
    'linear': 'linear maps without a rule (functional or matrix products with a weight), through which relevance '
              'is scaled as the gradient',
    'function': 'functions without a rule, through which relevance is scaled as the gradient',
    'module': 'modules without a rule, through which relevance is scaled as the gradient',
}


class Operation(NamedTuple):
    '''An operation on the relevance path through which the rules of a zennit composite do not conserve relevance.

    Attributes
    ----------
    place: str
        The module whose forward computes it (``""`` for the model's own forward), or the module itself where it is
        one.
    name: str
        What it computes: the module's type, or the function or method.
    kind: str
        One of :py:data:`KINDS`.
    module: bool
        Whether it is a module (``place`` is its name, ``name`` its type).
    '''
    place: str
    name: str
    kind: str
    module: bool = False

    def describe(self) -> str:
        '''What and where, for messages.'''
        if self.kind == 'batch norm':
            return f'batch norm {self.place!r}: {self.name}'
        if self.module:
            return f'{self.place!r} ({self.name})'
        article = 'a ' if self.kind in ('merge', 'product') and ' ' in self.name else ''
        return f'{article}{self.name} in {self.place or "the forward"!r}'


class NotConservedWarning(UserWarning):
    '''The rules of a zennit composite do not conserve relevance through some operations of a canonized model: its
    heatmaps are not LRP there (the warning names them).'''

#: modules through which relevance, passed as the gradient, is conserved (copies, slices, permutations, averages)
_CONSERVING_MODULES: Tuple[type, ...] = (
    torch.nn.modules.dropout._DropoutNd, torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten,
    torch.nn.PixelShuffle, torch.nn.PixelUnshuffle, torch.nn.ChannelShuffle, torch.nn.Upsample,
    torch.nn.modules.padding._ConstantPadNd, torch.nn.modules.padding._ReflectionPadNd,
    torch.nn.modules.padding._ReplicationPadNd, torch.nn.Unfold,
    torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd,
)
_POOLS: Tuple[type, ...] = (torch.nn.modules.pooling._MaxPoolNd, torch.nn.modules.pooling._AdaptiveMaxPoolNd, AvgPool)
_NORMALIZATIONS: Tuple[type, ...] = (
    torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm,
    torch.nn.CrossMapLRN2d,
) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, 'RMSNorm') else ())
_ATTENTIONS: Tuple[type, ...] = (
    torch.nn.MultiheadAttention, torch.nn.Transformer, torch.nn.TransformerEncoder, torch.nn.TransformerDecoder,
    torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
)
_SOFTMAXES: Tuple[type, ...] = (torch.nn.Softmax, torch.nn.Softmin, torch.nn.LogSoftmax, torch.nn.Softmax2d)

#: functions and methods of one signal through which relevance, passed as the gradient, is conserved
_CONSERVING: Set[object] = {
    'view', 'reshape', 'flatten', 'permute', 'transpose', 't', 'contiguous', 'squeeze', 'unsqueeze', 'expand',
    'expand_as', 'view_as', 'reshape_as', 'repeat', 'roll', 'flip', 'narrow', 'select', 'movedim', 'moveaxis',
    'swapaxes', 'swapdims', 'unflatten', 'chunk', 'split', 'unbind', 'tensor_split', 'float', 'double', 'half',
    'bfloat16', 'to', 'type', 'type_as', 'clone', 'mean', 'unfold', 'relu', 'relu_', 'repeat_interleave',
    # not fold: it sums overlapping patches, and the gradient hands each summand the whole relevance of the sum
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.roll, torch.flip, torch.narrow, torch.movedim,
    torch.swapaxes, torch.t, torch.mean, torch.relu, torch.repeat_interleave, torch.tensor_split,
    F.pad, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.interpolate, F.upsample,
    F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.relu, F.unfold,
    # the maximum or minimum of one signal over a dimension selects an entry (Hiera's and VOLO's pooling of tokens):
    # relevance goes to it whole, as through a max pool; of two signals, it is a merge (analysis.unsupported)
    'amax', 'amin', 'max', 'min', torch.amax, torch.amin, torch.max, torch.min,
}
#: a constant added to the signal (a bias, a position embedding): relevance passes on to the signal
_ADDITIONS = {operator.add, operator.iadd, torch.add, 'add', 'add_'}
_SUBTRACTIONS = {operator.sub, operator.isub, torch.sub, 'sub', 'sub_'}
_CONCATENATIONS = {torch.cat, torch.concat, torch.stack, torch.hstack, torch.vstack}
_BY_NAME = [
    ('attention', ('attention', 'attn')),
    ('softmax', ('softmax', 'softmin')),
    ('normalization', ('norm',)),
    ('product', ('matmul', 'bmm', 'einsum', 'baddbmm')),
    ('linear', ('linear', 'conv', 'neg', 'sub', 'mul', 'div')),
    ('detached', ('detach',)),
]


#: functions torch.fx keeps as leaves (wrapped) that move values without scaling them
_CONSERVING_LEAVES = {'torchvision.models.swin_transformer._patch_merging_pad'} | {
    # timm's window and block rearrangements (views and permutes) and its image scaling (an interpolation, whose
    # weights sum to 1 for every output, or a crop), which torch.fx keeps whole because their int arguments are proxies
    f'timm.models.{module}.{function}' for module, functions in (
        ('swin_transformer', ('window_reverse',)), ('swin_transformer_v2', ('window_reverse',)),
        ('swin_transformer_v2_cr', ('window_reverse',)),
        ('maxxvit', ('window_reverse', 'grid_reverse')), ('gcvit', ('window_reverse',)),
        ('davit', ('window_reverse',)), ('nest', ('deblockify',)),
        ('mvitv2', ('reshape_pre_pool', 'reshape_post_pool')), ('crossvit', ('scale_image',)),
    ) for function in functions
}
#: functions torch.fx keeps as leaves that are the identity in eval mode (their ``training`` argument False)
_IDENTITIES_IN_EVAL = {'torchvision.ops.stochastic_depth.stochastic_depth'}


def _qualified(target: object) -> str:
    return f'{getattr(target, "__module__", "")}.{getattr(target, "__qualname__", "")}'


def _by_name(target: object, default: str) -> str:
    name = target_name_of(target).lower()
    for kind, parts in _BY_NAME:
        if any(part in name for part in parts):
            return kind
    return default


def target_name_of(target: object) -> str:
    return target if isinstance(target, str) else getattr(target, '__name__', str(target))


def _from_torch(target: object) -> bool:
    '''Whether a called function is torch's (or Python's) own rather than one torch.fx was told to keep whole.'''
    if isinstance(target, str):
        return True
    module = getattr(target, '__module__', None) or ''
    return module.split('.')[0] in ('torch', '_operator', 'operator', 'builtins', 'math') or module == ''


def relevance_path(analysis: Analysis, transformer=None) -> List[torch.fx.Node]:
    '''The nodes that carry the signal and that relevance reaches from the output, in graph order: gates are constant
    (no relevance enters them), and scales pass relevance to their input alone. An in-place operation counts as a
    user of the tensor it changes (torch.fx leaves its result unused where the forward goes on with that tensor).'''
    constant_inputs: Dict[torch.fx.Node, Set[torch.fx.Node]] = dict(
        transformer.constant_inputs if transformer is not None else {})
    for gate in analysis.gates:
        constant_inputs[gate.node] = {gate.gate}
    in_place = [node for node in analysis.nodes if _in_place(node)]
    reached: Set[torch.fx.Node] = set()
    while True:
        before = len(reached)
        reached.update(node for node in in_place if node.args[0] in reached)
        for node in reversed(analysis.nodes):
            if node.op == 'output':
                reached.add(node)
            if node not in reached:
                continue
            if node in analysis.swishes:
                sources = [analysis.swishes[node][0]]
            else:
                sources = [source for source in analysis.dependencies(node)
                           if source not in constant_inputs.get(node, ())]
            reached.update(source for source in sources if source in analysis.signals)
        if len(reached) == before:
            break
    return [node for node in analysis.nodes if node in reached and node.op not in ('placeholder', 'output')]


def _in_place(node: torch.fx.Node) -> bool:
    '''Whether ``node`` changes its first argument in place (``x.add_(y)``, ``x += y`` as traced, ``F.relu_``).'''
    if node.op not in ('call_function', 'call_method') or not node.args or not isinstance(
            node.args[0], torch.fx.Node):
        return False
    name = target_name_of(node.target)
    return (name.endswith('_') and not name.startswith('_')) or node.target in (
        operator.iadd, operator.isub, operator.imul, operator.itruediv)


def find(analysis: Analysis, merged: Iterable[str], unmerged: Dict[str, str], whole: Iterable[str],
         transformer=None, path: 'Sequence[torch.fx.Node] | None' = None) -> List[Operation]:
    '''The operations on the relevance path of a traced model that the rules of a zennit composite do not conserve
    relevance through, once the graph canonizer has canonized it.

    Parameters
    ----------
    analysis: :py:class:`~canonizers.graph.analysis.Analysis`
        The traced model.
    merged: iterable of str
        The batch norms the canonizer merges.
    unmerged: mapping of str to str
        The batch norms it cannot merge, with the reason.
    whole: iterable of str
        The modules it keeps whole.
    transformer: :py:class:`~canonizers.graph.transformer.Transformer`, optional
        The normalizations, attention and constant shifts it turns into modules with rules.
    path: sequence of :py:obj:`torch.fx.Node`, optional
        The relevance path (:py:func:`relevance_path`), if computed already.

    Returns
    -------
    list of :py:class:`Operation`
        In graph order, each module once.
    '''
    merged, whole = set(merged), set(whole)
    handled = {merge.node for merge in analysis.merges} | {node for merge in analysis.merges for node in merge.absorbed}
    handled |= {gate.node for gate in analysis.gates} | set(analysis.scales) | set(analysis.swishes)
    handled |= set(analysis.conversions)
    if transformer is not None:
        handled |= transformer.handled()
    unsupported = {node: reason for node, reason, _ in analysis.unsupported}
    operations: Dict[Tuple[str, str], Operation] = {}
    path = relevance_path(analysis, transformer) if path is None else path
    on_path = set(path)
    for node in analysis.nodes:
        # an assignment into a tensor on the relevance path (MViTv2's relative positions, under AttnLRP) that writes
        # a signal: the data flow does not show it, the gradient passes through it
        if node.op == 'call_function' and node.target is operator.setitem and len(node.args) == 3 and (
                node.args[0] in on_path) and node.args[2] in analysis.signals:
            operation = Operation(analysis.holder(node), 'setitem', 'function')
            operations.setdefault(operation, operation)
    for node in path:
        if node in handled:
            continue
        if node in unsupported:
            kind = 'product' if node.target in PRODUCTS else _by_name(node.target, 'merge')
            operation = Operation(analysis.holder(node), unsupported[node], kind if kind in (
                'product', 'attention', 'softmax', 'normalization') else 'merge')
        elif node.op == 'call_module':
            operation = _module(analysis, node, merged, unmerged, whole)
        elif node.op in ('call_function', 'call_method'):
            operation = _function(analysis, node)
        else:
            operation = None
        if operation is not None:
            operations.setdefault(operation, operation)
    return list(operations.values())


def _module(analysis: Analysis, node: torch.fx.Node, merged: Set[str], unmerged: Dict[str, str],
            whole: Set[str]) -> 'Operation | None':
    name, module = str(node.target), analysis.module(node)
    kind = type(module).__name__
    # a pooling layer kept whole (timm's MaxPool2dSame pads and pools) has no paths inside: its rule, or the
    # gradient that moves the maximum, conserves relevance all the same
    if isinstance(module, _POOLS):
        return None
    if name in whole:
        return Operation(name, kind, 'whole', module=True)
    if isinstance(module, _BatchNorm):
        # timm's BatchNormAct2d calls its activation inside (a leaf to the tracer): zennit's rule must reach it
        act = getattr(module, 'act', None)
        if isinstance(act, torch.nn.Module) and not isinstance(act, (Activation, torch.nn.Identity)) and (
                not elementwise_activation(act)):
            return Operation(f'{name}.act', type(act).__name__, 'module', module=True)
        if name in merged:
            return None
        return Operation(name, unmerged.get(name, 'not merged'), 'batch norm', module=True)
    if isinstance(module, _ATTENTIONS):
        return Operation(name, kind, 'attention', module=True)
    if isinstance(module, (Sum, Linear, Activation, AvgPool) + _CONSERVING_MODULES) or elementwise_activation(module):
        # timm's activations the tracer keeps whole are declared activations while canonized
        return None
    if isinstance(module, _NORMALIZATIONS):
        return Operation(name, kind, 'normalization', module=True)
    if isinstance(module, _SOFTMAXES):
        return Operation(name, kind, 'softmax', module=True)
    if isinstance(module, torch.nn.RNNBase):
        return Operation(name, kind, 'recurrent', module=True)
    return Operation(name, kind, 'module', module=True)


def _function(analysis: Analysis, node: torch.fx.Node) -> 'Operation | None':
    target, place = node.target, analysis.holder(node)
    signals = analysis.signal_inputs(node)
    if target in _CONSERVING:
        return None
    if target in _ADDITIONS:
        return None
    if target in _SUBTRACTIONS and node.args and node.args[0] in signals:
        return None
    if target in _CONCATENATIONS and node.op == 'call_function':
        # learned tokens joined to the signal absorb the relevance that reaches them, as biases do (and are zeroed
        # with them in the bias-free check)
        return None
    if not _from_torch(target):
        if _qualified(target) in _CONSERVING_LEAVES or (
                _qualified(target) in _IDENTITIES_IN_EVAL and node.kwargs.get('training', node.args[-1]) is False):
            return None
        return Operation(place, target_name(node), 'leaf function')
    return Operation(place, target_name(node), _by_name(target, 'function'))


def warn(model: str, operations: Sequence[Operation], stacklevel: int = 3) -> None:
    '''Warn about ``operations`` of ``model`` (a type name), one :py:class:`NotConservedWarning` per kind, each
    naming every place (a transformer has dozens of LayerNorms).'''
    for kind, members in by_kind(operations).items():
        places = listing([operation.describe() for operation in members])
        if kind == 'batch norm':
            message = (f'GraphCanonizer cannot merge {count(members, "batch norm")} of {model}, which stay as they '
                       f'are (relevance through them is not conserved): {places}')
        elif kind == 'whole':
            places = listing([operation.place for operation in members], quote=True)
            message = (f'GraphCanonizer keeps {places} of {model} whole: torch.fx cannot trace through them (timm '
                       'marks them not traceable), so paths inside them are neither canonized nor cut, and relevance '
                       'through them is not conserved; where they branch on shapes, GraphCanonizer(input_shape=...) '
                       'traces through them for inputs of that shape')
        elif kind == 'merge':
            message = (f'GraphCanonizer leaves {count(members, "operation")} of parallel paths of {model} as they are '
                       f'(no rule applies to them, and they cannot be cut; relevance is not conserved): {places}')
        else:
            message = (f'GraphCanonizer: relevance is not conserved through {count(members, "operation")} of '
                       f'{model}, {KINDS[kind]}: {places}')
        warnings.warn(message, NotConservedWarning, stacklevel=stacklevel + 1)


def by_kind(operations: Iterable[Operation]) -> Dict[str, List[Operation]]:
    '''``operations`` grouped by kind, in the order the kinds first occur.'''
    kinds: Dict[str, List[Operation]] = {}
    for operation in operations:
        kinds.setdefault(operation.kind, []).append(operation)
    return kinds


def count(items: Sized, noun: str) -> str:
    '''``"3 batch norms"``.'''
    return f'{len(items)} {noun}{"s" if len(items) != 1 else ""}'


def listing(items: Sequence[str], limit: int = 5, quote: bool = False) -> str:
    '''The first ``limit`` items, and how many there are in all.'''
    shown = [repr(item) if quote else item for item in items[:limit]]
    return ', '.join(shown) + (f', ... ({len(items)} in all)' if len(items) > limit else '')
