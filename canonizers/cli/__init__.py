'''The ``canonizers`` command line: the cuttable blocks of a model, and CRP conditional heatmaps with and without
isolation, as pictures, a CSV and a table.

Every problem with the arguments or the input files is found before any heatmap is computed, and reported as one
line on stderr with exit status 2. One module per job: :py:mod:`.models` (models and weights), :py:mod:`.inputs`
(arguments and inputs checked against the model), :py:mod:`.explaining` (``explain`` and ``demo``), :py:mod:`.listing`
(``blocks``), :py:mod:`.parser` (the parser and :py:func:`main`).
'''
from .common import DEFAULT_DEMO_LAYER, UsageError
from .explaining import format_table
from .inputs import read_image
from .parser import build_parser, main

__all__ = ['DEFAULT_DEMO_LAYER', 'UsageError', 'build_parser', 'format_table', 'main', 'read_image']
