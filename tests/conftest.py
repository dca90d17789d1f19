import os

import torch

# one thread per pytest-xdist worker: more threads than cores make OpenMP spin and slow everything down
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)
