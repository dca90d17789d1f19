'''Which batch norms of a traced model merge into which linear layers, found along the data flow.

Three kinds, tried in this order for each batch norm:

- *after*: the batch norm's input is a linear layer (or convolution) whose output feeds nothing else;
- *after a concatenation*: its input concatenates the channels of such layers, each of which absorbs its slice;
- *before* (pre-activation, as in DenseNet and ResNetV2): its output reaches only linear layers, through a ReLU
  (which becomes a :py:class:`~canonizers.ThresholdReLU`) and maps that commute with a per-channel affine
  map (average pooling, flattening, dropout in eval mode). timm's ``BatchNormAct2d`` counts as a batch norm followed
  by its own activation.

The arithmetic is :py:mod:`canonizers.core.merging`'s; this module only finds the pairs and validates them there.
'''
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from zennit.types import Linear

from ..core.merging import LinearMerge, check_merge, output_features
from .analysis import Analysis, target_name

#: modules through which a pre-activation batch norm's affine map passes unchanged to the linear layer after it
_COMMUTING_MODULES = (torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveAvgPool3d,
                      torch.nn.Flatten, torch.nn.Identity, torch.nn.Dropout, torch.nn.Dropout2d)
_COMMUTING_FUNCTIONS = {torch.flatten, 'flatten', F.adaptive_avg_pool2d, F.dropout}
_RELUS = {F.relu, torch.relu, 'relu'}


class LinearPlan(NamedTuple):
    '''The batch norms one linear layer absorbs.

    Attributes
    ----------
    before: str, optional
        Name of the batch norm before it (pre-activation).
    after: (str, int, int), optional
        Name of the batch norm after it, and the slice of its channels that belongs to this layer.
    '''
    before: Optional[str] = None
    after: Optional[Tuple[str, int, int]] = None


class PreActivation(NamedTuple):
    '''A batch norm merged into the linear layers after it.

    Attributes
    ----------
    relu: :py:obj:`torch.fx.Node`, optional
        The node of the ReLU between them, which becomes a threshold ReLU.
    attribute: (str, str), optional
        Where that ReLU is a module the model holds once: the parent's name and the attribute.
    linears: tuple of str
        The linear layers after it.
    '''
    relu: Optional[torch.fx.Node]
    attribute: Optional[Tuple[str, str]]
    linears: Tuple[str, ...]


class BatchNormPlan:
    '''All merges of the batch norms of a traced model, and the batch norms that cannot be merged, with the reason.

    Parameters
    ----------
    analysis: :py:class:`~canonizers.graph.analysis.Analysis`
        The traced model.
    '''
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.linears: Dict[str, LinearPlan] = {}
        self.pre_activations: Dict[str, PreActivation] = {}
        self.unmerged: Dict[str, str] = {}
        for node in analysis.nodes:
            module = analysis.module(node)
            if isinstance(module, _BatchNorm):
                self._plan(node, module)

    def _plan(self, node: torch.fx.Node, batch_norm: torch.nn.Module) -> None:
        name = node.target
        analysis = self.analysis
        if analysis.calls[name] > 1:
            self.unmerged[name] = f'it is called at {analysis.calls[name]} places in the forward'
            return
        if batch_norm.running_mean is None or batch_norm.running_var is None:
            self.unmerged[name] = 'it keeps no running statistics (track_running_stats=False)'
            return
        if self._after(node, batch_norm) or self._after_concatenation(node, batch_norm):
            return
        reason = self._before(node, batch_norm)
        if reason is not None:
            self.unmerged[name] = reason

    def _sole_linear(self, node: torch.fx.Node, user: torch.fx.Node) -> Optional[str]:
        '''The name of the linear layer ``node`` calls if it is called once and its output feeds ``user`` alone.'''
        analysis = self.analysis
        module = analysis.module(node)
        if not isinstance(module, Linear) or analysis.calls[node.target] != 1 or analysis.users(node) != [user]:
            return None
        return node.target

    def _after(self, node: torch.fx.Node, batch_norm: torch.nn.Module) -> bool:
        source = node.args[0]
        linear = isinstance(source, torch.fx.Node) and self._sole_linear(source, node)
        if not linear:
            return False
        try:
            check_merge(LinearMerge(self.analysis.modules[linear], after=batch_norm))
        except ValueError:
            return False
        self.linears[linear] = self.linears.get(linear, LinearPlan())._replace(
            after=(node.target, 0, batch_norm.num_features))
        return True

    def _after_concatenation(self, node: torch.fx.Node, batch_norm: torch.nn.Module) -> bool:
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.target is torch.cat and source.op == 'call_function'):
            return False
        merges = [merge for merge in self.analysis.merges if merge.node is source]
        if len(merges) != 1 or merges[0].dim != 1 or self.analysis.users(source) != [node]:
            return False
        linears = [self._sole_linear(input, source) for input in merges[0].inputs]
        if not all(linears) or len(set(linears)) != len(linears):
            return False
        modules = [self.analysis.modules[linear] for linear in linears]
        if sum(output_features(module) for module in modules) != batch_norm.num_features:
            return False
        start = 0
        plans = {}
        for linear, module in zip(linears, modules):
            stop = start + output_features(module)
            plans[linear] = self.linears.get(linear, LinearPlan())._replace(after=(node.target, start, stop))
            start = stop
        self.linears.update(plans)
        return True

    def _before(self, node: torch.fx.Node, batch_norm: torch.nn.Module) -> Optional[str]:
        '''Plan merging ``batch_norm`` into the layers after it; the reason why not, or None.'''
        analysis = self.analysis
        name = node.target
        relu, attribute, start = None, None, node
        activation = getattr(batch_norm, 'act', None)
        if activation is not None:
            # timm's BatchNormAct2d: the activation (and dropout) belong to the batch norm module
            if not isinstance(getattr(batch_norm, 'drop', torch.nn.Identity()), torch.nn.Identity):
                return 'its dropout lies between the batch norm and the layers after it'
            if type(activation) is torch.nn.ReLU:
                attribute = (name, 'act')
            elif not isinstance(activation, torch.nn.Identity):
                return (f'its output passes its activation {type(activation).__name__} before the next layer, and only '
                        'a ReLU can be moved across a merged batch norm')
        else:
            users = analysis.users(node)
            if len(users) == 1 and self._is_relu(users[0]):
                relu = start = users[0]
                module = analysis.module(relu)
                if module is not None and analysis.calls[relu.target] == 1:
                    parent, _, child = relu.target.rpartition('.')
                    attribute = (parent, child)
        linears: List[str] = []
        frontier = list(analysis.users(start))
        while frontier:
            user = frontier.pop()
            module = analysis.module(user)
            if isinstance(module, Linear):
                if user.target in self.linears and self.linears[user.target].before is not None:
                    return f'layer {user.target!r} after it takes part in another merge'
                linears.append(user.target)
            elif self._commutes(user):
                frontier.extend(analysis.users(user))
            else:
                return (f'its input is no linear layer that feeds it alone, and its output reaches '
                        f'{target_name(user)!r}, not only linear layers')
        if not linears:
            return 'its output reaches no linear layer'
        parent = analysis.modules[attribute[0]] if attribute else None
        for linear in linears:
            module = analysis.modules[linear]
            if analysis.calls[linear] != 1:
                return f'layer {linear!r} after it is called at several places'
            merge = LinearMerge(module, before=batch_norm, relu=(parent, attribute[1]) if attribute else None,
                                after=self._after_of(linear))
            try:
                check_merge(merge)
            except ValueError as error:
                return str(error)
        for linear in linears:
            self.linears[linear] = self.linears.get(linear, LinearPlan())._replace(before=name)
        self.pre_activations[name] = PreActivation(relu, attribute, tuple(linears))
        return None

    def _after_of(self, linear: str) -> Optional[torch.nn.Module]:
        plan = self.linears.get(linear)
        if plan is None or plan.after is None or plan.after[1:] != (0, output_features(self.analysis.modules[linear])):
            return None
        return self.analysis.modules[plan.after[0]]

    def _is_relu(self, node: torch.fx.Node) -> bool:
        module = self.analysis.module(node)
        if module is not None:
            return type(module) is torch.nn.ReLU
        return node.op in ('call_function', 'call_method') and node.target in _RELUS and (
            node in self.analysis.conversions)

    def _commutes(self, node: torch.fx.Node) -> bool:
        '''Whether a per-channel affine map of the input of ``node`` passes through it to its output.'''
        module = self.analysis.module(node)
        if module is not None:
            if isinstance(module, torch.nn.AvgPool2d):
                padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
                return all(value == 0 for value in padding)
            return isinstance(module, _COMMUTING_MODULES)
        if node.op in ('call_function', 'call_method') and node.target in _COMMUTING_FUNCTIONS:
            return True
        return node.op in ('call_function', 'call_method') and node.target in ('mean', torch.mean) and (
            self.analysis.global_pool(node))
