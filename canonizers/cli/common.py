'''Constants of the command line, its error type and small helpers shared by its modules.'''
import argparse
import difflib
import os
import shutil
from pathlib import Path
from typing import Sequence

PROG = 'canonizers'
#: exit status of every usage error, as argparse uses
EXIT_USAGE = 2
DEMO = 'demo'
DEFAULT_COMPOSITE = 'epsilon_plus_flat'
DEFAULT_DEMO_LAYER = 'layer2.0.conv1'
DEFAULT_DEMO_OUT = Path('out', 'demo')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224
#: keys under which checkpoints commonly keep the state dict
CHECKPOINT_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')
CSV_NAME = 'heatmaps.csv'

NUMBERS = '''\
numbers (in the table, the CSV and the pictures):
  leaky         CRP conditional heatmap without isolation: relevance also flows
                around the conditioned layer, through the block's shortcut
  isolated      the same condition with the parallel paths around the layer cut
                (the canonizer's cut), so all relevance passes through the concept
  reference     CRP's exclude_parallel=True heatmap of the same condition
  relevance (R, *_sum)  the sum of a heatmap's pixels
  leaked share  sum|leaky - isolated| / (sum|isolated| + sum|leaky - isolated|):
                the share of the leaky heatmap's absolute relevance, split into its
                isolated and leaked (leaky - isolated) parts, that is leaked; in
                [0, 1], robust where positive and negative relevance cancel
  max deviation max|isolated - reference| / max|reference| (0 up to rounding)
'''


class UsageError(Exception):
    '''A problem with the arguments or inputs, reported as one line without traceback.'''


class Parser(argparse.ArgumentParser):
    '''Argument parser whose errors are :py:class:`UsageError` s, so that they are reported as one line.'''
    def error(self, message: str) -> None:
        raise UsageError(f'{message} (see {self.prog} --help)')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    '''Keeps the layout of descriptions and epilogs, with wider option columns.'''
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28, width=min(100, shutil.get_terminal_size((100, 24)).columns))


def closest(name: str, names: Sequence[str], count: int = 3) -> str:
    '''The names in ``names`` most similar to ``name``, for error messages.'''
    matches = difflib.get_close_matches(name, list(names), n=count, cutoff=0.)
    return ', '.join(map(repr, matches)) or '(none)'


def check_readable(path: Path, what: str) -> Path:
    '''``path`` if it is a readable file; else a :py:class:`UsageError` naming it.'''
    if not path.exists():
        raise UsageError(f'{what} {str(path)!r}: no such file')
    if not path.is_file():
        raise UsageError(f'{what} {str(path)!r}: not a file')
    if not os.access(path, os.R_OK):
        raise UsageError(f'{what} {str(path)!r}: not readable (permission denied)')
    return path
