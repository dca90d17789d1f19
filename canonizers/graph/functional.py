'''Linear maps the forward calls as functions on the model's own weights (``F.linear(x, self.weight)``,
``F.conv2d`` on a buffer), which become layers while canonized (:py:class:`.modules.FunctionalLayer`), so that the
rules of zennit's linear layers apply to them.'''
import operator
from typing import Collection, Optional

import torch
import torch.fx
import torch.nn.functional as F

from .modules import FunctionalLayer


def call_argument(node: torch.fx.Node, position: int, name: str, default=None):
    '''Argument ``name`` of a call, given at ``position`` (counting the input as 0) or as a keyword.'''
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


#: functional linear maps that become modules on the model's weights (:py:class:`.modules.FunctionalLayer`), with
#: the positions of their options after the input, weight and bias
_FUNCTIONAL_LAYERS = {
    F.linear: ('linear', ()),
    **{function: (kind, ('stride', 'padding', 'dilation', 'groups')) for function, kind in (
        (F.conv1d, 'conv1d'), (F.conv2d, 'conv2d'), (F.conv3d, 'conv3d'))},
}
_OPTION_DEFAULTS = {'stride': 1, 'padding': 0, 'dilation': 1, 'groups': 1}


def split_computed_biases(graph: torch.fx.Graph) -> None:
    '''Write ``F.linear(x, w, b)`` whose bias the forward computes (Swin V2's and DINOv3's ``cat`` of the query and
    value biases) as ``F.linear(x, w) + b``, in place: the linear map becomes a layer on the model's weight
    (:py:class:`.modules.FunctionalLayer`), and the bias a constant added to its output, which absorbs relevance as a
    layer's bias does.'''
    for node in list(graph.nodes):
        if node.op != 'call_function' or node.target is not F.linear:
            continue
        bias = call_argument(node, 2, 'bias')
        if not isinstance(bias, torch.fx.Node) or bias.op == 'get_attr':
            continue
        with graph.inserting_after(node):
            linear = graph.call_function(F.linear, (node.args[0], call_argument(node, 1, 'weight')))
        with graph.inserting_after(linear):
            shifted = graph.call_function(operator.add, (linear, bias))
        node.replace_all_uses_with(shifted)
        graph.erase_node(node)


def _attribute_node(node: object) -> bool:
    '''Whether ``node`` reads a tensor of the model (a parameter or buffer) as it is.'''
    return isinstance(node, torch.fx.Node) and node.op == 'get_attr'


def functional_layer(node: torch.fx.Node, signals: Collection[torch.fx.Node]) -> Optional[FunctionalLayer]:
    '''The layer of a functional linear map on the model's own weight and bias (parameters or buffers), if it is
    one.'''
    if node.op != 'call_function' or node.target not in _FUNCTIONAL_LAYERS:
        return None
    kind, names = _FUNCTIONAL_LAYERS[node.target]
    input = node.args[0] if node.args else None
    weight, bias = call_argument(node, 1, 'weight'), call_argument(node, 2, 'bias')
    options = tuple((name, call_argument(node, index + 3, name, _OPTION_DEFAULTS[name])) for index, name in enumerate(
        names))
    if not isinstance(input, torch.fx.Node) or input not in signals or not _attribute_node(weight) or not (
            bias is None or _attribute_node(bias)) or any(isinstance(value, torch.fx.Node) for _, value in options):
        return None
    if set(node.kwargs) - {'weight', 'bias'} - set(names):
        return None
    return FunctionalLayer(kind, str(weight.target), '' if bias is None else str(bias.target), options)
