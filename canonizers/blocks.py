'''Shared machinery of the architecture canonizers: cut-aware block rewriting and the composite that validates
everything before it touches the model.'''
import difflib
import warnings
import weakref
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from zennit.canonizers import Canonizer, CompositeCanonizer

from .compat import RestoreSwappedParameters
from .cuts import (
    BRANCHES,
    RESIDUAL,
    SKIP,
    BlockCatalog,
    CutLike,
    ParsedCut,
    PerSampleCut,
    ResolvedCut,
    parse_cut,
    public_cut,
)
from .merging import remove_all, require_eval
from .patch import ModulePatch

# blocks whose forward is rewritten by a canonizer of this package that is still registered
_REWRITTEN: 'weakref.WeakKeyDictionary[torch.nn.Module, bool]' = weakref.WeakKeyDictionary()


class BlockCanonizer(Canonizer):
    '''Base class of canonizers that rewrite the forward of blocks with parallel paths, so that named paths can be cut.

    Subclasses set :py:attr:`block_types` and implement :py:meth:`rewrite` (install the new forward and its modules)
    and :py:meth:`update` (set the gradient masks for a resolved cut). :py:meth:`apply` validates everything before
    it changes anything, and undoes what it did if anything fails.

    Parameters
    ----------
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance; see the package documentation.
    '''
    #: module types whose forward this canonizer rewrites
    block_types: Tuple[type, ...] = ()

    def __init__(self, cut: CutLike = None) -> None:
        self._cut: ParsedCut = parse_cut(cut)
        # registered instances, to update their masks when the cut changes
        self._instances: List[BlockCanonizer] = []
        self.owner: Optional[BlockCanonizer] = None
        self.catalog: Optional[BlockCatalog] = None
        self.name = ''
        self.module: Optional[torch.nn.Module] = None
        self.patch = ModulePatch()

    # --- the cut -------------------------------------------------------------------------------------------------
    @property
    def cut(self) -> Union[Dict[str, str], PerSampleCut]:
        '''The cut, as a mapping of block names or patterns to branches (or a :py:class:`PerSampleCut`). Setting it
        validates it against every registered model first, then acts from the next forward pass on.'''
        return public_cut(self._cut)

    @cut.setter
    def cut(self, value: CutLike) -> None:
        parsed = parse_cut(value)
        catalogs = {id(instance.catalog): instance.catalog for instance in self._instances}
        # resolve against every model first, so that a bad cut changes nothing anywhere
        resolved = {key: catalog.resolve(parsed) for key, catalog in catalogs.items()}
        self._cut = parsed
        for instance in self._instances:
            instance.update(resolved[id(instance.catalog)])

    def __repr__(self) -> str:
        return f'{type(self).__name__}(cut={self.cut!r})'

    # --- finding and validating blocks --------------------------------------------------------------------------
    def rewrites(self, name: str, module: torch.nn.Module) -> bool:
        '''Whether ``module`` is a block whose forward this canonizer rewrites.'''
        return isinstance(module, self.block_types)

    def branches(self, name: str, module: torch.nn.Module) -> Tuple[str, ...]:
        '''The branches of a rewritten block that can be cut; empty if the block cannot be cut.'''
        return BRANCHES

    def branch_of(self, name: str, module: torch.nn.Module, layer: str) -> str:
        '''The branch of block ``name`` that holds ``layer`` (a name relative to the block); the transforming
        (``"residual"``) branch unless a subclass knows better.'''
        return RESIDUAL

    def refusal(self, name: str, module: torch.nn.Module) -> Optional[str]:
        '''Why a rewritten block without cuttable branches cannot be named in a cut; None to treat its name as that of
        any layer (inside its enclosing block, if any).'''
        return f'block {name!r} ({type(module).__name__}) has no parallel path that could be cut'

    def layer_refusal(self, name: str, module: torch.nn.Module, layer: str) -> Optional[str]:
        '''Why a CRP condition may not name ``layer`` (a name relative to block ``name``), or None if it may.'''
        return None

    def blocks(self, root_module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
        '''The blocks of ``root_module`` whose forward this canonizer rewrites, by name.'''
        return {name: module for name, module in root_module.named_modules() if self.rewrites(name, module)}

    def catalog_of(self, root_module: torch.nn.Module) -> BlockCatalog:
        '''The cuttable blocks of ``root_module``, against which cuts are resolved.'''
        cuttable, refusals = {}, {}
        for name, module in self.blocks(root_module).items():
            branches = self.branches(name, module)
            if branches:
                cuttable[name] = branches
            elif self.refusal(name, module) is not None:
                refusals[name] = self.refusal(name, module)
        return BlockCatalog(cuttable, [name for name, _ in root_module.named_modules()], refusals)

    def check(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> ResolvedCut:
        '''Validate that this canonizer can be applied, without changing anything.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.cuts.BlockCatalog`, optional
            Blocks to resolve the cut against; those of this canonizer by default.

        Returns
        -------
        :py:class:`~canonizers.cuts.ResolvedCut`
            The cut, resolved against the model's blocks.
        '''
        for name, module in self.blocks(root_module).items():
            if module in _REWRITTEN or 'forward' in vars(module):
                raise RuntimeError(
                    f'block {name!r} already has a rewritten forward (is another canonizer still registered on this '
                    'model? nested composite contexts are not supported): remove it first'
                )
        return (catalog or self.catalog_of(root_module)).resolve(self._cut)

    # --- applying and removing ------------------------------------------------------------------------------------
    def apply(self, root_module: torch.nn.Module, catalog: Optional[BlockCatalog] = None) -> List['BlockCanonizer']:
        '''Rewrite all blocks of ``root_module``; on failure, undo what was done and raise.

        Parameters
        ----------
        root_module: :py:obj:`torch.nn.Module`
            The model.
        catalog: :py:class:`~canonizers.cuts.BlockCatalog`, optional
            Blocks to resolve the cut against; those of this canonizer by default.

        Returns
        -------
        list of :py:class:`BlockCanonizer`
            One registered instance per rewritten block.
        '''
        catalog = catalog or self.catalog_of(root_module)
        return self.apply_checked(root_module, catalog, self.check(root_module, catalog))

    def apply_checked(
        self, root_module: torch.nn.Module, catalog: BlockCatalog, resolved: ResolvedCut
    ) -> List['BlockCanonizer']:
        ''':py:meth:`apply` after :py:meth:`check` passed, with its result.'''
        instances = []
        try:
            for name, module in self.blocks(root_module).items():
                instance = self.copy()
                instance.owner, instance.catalog = self, catalog
                instances.append(instance)
                instance.register(name, module)
                instance.update(resolved)
        except BaseException:
            remove_all(instances)
            raise
        return instances

    def register(self, name: str, module: torch.nn.Module) -> None:
        '''Rewrite the forward of one block.

        Parameters
        ----------
        name: str
            Name of the block in the model.
        module: :py:obj:`torch.nn.Module`
            The block.
        '''
        self.name, self.module = name, module
        try:
            self.rewrite(self.patch, module)
            _REWRITTEN[module] = True
            self.patch.on_undo(lambda: _REWRITTEN.pop(module, None))
            if self.owner is not None:
                self.owner._instances.append(self)
                self.patch.on_undo(lambda: self.owner._instances.remove(self))
        except BaseException:
            self.patch.undo()
            raise

    def remove(self) -> None:
        '''Restore the block's original forward and remove the added modules.'''
        self.patch.undo()

    def copy(self) -> 'BlockCanonizer':
        '''Return an unregistered copy of this canonizer.'''
        return self.__class__()

    # --- to be implemented by each architecture ----------------------------------------------------------------
    def rewrite(self, patch: ModulePatch, module: torch.nn.Module) -> None:
        '''Install the rewritten forward and the modules it needs on ``module``, recording all changes in ``patch``.'''
        raise NotImplementedError

    def update(self, cut: ResolvedCut) -> None:
        '''Set the gradient masks of this block for a resolved cut.'''
        raise NotImplementedError


class FamilyCanonizer(CompositeCanonizer):
    '''Composite of the canonizers for one architecture family, applied all or nothing.

    Every part is validated before any is applied (training mode, names in the cut, blocks rewritten already); if
    applying a part fails, the parts already applied are removed again. The returned instances can be removed in any
    order.

    Parameters
    ----------
    canonizers: sequence of :py:obj:`zennit.canonizers.Canonizer`
        The parts; those that are :py:class:`BlockCanonizer` share the cut.
    cut: None, iterable of str, mapping of str to str, or :py:class:`~canonizers.cuts.PerSampleCut`
        Which paths carry no relevance.
    '''
    def __init__(self, canonizers: Sequence[Canonizer], cut: CutLike = None) -> None:
        super().__init__(list(canonizers))
        self._block_canonizers = [part for part in self.canonizers if isinstance(part, BlockCanonizer)]
        self.cut = cut

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
        catalogs = [part.catalog_of(root_module) for part in self._block_canonizers]
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
        :py:class:`~canonizers.cuts.BlockCatalog`
            The cuttable blocks of the model.
        '''
        return self._check_parts(root_module)[0]

    def _check_parts(self, root_module: torch.nn.Module) -> Tuple[BlockCatalog, List[object]]:
        # the catalog, and what each part's check returned (None for parts without one)
        require_eval(root_module)
        catalog = self.catalog_of(root_module)
        checked = []
        for part in self.canonizers:
            if isinstance(part, BlockCanonizer):
                checked.append(part.check(root_module, catalog))
            else:
                checked.append(part.check(root_module) if hasattr(part, 'check') else None)
        return catalog, checked

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
                if isinstance(part, BlockCanonizer):
                    instances += part.apply_checked(root_module, catalog, result)
                elif hasattr(part, 'apply_checked'):
                    instances += part.apply_checked(result)
                else:
                    instances += part.apply(root_module)
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
        # imported here: the registry and the tracer import the families, which import this module
        from .registry import families_for
        from .tracing import TracingError, describe, parallel_paths

        model = type(root_module).__name__
        fitting = [type(family).__name__ for family in families_for(root_module)]
        if fitting:
            hint = f'{" or ".join(fitting)} fits this model'
        else:
            try:
                merges = parallel_paths(root_module).merges.values()
                hint = (f'{model} has {describe(list(merges))}, which no canonizer of this package covers: not '
                        'supported (yet)' if merges else f'{model} has no parallel paths (traced with torch.fx); '
                        'canonizers.ExactMergeBatchNorm merges batch norms alone')
            except TracingError as error:
                hint = f'whether {model} has parallel paths is unknown: {error}'
        return (f'{type(self).__name__} rewrites no block of {model}: it only merges batch norms, and no path can '
                f'be cut; {hint}')

    def rewrites_blocks_of(self, root_module: torch.nn.Module) -> bool:
        '''Whether this family fits ``root_module``: it has blocks with parallel paths that this family rewrites.'''
        return bool(self.catalog_of(root_module).blocks)

    def layer_cuts(self, root_module: torch.nn.Module, layers: Iterable[str]) -> Dict[str, str]:
        '''The cut that makes all relevance reaching the input pass through every one of ``layers``.

        A layer inside a cuttable block cuts the block's other branch: the skip for a layer in the transforming
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
        dict of str to str
            Block names and the branch to cut; empty if nothing needs cutting.

        Raises
        ------
        ValueError
            If a name is not a module of the model, or two layers lie in parallel branches of one block.
        '''
        modules = dict(root_module.named_modules())
        unknown = [layer for layer in layers if layer not in modules]
        if unknown:
            closest = {layer: difflib.get_close_matches(layer, list(modules), n=3) for layer in unknown}
            raise ValueError('not modules of the model: ' + '; '.join(
                f'{layer!r} (closest: {", ".join(map(repr, names)) or "none"})' for layer, names in closest.items()))

        cuttable = {}
        for part in self._block_canonizers:
            for name, module in part.blocks(root_module).items():
                if part.branches(name, module):
                    cuttable[name] = (part, module)
                for layer in layers:
                    refusal = layer.startswith(name + '.') and part.layer_refusal(name, module, layer[len(name) + 1:])
                    if refusal:
                        raise ValueError(refusal)

        cuts: Dict[str, str] = {}
        reasons: Dict[str, str] = {}
        for layer in layers:
            enclosing = [name for name in cuttable if layer.startswith(name + '.')]
            if not enclosing:
                continue
            block = max(enclosing, key=len)
            part, module = cuttable[block]
            held = part.branch_of(block, module, layer[len(block) + 1:])
            branch = SKIP if held == RESIDUAL else RESIDUAL
            if cuts.get(block, branch) != branch:
                raise ValueError(f'layers {reasons[block]!r} and {layer!r} lie in parallel branches of block '
                                 f'{block!r}: relevance cannot pass through both, so no cut isolates them together')
            cuts[block] = branch
            reasons.setdefault(block, layer)
        return cuts
