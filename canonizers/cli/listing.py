'''``canonizers blocks``: the cuttable blocks of a model, their branches and the layers a condition may name.'''
import argparse
import shutil
import textwrap
from typing import Dict, List, Sequence

import torch

from ..core.cuts import RESIDUAL, SKIP
from ..core.family import FamilyCanonizer
from ..registry import families_for
from .models import build_architecture, check_model_name, graph_canonizer


def block_layers(family: FamilyCanonizer, model: torch.nn.Module) -> Dict[str, Dict[str, List[str]]]:
    '''Per cuttable block, per branch, the convolutional and linear layers (relative names, with their channels)
    whose innermost cuttable block it is: the layers a CRP condition may name.'''
    from zennit.types import Linear

    layers: Dict[str, Dict[str, List[str]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        try:
            cut = family.layer_cuts(model, [name])
        except ValueError:
            # layers a condition may not name (gate layers, shared ReLUs) are not listed
            continue
        branches = family.blocks(model)
        for block, cut_branches in cut.items():
            cut_branches = {cut_branches} if isinstance(cut_branches, str) else set(cut_branches)
            # GraphCanonizer names the inputs of a merge by number, and by skip/residual where they split so
            named = [branch for branch in branches.get(block, ()) if branch in (SKIP, RESIDUAL)]
            # the branch that holds the layer: the one its isolating cut leaves
            held = '/'.join(branch for branch in named or branches.get(block, ())
                            if branch not in cut_branches) or '-'
            channels = getattr(module, 'out_channels', getattr(module, 'out_features', '?'))
            holder = _module_of(block)
            relative = name[len(holder) + 1:] if holder and name.startswith(holder + '.') else name
            layers.setdefault(block, {}).setdefault(held, []).append(f'{relative} ({channels})')
    return layers


def _module_of(block: str) -> str:
    '''The module that holds a block: GraphCanonizer names a merge by that module, with ``:k`` where it holds
    several (``:k`` alone for the model's own forward).'''
    return block.split(':')[0]


def blocks_table(model: torch.nn.Module, families: Sequence[FamilyCanonizer], width: int) -> str:
    '''The table of ``canonizers blocks``, its last column wrapped to ``width`` characters.'''
    modules = dict(model.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    rows = []
    for family in families:
        layers = block_layers(family, model)
        blocks = family.blocks(model)
        for block, branches in blocks.items():
            listing = [f'{branch}: {", ".join(names)}' for branch, names in layers.get(block, {}).items()]
            nested = any(other.startswith(block + '.') for other in blocks)
            rows.append((block, type(modules[_module_of(block)]).__name__, ', '.join(branches),
                         listing or ['- (see the blocks inside it)' if nested else '-']))
    # in the model's order, so that nested blocks follow the block that holds them
    rows.sort(key=lambda row: (order[_module_of(row[0])], row[0]))
    header = ('block', 'type', 'can cut', ['condition layers by branch (channels)'])
    rule = tuple('-' * len(text) for text in header[:3]) + (['-' * len(header[3][0])],)
    widths = [max(len(row[column]) for row in [header] + rows) for column in range(3)]
    last = max(30, width - sum(widths) - 2 * len(widths) - 1)
    lines = []
    for *cells, listing in [header, rule] + rows:
        prefix = '  '.join(text.ljust(size) for text, size in zip(cells, widths)) + '  '
        lines += [(prefix if number == 0 else ' ' * len(prefix)) + text
                  for number, text in enumerate(wrap_listing(listing, last))]
    return '\n'.join(line.rstrip() for line in lines)


def wrap_listing(parts: Sequence[str], width: int) -> List[str]:
    '''``parts`` joined by ``"; "`` on one line if it fits, else one part per line, each wrapped to ``width``.'''
    joined = '; '.join(parts)
    if len(joined) <= width:
        return [joined]
    return [line for part in parts for line in textwrap.wrap(part, width, subsequent_indent='  ',
                                                               break_on_hyphens=False)]


def command_blocks(args: argparse.Namespace) -> int:
    '''``canonizers blocks``.'''
    check_model_name(args.model)
    model = build_architecture(args.model)
    # a model no family canonizer fits: the graph canonizer, if torch.fx can trace it
    families = families_for(model) or [graph_canonizer(args.model, model)()]
    if not any(family.blocks(model) for family in families):
        print(f'model {args.model!r} has no parallel paths (traced with torch.fx): CRP conditions on its layers need '
              'no isolation, and there is nothing to cut')
        return 0
    width = shutil.get_terminal_size((120, 24)).columns
    print(f'{args.model}: {", ".join(type(family).__name__ for family in families)}')
    print(blocks_table(model, families, width))
    total = sum(len(family.blocks(model)) for family in families)
    example = next(iter(_example_layer(model, families)), 'BLOCK.LAYER')
    print()
    print(textwrap.fill(
        f'{total} cuttable blocks. A condition names a layer in full (block + "." + layer, e.g. --layer {example}); '
        'isolating it cuts the other branch of its block: the skip for a layer in the residual branch, the residual '
        'branch for one in the skip.', min(width, 100)))
    return 0


def _example_layer(model: torch.nn.Module, families: Sequence[FamilyCanonizer]) -> List[str]:
    for family in families:
        for block, branches in block_layers(family, model).items():
            for names in branches.values():
                holder = _module_of(block)
                layer = names[0].split(' ')[0]
                return [f'{holder}.{layer}' if holder and not layer.startswith(holder + '.') else layer]
    return []
