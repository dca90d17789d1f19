'''The house: no import cycles between the package's modules (imports inside functions included), no module over
500 lines, and the families built on the core alone.'''
import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'canonizers'
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = ('canonizers',) + path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}


def imports_of(name: str) -> Set[str]:
    '''The modules of the package that module ``name`` imports, anywhere in it (inside functions too).'''
    path = MODULES[name]
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                origin = '.'.join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ''
            for alias in node.names:
                # `from . import demo` imports a module; `from .cuts import SKIP` a name of one
                submodule = f'{origin}.{alias.name}'
                found.add(submodule if submodule in MODULES else origin)
    return {module for module in found if module in MODULES and module != name}


GRAPH: Dict[str, Set[str]] = {name: imports_of(name) for name in MODULES}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    '''One cycle per strongly connected component with more than one module (Tarjan's algorithm).'''
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_function_level_imports():
    assert cycles({'a': {'b'}, 'b': {'a'}, 'c': set()}) == [['a', 'b']]
    assert 'canonizers.graph' in GRAPH['canonizers.crp.planning']


def test_no_import_cycles():
    assert not cycles(GRAPH), f'import cycles: {cycles(GRAPH)}'


@pytest.mark.parametrize('name', sorted(MODULES))
def test_module_is_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f'{name} has {lines} lines (at most {MAX_LINES})'


def test_the_core_imports_nothing_else_of_the_package():
    core = [name for name in MODULES if name.startswith('canonizers.core')]
    outside = {name: sorted(other for other in GRAPH[name] if not other.startswith('canonizers.core'))
               for name in core}
    assert core and not any(outside.values()), outside


def test_the_families_import_only_the_core():
    families = [name for name in MODULES if name.startswith('canonizers.families.')]
    outside = {name: sorted(other for other in GRAPH[name] if not other.startswith('canonizers.core'))
               for name in families}
    assert families and not any(outside.values()), outside
