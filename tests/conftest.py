import os

import pytest
import torch

# one thread per pytest-xdist worker: more threads than cores make OpenMP spin and slow everything down
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)


@pytest.fixture(scope='module')
def single_thread():
    '''Run a module single-threaded (``pytestmark = pytest.mark.usefixtures('single_thread')``): the many small
    tensor operations of the demo and the command line slow down badly on busy, shared cores with more threads.'''
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_report_header(config):
    import zennit

    try:
        from importlib.metadata import version
        zennit_version = version('zennit')
    except Exception:
        zennit_version = 'unknown'
    # PYTHONPATH may put another zennit first than the installed distribution says
    return f'zennit imported from {zennit.__file__} (installed distribution: {zennit_version})'
