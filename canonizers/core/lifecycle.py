'''Applying canonizers all or nothing, and guarding modules against being changed twice.'''
import weakref
from typing import Sequence

import torch
from zennit.canonizers import Canonizer
from zennit.types import BatchNorm

from .patch import ModulePatch


def require_eval(root: torch.nn.Module) -> None:
    '''Refuse a model in training mode, where batch norms use batch statistics and cannot be merged.

    Parameters
    ----------
    root: :py:obj:`torch.nn.Module`
        The model.

    Raises
    ------
    RuntimeError
        If ``root`` or any of its batch norms is in training mode.
    '''
    training = [
        name or '(the model itself)' for name, module in root.named_modules()
        if module.training and (module is root or isinstance(module, BatchNorm))
    ]
    if training:
        raise RuntimeError(f'the model is in training mode (e.g. module {training[0]!r}): batch norms can only be '
                           'merged in eval mode, call model.eval() before canonizing')


def remove_all(instances: Sequence[Canonizer]) -> None:
    '''Remove registered canonizer instances, last first.'''
    for instance in reversed(instances):
        instance.remove()


class InUse:
    '''The modules that registered canonizers of this package have changed in one way (merged, rewritten), weakly
    referenced: a second canonizer must not change them again before the first is removed (nested composite contexts
    are not supported).'''
    def __init__(self) -> None:
        self.modules: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()

    def __contains__(self, module: torch.nn.Module) -> bool:
        return module in self.modules

    def claim(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        '''Mark ``module`` as in use until ``patch`` is undone.'''
        self.modules[module] = True
        patch.on_undo(lambda: self.modules.pop(module, None))


def rewritten_forward(module: torch.nn.Module) -> bool:
    '''Whether a canonizer rewrote the forward of ``module``: one of this package that is still registered, or one
    that set a ``forward`` attribute (zennit's own canonizers do) which is not a method of the module's own class.

    A model may set its own forward in ``__init__`` (timm's FasterNet: ``self.forward = self.forward_split_cat``);
    that is the model's forward, not a rewrite.
    '''
    if module in REWRITTEN:
        return True
    forward = vars(module).get('forward')
    if forward is None:
        return False
    function = getattr(forward, '__func__', None)
    own = getattr(forward, '__self__', None) is module and any(
        vars(cls).get(function.__name__) is function for cls in type(module).__mro__)
    return not own


#: batch norms merged by a registered canonizer of this package
MERGED = InUse()
#: modules whose forward a registered canonizer of this package rewrote
REWRITTEN = InUse()
