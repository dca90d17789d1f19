'''A family canonizer: the parts that canonize one architecture family, applied all or nothing, sharing one cut.'''
import difflib
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from zennit.canonizers import Canonizer, CompositeCanonizer

from .blocks import BlockCanonizer
from .compat import RestoreSwappedParameters
from .cuts import BlockCatalog, CutLike, PerSampleCut, parse_cut, public_cut
from .lifecycle import remove_all, require_eval
from .rewrites import ForwardRewrite
from .tracing import TracingError, describe, traced_merges

#: what a family's cut gives per block: the branch to cut, or the branches where several are
Branches = Union[str, Tuple[str, ...]]

#: the family canonizers that fit a model, for the hint of :py:meth:`FamilyCanonizer.misfit`: the registry of the
#: families (:py:func:`canonizers.registry.families_for`) sets it, so that this module knows no family
_FITTING: List[Callable[[torch.nn.Module], Sequence['FamilyCanonizer']]] = []


def find_fitting_families_with(finder: Callable[[torch.nn.Module], Sequence['FamilyCanonizer']]) -> None:
    '''Have :py:meth:`FamilyCanonizer.misfit` name the families that ``finder`` says fit a model (the registry of
    the families calls this on import, which ``import canonizers`` does).'''
    _FITTING[:] = [finder]


class FamilyCanonizer(CompositeCanonizer):
    '''Composite of the canonizers for one architecture family, applied all or nothing.

    A family is declared by its parts: subclasses set :py:attr:`parts`, and this class supplies construction, copies
    and ``repr``. Every part follows one protocol: ``check(root_module, catalog)`` validates and finds what to change
    without changing anything, ``apply_checked(root_module, catalog, checked)`` changes what ``check`` found. Every part
    is validated before any is applied (training mode, names in the cut, blocks rewritten already); if applying a part
    fails, the parts already applied are removed again. The returned instances can be removed in any order.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.PerSampleCut`
        Which paths carry no relevance.
    parts: sequence of :py:obj:`zennit.canonizers.Canonizer`, optional
        The parts, instead of new instances of :py:attr:`parts`; those that are
        :py:class:`~canonizers.core.blocks.BlockCanonizer` share the cut.
    '''
    #: the parts of the family: classes (or factories) of canonizers following the check-then-apply protocol
    parts: Tuple[Callable[[], Canonizer], ...] = ()

    def __init__(self, cut: CutLike = None, parts: Optional[Sequence[Canonizer]] = None) -> None:
        super().__init__([part() for part in self.parts] if parts is None else list(parts))
        self._rewrites = [part for part in self.canonizers if isinstance(part, ForwardRewrite)]
        self._block_canonizers = [part for part in self._rewrites if isinstance(part, BlockCanonizer)]
        self.cut = cut

    def copy(self) -> 'FamilyCanonizer':
        '''Return an unregistered copy of this canonizer, with the same cut.'''
        return type(self)(self.cut, [part.copy() for part in self.canonizers])

    @property
    def cut(self) -> Union[Dict[str, str], PerSampleCut]:
        '''The cut, as a mapping of block names or patterns to branches (or a :py:class:`PerSampleCut`); settable at
        any time, also while registered (acts from the next forward on).'''
        return public_cut(self._cut)

    @cut.setter
    def cut(self, value: CutLike) -> None:
        parsed = parse_cut(value)
        # resolve against the combined blocks of each registered model first: a bad cut changes nothing
        instances = [instance for part in self._block_canonizers for instance in part._instances]
        catalogs = {id(instance.catalog): instance.catalog for instance in instances}
        resolved = {key: catalog.resolve(parsed) for key, catalog in catalogs.items()}
        self._cut = parsed
        for part in self._block_canonizers:
            part._cut = parsed
        for instance in instances:
            instance.update(resolved[id(instance.catalog)])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(cut={self.cut!r})'

    def catalog_of(self, root_module: torch.nn.Module) -> BlockCatalog:
        '''The cuttable blocks of ``root_module`` over all parts.'''
        catalogs = [part.catalog_of(root_module) for part in self._rewrites]
        cuttable, refusals = {}, {}
        for catalog in catalogs:
            cuttable.update(catalog.blocks)
            refusals.update(catalog.refusals)
        names = catalogs[0].module_names if catalogs else [name for name, _ in root_module.named_modules()]
        return BlockCatalog(cuttable, names, refusals)

    def check(self, root_module: torch.nn.Module) -> BlockCatalog:
        '''Validate all parts against ``root_module`` without changing anything.

        Returns
        -------
        :py:class:`~canonizers.core.cuts.BlockCatalog`
            The cuttable blocks of the model.
        '''
        return self._check_parts(root_module)[0]

    def _check_parts(self, root_module: torch.nn.Module) -> Tuple[BlockCatalog, List[object]]:
        # the catalog, and what each part's check returned
        require_eval(root_module)
        catalog = self.catalog_of(root_module)
        return catalog, [part.check(root_module, catalog) for part in self.canonizers]

    def apply(self, root_module: torch.nn.Module) -> List[Canonizer]:
        '''Apply all parts to ``root_module``, or none if any fails.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.

        Returns
        -------
        list of :py:obj:`zennit.canonizers.Canonizer`
            The registered instances, which may be removed in any order.
        '''
        catalog, checked = self._check_parts(root_module)
        if not catalog.blocks:
            warnings.warn(self.misfit(root_module), stacklevel=2)
        instances: List[Canonizer] = []
        try:
            # parts apply what their checks found, without looking for it again
            for part, result in zip(self.canonizers, checked):
                instances += part.apply_checked(root_module, catalog, result)
            # zennit 1.0's rules swap parameter objects while applied: put the model's own back on removal
            instances += RestoreSwappedParameters().apply(root_module)
        except BaseException:
            remove_all(instances)
            raise
        return instances

    def blocks(self, root_module: torch.nn.Module) -> Dict[str, Iterable[str]]:
        '''The cuttable blocks of ``root_module`` and the branches each can cut.'''
        return dict(self.catalog_of(root_module).blocks)

    def misfit(self, root_module: torch.nn.Module) -> str:
        '''Why this family does not fit ``root_module``, and what would.'''
        model = type(root_module).__name__
        fitting = [type(family).__name__ for finder in _FITTING for family in finder(root_module)]
        merges = None if fitting else traced_merges(root_module)
        if fitting:
            hint = f'{" or ".join(fitting)} fits this model'
        elif isinstance(merges, TracingError):
            hint = f'whether {model} has parallel paths is unknown: {merges}'
        elif merges:
            hint = f'{model} has {describe(merges)}, which no canonizer of this package covers: not supported (yet)'
        else:
            hint = (f'{model} has no parallel paths (traced with torch.fx); canonizers.ExactMergeBatchNorm merges '
                    'batch norms alone')
        return (f'{type(self).__name__} rewrites no block of {model}: it only merges batch norms, and no path can '
                f'be cut; {hint}')

    def rewrites_blocks_of(self, root_module: torch.nn.Module) -> bool:
        '''Whether this family fits ``root_module``: it has blocks with parallel paths that this family rewrites.'''
        return bool(self.catalog_of(root_module).blocks)

    def layer_cuts(self, root_module: torch.nn.Module, layers: Iterable[str]) -> Dict[str, Branches]:
        '''The cut that makes all relevance reaching the input pass through every one of ``layers``.

        A layer inside a cuttable block cuts the block's other branches (see
        :py:meth:`~canonizers.core.blocks.BlockCanonizer.isolating_cut`): the skip for a layer in the transforming
        branch, the residual branch for a layer in the shortcut. The block itself, and layers outside cuttable blocks,
        need no cut.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        layers: iterable of str
            Names of modules of the model.

        Returns
        -------
        dict of str to str or tuple of str
            Block names and the branch to cut (a tuple where several must be cut); empty if nothing needs cutting.

        Raises
        ------
        ValueError
            If a name is not a module of the model, a condition may not name it (e.g. a gate layer), or two layers lie
            in parallel branches of one block.
        '''
        modules = dict(root_module.named_modules())
        unknown = [layer for layer in layers if layer not in modules]
        if unknown:
            closest = {layer: difflib.get_close_matches(layer, list(modules), n=3) for layer in unknown}
            raise ValueError('not modules of the model: ' + '; '.join(
                f'{layer!r} (closest: {", ".join(map(repr, names)) or "none"})' for layer, names in closest.items()))

        cuttable = {}
        for part in self._rewrites:
            for name, module in part.blocks(root_module).items():
                if part.branches(name, module):
                    cuttable[name] = (part, module)
                for layer in layers:
                    refusal = layer.startswith(name + '.') and part.layer_refusal(name, module, layer[len(name) + 1:])
                    if refusal:
                        raise ValueError(refusal)

        cuts: Dict[str, Branches] = {}
        reasons: Dict[str, str] = {}
        for layer in layers:
            enclosing = [name for name in cuttable if layer.startswith(name + '.')]
            if not enclosing:
                continue
            block = max(enclosing, key=len)
            part, module = cuttable[block]
            isolating = part.isolating_cut(block, module, layer[len(block) + 1:])
            branch = isolating[0] if len(isolating) == 1 else isolating
            if cuts.get(block, branch) != branch:
                raise ValueError(f'layers {reasons[block]!r} and {layer!r} lie in parallel branches of block '
                                 f'{block!r}: relevance cannot pass through both, so no cut isolates them together')
            cuts[block] = branch
            reasons.setdefault(block, layer)
        return cuts
