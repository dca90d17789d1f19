'''Tracing a model with ``torch.fx`` without touching it: leaves as zennit needs them, the user's hooks left out,
and nothing left behind on the model.'''
import collections
import copy
import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from zennit.layer import Sum

from .modules import leaf_activation

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


def trace(model: torch.nn.Module) -> Tuple[torch.fx.Graph, Dict[str, Any], Tuple[type, ...]]:
    '''Trace ``model`` with :py:class:`LeafTracer`, with its hooks left out and nothing left on it.

    The user's forward hooks are not run on proxies (they would fail, or record proxies), and attributes the tracer
    sets on the model (tensor constants) are taken off again and returned, to be installed reversibly.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model; it is unchanged afterwards.

    Returns
    -------
    (:py:obj:`torch.fx.Graph`, dict of str to object, tuple of type)
        The graph, the attributes the graph's code reads from the model that the model does not have, and the module
        types kept whole because tracing through them failed (timm's no-trace modules), if any.

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
    attributes = set(vars(model))
    registered = {store: set(model.__dict__[store]) for store in ('_parameters', '_buffers', '_modules')}
    try:
        for module in modules:
            for key in _HOOK_DICTS:
                registry = module.__dict__.get(key)
                if registry:
                    saved.append((module, key, registry))
                    module.__dict__[key] = collections.OrderedDict()
        opaque: Tuple[type, ...] = ()
        try:
            graph = LeafTracer().trace(model, concrete_args=_defaults(model))
        except Exception as error:
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
        added = {key: model.__dict__.pop(key) for key in set(vars(model)) - attributes}
        # constants set through Module.__setattr__ land in the registries: take them off as well
        for store, keys in registered.items():
            registry = model.__dict__[store]
            for key in [key for key in registry if key not in keys]:
                added[key] = registry.pop(key)
    return graph, added, opaque
