'''Shared tools of the benchmarks: interleaved timing with medians, and peak memory of a call.'''
import statistics
import time
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
