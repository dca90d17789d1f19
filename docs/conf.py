'''Sphinx configuration of the zennit-canonizers documentation: ``make docs``, or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.

Everything builds offline: no intersphinx, so references to torch, zennit and CRP objects stay plain text
(``nitpicky`` is off, which leaves unresolved references unreported).'''
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import canonizers  # noqa: E402

project = 'zennit-canonizers'
author = 'the zennit-canonizers authors'
copyright = 'the zennit-canonizers authors, LGPL-3.0-or-later'
version = release = canonizers.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

# markdown: ``#anchor`` links to headings, ``{eval-rst}`` blocks, ``$...$`` maths as text
myst_heading_anchors = 3
myst_enable_extensions = ['colon_fence']

# the docstrings are numpy style, with :py:obj:/:py:class:/:py:func: roles
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# Attributes sections as field lists: autodoc documents the attributes of dataclasses and named tuples itself
napoleon_use_ivar = True
autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
# the docstrings of torch's and zennit's methods are theirs to render (and not all of them are valid reST)
autodoc_inherit_docstrings = False
autodoc_default_options = {'members': True, 'show-inheritance': True}
# no intersphinx (the docs build offline): references to torch, zennit and crp objects cannot resolve
nitpicky = False

html_theme = 'alabaster'
html_title = f'zennit-canonizers {release}'
html_static_path = []
