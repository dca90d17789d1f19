'''Reversible, bitwise-exact modifications of modules.'''
from typing import Any, Callable, List

import torch

_MODULE_STORES = ('_parameters', '_buffers', '_modules')


def _restorer(module: torch.nn.Module, name: str) -> Callable[[], None]:
    '''A function that puts back what ``module`` holds under ``name`` now, or removes the name if it holds none.'''
    for store in _MODULE_STORES:
        registry = module.__dict__[store]
        if name in registry:
            # the entry existed (possibly as None, e.g. a missing bias): put the same object back in the same place
            original = registry[name]
            return lambda: registry.__setitem__(name, original)
    if name in module.__dict__:
        original = module.__dict__[name]
        return lambda: module.__dict__.__setitem__(name, original)
    # instance attributes such as `forward` shadow the class; deleting them restores the class method
    return lambda: delattr(module, name)


class ModulePatch:
    '''Record of changes made to modules, which can be undone exactly.

    Every change goes through this record, so that undoing it restores the very objects that were there before
    (parameter objects, their storage, plain attributes, or the absence of an attribute): a canonized model is
    bitwise what it was after removal, and a failed application can be rolled back half-way.
    '''
    def __init__(self) -> None:
        self._undo: List[Callable[[], None]] = []

    def set_data(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        '''Replace the data of ``tensor`` (a parameter or buffer) in place, keeping the tensor object.

        Parameters
        ----------
        tensor: :py:obj:`torch.Tensor`
            Parameter or buffer whose data to replace.
        value: :py:obj:`torch.Tensor`
            New data, of the same dtype and device as ``tensor``.
        '''
        original = tensor.data
        tensor.data = value
        self._undo.append(lambda: setattr(tensor, 'data', original))

    def set_attribute(self, module: torch.nn.Module, name: str, value: Any) -> None:
        '''Set an attribute, parameter, buffer or submodule of ``module``, remembering what was there before.

        Parameters
        ----------
        module: :py:obj:`torch.nn.Module`
            Module to modify.
        name: str
            Name of the attribute.
        value: object
            New value; a :py:obj:`torch.nn.Module` becomes a submodule, a :py:obj:`torch.nn.Parameter` a parameter.
        '''
        self._undo.append(_restorer(module, name))
        if isinstance(value, (torch.Tensor, torch.nn.Module)) or any(
                name in module.__dict__[store] for store in _MODULE_STORES):
            setattr(module, name, value)
        else:
            # a plain attribute (a float, a bound forward): Module.__setattr__ would only check that it is none of the
            # above, at a cost that shows when canonizing in every attribution
            module.__dict__[name] = value

    def shadow(self, module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
        '''Make ``module.<name>`` return ``value``, keeping the registered parameter or buffer of that name.

        ``value`` is put into the instance dictionary, where attribute lookup finds it before ``Module.__getattr__``
        looks in the registries (as zennit 1.0's ``MergeBatchNorm`` does with ``object.__setattr__``): the forward
        computes with ``value``, which may be a tensor computed from the original parameters, so that gradients reach
        them, while ``named_parameters()`` and ``state_dict()`` still hold the original objects. A missing parameter
        (``None``, such as an absent bias) gets a placeholder parameter with ``value``'s data, because zennit 1.0's
        rules load their modified parameters with ``load_state_dict``, which only sets registered ones.

        Undoing puts the original objects back into the registries, whatever replaced them meanwhile (zennit 1.0's
        rules swap in new parameter objects), and removes the entry from the instance dictionary.

        Parameters
        ----------
        module: :py:obj:`torch.nn.Module`
            Module to modify.
        name: str
            Name of a parameter or buffer of ``module`` (registered, possibly as ``None``).
        value: :py:obj:`torch.Tensor`
            What the module computes with instead.
        '''
        registry = next(
            module.__dict__[store] for store in ('_parameters', '_buffers') if name in module.__dict__[store])
        registered = registry[name]
        missing = object()
        plain = module.__dict__.get(name, missing)

        def undo() -> None:
            registry[name] = registered
            if plain is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = plain

        self._undo.append(undo)
        if registered is None and registry is module.__dict__['_parameters']:
            registry[name] = torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
        module.__dict__[name] = value

    def on_undo(self, function: Callable[[], None]) -> None:
        '''Call ``function`` when undoing, in reverse order with all other changes.'''
        self._undo.append(function)

    def undo(self) -> None:
        '''Undo all recorded changes, last first. Calling it again does nothing.'''
        while self._undo:
            self._undo.pop()()
