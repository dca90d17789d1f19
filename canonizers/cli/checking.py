'''``canonizers check``: the support report of one model, and the warning ``explain`` and ``demo`` print with it.'''
import argparse
from typing import Optional, Sequence

import torch

from ..leakage import FLOAT32_ROUNDING
from .common import DEMO, IMAGENET_SIZE, UsageError
from .models import build_architecture, check_model_name, timm_name

#: the largest deviation of an isolated heatmap from CRP's reference that float32 rounding explains (larger ones are
#: measured again in float64 by :py:func:`canonizers.leakage.compare_heatmaps`)
ROUNDING = FLOAT32_ROUNDING


def default_size(name: str, model: torch.nn.Module) -> int:
    '''The input size a model is checked at: the demo's 64, timm's declared input size, or 224.'''
    from .. import demo

    if name == DEMO:
        return demo.IMAGE_SIZE
    if timm_name(name) is not None:
        config = getattr(model, 'pretrained_cfg', None) or {}
        return int(config.get('input_size', (3, IMAGENET_SIZE, IMAGENET_SIZE))[-1])
    return IMAGENET_SIZE


def command_check(args: argparse.Namespace) -> int:
    '''``canonizers check``: print the report; exit status 0 supported, 1 not conservative, 2 refused.'''
    from .. import demo
    from ..evaluation import randomize_batch_norms
    from ..support import check

    check_model_name(args.model)
    if args.size is not None and args.size < 1:
        raise UsageError(f'--size {args.size}: must be a positive number of pixels')
    if args.model == DEMO:
        model, weights = demo.load_demo_model(), 'the embedded weights'
    else:
        torch.manual_seed(args.seed)
        # random weights, and random batch-norm statistics: a fresh batch norm is the identity and tests nothing
        model = randomize_batch_norms(build_architecture(args.model), seed=args.seed)
        weights = f'random weights and batch-norm statistics, seed {args.seed}'
    size = args.size or default_size(args.model, model)
    data = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    print(f'checking {args.model} ({weights}) on a random {size}x{size} input')
    report = check(model, data, progress=True)
    print(report)
    return report.exit_code


def verdict_warning(model: torch.nn.Module, data: torch.Tensor) -> Optional[str]:
    '''The warning ``explain`` and ``demo`` print above their table where ``model`` is not supported, else None.'''
    from ..support import check

    report = check(model, data[:1])
    if report.supported and report.input_shape is not None:
        # check traced it for one input shape; explain canonizes it for any, where timm's modules and functions that
        # branch on shapes stay whole: warned about where that loses relevance (timm's Swin keeps no loss there)
        from ..graph.compiled import compiled_for
        from ..graph.conservation import listing

        try:
            whole = [operation.describe() for operation in compiled_for(model).operations]
        except ValueError as error:
            whole = [str(error).splitlines()[0]]
        if not whole:
            return None
        return (f'warning: {report.model} branches on shapes, and explain keeps the modules and functions that do '
                f'whole ({listing(whole, 2)}; relevance through them is not conserved, paths inside them are not '
                f'cut); canonizers check traces it for one input shape, as GraphCanonizer(input_shape='
                f'{report.input_shape}) does')
    if report.supported:
        return None
    return f'warning: {report.verdict} (see: canonizers check)'


def deviation_warnings(rows: Sequence[dict]) -> Sequence[str]:
    '''Warnings for isolated heatmaps that deviate from CRP's reference more than float32 rounding explains.'''
    flagged = [row for row in rows if row.get('max_deviation') not in (None, '') and float(row['max_deviation'])
               > ROUNDING]
    return [f"warning: the isolated heatmap of concept {row['concept']} of {row['image']} deviates from CRP's "
            f"reference by {float(row['max_deviation']):.2g} (max relative), above float32 rounding ({ROUNDING:g}): "
            'it is not the isolated heatmap' for row in flagged]
