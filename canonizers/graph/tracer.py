'''Tracing a model with ``torch.fx`` without touching it: leaves as zennit needs them, the user's hooks left out,
and nothing left behind on the model.'''
import collections
import copy
import inspect
import operator
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from zennit.layer import Sum

from .modules import attribute_at, leaf_activation

#: what every module holds in its ``__dict__`` (registries, hooks), restored otherwise
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
#: the hook registries of a module that would run (on proxies) while tracing through its forward
_HOOK_DICTS = ('_forward_hooks', '_forward_pre_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called',
               '_forward_pre_hooks_with_kwargs')


class TraceFailure(Exception):
    '''``torch.fx`` cannot trace the model; ``cause`` is the tracing error.'''
    def __init__(self, model: torch.nn.Module, cause: BaseException) -> None:
        first = str(cause).splitlines()[0] if str(cause) else ''
        super().__init__(f'torch.fx cannot trace {type(model).__name__} ({type(cause).__name__}: {first})')
        self.cause = cause


def _timm_leaves() -> Tuple[Tuple[type, ...], Tuple[Callable, ...]]:
    '''timm's own list of modules and functions to keep opaque when tracing, if timm is in use (imported).'''
    if 'timm' not in sys.modules:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(function for function in get_notrace_functions() if callable(function))


class LeafTracer(torch.fx.Tracer):
    '''Tracer that keeps as leaves (single ``call_module`` nodes) what zennit and the batch-norm merges need whole:
    torch's own layers, and every convolution, linear layer and batch norm (also subclasses with their own forward, such
    as timm's ``Conv2dSame`` or ``BatchNormAct2d``, whose padding or activation belongs to them), and zennit's own
    :py:obj:`zennit.layer.Sum` modules of models written for zennit, to which composites attach their sum rule, and
    timm's elementwise activations that zennit's activation rule must reach whole
    (:py:data:`.modules.LEAF_ACTIVATIONS`).

    Parameters
    ----------
    opaque: bool
        Also keep timm's registered no-trace modules whole (the parallel paths inside them are then out of reach);
        only needed where tracing through them fails.
    '''
    def __init__(self, opaque: bool = False) -> None:
        modules, functions = _timm_leaves()
        self.extra_leaves = modules if opaque else ()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (_ConvNd, _BatchNorm, torch.nn.Linear, Sum) + self.extra_leaves) or leaf_activation(
                module):
            return True
        return super().is_leaf_module(module, qualified_name)


class ShapeProxy(torch.fx.Proxy):
    '''A proxy that knows the tensor it stands for on one example input, and answers questions about its shape, dtype
    and device with it (so that a forward branching on them, ``if H % window:``, can be traced), but never about its
    values: ``if x.sum() > 0`` still fails to trace.'''
    example_value: Any = None

    def _known(self) -> bool:
        return isinstance(self.example_value, torch.Tensor)

    shape = property(lambda self: self._attribute('shape'))
    ndim = property(lambda self: self._attribute('ndim'))
    dtype = property(lambda self: self._attribute('dtype'))
    device = property(lambda self: self._attribute('device'))

    def _attribute(self, name: str) -> Any:
        return getattr(self.example_value, name) if self._known() else self.__getattr__(name)

    def size(self, dim: Optional[int] = None) -> Any:
        if self._known():
            return self.example_value.size() if dim is None else self.example_value.size(dim)
        return self.tracer.create_proxy('call_method', 'size', (self,) if dim is None else (self, dim), {})

    def dim(self) -> Any:
        return self.example_value.dim() if self._known() else self._method('dim')

    def numel(self) -> Any:
        return self.example_value.numel() if self._known() else self._method('numel')

    def _method(self, name: str) -> Any:
        return self.tracer.create_proxy('call_method', name, (self,), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        # an assignment into a slice (MViTv2's relative positions added to the attention logits): a node of the
        # graph, which torch.fx keeps as it has an effect (the analysis reports it where relevance flows)
        self.tracer.create_proxy('call_function', operator.setitem, (self, key, value), {})


class ShapeTracer(LeafTracer):
    ''':py:class:`LeafTracer` specialized to one input shape: every proxy carries its tensor on an example input of
    that shape (computed as the trace goes), so that shapes, dtypes and devices are plain values to the forward and
    the graph holds them as constants. It traces through timm's no-trace modules and functions, which are no-trace for
    branching on shapes. The graph is then the forward for inputs of that shape (and dtype) only.

    Parameters
    ----------
    example: :py:obj:`torch.Tensor`
        The example input (its values do not matter: control flow on values still fails to trace).
    '''
    def __init__(self, example: torch.Tensor) -> None:
        torch.fx.Tracer.__init__(self)
        self.extra_leaves = ()
        self.example = example
        self.placeholders = 0
        self.reading = False
        self.forwards: List[Callable] = []

    def proxy(self, node: torch.fx.Node) -> ShapeProxy:
        return ShapeProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        # while computing a leaf module's value, its parameters are its own tensors, not proxies
        if self.reading:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if self.reading:
            # a submodule called while computing a leaf module's value runs as it is, untraced
            return forward(*args, **kwargs)
        self.forwards.append(forward)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.forwards.pop()

    def create_proxy(self, kind: str, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], *rest: Any,
                     **options: Any) -> Any:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        if not isinstance(proxy, ShapeProxy):
            return proxy
        if kind == 'placeholder':
            self.placeholders += 1
            if self.placeholders == 1:
                proxy.example_value = self.example
            return proxy
        unknown = []

        def value(argument: Any) -> Any:
            if isinstance(argument, torch.fx.Proxy):
                if not isinstance(argument, ShapeProxy) or argument.example_value is None:
                    unknown.append(argument)
                return argument.example_value if isinstance(argument, ShapeProxy) else None
            return argument

        arguments = torch.fx.node.map_aggregate(args, value)
        keywords = torch.fx.node.map_aggregate(kwargs, value)
        if unknown:
            return proxy
        self.reading = True
        try:
            with torch.no_grad():
                if kind == 'call_function':
                    proxy.example_value = target(*arguments, **keywords)
                elif kind == 'call_method':
                    proxy.example_value = getattr(arguments[0], target)(*arguments[1:], **keywords)
                elif kind == 'call_module':
                    proxy.example_value = self.forwards[-1](*arguments, **keywords)
                elif kind == 'get_attr':
                    # a copy: an in-place operation on the value must not reach the model's tensor
                    proxy.example_value = torch.fx.node.map_aggregate(
                        attribute_at(self.root, target), lambda item: item.detach().clone()
                        if isinstance(item, torch.Tensor) else item)
        except Exception:
            # unknown from here on: a question about its shape becomes a node again (and fails where it must)
            proxy.example_value = None
        finally:
            self.reading = False
        return proxy


def _defaults(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    '''The optional arguments of the model's forward after the input, at their defaults (``mask=None``): traced as
    inputs, ``if mask is not None`` would take the branch a call ``model(x)`` never takes.'''
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    defaults = {parameter.name: parameter.default for parameter in parameters[1:]
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
                and parameter.default is not parameter.empty
                and (parameter.default is None or isinstance(parameter.default, (bool, int, float, str)))}
    return defaults or None


def _wrapped_functions(graph: torch.fx.Graph) -> bool:
    '''Whether ``graph`` calls one of timm's no-trace functions, kept as a leaf.'''
    functions = set(_timm_leaves()[1])
    return any(node.op == 'call_function' and node.target in functions for node in graph.nodes)


def trace(model: torch.nn.Module, example: Optional[torch.Tensor] = None
          ) -> Tuple[torch.fx.Graph, Dict[str, Any], Tuple[type, ...], bool]:
    '''Trace ``model`` with :py:class:`LeafTracer`, with its hooks left out and nothing left on it.

    The user's forward hooks are not run on proxies (they would fail, or record proxies), and attributes the tracer
    sets on the model (tensor constants) are taken off again and returned, to be installed reversibly. Where the
    forward branches on shapes (timm's no-trace modules and functions), and ``example`` is given, the model is traced
    for inputs of its shape alone (:py:class:`ShapeTracer`); without one, timm's no-trace modules are kept whole.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model; it is unchanged afterwards.
    example: :py:obj:`torch.Tensor`, optional
        An input of the shape and dtype the graph may be specialized to.

    Returns
    -------
    (:py:obj:`torch.fx.Graph`, dict of str to object, tuple of type, bool)
        The graph, the attributes the graph's code reads from the model that the model does not have, the module
        types kept whole because tracing through them failed (timm's no-trace modules), if any, and whether the graph
        is specialized to the shape of ``example``.

    Raises
    ------
    TraceFailure
        If ``torch.fx`` cannot trace the model.
    '''
    modules = list(model.modules())
    saved: List[Tuple[torch.nn.Module, str, Any]] = []
    # caches a forward fills (LeViT's attention-bias cache) would keep proxies: their contents are put back
    containers = [(value, copy.copy(value)) for module in modules for key, value in vars(module).items()
                  if key not in _MODULE_INTERNALS and type(value) in (dict, list, set, collections.OrderedDict)]
    # and attributes it sets (ConViT's cache of relative indices, filled for the example's shape)
    states = [(module, {key: value for key, value in vars(module).items() if key not in _MODULE_INTERNALS})
              for module in modules]
    attributes = set(vars(model))
    registered = {store: set(model.__dict__[store]) for store in ('_parameters', '_buffers', '_modules')}
    specialized = False
    try:
        for module in modules:
            for key in _HOOK_DICTS:
                registry = module.__dict__.get(key)
                if registry:
                    saved.append((module, key, registry))
                    module.__dict__[key] = collections.OrderedDict()
        opaque: Tuple[type, ...] = ()
        graph: Optional[torch.fx.Graph] = None
        error: Optional[BaseException] = None
        try:
            graph = LeafTracer().trace(model, concrete_args=_defaults(model))
        except Exception as failure:
            error = failure
        if example is not None and (graph is None or _wrapped_functions(graph)):
            try:
                graph = ShapeTracer(example).trace(model, concrete_args=_defaults(model))
                specialized = True
            except Exception:
                pass
        if graph is None:
            # timm's no-trace modules, whole, may be what keeps the model from being traced
            try:
                tracer = LeafTracer(opaque=True)
                graph = tracer.trace(model, concrete_args=_defaults(model))
                opaque = tracer.extra_leaves
            except Exception:
                raise TraceFailure(model, error) from error
    finally:
        for module, key, registry in saved:
            module.__dict__[key] = registry
        for value, contents in containers:
            value.clear()
            if isinstance(value, list):
                value.extend(contents)
            else:
                value.update(contents)
        for module, state in states[1:]:
            for key in [key for key in vars(module) if key not in _MODULE_INTERNALS and key not in state]:
                del module.__dict__[key]
            module.__dict__.update(state)
        added = {key: model.__dict__.pop(key) for key in set(vars(model)) - attributes}
        # constants set through Module.__setattr__ land in the registries: take them off as well
        for store, keys in registered.items():
            registry = model.__dict__[store]
            for key in [key for key in registry if key not in keys]:
                added[key] = registry.pop(key)
        model.__dict__.update(states[0][1])
    return graph, added, opaque, specialized
