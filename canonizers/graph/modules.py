'''Modules and functions that the graph canonizer puts into a traced forward.'''
import collections
import copy
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from zennit.layer import Sum
from zennit.types import Activation

from ..core.masked_sum import mask_columns, mask_gradient
from ..core.products import stabilize


class MaskedConcatenation(torch.nn.Module):
    '''``torch.cat`` (or ``torch.stack``) of several inputs, with a gradient mask per input, so that the paths
    entering a concatenation can be cut.

    Parameters
    ----------
    inputs: int
        The number of inputs.
    dim: int
        The dimension to concatenate along.
    stack: bool
        Stack (``torch.stack``) instead of concatenating.

    Attributes
    ----------
    mask: :py:obj:`torch.Tensor` or None
        ``None`` (nothing cut), or a mask over the inputs of shape ``[n]`` (all samples) or ``[batch, n]`` (per
        sample), 0 where no gradient flows into the input.
    '''
    def __init__(self, inputs: int, dim: int = 0, stack: bool = False) -> None:
        super().__init__()
        self.inputs = inputs
        self.dim = dim
        self.stack = stack
        self._mask: Optional[torch.Tensor] = None
        self._cast: Dict[tuple, List[Optional[torch.Tensor]]] = {}

    @property
    def mask(self) -> Optional[torch.Tensor]:
        '''The mask over the inputs, or None.'''
        return self._mask

    @mask.setter
    def mask(self, value: Optional[torch.Tensor]) -> None:
        if value is not None and bool((value == 1).all()):
            value = None
        self._mask = value
        self._cast = {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        '''Concatenate ``inputs``, masking the gradient into each.'''
        if self._mask is not None and torch.is_grad_enabled():
            columns = self._columns(inputs[0])
            inputs = tuple(input if column is None else mask_gradient(input, column)
                           for input, column in zip(inputs, columns))
        return (torch.stack if self.stack else torch.cat)(inputs, self.dim)

    def _columns(self, like: torch.Tensor) -> List[Optional[torch.Tensor]]:
        if self._mask.shape[-1] != self.inputs:
            raise ValueError(f'mask of shape {tuple(self._mask.shape)} does not fit the inputs of the concatenation')
        return mask_columns(self._mask, like, self._cast)

    def extra_repr(self) -> str:
        return f'inputs={self.inputs}, dim={self.dim}' + (', stack=True' if self.stack else '')


class Scale(torch.nn.Module, Activation):
    '''``input * factor`` (or ``input / factor``) with a factor that does not depend on the input: a layer scale, the
    scalar of a normalizer-free network, a constant.

    As a linear map with a constant diagonal weight, LRP passes the relevance through it unchanged (the z-rule gives
    ``R_input = input * factor * R_output / (input * factor) = R_output``); left to autograd, the relevance would be
    multiplied by the factor. The module declares itself an activation (:py:class:`zennit.types.Activation`), to
    which zennit's LRP composites attach their pass-through rule. The factor is a keyword argument, as the gate of
    :py:class:`~canonizers.ConstantGate`, so that zennit's hooks see the input alone; unlike a gate, gradients reach it
    (a layer scale stays trainable). The factor must not broadcast the input to a larger shape (relevance passed
    unchanged must fit the input); scalings in CNNs (per channel, scalar) do not.

    Parameters
    ----------
    divide: bool
        Divide by the factor instead of multiplying.
    '''
    def __init__(self, divide: bool = False) -> None:
        super().__init__()
        self.divide = divide

    def forward(self, input: torch.Tensor, *, factor: Union[torch.Tensor, float]) -> torch.Tensor:
        '''Scale ``input`` by ``factor``, bitwise as the operation it replaces.'''
        return input / factor if self.divide else input * factor

    def extra_repr(self) -> str:
        return 'divide=True' if self.divide else ''


class GlobalMeanPool(torch.nn.AdaptiveAvgPool2d):
    '''``input.mean(dims, keepdim)`` over the spatial dimensions, as a module: an average pool to zennit (its
    composites attach their rule for average pools), and bitwise the mean it replaces.

    Parameters
    ----------
    dims: tuple of int
        The dimensions to average over.
    keepdim: bool
        Whether to keep them, with size 1.
    '''
    def __init__(self, dims: Sequence[int], keepdim: bool = False) -> None:
        super().__init__(1)
        self.dims = tuple(dims)
        self.keepdim = keepdim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.mean(self.dims, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f'dims={self.dims}, keepdim={self.keepdim}'


class SumReduction(Sum):
    '''``input.sum(dims, keepdim)`` of one tensor, as a module: a sum to zennit (its composites attach their rule for
    sums, :py:obj:`zennit.layer.Sum`), and bitwise the sum it replaces.

    Left to autograd, a sum over a dimension hands every summand the whole relevance of the sum (the gradient of a sum
    is 1 for each summand); the sum rule splits it in proportion to the summands. Selective-kernel and split attention
    (SKNet, ResNeSt) sum their gated branches so, after stacking them along a dimension.

    Parameters
    ----------
    dims: int, tuple of int or None
        The dimensions to sum over; None sums over all.
    keepdim: bool
        Whether to keep them, with size 1.
    '''
    def __init__(self, dims: Union[int, Sequence[int], None] = None, keepdim: bool = False) -> None:
        super().__init__(dim=dims if dims is None or isinstance(dims, int) else tuple(dims))
        self.keepdim = keepdim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            return input.sum()
        return input.sum(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f'dims={self.dim}, keepdim={self.keepdim}'


class _Fold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: torch.Tensor, output_size, options: Dict[str, Any]) -> torch.Tensor:
        output = torch.nn.functional.fold(input, output_size, **options)
        ctx.save_for_backward(input, output)
        ctx.options = options
        return output

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        input, output = ctx.saved_tensors
        return input * torch.nn.functional.unfold(relevance / stabilize(output), **ctx.options), None, None


class FoldSum(torch.nn.Module):
    '''``F.fold``, which sums overlapping patches into an image (VOLO's outlook attention), with the sum rule: each
    summand gets the share ``x_i / y_j`` of the relevance of its sum ``y_j``.

    Left to autograd, fold hands every summand the whole relevance of its sum (its gradient is 1 for each). The
    output size is an input of the forward, as the traced model computes it from the signal's shape.

    Parameters
    ----------
    kernel_size, dilation, padding, stride
        As for :py:func:`torch.nn.functional.fold`.
    '''
    def __init__(self, kernel_size, dilation=1, padding=0, stride=1) -> None:
        super().__init__()
        self.options = {'kernel_size': kernel_size, 'dilation': dilation, 'padding': padding, 'stride': stride}

    def forward(self, input: torch.Tensor, output_size) -> torch.Tensor:
        if not torch.is_grad_enabled() or not input.requires_grad:
            return torch.nn.functional.fold(input, output_size, **self.options)
        return _Fold.apply(input, output_size, self.options)

    def extra_repr(self) -> str:
        return ', '.join(f'{key}={value}' for key, value in self.options.items())


class FunctionalLayer(NamedTuple):
    '''A linear layer or convolution the forward calls as a function on a weight (and bias) the model holds
    (``F.linear(x, self.weight)``, TResNet's blur ``F.conv2d(x, self.filt, groups=C)`` on a buffer), to be called
    as a module while canonized, so that the rules of zennit's linear layers apply to it.

    Holds names, not tensors: :py:meth:`build` makes the module on the model's own tensors.

    Attributes
    ----------
    kind: str
        ``"linear"`` or ``"conv1d"``, ``"conv2d"``, ``"conv3d"``.
    weight, bias: str
        The names of the weight and the bias in the model (``""``: no bias).
    options: tuple of (str, object)
        The convolution's stride, padding, dilation and groups.
    '''
    kind: str
    weight: str
    bias: str
    options: Tuple[Tuple[str, Any], ...] = ()

    def build(self, model: torch.nn.Module) -> torch.nn.Module:
        '''The module, on the model's tensors: parameters themselves (gradients reach them), buffers as parameters
        that share their storage and need no gradient (zennit's rules modify parameters only).'''
        weight = _parameter(attribute_at(model, self.weight))
        bias = _parameter(attribute_at(model, self.bias)) if self.bias else None
        if self.kind == 'linear':
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device='meta')
        else:
            options = dict(self.options)
            layer = {'conv1d': torch.nn.Conv1d, 'conv2d': torch.nn.Conv2d, 'conv3d': torch.nn.Conv3d}[self.kind]
            module = layer(weight.shape[1] * options['groups'], weight.shape[0], tuple(weight.shape[2:]), bias=False,
                           device='meta', **options)
        module.weight = weight
        module.bias = bias
        return module.eval()


def attribute_at(root: torch.nn.Module, target: Optional[str], *default: object) -> object:
    '''The attribute ``target`` (dotted, a ``get_attr`` target) of ``root``; None for None; ``default`` if given and
    the attribute is missing.'''
    if target is None:
        return None
    *path, name = target.split('.')
    return getattr(root.get_submodule('.'.join(path)), name, *default)


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    if isinstance(tensor, torch.nn.Parameter):
        return tensor
    return torch.nn.Parameter(tensor, requires_grad=False)


def call_forward_hooks(module: torch.nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    '''Run the forward hooks of ``module`` on ``output``, as ``module(*args)`` would: the traced forward no longer
    calls the blocks whose forwards it inlines, and hooks on them (CRP's recording and masking) must still fire.'''
    hooks = module._forward_hooks
    if not hooks:
        return output
    with_kwargs = getattr(module, '_forward_hooks_with_kwargs', {})
    for key, hook in list(hooks.items()):
        result = hook(module, args, {}, output) if key in with_kwargs else hook(module, args, output)
        if result is not None:
            output = result
    return output


#: the hook registries a copy made by :py:func:`call_copy` gets empty
_HOOKS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks',
          '_forward_hooks_with_kwargs', '_forward_hooks_always_called', '_forward_pre_hooks_with_kwargs',
          '_state_dict_hooks', '_load_state_dict_pre_hooks', '_state_dict_pre_hooks', '_load_state_dict_post_hooks')


def call_copy(module: torch.nn.Module) -> torch.nn.Module:
    '''A copy of ``module`` for one more place the forward calls it: the same parameters, buffers and submodules
    (objects, not copies), its own hooks.

    zennit's rules keep the input and output of a module's last call for its backward pass, so a layer called at
    several places (CoaT's convolutional position encodings, shared MLPs) gets wrong relevance, or a shape error,
    from the first calls' backward passes. With one module per call, each has a rule of its own; the function of
    the parameters is unchanged. The copy knows its original as ``canonizer_copy_of`` (not a submodule).
    '''
    clone = copy.copy(module)
    for store in ('_parameters', '_buffers', '_modules'):
        clone.__dict__[store] = collections.OrderedDict(module.__dict__[store])
    for store in _HOOKS:
        if store in module.__dict__:
            clone.__dict__[store] = collections.OrderedDict()
    clone.__dict__['canonizer_copy_of'] = module
    return clone


def copies_of(model: torch.nn.Module, module: torch.nn.Module) -> List[torch.nn.Module]:
    '''The copies of ``module`` for further calls (:py:func:`call_copy`) that a canonized ``model`` holds.'''
    return [other for other in model.modules() if other.__dict__.get('canonizer_copy_of') is module]


def call_unhooked(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    '''Call ``module``'s forward without its hooks: zennit's composites give attention modules (which zennit counts as
    activations) a pass-through rule that fails on their several inputs and outputs ("hook 'backward' has returned an
    incorrect number of values"); without the hook, the gradient passes through them instead.'''
    return module.forward(*args, **kwargs)


#: timm's elementwise activation modules (``timm.layers.activations``), by class name
TIMM_ACTIVATIONS = frozenset({'GELU', 'GELUTanh', 'QuickGELU', 'Swish', 'Mish', 'Sigmoid', 'Tanh', 'HardSwish',
                              'HardSigmoid', 'HardMish'})


#: timm's elementwise activations defined with a model, which the tracer keeps whole (their forward, written out,
#: has products and powers without rules): module and class name
LEAF_ACTIVATIONS = frozenset({('timm.models.metaformer', 'StarReLU')})


def leaf_activation(module: torch.nn.Module) -> bool:
    '''Whether ``module`` is one of :py:data:`LEAF_ACTIVATIONS`.'''
    return (type(module).__module__, type(module).__name__) in LEAF_ACTIVATIONS


def elementwise_activation(module: torch.nn.Module) -> bool:
    '''Whether ``module`` is one of timm's elementwise activations, which zennit does not know as activations.'''
    return (type(module).__module__.startswith('timm.layers.activations') and type(module).__name__ in
            TIMM_ACTIVATIONS) or leaf_activation(module)


class ElementwiseActivation(torch.nn.Module, Activation):
    '''An elementwise activation zennit does not know (timm's ``GELU``, ``Swish``, ...) declared an activation, so
    that composites give it their rule for activations; it calls the module it wraps (the forward is bitwise the
    same). Used where the activation is called inside a module the canonizer keeps whole (timm's ``BatchNormAct2d``).
    '''
    def __init__(self, activation: torch.nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.activation(input)
