'''Exact merging of batch norms into adjacent linear layers.

zennit's ``MergeBatchNorm`` leaves the merged batch norm computing ``x / sqrt(1 + eps)`` instead of the identity, an
error of about ``eps / 2`` per batch norm that adds up over deep networks. Here the batch norm becomes the exact
identity (``eps`` is set to 0 while merged) and the scale is computed in float64.
'''
import weakref
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
from zennit.canonizers import Canonizer
from zennit.types import BatchNorm, ConvolutionTranspose, Linear

from .patch import ModulePatch

#: (linear layers, batch norm) pairs to merge
Pairs = List[Tuple[Tuple[torch.nn.Module, ...], torch.nn.Module]]

# batch norms merged by a canonizer of this package that is still registered, and the linear layers merged into
_MERGED: 'weakref.WeakKeyDictionary[torch.nn.Module, bool]' = weakref.WeakKeyDictionary()


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


def leaves(root: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module]]:
    '''Modules without children, in registration order.'''
    for name, module in root.named_modules():
        if next(module.children(), None) is None:
            yield name, module


def output_features(linear: torch.nn.Module) -> int:
    '''Number of output features (channels) of a linear or convolutional layer.'''
    if isinstance(linear, torch.nn.Linear):
        return linear.out_features
    return linear.out_channels


def sequential_pairs(root: torch.nn.Module) -> Pairs:
    '''Pair every batch norm with the linear layer right before it among the leaves, in registration order.

    As zennit's ``SequentialMergeBatchNorm``, this relies on modules being registered in the order of the forward
    pass; unlike it, a pair whose shapes do not belong together is never merged.

    Parameters
    ----------
    root: :py:obj:`torch.nn.Module`
        The model.

    Returns
    -------
    list of ((:py:obj:`torch.nn.Module`,), :py:obj:`torch.nn.Module`)
        The pairs to merge.
    '''
    pairs = []
    last = None
    for _, leaf in leaves(root):
        if (
            isinstance(last, Linear) and isinstance(leaf, BatchNorm)
            and output_features(last) == leaf.num_features
        ):
            pairs.append(((last,), leaf))
        last = leaf
    return pairs


def batch_norm_affine(batch_norm: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    '''The batch norm as an affine map ``x * scale + shift`` per channel, in float64.

    Parameters
    ----------
    batch_norm: :py:obj:`torch.nn.Module`
        Batch norm in eval mode, with running statistics.

    Returns
    -------
    (:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`)
        ``scale`` and ``shift``, each of shape ``[channels]``.
    '''
    mean = batch_norm.running_mean.double()
    scale = (batch_norm.running_var.double() + batch_norm.eps).rsqrt()
    shift = -mean * scale
    if batch_norm.weight is not None:
        scale = scale * batch_norm.weight.double()
        shift = shift * batch_norm.weight.double()
    if batch_norm.bias is not None:
        shift = shift + batch_norm.bias.double()
    return scale, shift


def check_batch_norm(batch_norm: torch.nn.Module) -> None:
    '''Refuse a batch norm that cannot be merged, or that is merged already.'''
    if batch_norm.running_mean is None or batch_norm.running_var is None:
        raise ValueError(f'batch norm {batch_norm} keeps no running statistics (track_running_stats=False) and '
                         'cannot be merged')
    if batch_norm in _MERGED:
        raise RuntimeError(f'batch norm {batch_norm} is merged by a canonizer that is still registered: remove it '
                           'before applying another one (nested composite contexts are not supported)')


def make_identity(patch: ModulePatch, batch_norm: torch.nn.Module) -> None:
    '''Turn ``batch_norm`` into the exact identity while ``patch`` is not undone.'''
    for key, fill in (('running_mean', 0.), ('running_var', 1.), ('weight', 1.), ('bias', 0.)):
        tensor = getattr(batch_norm, key)
        if tensor is not None:
            patch.set_data(tensor, torch.full_like(tensor, fill))
    # with eps = 0 the normalisation divides by sqrt(1) = 1 exactly
    patch.set_attribute(batch_norm, 'eps', 0.)
    _MERGED[batch_norm] = True
    patch.on_undo(lambda: _MERGED.pop(batch_norm, None))


def merge_into_linear(patch: ModulePatch, linear: torch.nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    '''Make ``linear`` compute ``linear(x) * scale + shift`` (per output channel), keeping its parameter objects.

    Parameters
    ----------
    patch: :py:class:`~canonizers.patch.ModulePatch`
        Record of the changes.
    linear: :py:obj:`torch.nn.Module`
        Linear or convolutional layer.
    scale, shift: :py:obj:`torch.Tensor`
        Per-channel factors in float64.
    '''
    weight = linear.weight
    if isinstance(linear, ConvolutionTranspose):
        # transposed convolutions keep their output channels in dimension 1, and groups split them
        groups = getattr(linear, 'groups', 1)
        shape = (groups, 1, -1) + (1,) * (weight.ndim - 2)
        merged = (weight.double().unflatten(0, (groups, -1)) * scale.reshape(shape)).flatten(0, 1)
    else:
        merged = weight.double() * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    patch.set_data(weight, merged.to(weight.dtype))

    bias = torch.zeros_like(shift) if linear.bias is None else linear.bias.double()
    merged_bias = (bias * scale + shift).to(dtype=weight.dtype, device=weight.device)
    if linear.bias is None:
        # zennit 0.4.6 rules swap parameters by setattr and need a Parameter here
        patch.set_attribute(linear, 'bias', torch.nn.Parameter(merged_bias, requires_grad=weight.requires_grad))
    else:
        patch.set_data(linear.bias, merged_bias)


class ExactMergeBatchNorm(Canonizer):
    '''Canonizer to merge batch norms into the linear layers before them, exactly.

    The merged batch norm is the exact identity while registered (``eps`` set to 0), and the merge is computed in
    float64, so the canonized model computes the same function up to rounding of the result's dtype. Removal restores
    the same parameter objects with their original data, bitwise.

    Parameters
    ----------
    pairs: callable, optional
        Function ``root -> [((linear, ...), batch_norm), ...]`` that finds the pairs to merge;
        :py:func:`sequential_pairs` by default.
    '''
    def __init__(self, pairs: Callable[[torch.nn.Module], Pairs] = sequential_pairs) -> None:
        self.pairs = pairs
        self.linears: Sequence[torch.nn.Module] = ()
        self.batch_norm = None
        self.patch = ModulePatch()

    def check(self, root_module: torch.nn.Module) -> Pairs:
        '''Find and validate the pairs to merge without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of ((:py:obj:`torch.nn.Module`,), :py:obj:`torch.nn.Module`)
            The pairs to merge.
        '''
        require_eval(root_module)
        pairs = self.pairs(root_module)
        for linears, batch_norm in pairs:
            check_batch_norm(batch_norm)
            for linear in linears:
                if output_features(linear) != batch_norm.num_features:
                    raise ValueError(f'cannot merge batch norm {batch_norm} into {linear}: their numbers of '
                                     'channels differ')
        return pairs

    def apply(self, root_module: torch.nn.Module) -> List['ExactMergeBatchNorm']:
        '''Merge all pairs found in ``root_module``; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:class:`ExactMergeBatchNorm`
            One registered instance per merged batch norm.
        '''
        instances = []
        try:
            for linears, batch_norm in self.check(root_module):
                instance = self.copy()
                instances.append(instance)
                instance.register(linears, batch_norm)
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
        return instances

    def register(self, linears: Sequence[torch.nn.Module], batch_norm: torch.nn.Module) -> None:
        '''Merge ``batch_norm`` into each of ``linears``.

        Parameters
        ----------
        linears: sequence of :py:obj:`torch.nn.Module`
            Linear layers whose output the batch norm normalises.
        batch_norm: :py:obj:`torch.nn.Module`
            The batch norm.
        '''
        self.linears = tuple(linears)
        self.batch_norm = batch_norm
        scale, shift = batch_norm_affine(batch_norm)
        try:
            for linear in self.linears:
                merge_into_linear(self.patch, linear, scale, shift)
            make_identity(self.patch, batch_norm)
        except BaseException:
            self.patch.undo()
            raise

    def remove(self) -> None:
        '''Restore the original parameters, bitwise.'''
        self.patch.undo()

    def copy(self) -> 'ExactMergeBatchNorm':
        '''Return an unregistered copy of this canonizer.'''
        return self.__class__(self.pairs)
