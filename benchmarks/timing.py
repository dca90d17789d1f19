'''Shared tools of the benchmarks: interleaved timing with medians, and peak memory of a call in a fresh process.'''
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(functions: Dict[str, Callable[[], None]], repeats: int, device: torch.device,
                warmup: int = 1) -> Dict[str, List[float]]:
    '''Time each function ``repeats`` times, taking turns, so that drifts of the machine hit all alike.

    Parameters
    ----------
    functions: dict of str to callable
        The functions to time, by label.
    repeats: int
        Number of timed rounds.
    device: :py:obj:`torch.device`
        Device to synchronise before reading the clock.
    warmup: int
        Untimed rounds first.

    Returns
    -------
    dict of str to list of float
        The times in seconds, per label.
    '''
    times = {label: [] for label in functions}
    for round_ in range(warmup + repeats):
        for label, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            if round_ >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


def median(values: List[float]) -> float:
    return statistics.median(values)


def table(header: List[str], rows: List[List[object]]) -> str:
    '''A plain-text table with aligned columns.'''
    cells = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    lines = ['  '.join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


def fresh_process_peak(command: List[str]) -> float:
    '''The number a benchmark prints when run as ``command`` in a fresh process (its peak memory in MiB), so that
    earlier runs in this process do not count.'''
    # glibc serves large blocks by mmap and returns freed memory at once: the resident set then follows the live
    # tensors to within a fraction of a MiB, instead of varying by a few percent with the heap's fragmentation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    return float(subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout.strip())


def resident_kib(field: str) -> int:
    '''A memory figure of this process from /proc/self/status, in KiB.'''
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def peak_of(function: Callable[[], object], device: torch.device) -> float:
    '''Peak memory in MiB that ``function`` adds: allocated on a GPU, resident on a CPU.'''
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        function()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    # ru_maxrss may carry the parent's peak over the fork: reset the kernel's high-water mark instead
    Path('/proc/self/clear_refs').write_text('5')
    base = resident_kib('VmRSS')
    function()
    return (resident_kib('VmHWM') - base) / 2 ** 10
