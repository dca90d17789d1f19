'''Cut specifications: which parallel paths of which blocks carry no relevance.

A cut is given by the user as ``None``, an iterable of block names or glob patterns (their **skip** path is cut), or
a mapping from name or pattern to a branch (``"skip"`` or ``"residual"`` for two-path blocks; a block names its own
branches, and several of one block are given as a tuple). :py:class:`PerSampleCut` holds one such
specification per batch sample. :py:class:`BlockCatalog` resolves specifications against the blocks of one model,
refusing anything it cannot place, and :py:class:`ResolvedCut` turns the result into gradient masks.
'''
import difflib
import fnmatch
from typing import Collection, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

SKIP = 'skip'
RESIDUAL = 'residual'
BRANCHES = (SKIP, RESIDUAL)

#: a parsed specification: (name or pattern, branch) pairs in the order given
Entries = Tuple[Tuple[str, str], ...]
#: what users may pass as ``cut``
CutLike = Union[None, str, Iterable[str], Mapping[str, Union[str, Sequence[str]]], 'PerSampleCut']
#: (block name, branch) pairs that are cut
CutSet = FrozenSet[Tuple[str, str]]

_GLOB_CHARACTERS = frozenset('*?[')


def parse_entries(cut: Union[None, str, Iterable[str], Mapping[str, str]]) -> Entries:
    '''Check the form of one cut specification and bring it into a canonical form.

    Parameters
    ----------
    cut: None, str, iterable of str, or mapping of str to str
        ``None`` cuts nothing; a name, or an iterable of names or glob patterns, cuts the skip path of those blocks;
        a mapping gives the branch (``"skip"`` or ``"residual"``) to cut for each name or pattern.

    Returns
    -------
    tuple of (str, str)
        The (name or pattern, branch) pairs.

    Raises
    ------
    TypeError
        If ``cut`` or one of its names is not of a valid type.
    ValueError
        If a branch is neither ``"skip"`` nor ``"residual"``.
    '''
    if cut is None:
        return ()
    if isinstance(cut, str):
        # a lone string is one block name, not an iterable of one-letter names
        items = [(cut, SKIP)]
    elif isinstance(cut, Mapping):
        items = []
        for name, branches in cut.items():
            # several branches of one block (a merge of more than two paths) as a tuple or list
            for branch in (branches if isinstance(branches, (tuple, list)) else [branches]):
                items.append((name, branch))
    elif isinstance(cut, Iterable):
        items = [(name, SKIP) for name in cut]
    else:
        raise TypeError(f'cut must be None, block names, or a mapping of block names to branches; got {cut!r}')

    for name, branch in items:
        if not isinstance(name, str):
            raise TypeError(f'block names in a cut must be strings, got {name!r}')
        if not isinstance(branch, str):
            raise TypeError(f'branches in a cut must be strings (or tuples of them), got {branch!r} for {name!r}')
    # branch names are checked against the blocks they name when the cut is resolved
    return tuple(items)


class PerSampleCut:
    '''One cut specification per batch sample.

    Sample ``i`` of every batch is computed with the cuts of ``specs[i]``; the batch must hold exactly
    ``len(specs)`` samples.

    Parameters
    ----------
    specs: sequence of cut specifications
        Each as accepted by the ``cut`` argument of the canonizers (not itself per-sample).
    '''
    def __init__(self, specs: Sequence[Union[None, str, Iterable[str], Mapping[str, str]]]) -> None:
        specs = list(specs)
        if not specs:
            raise ValueError('PerSampleCut needs one specification per sample, got none')
        for spec in specs:
            if isinstance(spec, PerSampleCut):
                raise TypeError('PerSampleCut cannot be nested')
        self.entries: Tuple[Entries, ...] = tuple(parse_entries(spec) for spec in specs)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f'PerSampleCut({[dict(entries) for entries in self.entries]!r})'


ParsedCut = Union[Entries, PerSampleCut]


def parse_cut(cut: CutLike) -> ParsedCut:
    '''Check the form of a cut, which may be per sample.

    Parameters
    ----------
    cut: None, str, iterable of str, mapping of str to str, or :py:class:`PerSampleCut`
        The cut as given by the user.

    Returns
    -------
    tuple of (str, str), or :py:class:`PerSampleCut`
        The parsed cut.
    '''
    if isinstance(cut, PerSampleCut):
        return cut
    return parse_entries(cut)


def public_cut(cut: ParsedCut) -> Union[Dict[str, str], PerSampleCut]:
    '''The parsed cut in the form users pass it: a mapping of names and patterns to branches, or the
    :py:class:`PerSampleCut`.'''
    if isinstance(cut, PerSampleCut):
        return cut
    grouped: Dict[str, List[str]] = {}
    for name, branch in cut:
        if branch not in grouped.setdefault(name, []):
            grouped[name].append(branch)
    return {name: branches[0] if len(branches) == 1 else tuple(branches) for name, branches in grouped.items()}


def _is_pattern(name: str) -> bool:
    return not _GLOB_CHARACTERS.isdisjoint(name)


class ResolvedCut:
    '''A cut placed on the blocks of one model, as (block name, branch) pairs, for all samples or per sample.

    Parameters
    ----------
    cuts: frozenset, or list of frozensets
        The (block name, branch) pairs that are cut; a list holds one set per sample.
    '''
    def __init__(self, cuts: Union[CutSet, List[CutSet]]) -> None:
        self.cuts = cuts

    @property
    def per_sample(self) -> bool:
        '''Whether the cut differs between samples.'''
        return isinstance(self.cuts, list)

    def mask(self, summands: Sequence[Collection[Tuple[str, str]]]) -> Optional[torch.Tensor]:
        '''Build the gradient mask over the summands of one sum (or the inputs of one concatenation).

        Parameters
        ----------
        summands: sequence of collections of (str, str)
            For each summand, the (block name, branch) pairs any one of which cuts it.

        Returns
        -------
        :py:obj:`torch.Tensor` or None
            ``None`` if nothing is cut; else a float mask of shape ``[n]`` (for all samples) or ``[batch, n]`` (per
            sample), 0 where the summand is cut.
        '''
        if self.per_sample:
            rows = [[0. if cut.intersection(pairs) else 1. for pairs in summands] for cut in self.cuts]
            if all(value == 1. for row in rows for value in row):
                return None
            return torch.tensor(rows)
        row = [0. if self.cuts.intersection(pairs) else 1. for pairs in summands]
        if all(value == 1. for value in row):
            return None
        return torch.tensor(row)


class BlockCatalog:
    '''The cuttable blocks of one model, against which cut specifications are resolved.

    Parameters
    ----------
    blocks: mapping of str to tuple of str
        Names of the cuttable blocks and the branches each can cut.
    module_names: collection of str
        Names of all modules of the model, to tell a layer inside a block from an unknown name.
    refusals: mapping of str to str, optional
        Names of blocks that cannot be cut, with the reason why.
    '''
    def __init__(
        self,
        blocks: Mapping[str, Tuple[str, ...]],
        module_names: Collection[str],
        refusals: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.blocks = dict(blocks)
        self.module_names = frozenset(module_names)
        self.refusals = dict(refusals or {})

    def resolve(self, cut: ParsedCut) -> ResolvedCut:
        '''Place a parsed cut on the blocks of this model.

        Parameters
        ----------
        cut: tuple of (str, str), or :py:class:`PerSampleCut`
            The parsed cut, see :py:func:`parse_cut`.

        Returns
        -------
        :py:class:`ResolvedCut`
            The cut as (block name, branch) pairs.

        Raises
        ------
        ValueError
            If a name is unknown, names a layer inside a block or a block that cannot be cut, or a pattern matches no
            block. The message names the value and what would be valid.
        '''
        if isinstance(cut, PerSampleCut):
            return ResolvedCut([self._resolve_entries(entries) for entries in cut.entries])
        return ResolvedCut(self._resolve_entries(cut))

    def _resolve_entries(self, entries: Entries) -> CutSet:
        pairs = set()
        for name, branch in entries:
            for block in self._match(name):
                if branch not in self.blocks[block]:
                    raise ValueError(f'branch {branch!r} for {name!r} is not valid: use '
                                     f'{" or ".join(map(repr, self.blocks[block]))}')
                pairs.add((block, branch))
        return frozenset(pairs)

    def _match(self, name: str) -> List[str]:
        if _is_pattern(name):
            matches = fnmatch.filter(self.blocks, name)
            if not matches:
                raise ValueError(f'pattern {name!r} matches no cuttable block (patterns are matched against block '
                                 f'names only); blocks are: {self._listing()}')
            return matches
        if name in self.blocks:
            return [name]
        if name in self.refusals:
            raise ValueError(self.refusals[name])
        enclosing = [block for block in self.blocks if name.startswith(block + '.')]
        if enclosing and name in self.module_names:
            block = max(enclosing, key=len)
            raise ValueError(f'{name!r} is a layer inside block {block!r}: cuts name whole blocks, so use {block!r} '
                             f'(the layer names a CRP condition uses can be turned into cuts with '
                             f'canonizers.crp.cuts_for)')
        closest = difflib.get_close_matches(name, list(self.blocks), n=3, cutoff=0.)
        kind = 'is not a cuttable block' if name in self.module_names else 'is not a module of this model'
        raise ValueError(f'{name!r} {kind}; closest block names: {", ".join(map(repr, closest)) or "(none)"}')

    def _listing(self, limit: int = 12) -> str:
        names = list(self.blocks)
        shown = ', '.join(map(repr, names[:limit]))
        return shown + (f', ... ({len(names)} in all)' if len(names) > limit else '') if names else '(none)'

