'''The documentation builds without a single warning, and documents every public name.

``make docs`` builds it into ``docs/_build/html``; this test builds it into a temporary directory, with the same
warnings-are-errors options, so that ``make test`` catches a broken docstring, link or page.
'''
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import canonizers

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'

for _module in ('sphinx', 'myst_parser'):
    pytest.importorskip(_module, reason=f'{_module} is not installed: pip install -e ".[docs]" (make test installs it)')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    '''The HTML documentation, built as ``make docs`` builds it; fails on any warning, naming them all.'''
    out = tmp_path_factory.mktemp('html')
    process = subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html', '-d', str(out / '.doctrees'),
         str(DOCS), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0 and not process.stderr.strip(), f'sphinx-build failed:\n{process.stderr}'
    return out


def documented_ids(out: Path):
    return {match for path in out.rglob('*.html') for match in re.findall(r'id="([\w.\-]+)"', path.read_text())}


def test_docs_build_without_warnings(built):
    assert (built / 'index.html').exists()
    assert (built / '_images' / 'demo.png').exists()


def test_every_public_name_is_documented(built):
    ids = documented_ids(built)
    missing = [f'canonizers.{name}' for name in canonizers.__all__ if f'canonizers.{name}' not in ids]
    for module in ('canonizers.crp', 'canonizers.graph', 'canonizers.cli', 'canonizers.demo'):
        public = importlib.import_module(module).__all__ if module != 'canonizers.crp' else ['cuts_for',
                                                                                           'IsolatingCondAttribution']
        missing += [f'{module}.{name}' for name in public if f'{module}.{name}' not in ids
                    and f'canonizers.{name}' not in ids]
    assert not missing, f'not in the API reference (docs/api/*.rst): {missing}'


def test_every_module_has_an_api_page(built):
    ids = documented_ids(built)
    modules = ['canonizers'] + [info.name for info in pkgutil.walk_packages(canonizers.__path__, 'canonizers.')]
    missing = [name for name in modules if f'module-{name}' not in ids]
    assert not missing, f'modules without an automodule in docs/api/*.rst: {missing}'


def test_readme_is_a_front_page():
    readme = (ROOT / 'README.md').read_text()
    assert len(readme.splitlines()) <= 200
    # its links into the docs point at pages that exist
    for link in re.findall(r'\]\((docs/[^)#\s]+)', readme):
        assert (ROOT / link).exists(), link
