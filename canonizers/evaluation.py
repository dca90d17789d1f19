'''Tools to measure canonizers rather than trust them: models with random batch-norm statistics, the composite under
which relevance is conserved exactly, and the figures built on them. Used by the test suite and the benchmarks.'''
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torchvision.ops.misc import SqueezeExcitation
from zennit.attribution import Gradient
from zennit.canonizers import Canonizer
from zennit.composites import LayerMapComposite
from zennit.layer import Sum
from zennit.rules import Epsilon, Norm, Pass
from zennit.types import Activation, AvgPool, BatchNorm, Linear

from .core.patch import ModulePatch


def randomize_batch_norms(
    model: torch.nn.Module,
    seed: int = 0,
    bias_free: bool = False,
    weight: Tuple[float, float] = (0.5, 1.5),
) -> torch.nn.Module:
    '''Give every batch norm random statistics and affine parameters, and put the model in eval mode.

    A freshly initialised batch norm is the identity and tests nothing.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model, modified in place.
    seed: int
        Seed of the random numbers.
    bias_free: bool
        If True, batch-norm means and shifts and all biases of linear layers are 0, so that the model has no bias
        anywhere (relevance is then conserved exactly under the Epsilon rule).
    weight: (float, float)
        Range of the batch-norm weights; variances lie in [0.5, 2], means and shifts in [-0.5, 0.5].

    Returns
    -------
    :py:obj:`torch.nn.Module`
        ``model``, in eval mode.
    '''
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(tensor.shape, generator=generator, dtype=torch.float64).mul(high - low).add(low).to(tensor)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNorm):
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.))
                module.weight.copy_(uniform(module.weight, *weight))
                if bias_free:
                    module.running_mean.zero_()
                    module.bias.zero_()
                else:
                    module.running_mean.copy_(uniform(module.running_mean, -.5, .5))
                    module.bias.copy_(uniform(module.bias, -.5, .5))
            elif bias_free and isinstance(module, Linear) and module.bias is not None:
                module.bias.zero_()
    return model.eval()


class StabilizedQuotient:
    '''The gradient mapper of zennit's epsilon and norm rules, ``out_grad / stabilize(outputs[0], epsilon)``
    (``epsilon`` added with the sign of each output, +1 for zeros), bitwise the same, in fewer passes over memory.

    zennit's ``stabilize`` writes six new tensors of the output's size (one of them boolean) before the division writes
    a seventh; on a transformer, whose outputs are large, that is about 5% of an attribution. Here the sign is built in
    one tensor, scaled by epsilon and added to the output in place, and the quotient overwrites it: each element is
    the same sum, the output plus or minus the same epsilon (IEEE addition commutes), so the bits are the same, NaN
    and -0 included.

    Parameters
    ----------
    epsilon: float
        The stabilizer.
    '''
    def __init__(self, epsilon: float) -> None:
        self.epsilon = epsilon

    def __call__(self, out_grad: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        output = outputs[0]
        # +1 where the output is >= 0 (zennit's (output == 0) + sign(output): -0 included), else -1, times epsilon
        denominator = (output >= 0).to(output).mul_(2).sub_(1).mul_(self.epsilon).add_(output)
        if (torch.is_grad_enabled() or out_grad.shape != denominator.shape or out_grad.dtype != denominator.dtype
                or out_grad.stride() != denominator.stride()):
            # a graph is being built (create_graph; out= is not differentiable), or the quotient has another shape,
            # type or memory layout than the denominator (the layout decides the bits of the products it enters)
            return out_grad / denominator
        return torch.div(out_grad, denominator, out=denominator)


def epsilon_rule(epsilon: float) -> Epsilon:
    '''zennit's epsilon rule with :py:class:`StabilizedQuotient` as its gradient mapper: the same relevance, bitwise, in
    less time.

    Parameters
    ----------
    epsilon: float
        The epsilon.

    Returns
    -------
    :py:obj:`zennit.rules.Epsilon`
        The rule.
    '''
    rule = Epsilon(epsilon=epsilon)
    rule.gradient_mapper = StabilizedQuotient(epsilon)
    return rule


def sum_rule(stabilizer: float) -> Norm:
    '''zennit's rule for sums and average pools with a chosen stabilizer (zennit 0.4.6's ``Norm`` has a fixed
    stabilizer of 1e-6), with :py:class:`StabilizedQuotient` as its gradient mapper.

    Parameters
    ----------
    stabilizer: float
        The stabilizer of the division by the output.

    Returns
    -------
    :py:obj:`zennit.rules.Norm`
        The rule.
    '''
    rule = Norm()
    rule.gradient_mapper = StabilizedQuotient(stabilizer)
    return rule


def conservation_composite(canonizers: Sequence[Canonizer], epsilon: float = 1e-30) -> LayerMapComposite:
    '''The Epsilon rule with negligible epsilon on every linear layer, the same stabilizer on sums and average pools,
    and relevance passed through activations: on a model without biases, relevance is conserved exactly. The rules are
    zennit's (:py:func:`epsilon_rule`, :py:func:`sum_rule`, ``Pass``).

    Parameters
    ----------
    canonizers: sequence of :py:obj:`zennit.canonizers.Canonizer`
        Canonizers of the composite.
    epsilon: float
        The epsilon and stabilizer.

    Returns
    -------
    :py:obj:`zennit.composites.LayerMapComposite`
        The composite.
    '''
    return LayerMapComposite(
        layer_map=[
            (Activation, Pass()),
            (Sum, sum_rule(epsilon)),
            (AvgPool, sum_rule(epsilon)),
            (Linear, epsilon_rule(epsilon)),
        ],
        canonizers=list(canonizers),
    )


def output_relevance(output: torch.Tensor, target: int) -> torch.Tensor:
    '''Relevance at the output: the logit of ``target``, nothing elsewhere.'''
    return torch.nn.functional.one_hot(torch.as_tensor(target), output.shape[1]).to(output) * output


def conservation(
    model: torch.nn.Module, data: torch.Tensor, target: int, canonizers: Sequence[Canonizer],
    composite: Optional[Callable[[Sequence[Canonizer]], LayerMapComposite]] = None,
) -> float:
    '''Input relevance divided by output relevance (the logit of ``target``) of the first sample; 1 is exact.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model without biases (see :py:func:`randomize_batch_norms`), ideally in float64.
    data: :py:obj:`torch.Tensor`
        Input batch.
    target: int
        The explained class.
    canonizers: sequence of :py:obj:`zennit.canonizers.Canonizer`
        Canonizers to apply.
    composite: callable, optional
        ``canonizers -> composite``; :py:func:`conservation_composite` by default.

    Returns
    -------
    float
        The ratio.
    '''
    composite = (composite or conservation_composite)(canonizers)
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(data.detach().requires_grad_(), lambda out: output_relevance(out, target))
    return relevance[0].sum().item() / output[0, target].item()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    '''Maximum absolute deviation relative to the maximum absolute reference value, in float64.'''
    return ((value.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def _gated_by_constant(self: SqueezeExcitation, input: torch.Tensor) -> torch.Tensor:
    return self._scale(input).detach() * input


@contextmanager
def constant_gates(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    '''Context in which every squeeze-and-excitation gate of ``model`` is detached (``scale.detach() * input``): the
    plain model with the gates held constant in the backward pass, as the canonizers of this package hold them. The
    reference for gradients through canonized models with gates.'''
    patch = ModulePatch()
    try:
        for module in model.modules():
            if isinstance(module, SqueezeExcitation):
                patch.set_attribute(module, 'forward', _gated_by_constant.__get__(module))
        yield model
    finally:
        patch.undo()


def parameter_gradients(
    model: torch.nn.Module, data: torch.Tensor, target: int, canonizers: Sequence[Canonizer] = (),
) -> Dict[str, torch.Tensor]:
    '''Gradients of the logit of ``target`` (summed over the batch) w.r.t. every parameter of ``model``, with
    ``canonizers`` applied alone (no rules): the parameter objects are taken before canonizing, so these are the
    gradients w.r.t. the model's own parameters, whatever the canonizers install while applied.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model; its parameters must require gradients.
    data: :py:obj:`torch.Tensor`
        Input batch.
    target: int
        The class whose logit is differentiated.
    canonizers: sequence of :py:obj:`zennit.canonizers.Canonizer`
        Canonizers to apply during the forward pass; removed afterwards.

    Returns
    -------
    dict of str to :py:obj:`torch.Tensor`
        The gradient per parameter name, zero for parameters the output does not depend on.
    '''
    parameters = dict(model.named_parameters())
    instances = []
    try:
        for canonizer in canonizers:
            instances += canonizer.apply(model)
        output = model(data)[:, target].sum()
        gradients = torch.autograd.grad(output, list(parameters.values()), allow_unused=True)
    finally:
        for instance in reversed(instances):
            instance.remove()
    return {
        name: torch.zeros_like(parameter) if gradient is None else gradient
        for (name, parameter), gradient in zip(parameters.items(), gradients)
    }


def gradient_errors(values: Dict[str, torch.Tensor], references: Dict[str, torch.Tensor]) -> Dict[str, float]:
    ''':py:func:`relative_error` per name; 0 where both are zero, infinite where only the reference is.'''
    errors = {}
    for name, reference in references.items():
        if reference.abs().max() == 0:
            errors[name] = 0. if values[name].abs().max() == 0 else float('inf')
        else:
            errors[name] = relative_error(values[name], reference)
    return errors
