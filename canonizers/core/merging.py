'''Exact merging of batch norms into adjacent linear layers.

zennit 0.4.6 and 0.5.1 leave the merged batch norm computing ``x / sqrt(1 + eps)`` instead of the identity, an error
of about ``eps / 2`` per batch norm that adds up over deep networks. Here the batch norm becomes the exact identity
(``eps`` is set to 0 while merged, as zennit 1.0 does too) and the per-channel scale and shift are computed in float64.

How the merged values are installed depends on the zennit version (:py:mod:`canonizers.core.compat`). With zennit 1.0
and newer, the layers compute with tensors computed from the original parameters, so that the canonized model is the
same function of its parameters as well as of its input (gradients w.r.t. every original parameter are exact). zennit
0.4.6 and 0.5.1 require the layers' parameters to stay ``torch.nn.Parameter`` objects, so there the merged values
replace the parameters' data, as zennit's own ``MergeBatchNorm`` does: the output is exact, parameter gradients are not.
'''
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from zennit.canonizers import Canonizer
from zennit.types import BatchNorm, ConvolutionStandard, ConvolutionTranspose, Linear

from .compat import RULES_ASSIGN_PARAMETERS, RestoreSwappedParameters
from .cuts import BlockCatalog
from .layers import ThresholdReLU
from .lifecycle import MERGED, remove_all, require_eval
from .patch import ModulePatch


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


def sequential_merges(root: torch.nn.Module) -> List['LinearMerge']:
    '''Merge every batch norm into the linear layer right before it among the leaves, in registration order.

    As zennit's ``SequentialMergeBatchNorm``, this relies on modules being registered in the order of the forward
    pass; unlike it, a pair whose shapes do not belong together is never merged.

    Parameters
    ----------
    root: :py:obj:`torch.nn.Module`
        The model.

    Returns
    -------
    list of :py:class:`LinearMerge`
        The merges, each of a batch norm into the layer before it.
    '''
    merges = []
    last = None
    for _, leaf in leaves(root):
        if (
            isinstance(last, Linear) and isinstance(leaf, BatchNorm)
            and output_features(last) == leaf.num_features
        ):
            merges.append(LinearMerge(last, after=leaf))
        last = leaf
    return merges


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
    if batch_norm in MERGED:
        raise RuntimeError(f'batch norm {batch_norm} is merged by a canonizer that is still registered: remove it '
                           'before applying another one (nested composite contexts are not supported)')


def install(patch: ModulePatch, module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    '''Make ``module`` compute with ``value`` as its parameter or buffer ``name`` while ``patch`` is not undone.

    With zennit 1.0 and newer, ``value`` (computed from the original parameters, gradients included) shadows the
    registered tensor; with zennit 0.4.6 and 0.5.1, it replaces the registered tensor's data (see the module
    documentation).
    '''
    if RULES_ASSIGN_PARAMETERS:
        patch.shadow(module, name, value)
        return
    current = getattr(module, name)
    if current is not None:
        patch.set_data(current, value.detach())
        return
    # zennit 0.4.6 and 0.5.1 rules swap parameters by setattr and need a Parameter here
    requires_grad = any(parameter.requires_grad for parameter in module.parameters(recurse=False))
    patch.set_attribute(module, name, torch.nn.Parameter(value.detach(), requires_grad=requires_grad))


def make_identity(patch: ModulePatch, batch_norm: torch.nn.Module) -> None:
    '''Turn ``batch_norm`` into the exact identity while ``patch`` is not undone.'''
    for key, fill in (('running_mean', 0.), ('running_var', 1.), ('weight', 1.), ('bias', 0.)):
        tensor = getattr(batch_norm, key)
        if tensor is not None:
            # constants: the batch norm's parameters reach the output through the merged layer alone
            install(patch, batch_norm, key, torch.full_like(tensor, fill, requires_grad=False))
    # with eps = 0 the normalisation divides by sqrt(1) = 1 exactly
    patch.set_attribute(batch_norm, 'eps', 0.)
    MERGED.claim(patch, batch_norm)


class LinearMerge(NamedTuple):
    '''Batch norms to merge into one linear layer, from before and from after it.

    A linear layer gets all its merges in one go (and one registered instance), so that removing instances in any
    order restores it bitwise.

    Attributes
    ----------
    linear: :py:obj:`torch.nn.Module`
        The linear or convolutional layer that absorbs the batch norms.
    before: :py:obj:`torch.nn.Module`, optional
        Batch norm whose output reaches ``linear`` through nothing but ``relu`` and maps that commute with a
        per-channel affine map (such as average pooling and flattening to channels).
    relu: (:py:obj:`torch.nn.Module`, str), optional
        The module holding the ReLU between ``before`` and ``linear``, and the ReLU's attribute name there; the ReLU
        is replaced by a :py:class:`~canonizers.ThresholdReLU`. Without it, ``before`` feeds ``linear`` directly.
    after: :py:obj:`torch.nn.Module`, optional
        Batch norm right after ``linear``.
    '''
    linear: torch.nn.Module
    before: Optional[torch.nn.Module] = None
    relu: Optional[Tuple[torch.nn.Module, str]] = None
    after: Optional[torch.nn.Module] = None


def input_features(linear: torch.nn.Module) -> int:
    '''Number of input features (channels) of a linear or convolutional layer.'''
    if isinstance(linear, torch.nn.Linear):
        return linear.in_features
    return linear.in_channels


def padded(linear: torch.nn.Module) -> bool:
    '''Whether ``linear`` is a convolution that pads its input (so that some outputs see fewer than all inputs).'''
    padding = getattr(linear, 'padding', ())
    kernel = getattr(linear, 'kernel_size', ())
    if isinstance(padding, str):
        return padding == 'same' and any(size > 1 for size in kernel)
    if any(value != 0 for value in padding):
        return True
    # a convolution with a forward of its own (timm's Conv2dSame) may pad its input there, whatever its attribute says;
    # with a 1x1 kernel, 'same' padding is none
    standard = [
        base.forward for base in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) if isinstance(linear, base)]
    return bool(standard) and type(linear).forward is not standard[0] and any(size > 1 for size in kernel)


def check_merge(merge: LinearMerge) -> None:
    '''Refuse a merge that is not exact or not possible, without changing anything.

    Parameters
    ----------
    merge: :py:class:`LinearMerge`
        The merge.

    Raises
    ------
    ValueError
        If the numbers of channels do not belong together, the layer is not a linear layer or plain convolution, or
        absorbing the batch norm before it is not exact because it pads its input.
    RuntimeError
        If a batch norm is merged already by a canonizer that is still registered.
    '''
    linear = merge.linear
    if not isinstance(linear, Linear):
        raise ValueError(f'cannot merge batch norms into {linear}: it is not a linear or convolutional layer')
    if merge.after is not None:
        check_batch_norm(merge.after)
        if output_features(linear) != merge.after.num_features:
            raise ValueError(f'cannot merge batch norm {merge.after} into {linear} before it: their numbers of '
                             'channels differ')
    if merge.before is None:
        if merge.relu is not None:
            raise ValueError(f'a ReLU to replace needs the batch norm before it (merge into {linear})')
        return
    check_batch_norm(merge.before)
    if isinstance(linear, ConvolutionTranspose) or not isinstance(linear, (torch.nn.Linear, ConvolutionStandard)):
        raise ValueError(f'cannot merge batch norm {merge.before} into {linear} after it: only linear layers and '
                         'plain convolutions can absorb a batch norm before them')
    if input_features(linear) != merge.before.num_features:
        raise ValueError(f'cannot merge batch norm {merge.before} into {linear} after it: their numbers of '
                         'channels differ')
    if padded(linear):
        # the padded zeros would have to become the batch norm's image of zero, -t after the threshold ReLU
        raise ValueError(f'cannot merge batch norm {merge.before} into {linear} after it: the convolution pads its '
                         'input, and the merged bias would not be exact at the borders')
    if merge.relu is not None:
        parent, name = merge.relu
        relu = getattr(parent, name, None)
        if type(relu) is not torch.nn.ReLU:
            raise ValueError(f'expected a ReLU as {name!r} of {type(parent).__name__} between batch norm '
                             f'{merge.before} and {linear}, found {relu!r}')


def scale_outputs(linear: torch.nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    '''``weight`` of ``linear`` with each output channel multiplied by its entry of ``scale``.'''
    if isinstance(linear, ConvolutionTranspose):
        # transposed convolutions keep their output channels in dimension 1, and groups split them
        groups = getattr(linear, 'groups', 1)
        shape = (groups, 1, -1) + (1,) * (weight.ndim - 2)
        return (weight.unflatten(0, (groups, -1)) * scale.reshape(shape)).flatten(0, 1)
    return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))


def merge_around_linear(
    patch: ModulePatch,
    linear: torch.nn.Module,
    before: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    after: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> None:
    '''Make ``linear`` compute ``linear(x * s_in + t_in) * s_out + t_out``, keeping its parameter objects.

    All arithmetic is in float64 and rounded once to the layer's dtype. The input side is exact only for layers whose
    every output sees every input position (no padding); :py:func:`check_merge` refuses the others.

    Parameters
    ----------
    patch: :py:class:`~canonizers.core.patch.ModulePatch`
        Record of the changes.
    linear: :py:obj:`torch.nn.Module`
        Linear layer or plain convolution.
    before: (:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`), optional
        ``s_in`` and ``t_in`` per input channel, in float64.
    after: (:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`), optional
        ``s_out`` and ``t_out`` per output channel, in float64.
    '''
    weight = linear.weight
    bias = torch.zeros(output_features(linear), dtype=torch.float64, device=weight.device)
    if linear.bias is not None:
        bias = linear.bias.double()
    if before is None:
        # only the output side: one multiplication in the weight's dtype keeps applying as cheap as zennit's merge
        # (a float64 product rounded once measured no more exact on the models' outputs)
        merged = weight
    else:
        # both sides: float64, so that the weight is rounded once
        merged = weight.double()
        scale, shift = (value.to(merged.device) for value in before)
        groups = getattr(linear, 'groups', 1)
        kernel = (1,) * (weight.ndim - 2)
        # [groups, out / groups, in / groups, *kernel]: each output channel sees the input channels of its group
        grouped = merged.unflatten(0, (groups, -1))
        summed = grouped.sum(dim=tuple(range(3, grouped.ndim))) if kernel else grouped
        bias = bias + (summed * shift.reshape(groups, 1, -1)).sum(-1).flatten()
        merged = (grouped * scale.reshape((groups, 1, -1) + kernel)).flatten(0, 1)
    if after is not None:
        scale, shift = (value.to(weight.device) for value in after)
        merged = scale_outputs(linear, merged, scale.to(merged.dtype))
        bias = bias * scale + shift
    install(patch, linear, 'weight', merged.to(weight.dtype))
    install(patch, linear, 'bias', bias.to(dtype=weight.dtype, device=weight.device))


def threshold_relu(
    scale: torch.Tensor, shift: torch.Tensor, like: torch.Tensor
) -> Tuple[ThresholdReLU, torch.Tensor, torch.Tensor]:
    '''Split ``ReLU(scale * x + shift)`` into a threshold ReLU and an affine map for the following linear layer.

    Parameters
    ----------
    scale, shift: :py:obj:`torch.Tensor`
        The batch norm as ``x * scale + shift`` per channel, in float64.
    like: :py:obj:`torch.Tensor`
        Tensor with the dtype and device for the threshold ReLU.

    Returns
    -------
    (:py:class:`~canonizers.ThresholdReLU`, :py:obj:`torch.Tensor`, :py:obj:`torch.Tensor`)
        The threshold ReLU ``g`` and ``s_in``, ``t_in`` with ``ReLU(scale * x + shift) = g(x) * s_in + t_in``.
    '''
    constant = scale == 0
    # a channel with scale 0 is the constant ReLU(shift): all of it goes into the next layer's bias, and its weight
    # there is 0, so that the threshold ReLU may pass anything finite (ReLU(x), with threshold 0)
    threshold = torch.where(constant, torch.zeros_like(shift), -shift / torch.where(constant, 1., scale))
    module = ThresholdReLU(threshold.to(like), torch.sign(scale).to(like))
    return module, scale, torch.where(constant, shift.clamp(min=0), shift)


def apply_merge(patch: ModulePatch, merge: LinearMerge) -> None:
    '''Merge the batch norms of ``merge`` into its linear layer, replace its ReLU by a threshold ReLU, and make the
    batch norms the exact identity, all recorded in ``patch``.

    Parameters
    ----------
    patch: :py:class:`~canonizers.core.patch.ModulePatch`
        Record of the changes.
    merge: :py:class:`LinearMerge`
        The merge, validated by :py:func:`check_merge`.
    '''
    # the merged values are functions of the original parameters where the zennit version lets them be installed so
    # (see the module documentation); elsewhere they are only values, and no graph needs to be recorded
    with torch.enable_grad() if RULES_ASSIGN_PARAMETERS else torch.no_grad():
        before = after = None
        if merge.before is not None:
            scale, shift = batch_norm_affine(merge.before)
            if merge.relu is not None:
                parent, name = merge.relu
                relu = getattr(parent, name)
                module, scale, shift = threshold_relu(scale, shift, merge.linear.weight)
                patch.set_attribute(parent, name, module.train(relu.training))
            before = (scale, shift)
        if merge.after is not None:
            after = batch_norm_affine(merge.after)
        merge_around_linear(patch, merge.linear, before, after)
    for batch_norm in (merge.before, merge.after):
        if batch_norm is not None:
            make_identity(patch, batch_norm)


class ExactMergeBatchNorm(Canonizer):
    '''Canonizer to merge batch norms exactly into linear layers: the batch norm right after a layer, and (as in
    pre-activation networks such as DenseNet) the batch norm before it, across a ReLU that becomes a
    :py:class:`~canonizers.ThresholdReLU` (Motzkus et al., "Measurably Stronger Explanation Reliability via
    Model Canonization", ICIP 2022).

    The merged batch norms are the exact identity while registered (``eps`` set to 0) and the per-channel factors are
    computed in float64, so the canonized model computes the same function up to rounding of its dtype. Removal
    restores the same parameter objects with their original data, bitwise, in any order of the instances: each
    instance holds all merges into one linear layer.

    Parameters
    ----------
    merges: callable, optional
        Function ``root -> [LinearMerge, ...]`` that finds the merges, one per linear layer;
        :py:func:`sequential_merges` (each batch norm into the linear layer before it) by default.
    '''
    def __init__(self, merges: Callable[[torch.nn.Module], List[LinearMerge]] = sequential_merges) -> None:
        self.merges = merges
        self.merge: Optional[LinearMerge] = None
        self.patch = ModulePatch()

    def check(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> List[LinearMerge]:
        '''Find and validate the merges without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.core.cuts.BlockCatalog`, optional
            Not used: merges know no cuts (the argument belongs to the protocol of a family's parts).

        Returns
        -------
        list of :py:class:`LinearMerge`
            The merges.

        Raises
        ------
        ValueError
            If a merge is not exact or not possible, or a module takes part in more than one merge.
        RuntimeError
            If the model is in training mode, or a batch norm is merged by a canonizer still registered.
        '''
        require_eval(root_module)
        merges = self.merges(root_module)
        seen = set()
        for merge in merges:
            check_merge(merge)
            parts = [merge.linear, merge.before, merge.after]
            if merge.relu is not None:
                parts.append(getattr(*merge.relu))
            for part in parts:
                if part is not None and id(part) in seen:
                    raise ValueError(f'{part} takes part in more than one merge')
                seen.add(id(part))
        return merges

    def apply(self, root_module: torch.nn.Module) -> List[Canonizer]:
        '''Apply all merges found in ``root_module``; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:obj:`zennit.canonizers.Canonizer`
            One registered instance per linear layer (and, with zennit 1.0, one that puts back the parameter objects
            zennit's rules swap).
        '''
        instances = self.apply_checked(root_module, None, self.check(root_module))
        # zennit 1.0's rules swap parameter objects while applied: put the model's own back on removal
        return instances + RestoreSwappedParameters().apply(root_module) if instances else instances

    def apply_checked(
        self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog], merges: List[LinearMerge]
    ) -> List['ExactMergeBatchNorm']:
        ''':py:meth:`apply` after :py:meth:`check` passed, with the merges it returned.'''
        instances = []
        try:
            for merge in merges:
                instance = self.copy()
                instances.append(instance)
                instance.register(merge)
        except BaseException:
            remove_all(instances)
            raise
        return instances

    def register(self, merge: LinearMerge) -> None:
        '''Apply one merge.

        Parameters
        ----------
        merge: :py:class:`LinearMerge`
            The merge, validated by :py:func:`check_merge`.
        '''
        self.merge = merge
        try:
            apply_merge(self.patch, merge)
        except BaseException:
            self.patch.undo()
            raise

    def remove(self) -> None:
        '''Restore the original parameters (and ReLU), bitwise.'''
        self.patch.undo()

    def copy(self) -> 'ExactMergeBatchNorm':
        '''Return an unregistered copy of this canonizer.'''
        return self.__class__(self.merges)
