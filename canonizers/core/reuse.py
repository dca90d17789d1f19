'''Serving the forward that zennit's rules compute again in the backward pass from the forward pass's own result.

A zennit rule (:py:class:`zennit.core.BasicHook`) computes the relevance of a layer by running the layer's forward
once more in the backward pass, on the stored input and the (modified) parameters, and taking the gradient of that
output. Where a rule modifies neither (the epsilon rule, the rules of :py:func:`canonizers.evaluation
.conservation_composite`), that second forward computes the very output of the first: the same function of the same
values. For a transformer, whose cost is its linear layers, it is a quarter of all the arithmetic of an attribution.

:py:class:`ReuseForward` keeps, per linear layer, the operands and the output of its last forward pass with gradients,
and answers a forward on the same input values and the same parameter storage, unchanged since (torch's version
counters, as autograd checks its saved tensors), with that output, attached to the new input by the layer's exact
backward (:py:class:`ReusedLinear`). Anything else (modified parameters, as the z+ and alpha-beta rules use, other
inputs) is computed as before. The relevance is the same to the last bit wherever the second forward would give the
first one's bits, and at float rounding otherwise (zennit 1.0 recomputes on a contiguous copy of the input). The
attention weightings of this package (a matrix product with constant attention weights) are served the same way
(:py:class:`WeightingRecord`).

The first forward's own input gradient is wasted work as well: zennit's rule replaces it with the relevance it
computes (the hook on the :py:class:`zennit.core.Identity` that ``Hook.pre_forward`` puts before the layer). Where the
layer's input is exactly that (its last forward pre-hook is the ``pre_forward`` of a :py:class:`zennit.core.BasicHook`
whose ``backward`` is zennit's own, which reads only the shape of the gradient it replaces, or of zennit's ``Pass``,
which returns the output's gradient), the layer is computed on its detached input, so that the forward's backward
pass computes its parameters' gradients alone, and its output is attached to the input by zeros, or by the exact
gradient computed again where the rule does not replace it after all (it is inactive, as in zennit's
``Composite.inactive()``, or removed; :py:class:`RuledOutput`). Anything else about the input, the hook or a future
zennit is not recognized and gets the exact gradient. So are the linear layers (:py:class:`LinearRecord`) and, through
:py:class:`RuledCall`, convolutions, activations and the normalizations and attention weightings of this package.
'''
import weakref
from typing import Any, Callable, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
import zennit.core
import zennit.rules
from zennit.canonizers import Canonizer

from .attention import ConstantWeighting
from .engine import as_view, engine_needs
from .normalization import ConstantRMSNorm, ConstantStdGroupNorm, ConstantStdLayerNorm, FrozenBatchNorm
from .patch import ModulePatch

Operands = Tuple[torch.Tensor, Optional[torch.Tensor]]


class ReusedLinear(torch.autograd.Function):
    '''``F.linear(input, weight, bias)`` given its result, ``output``: a copy of it, with the exact backward of the
    linear map (the gradients of the input, the weight and the bias that the backward pass wants).'''
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, output: torch.Tensor, input: torch.Tensor,
                weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        # a copy: output modifiers of rules may work in place, and the original is the forward pass's own tensor
        return output.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> Tuple[None, Optional[torch.Tensor], ...]:
        input, weight = ctx.saved_tensors
        grad_input = grad @ weight if engine_needs(ctx, 1) else None
        grad_weight = grad_bias = None
        if engine_needs(ctx, 2):
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ input.reshape(-1, input.shape[-1])
        if engine_needs(ctx, 3):
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return None, grad_input, grad_weight, grad_bias


class RuledOutput(torch.autograd.Function):
    '''The output of a layer's ``call`` on its detached input, attached to the ``input``: its gradient flows on to
    the output's own graph (the parameters), and the input's is zeros while ``rule`` will replace it, else the exact
    gradient of ``call`` (computed again from the input). ``record`` counts the zeros passed (its ``replaced``).'''
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, output: torch.Tensor, input: torch.Tensor,
                call: Callable[[torch.Tensor], torch.Tensor], rule: 'weakref.ref[zennit.core.Hook]',
                record: Any) -> torch.Tensor:
        ctx.save_for_backward(input)
        ctx.call, ctx.rule, ctx.record = call, rule, record
        if output._base is not None:
            # a view's history cannot be taken over
            return output.clone()
        # the output itself, its history continued by this node (it is no one else's: computed for this call), so
        # that nothing is copied and in-place operations on it stay allowed
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        grad_input = None
        if engine_needs(ctx, 1):
            input, = ctx.saved_tensors
            if _replaces(ctx.rule()):
                ctx.record.replaced += 1
                # one element, expanded: nothing is written
                grad_input = input.new_zeros(()).expand(input.shape)
            else:
                # differentiable again where the backward pass builds a graph (create_graph)
                create = torch.is_grad_enabled()
                with torch.enable_grad():
                    source = input if create else input.detach().requires_grad_()
                    grad_input, = torch.autograd.grad(ctx.call(source), source, grad, create_graph=create)
        return grad, grad_input, None, None, None


def _ruled(module: torch.nn.Module, call: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor,
           record: Any) -> torch.Tensor:
    '''``call(input)``, the forward of ``module``: where a zennit rule will replace its input gradient
    (:py:func:`_replacing_rule`), computed on the detached input and attached to ``input`` by :py:class:`RuledOutput`
    (``record`` counts the gradients left to the rule).'''
    rule = _replacing_rule(module, input) if torch.is_grad_enabled() else None
    if rule is None:
        return call(input)
    return RuledOutput.apply(call(input.detach()), input, call, weakref.ref(rule), record)


def _replaces(rule: Optional[zennit.core.Hook]) -> bool:
    '''Whether ``rule`` (recognized by :py:func:`_replacing_rule`) will replace the gradient of its layer's input in
    the backward pass now running: what zennit's hook on the Identity checks (0.5.1 and 1.0: ``active``), and that it
    is still registered: a removed rule has cleared its stored tensors (a BasicHook's backward reads the stored input)
    and, from 0.5.1 on, its hooks on the Identities (``tensor_handles``; zennit 0.4.6 leaves them, and the rule
    replaces the gradient).'''
    if rule is None or not getattr(rule, 'active', True):
        return False
    if isinstance(rule, zennit.core.BasicHook):
        return bool(rule.stored_tensors)
    return bool(getattr(rule, 'tensor_handles', True))


def _replacing_rule(module: torch.nn.Module, input: Any) -> Optional[zennit.core.Hook]:
    '''The zennit rule that will replace the gradient of ``module``'s ``input`` (the forward's argument), if
    recognized: the module's last forward pre-hook is zennit's ``Hook.pre_forward`` of a rule whose backward is
    ``BasicHook.backward`` (which reads only the shape of the gradient it replaces) or ``Pass.backward`` (which
    returns the output's gradient), and ``input`` is the copy of the output of the :py:class:`zennit.core.Identity`
    it put before the layer (the same in zennit 0.4.6, 0.5.1 and 1.0).'''
    if not module._forward_pre_hooks or not isinstance(input, torch.Tensor):
        return None
    hook = next(reversed(module._forward_pre_hooks.values()))
    rule = getattr(hook, '__self__', None)
    zennits = getattr(hook, '__func__', None) is zennit.core.Hook.pre_forward and (
        (isinstance(rule, zennit.core.BasicHook) and type(rule).backward is zennit.core.BasicHook.backward)
        or (isinstance(rule, zennit.rules.Pass) and type(rule).backward is zennit.rules.Pass.backward))
    if not zennits:
        return None
    node = input.grad_fn
    if node is None or type(node).__name__ != 'CloneBackward0' or len(node.next_functions) != 1:
        return None
    identity = node.next_functions[0][0]
    return rule if isinstance(identity, zennit.core.Identity._backward_cls) else None


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _same_place(tensor: Optional[torch.Tensor], stored: Optional[torch.Tensor], version: int) -> bool:
    '''Whether ``tensor`` is the very memory of ``stored``, unchanged since it was stored (for ``None``: both None).'''
    if tensor is None or stored is None:
        return tensor is stored
    return (tensor.data_ptr() == stored.data_ptr() and tensor.shape == stored.shape
            and tensor.stride() == stored.stride() and tensor.dtype == stored.dtype
            and tensor.device == stored.device and stored._version == version)


def _same_values(tensor: torch.Tensor, stored: torch.Tensor, version: int) -> bool:
    '''Whether ``tensor`` holds the values ``stored`` held when its version was ``version``: none if it changed
    since; else its very memory (zennit 0.4.6 and 0.5.1 recompute on the stored input itself), or equal values
    (zennit 1.0 recomputes on a copy; comparing synchronizes a GPU).'''
    if stored._version != version:
        return False
    if _same_place(tensor, stored, version):
        return True
    return (tensor.shape == stored.shape and tensor.dtype == stored.dtype and tensor.device == stored.device
            and torch.equal(tensor, stored))


class LinearRecord:
    '''The last forward pass with gradients of one linear layer: its input, operands and output, and their versions
    then. Installed as the layer's ``forward``.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Linear`
        The layer; its forward is ``F.linear(input, *operands(module))``.
    '''
    def __init__(self, module: torch.nn.Linear) -> None:
        self.module = module
        # the layer's own memory (merged batch norms included): rules that modify parameters compute elsewhere, and
        # their results are not kept (they would keep modified copies of the weights alive)
        self.own: Set[int] = {_storage(tensor) for tensor in operands(module) if tensor is not None}
        self.entry: Optional[Tuple[torch.Tensor, Operands, Tuple[int, int, int, int], torch.Tensor]] = None
        #: how many forwards were answered with a kept output
        self.hits = 0
        #: how many input gradients were left to the zennit rule that replaces them (zeros passed instead)
        self.replaced = 0

    def __call__(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = operands(self.module)
        entry = self.entry
        if entry is not None:
            stored_input, (stored_weight, stored_bias), versions, output = entry
            # the kept output too may have been changed in place since (an in-place ReLU after the layer)
            if (output._version == versions[3] and _same_place(weight, stored_weight, versions[0])
                    and _same_place(bias, stored_bias, versions[1]) and _same_values(input, stored_input, versions[2])):
                self.hits += 1
                return ReusedLinear.apply(output, as_view(input), as_view(weight), as_view(bias))
        output = _ruled(self.module, lambda source: F.linear(source, weight, bias), input, self)
        if torch.is_grad_enabled() and output.requires_grad and all(
                tensor is None or _storage(tensor) in self.own for tensor in (weight, bias)):
            versions = (weight._version, -1 if bias is None else bias._version, input._version, output._version)
            self.entry = (input.detach(), (weight, bias), versions, output.detach())
        return output

    def clear(self) -> None:
        '''Forget the last forward pass.'''
        self.entry = None


def operands(module: torch.nn.Linear) -> Operands:
    '''The weight and bias of ``module``'s ``F.linear`` (a slice of them for
    :py:class:`canonizers.core.attention.SlicedLinear`).'''
    sliced = getattr(module, 'operands', None)
    return sliced() if sliced is not None else (module.weight, module.bias)


def reusable(module: torch.nn.Module) -> bool:
    '''Whether ``module``'s forward is ``F.linear`` of its operands: :py:obj:`torch.nn.Linear` and subclasses that keep
    its forward (``NonDynamicallyQuantizableLinear``) or declare their ``operands``, with no forward of their own set
    on the instance.'''
    if not isinstance(module, torch.nn.Linear) or 'forward' in vars(module):
        return False
    forward = type(module).forward
    return forward is torch.nn.Linear.forward or getattr(type(module), 'operands', None) is not None


class RuledCall:
    '''The forward of a layer other than a linear one whose input gradient a zennit rule may replace: where the rule
    will (:py:func:`_replacing_rule`), it computes the layer on its detached input, so that the backward pass of the
    forward computes the parameters' gradients alone, and attaches the output to the input
    (:py:class:`RuledOutput`). Installed as the layer's ``forward``; otherwise it is the layer's own forward.

    Parameters
    ----------
    module: :py:obj:`torch.nn.Module`
        The layer, one for which :py:func:`rulable` holds.
    '''
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        #: the layer's own forward, bound
        self.forward = type(module).forward.__get__(module)
        #: how many input gradients were left to the zennit rule that replaces them (zeros passed instead)
        self.replaced = 0

    def __call__(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _ruled(self.module, lambda source: self.forward(source, *args, **kwargs), input, self)


class ServedWeighting(torch.autograd.Function):
    '''``weight @ input`` (or ``input @ weight``, where not ``left``) given its result, ``output``: a copy of it, with
    the backward of the product in ``input`` (the weight is a constant).'''
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, output: torch.Tensor, input: torch.Tensor,
                weight: torch.Tensor, left: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.left = left
        # a copy, as ReusedLinear's: the original is the forward pass's own tensor
        return output.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        weight, = ctx.saved_tensors
        transposed = weight.transpose(-1, -2)
        # where the input broadcasts over the weight's batch, the engine sums the gradient to the input's shape
        grad_input = torch.matmul(transposed, grad) if ctx.left else torch.matmul(grad, transposed)
        return None, grad_input, None, None


class WeightingRecord(RuledCall):
    '''The :py:class:`RuledCall` of an attention weighting (:py:class:`~canonizers.core.attention.ConstantWeighting`
    as a matrix product) that also serves zennit's second forward from the first, as :py:class:`LinearRecord` does
    for linear layers: where the input holds the values of the last forward pass with gradients and the weight is the
    same memory, both unchanged since, the kept output is returned, with the product's backward
    (:py:class:`ServedWeighting`).

    Parameters
    ----------
    module: :py:class:`~canonizers.core.attention.ConstantWeighting`
        The weighting; its ``equation`` is None.
    '''
    def __init__(self, module: ConstantWeighting) -> None:
        super().__init__(module)
        self.entry: Optional[Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int], torch.Tensor]] = None
        #: how many forwards were answered with a kept output
        self.hits = 0

    def __call__(self, input: torch.Tensor, *, operand: Optional[torch.Tensor] = None) -> torch.Tensor:
        entry = self.entry
        if entry is not None and torch.is_grad_enabled() and input.dim() >= 2:
            stored_input, stored_weight, versions, output = entry
            # zennit 0.4.6 and 0.5.1 call again without the operand (the module keeps it), zennit 1.0 with it
            weight = self.module.operand if operand is None else operand.detach()
            if (output._version == versions[2] and weight is not None
                    and _same_place(weight, stored_weight, versions[0])
                    and _same_values(input, stored_input, versions[1])):
                self.hits += 1
                return ServedWeighting.apply(output, input, stored_weight, self.module.left)
        output = super().__call__(input, operand=operand)
        weight = self.module.operand
        if torch.is_grad_enabled() and output.requires_grad and weight.dim() >= 2 and input.dim() >= 2:
            self.entry = (input.detach(), weight, (weight._version, input._version, output._version), output.detach())
        return output

    def clear(self) -> None:
        '''Forget the last forward pass.'''
        self.entry = None


#: the layers :py:class:`RuledCall` serves: each a deterministic function of one input and its parameters, with one
#: output, that never changes its input
_RULABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU,
            torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Hardswish,
            torch.nn.Hardsigmoid, torch.nn.Mish, torch.nn.Softplus, ConstantStdLayerNorm, ConstantStdGroupNorm,
            ConstantRMSNorm, FrozenBatchNorm, ConstantWeighting)
_RULABLE_FORWARDS = frozenset(layer.forward for layer in _RULABLE)


def rulable(module: torch.nn.Module) -> bool:
    '''Whether :py:class:`RuledCall` serves ``module``: one of the convolutions, activations (not in place),
    normalizations and attention weightings it knows, with the forward of its class (none of its own).'''
    return (type(module).forward in _RULABLE_FORWARDS and 'forward' not in vars(module)
            and not getattr(module, 'inplace', False))


class ReuseForward(Canonizer):
    '''Canonizer that lets zennit's rules take the output of the forward pass instead of computing every linear layer
    (:py:obj:`torch.nn.Linear`) once more in the backward pass, wherever that second forward computes the same: the
    epsilon rule (and every rule that modifies neither the input nor the parameters) then costs one linear map fewer
    per layer. Where a zennit rule will replace the input gradient of a linear layer, a convolution, an activation
    (``Pass``) or a normalization or attention weighting of this package, the forward pass does not compute it
    (:py:class:`RuledOutput`). See :py:mod:`canonizers.core.reuse`.

    It keeps the input and output of each linear layer's last forward pass with gradients until the next one or its
    removal (zennit's rules keep the inputs the same way). Forward passes without gradients keep nothing. Removal
    restores the model bitwise.
    '''
    def __init__(self) -> None:
        self.patch = ModulePatch()
        self.records: List[Union[LinearRecord, WeightingRecord]] = []

    def apply(self, root_module: torch.nn.Module) -> List['ReuseForward']:
        '''Install the records on every linear layer of ``root_module`` whose forward is ``F.linear``.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:class:`ReuseForward`
            One registered instance.
        '''
        instance = type(self)()
        try:
            instance.register(root_module)
        except BaseException:
            instance.remove()
            raise
        return [instance]

    def register(self, root_module: torch.nn.Module) -> None:
        '''Install a :py:class:`LinearRecord` as the forward of every reusable linear layer of ``root_module``, a
        :py:class:`RuledCall` as that of every other layer it serves (:py:func:`rulable`).'''
        for module in root_module.modules():
            if reusable(module):
                record = LinearRecord(module)
                self.records.append(record)
                self.patch.set_attribute(module, 'forward', record)
            elif isinstance(module, ConstantWeighting) and module.equation is None and rulable(module):
                record = WeightingRecord(module)
                self.records.append(record)
                self.patch.set_attribute(module, 'forward', record)
            elif rulable(module):
                self.patch.set_attribute(module, 'forward', RuledCall(module))

    def remove(self) -> None:
        '''Restore the forward of every layer and forget what was kept.'''
        for record in self.records:
            record.clear()
        self.records = []
        self.patch.undo()
