'''The graph canonizer: the canonizers of this package for any model ``torch.fx`` can trace.'''
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from zennit.canonizers import Canonizer

from ..core.attention import AttentionProjections
from ..core.compat import RULES_ASSIGN_PARAMETERS, RestoreSwappedParameters
from ..core.cuts import CutLike, ParsedCut, PerSampleCut, ResolvedCut, parse_cut, public_cut
from ..core.lifecycle import REWRITTEN, remove_all, require_eval, rewritten_forward
from ..core.merging import batch_norm_affine, check_batch_norm, make_identity, merge_around_linear, threshold_relu
from ..core.patch import ModulePatch
from ..core.reuse import ReuseForward
from .compiled import Compiled, compiled_for
from .conservation import count, listing, warn
from .cutting import Branches
from .modules import ElementwiseActivation, call_copy
from .transformer import build_norm

#: the treatments of attention: ``"cp-lrp"``, attention weights constant (Ali et al., ICML 2022); ``"attnlrp"``, the
#: softmax and uniform rules of AttnLRP (Achtibat et al., ICML 2024)
ATTENTION_RULES = ('cp-lrp', 'attnlrp')


class GraphCanonizer(Canonizer):
    '''Canonizer for any model that ``torch.fx`` can trace (timm models, torchvision's GoogLeNet, Inception, RegNet,
    ConvNeXt, ShuffleNet, MNASNet, users' own blocks), applied in place.

    From the traced graph it

    - routes every sum of tensors from parallel paths (``+``, ``+=``, ``torch.add``; ``a + b + c`` as one sum) through
      a :py:class:`~canonizers.MaskedSum`, and gives every concatenation of them a gradient mask per input, so that
      paths can be cut;
    - treats gates (``x * sigmoid(f(pool(x)))``, hard sigmoid, ECA) as constants (:py:class:`~canonizers.ConstantGate`);
    - merges every batch norm exactly along the data flow: into the layer before it, into the layers of a
      concatenation before it, or (pre-activation) into the layers after it across a ReLU that becomes a
      :py:class:`~canonizers.ThresholdReLU`; one it cannot merge is warned about by name;
    - calls functional activations and pooling (``F.relu``, ``x.mean((2, 3))``, swish written out as
      ``x * sigmoid(x)``, ...) as modules, so that rules apply, and scalings by factors that do not depend on the
      input (layer scales, constants) as modules that relevance passes unchanged (the z-rule of a diagonal map);
    - still calls the forward hooks of the blocks whose forward it inlines (CRP's recording and masking).

    The traced forward is installed as the model's ``forward`` and compiled once per model
    (:py:func:`canonizers.graph.clear_cache` forgets it, e.g. after changing an attribute the forward branches on).
    Removal restores the model bitwise. A model ``torch.fx`` cannot trace gets a ``ValueError`` that quotes the
    tracing error, untouched. Note that ``torch.fx`` itself traces ``y += z`` as ``y = y + z``: a forward that reads
    ``y``'s tensor again under another name after such an in-place sum is traced wrongly by ``torch.fx`` (explicit
    in-place calls, ``y.add_(z)``, are kept as they are).
    Forward pre-hooks of inlined blocks do not run (a warning says so).

    Transformers (:py:mod:`canonizers.graph.transformer`): attention in every form (``nn.MultiheadAttention``,
    ``F.scaled_dot_product_attention``, torchvision's window attention, explicit ``softmax(...) @ v``) gets constant
    attention weights (CP-LRP): the weighting of the values is a linear layer to zennit's rules; LayerNorm, GroupNorm,
    RMSNorm (also as functions, and between permutes) and batch norms that cannot be merged become affine layers with
    their normalizing factor constant; constants added to the signal (position embeddings) are biases. With a
    vanishing epsilon this is LXT's CP-LRP, to rounding. Attention weights and normalizing factors are then constant
    in the backward pass (as gates are), also for parameter gradients.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance. A merge is named by the module whose forward computes it, with ``:k`` where
        one module computes several; its branches are its inputs ``"0"``, ``"1"``, ... and, where they are told apart,
        ``"skip"`` and ``"residual"``, as the family canonizers name them (see :py:mod:`canonizers.graph.cutting`).
    attention: str
        The treatment of attention: ``"cp-lrp"`` (attention weights constant, relevance flows through the values
        alone; conservative) or ``"attnlrp"`` (AttnLRP: relevance also flows into queries and keys, by the uniform
        rule on ``q @ k^T`` and ``weights @ values`` and the softmax rule, which absorbs relevance as a bias does, so
        that relevance is not conserved through attention by design; see :py:mod:`canonizers.core.products`).
        Either way, products of two signals that are no gate (gMLP's gating, GLU-style gates, ``x1 * x2`` of
        StarNet) get the uniform rule: each factor takes half of the product's relevance.
    input_shape: tuple of int, optional
        The shape of the inputs (batch included) to trace the model for where its forward branches on shapes
        (timm's MobileViT, Twins, TinyViT, EfficientViT, ConViT, ...: padding to windows, caches of the token count),
        which ``torch.fx`` cannot trace in general. The canonized forward then takes inputs of this shape and of the
        dtype of the model's parameters alone, and refuses others with a ``ValueError``. Without it, timm's no-trace
        modules of such a model are kept whole, and the paths and operations inside them are out of reach (the
        warning of :py:mod:`canonizers.graph.conservation` names them). Models whose forward is traced in general
        are traced so either way.
    reuse_forward: bool
        Whether zennit's rules take each linear layer's output from the forward pass where they would compute it again
        in the backward pass (:py:class:`~canonizers.core.reuse.ReuseForward`): the same relevance, one linear map
        fewer per layer under the epsilon rule, for the memory of the layers' last outputs while canonized; and
        whether the forward pass leaves uncomputed the input gradients that zennit's rules replace (of linear layers,
        convolutions, activations under ``Pass``, normalizations and attention weightings).

    Raises
    ------
    ValueError
        If ``attention`` is not one of :py:data:`ATTENTION_RULES`, ``input_shape`` is no sequence of positive
        integers, or ``reuse_forward`` is no bool.
    '''
    def __init__(self, cut: CutLike = None, attention: str = 'cp-lrp',
                 input_shape: Optional[Sequence[int]] = None, reuse_forward: bool = True) -> None:
        if attention not in ATTENTION_RULES:
            raise ValueError(f'attention={attention!r}: must be one of {", ".join(map(repr, ATTENTION_RULES))}')
        self.attention = attention
        self.input_shape = shape_of(input_shape)
        if not isinstance(reuse_forward, bool):
            raise ValueError(f'reuse_forward={reuse_forward!r}: must be True or False')
        self.reuse_forward = reuse_forward
        self._cut: ParsedCut = parse_cut(cut)
        self._instances: List[GraphCanonizer] = []
        self.compiled: Optional[Compiled] = None
        self.patch = ModulePatch()

    @property
    def cut(self) -> Union[Dict[str, Branches], PerSampleCut]:
        '''The cut; settable at any time, also while registered (validated against every registered model first,
        acts from the next forward on).'''
        return public_cut(self._cut)

    @cut.setter
    def cut(self, value: CutLike) -> None:
        parsed = parse_cut(value)
        resolved = [instance.compiled.catalog.resolve(parsed) for instance in self._instances]
        self._cut = parsed
        for instance, cut in zip(self._instances, resolved):
            instance.update(cut)

    def __repr__(self) -> str:
        shape = '' if self.input_shape is None else f', input_shape={self.input_shape!r}'
        reuse = '' if self.reuse_forward else ', reuse_forward=False'
        return f'{type(self).__name__}(cut={self.cut!r}, attention={self.attention!r}{shape}{reuse})'

    def copy(self) -> 'GraphCanonizer':
        '''Return an unregistered copy of this canonizer, with the same cut, attention rules, input shape and reuse.'''
        return type(self)(self.cut, self.attention, self.input_shape, self.reuse_forward)

    def apply(self, root_module: torch.nn.Module) -> List[Canonizer]:
        '''Canonize ``root_module`` in place; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model, in eval mode.

        Returns
        -------
        list of :py:obj:`zennit.canonizers.Canonizer`
            The registered instances, which may be removed in any order.

        Raises
        ------
        ValueError
            If the model cannot be traced, or the cut names nothing of it.
        RuntimeError
            If the model is in training mode or canonized by a canonizer that is still registered.
        '''
        require_eval(root_module)
        rewritten = [name or 'the model' for name, module in root_module.named_modules() if rewritten_forward(module)]
        if rewritten:
            # tracing a forward another canonizer rewrote would bake its modules into the compiled forward
            raise RuntimeError(f'{rewritten[0]!r} of {type(root_module).__name__} already has a rewritten forward (is '
                               'another canonizer still registered on this model? nested composite contexts are not '
                               'supported): remove it first')
        compiled = compiled_for(root_module, self.attention, self.input_shape)
        cut = compiled.catalog.resolve(self._cut)
        modules = dict(root_module.named_modules())
        for name in compiled.merged:
            check_batch_norm(modules[name])
        self._warn(root_module, compiled)
        instance = type(self)(attention=self.attention, input_shape=self.input_shape)
        instances: List[Canonizer] = [instance]
        try:
            instance.register(root_module, modules, compiled)
            instance.owner = self
            self._instances.append(instance)
            instance.patch.on_undo(lambda: self._instances.remove(instance))
            instance.update(cut)
            # zennit 1.0's rules swap parameter objects while applied: put the model's own back on removal
            instances += RestoreSwappedParameters().apply(root_module)
            if self.reuse_forward:
                instances += ReuseForward().apply(root_module)
        except BaseException:
            remove_all(instances)
            raise
        return instances

    def layer_cuts(self, root_module: torch.nn.Module, layers: Iterable[str]) -> Dict[str, Branches]:
        '''The cut that makes all relevance reaching the input pass through every one of ``layers``, as
        :py:meth:`canonizers.core.family.FamilyCanonizer.layer_cuts` (see :py:func:`graph_cuts_for`).'''
        return compiled_for(root_module, self.attention, self.input_shape).table.layer_cuts(list(layers))

    def blocks(self, root_module: torch.nn.Module) -> Dict[str, Tuple[str, ...]]:
        '''The names that cuts of ``root_module`` may use, and the branches of each.'''
        return dict(compiled_for(root_module, self.attention, self.input_shape).catalog.blocks)

    @staticmethod
    def _warn(root_module: torch.nn.Module, compiled: Compiled) -> None:
        # one warning per kind, listing every place: a transformer has dozens of attention products
        model = type(root_module).__name__
        pre_hooks = [name for name in compiled.hooked if root_module.get_submodule(name)._forward_pre_hooks]
        if pre_hooks:
            warnings.warn(f'GraphCanonizer inlines the forward of {listing(pre_hooks, quote=True)} of {model}: '
                          'forward hooks still run, forward pre-hooks do not', stacklevel=3)
        unmerged = {name: reason for name, reason in compiled.batch_norms.unmerged.items() if name in compiled.frozen}
        if unmerged:
            places = listing([f'batch norm {name!r}: {reason}' for name, reason in unmerged.items()])
            warnings.warn(f'GraphCanonizer cannot merge {count(list(unmerged), "batch norm")} of {model}, which '
                          'become affine layers of their own while canonized (the rules of linear layers apply to '
                          f'them; their shift absorbs relevance as a bias does): {places}', stacklevel=3)
        warn(model, compiled.operations, stacklevel=3)

    def register(self, root_module: torch.nn.Module, modules: Mapping[str, torch.nn.Module],
                 compiled: Compiled) -> None:
        '''Install the compiled forward, its modules and the batch-norm merges on ``root_module``.'''
        self.compiled = compiled
        self.modules = modules
        patch = self.patch
        try:
            for name, value in compiled.constants.items():
                patch.set_attribute(root_module, name, value)
            thresholds = self._merge(modules, compiled)
            for name in compiled.activations:
                parent, attribute = name.rsplit('.', 1)
                patch.set_attribute(modules[parent], attribute, ElementwiseActivation(modules[name]))
            for slot in compiled.program.slots:
                if slot.kind == 'call':
                    module = call_copy(modules[slot.source])
                elif slot.kind == 'norm':
                    module = build_norm(slot.spec, root_module).train(root_module.training)
                elif slot.kind == 'functional':
                    module = slot.spec.build(root_module)
                elif slot.kind == 'projections':
                    module = AttentionProjections(modules[slot.source], self.attention == 'attnlrp').train(
                        root_module.training)
                else:
                    module = thresholds[slot.source] if slot.kind == 'threshold' else slot.build()
                    module.train(root_module.training)
                patch.set_attribute(modules[slot.holder], slot.attribute, module)
            forward = compiled.program.forward
            if compiled.specialized is not None:
                forward = only_for(forward, *compiled.specialized)
            patch.set_attribute(root_module, 'forward', forward.__get__(root_module))
            REWRITTEN.claim(patch, root_module)
        except BaseException:
            patch.undo()
            raise

    def _merge(self, modules: Mapping[str, torch.nn.Module], compiled: Compiled) -> Dict[str, torch.nn.Module]:
        '''Merge the batch norms; return the threshold ReLUs of those the forward calls as added modules.'''
        plan, patch = compiled.batch_norms, self.patch
        thresholds = {}
        # the merged values are functions of the original parameters where the zennit version lets them be
        # installed so (see canonizers.core.merging)
        with torch.enable_grad() if RULES_ASSIGN_PARAMETERS else torch.no_grad():
            affine = {name: batch_norm_affine(modules[name]) for name in compiled.merged}
            before = {}
            for name, pre in plan.pre_activations.items():
                scale, shift = affine[name]
                if pre.relu is not None or pre.attribute is not None:
                    like = modules[pre.linears[0]].weight
                    relu, scale, shift = threshold_relu(scale, shift, like)
                    if pre.attribute is not None:
                        parent = modules[pre.attribute[0]]
                        original = getattr(parent, pre.attribute[1])
                        patch.set_attribute(parent, pre.attribute[1], relu.train(original.training))
                    else:
                        thresholds[name] = relu
                before[name] = (scale, shift)
            for name, linear in plan.linears.items():
                after = None
                if linear.after is not None:
                    source, start, stop = linear.after
                    scale, shift = affine[source]
                    after = (scale[start:stop], shift[start:stop])
                merge_around_linear(patch, modules[name], before.get(linear.before), after)
        for name in compiled.merged:
            make_identity(patch, modules[name])
        return thresholds

    def update(self, cut: ResolvedCut) -> None:
        '''Set the gradient masks of the merges for a resolved cut.'''
        pairs = self.compiled.table.pairs
        for slot in self.compiled.program.slots:
            if slot.merge >= 0:
                getattr(self.modules[slot.holder], slot.attribute).mask = cut.mask(pairs[slot.merge])

    def remove(self) -> None:
        '''Restore the model bitwise.'''
        self.patch.undo()
        self.modules = {}


def shape_of(input_shape: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    '''``input_shape`` as a tuple, checked: a sequence of positive integers, or None.'''
    if input_shape is None:
        return None
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape or not all(
            isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in input_shape):
        raise ValueError(f'input_shape={input_shape!r}: must be a sequence of positive integers, the shape of the '
                         'inputs with the batch size first, such as (1, 3, 224, 224)')
    return tuple(input_shape)


def only_for(forward: Callable, shape: torch.Size, dtype: torch.dtype) -> Callable:
    '''``forward``, refusing inputs of any shape or dtype but the ones its graph is specialized to.'''
    def specialized(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        data = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(data, torch.Tensor) or data.shape != shape or data.dtype != dtype:
            tensor = isinstance(data, torch.Tensor)
            got = f'shape {tuple(data.shape)} and {data.dtype}' if tensor else type(data).__name__
            advice = f'input_shape={tuple(data.shape)}, ' if tensor else ''
            raise ValueError(f'{type(self).__name__} is canonized by GraphCanonizer(input_shape={tuple(shape)}) for '
                             f'inputs of that shape and {dtype} alone (its forward branches on shapes), not for '
                             f'{got}: canonize it with {advice}the model in the dtype of the input')
        return forward(self, *args, **kwargs)
    return specialized


def graph_cuts_for(model: torch.nn.Module, conditions: Sequence[Mapping[str, object]],
                   output: str = 'y', attention: str = 'cp-lrp',
                   input_shape: Optional[Sequence[int]] = None) -> List[Dict[str, Branches]]:
    '''For each CRP condition, the cut of :py:class:`GraphCanonizer` that makes all relevance reaching the input pass
    through every conditioned layer: every input of a merge after a conditioned layer that does not depend on it.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (not canonized).
    conditions: sequence of mappings
        CRP conditions, layer names to concepts; the key ``output`` names the model output and is left out.
    output: str
        The name of the model output in the conditions.
    attention: str
        The treatment of attention of the canonizer the cuts are for (under AttnLRP relevance also flows through
        queries and keys).
    input_shape: tuple of int, optional
        The ``input_shape`` of the canonizer the cuts are for (models whose forward branches on shapes).

    Returns
    -------
    list of dict
        Per condition, names and branches to cut; ``{}`` where nothing needs cutting. On the models of the family
        canonizers, the names and branches are theirs (``{"layer3.0": "skip"}``).

    Raises
    ------
    ValueError
        If the model cannot be traced, a layer is unknown, not called, called at several places, replaced while
        canonized or computes a constant gate, relevance can go around a layer through an operation that cannot be
        cut, or two layers of one condition lie in parallel paths.
    '''
    table = compiled_for(model, attention, shape_of(input_shape)).table
    return [table.layer_cuts([name for name in condition if name != output]) for condition in conditions]
