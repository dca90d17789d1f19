'''The support report of one model: whether :py:class:`~canonizers.GraphCanonizer` can canonize it, whether the
canonized model is the same function, and whether relevance through it is conserved, measured rather than assumed.

Usage::

    import canonizers

    report = canonizers.check(model, torch.randn(1, 3, 64, 64))
    report.status      # 'supported', 'not conservative' or 'refused'
    print(report)      # the whole report, as ``canonizers check MODEL`` prints it
'''
import copy
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .core.attention import zeroed_shifts
from .evaluation import conservation_composite, relative_error
from .graph import GraphCanonizer
from .graph.compiled import Compiled, compiled_for
from .graph.conservation import KINDS, Operation, by_kind, count, listing
from .graph.modules import attribute_at

#: statuses, and the exit status of ``canonizers check`` for each
SUPPORTED, NOT_CONSERVATIVE, REFUSED = 'supported', 'not conservative', 'refused'
EXIT_CODES = {SUPPORTED: 0, NOT_CONSERVATIVE: 1, REFUSED: 2}
#: the largest deviation of the canonized float64 model from the original in float64 that counts as exact
FORWARD_TOLERANCE = 1e-10
#: the largest ``|R_in / R_out - 1|`` of the bias-free float64 copy that counts as conserved
CONSERVATION_TOLERANCE = 1e-6
#: the conservation error that float64 rounding can explain, per unit of cancellation (sum |R_in| / |R_out|): the
#: unit roundoff 1.1e-16 times a generous 1e3 for the many operations each relevance passes
ROUNDING_EXPLAINS = 1e-13


@dataclass(frozen=True)
class MergeReport:
    '''A place where parallel paths meet.

    Attributes
    ----------
    name: str
        Its name in cuts (for those that can be cut), or the module whose forward holds it.
    kind: str
        ``"sum"`` or ``"concatenation"``, or what it computes for those that cannot be cut.
    cuttable: bool
        Whether a cut can name it.
    branches: tuple of str
        The branches a cut may name.
    '''
    name: str
    kind: str
    cuttable: bool
    branches: Tuple[str, ...] = ()


@dataclass
class SupportReport:
    '''What :py:func:`check` found out about one model.

    Attributes
    ----------
    model: str
        The model's type name.
    traced: bool
        Whether ``torch.fx`` traces it.
    reason: str, optional
        Why it is refused (the tracing error, or the failure), else None.
    merges: list of :py:class:`MergeReport`
        The merges of parallel paths, cuttable or not.
    merged: list of str
        The batch norms merged exactly.
    unmerged: dict of str to str
        The batch norms not merged, with the reason.
    operations: list of :py:class:`~canonizers.graph.conservation.Operation`
        The operations on the relevance path without a conserving rule (name, kind).
    forward_float32, forward_float64: float, optional
        Relative max deviation of the canonized model's output in float32 and float64 from the original in float64
        (float64 arithmetic).
    conservation: float, optional
        ``R_in / R_out`` of a bias-free float64 copy under an epsilon-only composite
        (:py:func:`canonizers.evaluation.conservation_composite`); 1 is exact.
    cancellation: float, optional
        ``sum |R_in| / |R_out|`` of the same: how much larger the relevances are than what they add up to. Where
        float64 rounding of that size explains the conservation error (:py:data:`ROUNDING_EXPLAINS`), the error is
        the measurement's, and the verdict says so.
    notes: list of str
        What could not be measured, and why.
    input_shape: tuple of int, optional
        Where the model's forward branches on shapes: the shape of the example input, the only one it was traced and
        measured for (and the ``input_shape`` of :py:class:`~canonizers.GraphCanonizer` these figures hold for).
    status: str
        ``"supported"``, ``"not conservative"`` or ``"refused"``.
    verdict: str
        One line.
    '''
    model: str
    traced: bool
    reason: Optional[str] = None
    merges: List[MergeReport] = field(default_factory=list)
    merged: List[str] = field(default_factory=list)
    unmerged: Dict[str, str] = field(default_factory=dict)
    operations: List[Operation] = field(default_factory=list)
    forward_float32: Optional[float] = None
    forward_float64: Optional[float] = None
    conservation: Optional[float] = None
    cancellation: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    input_shape: Optional[Tuple[int, ...]] = None
    status: str = REFUSED
    verdict: str = ''

    @property
    def cancels(self) -> bool:
        '''Whether conservation is lost (beyond :py:data:`CONSERVATION_TOLERANCE`) by no more than float64 rounding
        explains, given how much the relevances cancel (:py:attr:`cancellation`).'''
        if self.conservation is None or self.cancellation is None:
            return False
        error = abs(self.conservation - 1)
        return CONSERVATION_TOLERANCE < error <= ROUNDING_EXPLAINS * self.cancellation

    @property
    def exit_code(self) -> int:
        '''0 when supported, 1 when not conservative, 2 when refused.'''
        return EXIT_CODES[self.status]

    @property
    def supported(self) -> bool:
        '''Whether the canonized model is exact and conserves relevance.'''
        return self.status == SUPPORTED

    def __str__(self) -> str:
        lines = [f'model: {self.model}']
        lines.append('traced: yes' if self.traced else f'traced: no ({self.reason})')
        if self.traced:
            cuttable = [merge for merge in self.merges if merge.cuttable]
            lines.append(f'merges of parallel paths: {len(self.merges)} ({len(cuttable)} can be cut)' + (
                ': ' + listing([_merge_text(merge) for merge in self.merges], 8) if self.merges else ''))
            lines.append(f'batch norms: {len(self.merged)} merged exactly, {len(self.unmerged)} not merged' + (
                ': ' + listing([f'{name!r} ({reason})' for name, reason in self.unmerged.items()])
                if self.unmerged else ''))
            if self.operations:
                lines.append(f'operations without a conserving rule: {len(self.operations)}')
                for kind, members in by_kind(self.operations).items():
                    lines.append(f'  {kind} ({count(members, "place")}): '
                                 f'{listing([operation.describe() for operation in members])}')
            else:
                lines.append('operations without a conserving rule: none')
            if self.forward_float64 is not None:
                lines.append(f'forward deviation from float64 arithmetic: float32 {_number(self.forward_float32)}, '
                             f'float64 {_number(self.forward_float64)}')
            if self.conservation is not None:
                lines.append(f'conservation (bias-free float64 copy, epsilon-only composite): R_in / R_out = '
                             f'{self.conservation:.12g} (|error| {abs(self.conservation - 1):.1e}; sum |R_in| / '
                             f'|R_out| = {self.cancellation:.3g})')
        lines += [f'note: {note}' for note in self.notes]
        lines.append(f'verdict: {self.verdict}')
        return '\n'.join(lines)


def _merge_text(merge: MergeReport) -> str:
    if merge.cuttable:
        return f'{merge.name} ({merge.kind}: {", ".join(merge.branches)})'
    return f'{merge.name or "the forward"} ({merge.kind}, cannot be cut)'


def _number(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.1e}'


def bias_free(model: torch.nn.Module, input_shape: Optional[Sequence[int]] = None) -> torch.nn.Module:
    '''Set every bias of ``model`` (of linear layers, convolutions, normalizations), every batch-norm mean and every
    learned constant that joins the signal (position embeddings, class and register tokens, as
    :py:class:`~canonizers.GraphCanonizer` finds them, where it can trace the model) to 0, in place: without biases,
    the Epsilon rule conserves relevance exactly, so any loss is the rules' own. ``input_shape`` is that of
    :py:class:`~canonizers.GraphCanonizer`, for models whose forward branches on shapes.'''
    try:
        learned = compiled_for(model, input_shape=input_shape).learned
    except ValueError:
        learned = []
    with torch.no_grad():
        for name in learned:
            # constants the tracer made (held by the compiled forward, not the model) are no learned constants
            value = attribute_at(model, name, None)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.zero_()
        for module in model.modules():
            bias = getattr(module, 'bias', None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
            # the packed biases of attention (nn.MultiheadAttention's in_proj_bias, bias_k, bias_v)
            for name, parameter in module.named_parameters(recurse=False):
                if name.endswith('bias') or name.startswith('bias_'):
                    parameter.zero_()
            mean = getattr(module, 'running_mean', None)
            if isinstance(mean, torch.Tensor):
                mean.zero_()
    return model


def check(model: torch.nn.Module, example_input: torch.Tensor, progress: bool = False) -> SupportReport:
    '''The support report of ``model``: what :py:class:`~canonizers.GraphCanonizer` finds in it and how well the
    canonized model keeps the forward and conserves relevance, measured on copies. Never changes ``model``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (checked in eval mode, as it is explained).
    example_input: :py:obj:`torch.Tensor`
        An input batch of the shape the model takes (random values are fine). Where the forward branches on shapes,
        the model is traced and measured for this shape alone, as ``GraphCanonizer(input_shape=...)`` canonizes it
        (``report.input_shape``, and a note, say so).
    progress: bool
        Print each step to stderr (large models take a while).

    Returns
    -------
    :py:class:`SupportReport`
        The report; ``report.status`` is ``"supported"`` (exact and conservative), ``"not conservative"`` or
        ``"refused"`` (with ``report.reason``).
    '''
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, not {type(model).__name__}')
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError(f'example_input must be a floating-point tensor, not {type(example_input).__name__}'
                        + (f' of {example_input.dtype}' if isinstance(example_input, torch.Tensor) else ''))
    step = _progress(progress)
    name = type(model).__name__
    step(f'copying {name} to float64')
    exact_model = copy.deepcopy(model).eval().requires_grad_(False).to(torch.float64)
    data = example_input.detach().to(torch.float64)
    report = SupportReport(name, traced=False)
    step('tracing')
    shape = tuple(data.shape)
    try:
        compiled = compiled_for(exact_model, input_shape=shape)
    except ValueError as error:
        return _refused(report, str(error))
    report.traced = True
    _describe(report, compiled)
    if compiled.specialized is not None:
        report.input_shape = shape
        report.notes.append(f'its forward branches on shapes: traced for inputs of shape {shape} alone (canonize it '
                            f'with GraphCanonizer(input_shape={shape}); without it, the modules that branch are kept '
                            'whole)')
    try:
        step('forward in float64 and float32')
        with torch.no_grad():
            exact = exact_model(data)
        if not bool(exact.abs().max() > 0):
            report.notes.append('the output is 0 for this input (a head initialised to zero?): forward deviations are '
                                'absolute')
        report.forward_float64 = _deviation(_canonized(exact_model, lambda: exact_model(data), shape), exact)
        single = copy.deepcopy(exact_model).to(torch.float32)
        report.forward_float32 = _deviation(_canonized(single, lambda: single(data.float()), shape), exact)
        step('relevance of a bias-free float64 copy')
        report.conservation = _conservation(bias_free(exact_model, shape), data, report)
    except (RuntimeError, ValueError, TypeError) as error:
        return _refused(report, f'{type(error).__name__} while canonized: {str(error).splitlines()[0]}')
    _judge(report)
    step(f'verdict: {report.verdict}')
    return report


def _progress(enabled: bool) -> Callable[[str], None]:
    def step(text: str) -> None:
        if enabled:
            print(f'check: {text}', file=sys.stderr, flush=True)
    return step


def _refused(report: SupportReport, reason: str) -> SupportReport:
    report.reason = reason
    report.status = REFUSED
    report.verdict = f'refused because {reason}'
    return report


def _describe(report: SupportReport, compiled: Compiled) -> None:
    table, blocks = compiled.table, compiled.catalog.blocks
    report.merges = [MergeReport(name, merge.kind, True, tuple(blocks.get(name, ())))
                     for name, merge in zip(table.names, table.merges)]
    report.merges += [MergeReport(holder, reason, False) for holder, reason in compiled.unsupported]
    report.merged = list(compiled.merged)
    report.unmerged = dict(compiled.batch_norms.unmerged)
    report.operations = list(compiled.operations)


def _deviation(value: torch.Tensor, reference: torch.Tensor) -> float:
    ''':py:func:`~canonizers.evaluation.relative_error`, absolute where the reference is 0.'''
    if bool(reference.abs().max() > 0):
        return relative_error(value, reference)
    return (value.double() - reference.double()).abs().max().item()


def _canonized(model: torch.nn.Module, forward: Callable[[], torch.Tensor], shape: Tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():
        # the report holds what the warnings say
        warnings.simplefilter('ignore')
        instances = GraphCanonizer(input_shape=shape).apply(model)
    try:
        with torch.no_grad():
            return forward()
    finally:
        for instance in reversed(instances):
            instance.remove()


def _conservation(model: torch.nn.Module, data: torch.Tensor, report: SupportReport) -> Optional[float]:
    '''``R_in / R_out`` for the output of the first sample with the largest magnitude (a logit, or any element of
    another output), None (with a note) where the bias-free output is 0.'''
    from zennit.attribution import Gradient

    with torch.no_grad():
        output = model(data[:1])
    if not isinstance(output, torch.Tensor):
        report.notes.append(f'conservation not measured: the output is a {type(output).__name__}, not a tensor')
        return None
    target = int(output.abs().argmax())
    if output.flatten()[target] == 0:
        report.notes.append('conservation not measured: every output of the bias-free copy is 0')
        return None

    def initial(out: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(out).flatten().index_fill(0, torch.tensor([target]), 1.).reshape(out.shape) * out

    composite = conservation_composite([GraphCanonizer(input_shape=tuple(data[:1].shape))])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        # constant shifts computed by layers (not parameters bias_free zeroes) are biases too: zeroed alike
        with zeroed_shifts(), Gradient(model, composite) as attributor:
            output, relevance = attributor(data[:1].requires_grad_(), initial)
    if output.flatten()[target] == 0:
        report.notes.append('conservation not measured: the explained output of the bias-free copy is 0')
        return None
    explained = output.flatten()[target].item()
    report.cancellation = relevance.abs().sum().item() / abs(explained)
    return relevance.sum().item() / explained


def _judge(report: SupportReport) -> None:
    exact = report.forward_float64 is not None and report.forward_float64 <= FORWARD_TOLERANCE
    conserved = report.conservation is not None and abs(report.conservation - 1) <= CONSERVATION_TOLERANCE
    if not exact:
        report.status = NOT_CONSERVATIVE
        report.verdict = (f'not exact: the canonized model deviates from the original by {report.forward_float64:.1e} '
                          'in float64; please report this model')
    elif report.operations:
        report.status = NOT_CONSERVATIVE
        kinds = by_kind(report.operations)
        report.verdict = 'exact, relevance not conserved at ' + '; '.join(
            f'{count(members, "place")} of {kind} ({listing([member.describe() for member in members], 2)})'
            for kind, members in kinds.items())
    elif not conserved and report.cancels:
        report.status = NOT_CONSERVATIVE
        report.verdict = (f'exact; conservation cannot be measured in float64 (R_in / R_out = '
                          f'{report.conservation:.6g}): relevance cancels, its absolute sum is '
                          f'{report.cancellation:.1e} times the explained output, so rounding alone accounts for the '
                          'error (no operation without a conserving rule was found; trained weights or a larger '
                          'epsilon cancel less)')
    elif not conserved:
        report.status = NOT_CONSERVATIVE
        measured = 'not measured' if report.conservation is None else f'R_in / R_out = {report.conservation:.6g}'
        report.verdict = (f'exact, relevance not conserved ({measured}) although no operation is known not to '
                          'conserve it: please report this model')
    else:
        report.status = SUPPORTED
        report.verdict = 'exact and conservative'


__all__ = ['KINDS', 'MergeReport', 'SupportReport', 'bias_free', 'check']
