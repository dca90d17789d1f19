'''Pictures of leaky and isolated CRP conditional heatmaps, as written by the ``canonizers`` command line.

Heatmaps are drawn with a red-white-blue colour map centred at 0 (red positive, blue negative relevance) on a
symmetric range ``[-b, b]``, ``b`` the :py:data:`RANGE_PERCENTILE` th percentile of the absolute values, so that a
few extreme pixels do not wash the pattern out (pixels beyond are drawn at full colour). Per concept, the leaky and
the isolated heatmap are drawn on one *shared* scale, so that their magnitudes compare, and the isolated heatmap once
more on its *own* scale, so that its structure shows however much of the leaky relevance went around the layer.
'''
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

#: the colour map of all heatmaps: red positive, white 0, blue negative
HEATMAP_CMAP = 'bwr'
#: percentile of a heatmap's absolute values that bounds its colour range
RANGE_PERCENTILE = 99.5
#: inches per panel
PANEL_SIZE = 2.0
#: inches right of the panels for the colour bars
COLORBAR_SPACE = 0.85
#: inches between the shared-scale panels and the own-scale panel, for the shared scale's colour bar
GAP = 0.35
DPI = 100
#: the titles' names of the two colour scales of a concept's row
SHARED, OWN = 'shared scale', 'own scale'


@dataclass
class ConceptPanels:
    '''What the picture shows of one concept.

    Parameters
    ----------
    concept: int
        The concept (channel) index.
    relevance: float
        The concept's relevance at its layer for the target class.
    leaky: :py:obj:`torch.Tensor`
        Conditional heatmap without isolation, ``[H, W]``.
    isolated: :py:obj:`torch.Tensor`
        Conditional heatmap with the parallel paths cut, ``[H, W]``.
    leaked_share: float
        See :py:func:`canonizers.leakage.leaked_share`.
    '''
    concept: int
    relevance: float
    leaky: torch.Tensor
    isolated: torch.Tensor
    leaked_share: float


def _as_array(tensor: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu().double().numpy()
    return np.asarray(tensor)


def relevance_label(value: float) -> str:
    '''A relevance for a label: signed, three significant digits.'''
    return f'{value:+.3g}'


def color_bound(heatmap: np.ndarray) -> float:
    '''The bound ``b`` of the symmetric colour range ``[-b, b]`` of ``heatmap``: the :py:data:`RANGE_PERCENTILE` th
    percentile of its absolute values, its maximum if that is 0, and 1 for an all-zero heatmap.'''
    magnitudes = np.abs(heatmap).ravel()
    if not magnitudes.size or not magnitudes.max() > 0.:
        return 1.
    bound = float(np.percentile(magnitudes, RANGE_PERCENTILE))
    return bound if bound > 0. else float(magnitudes.max())


def draw_heatmap(ax, heatmap: Union[torch.Tensor, np.ndarray], title: str, bound: Optional[float] = None):
    '''Draw one heatmap on ``ax`` with a colour range symmetric about 0.

    Parameters
    ----------
    ax: :py:obj:`matplotlib.axes.Axes`
        Where to draw.
    heatmap: :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        ``[H, W]``.
    title: str
        The panel's title.
    bound: float, optional
        The colour range ``[-bound, bound]``; the heatmap's own :py:func:`color_bound` by default.

    Returns
    -------
    :py:obj:`matplotlib.image.AxesImage`
        The drawn image (for a colour bar).
    '''
    values = _as_array(heatmap)
    bound = color_bound(values) if bound is None else bound
    image = ax.imshow(values, cmap=HEATMAP_CMAP, vmin=-bound, vmax=bound, interpolation='nearest')
    _frame(ax, title)
    return image


def draw_image(ax, image: Union[torch.Tensor, np.ndarray], title: str) -> None:
    '''Draw an RGB image ``[H, W, 3]`` with values in ``[0, 1]`` on ``ax``.'''
    ax.imshow(np.clip(_as_array(image), 0., 1.), interpolation='nearest')
    _frame(ax, title)


def _frame(ax, title: str) -> None:
    ax.set_title(title, fontsize=8.5)
    ax.set_xticks([])
    ax.set_yticks([])


def explanation_figure(
    image: Union[torch.Tensor, np.ndarray],
    class_heatmap: Union[torch.Tensor, np.ndarray],
    concepts: Sequence[ConceptPanels],
    *,
    image_title: str,
    class_title: str,
    heading: str,
):
    '''The picture of one image: the input, its class heatmap, and per concept the leaky and the isolated heatmap on
    one shared colour scale, and the isolated heatmap on its own.

    The leaked part (leaky minus isolated) is not drawn: it is what the leaky heatmap shows beyond the isolated one;
    its sum and share are in the leaky panel's title.

    Parameters
    ----------
    image: :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        The input as RGB in ``[0, 1]``, ``[H, W, 3]``.
    class_heatmap: :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        The heatmap of the target class, ``[H, W]``.
    concepts: sequence of :py:class:`ConceptPanels`
        One row each.
    image_title: str
        Title of the input panel (e.g. the prediction).
    class_title: str
        Title of the class heatmap panel (e.g. the target).
    heading: str
        The figure's heading.

    Returns
    -------
    :py:obj:`matplotlib.figure.Figure`
        The picture; not attached to pyplot, so it needs no closing. Its axes are, in order: the input, the class
        heatmap, the legend, then per concept the leaky (shared scale), isolated (shared scale) and isolated (own
        scale) panels, then per concept the shared and the own colour bar.
    '''
    from matplotlib.figure import Figure

    rows = 1 + len(concepts)
    # long layer names would run off the figure
    heading = textwrap.fill(heading, 75)
    extra = 0.17 * heading.count('\n')
    # margins in inches: the heading on top, the row labels on the left
    top, left = 0.85 + extra, 0.55
    width = 3 * PANEL_SIZE + 2 * GAP + 0.6 + COLORBAR_SPACE
    height = rows * (PANEL_SIZE + 0.45) + 0.5 + extra
    figure = Figure(figsize=(width, height), dpi=DPI)
    # a gap column between the shared-scale panels and the own-scale one holds the shared scale's colour bar
    grid = figure.add_gridspec(rows, 4, width_ratios=[PANEL_SIZE, PANEL_SIZE, 2 * GAP, PANEL_SIZE],
                               left=left / width, right=1 - COLORBAR_SPACE / width, bottom=0.1 / height,
                               top=1 - top / height, wspace=0.04, hspace=0.45 / PANEL_SIZE * 1.1)
    figure.suptitle(heading, fontsize=9.5)

    draw_image(figure.add_subplot(grid[0, 0]), image, image_title)
    draw_heatmap(figure.add_subplot(grid[0, 1]), class_heatmap, class_title)
    _legend(figure.add_subplot(grid[0, 2:]))

    bars = []
    for row, panels in enumerate(concepts, start=1):
        leaked = panels.leaky - panels.isolated
        # leaky and isolated on one scale: the isolated heatmap is a part of the leaky one, so their magnitudes must
        # compare; the isolated one again on its own scale, where its structure shows however faint it is there
        shared = max(color_bound(_as_array(values)) for values in (panels.leaky, panels.isolated))
        leaky_sum, isolated_sum = (relevance_label(values.sum().item()) for values in (panels.leaky, panels.isolated))
        share = ('no relevance' if math.isnan(panels.leaked_share)
                 else f'{panels.leaked_share:.0%} leaked ({relevance_label(leaked.sum().item())})')
        leaky_ax, shared_ax, own_ax = (figure.add_subplot(grid[row, column]) for column in (0, 1, 3))
        shared_image = draw_heatmap(leaky_ax, panels.leaky, f'leaky, {SHARED}\nR={leaky_sum}, {share}', shared)
        draw_heatmap(shared_ax, panels.isolated, f'isolated, {SHARED}\nR={isolated_sum}', shared)
        own_image = draw_heatmap(own_ax, panels.isolated, f'isolated, {OWN}\nR={isolated_sum}')
        leaky_ax.set_ylabel(f'concept {panels.concept}\nR at layer {relevance_label(panels.relevance)}',
                            fontsize=8.5)
        bars.append((shared_ax, shared_image, own_ax, own_image))

    for shared_ax, shared_image, own_ax, own_image in bars:
        # the shared scale's bar right of the isolated panel on it, the own scale's right of the last panel
        for ax, image in ((shared_ax, shared_image), (own_ax, own_image)):
            box = ax.get_position()
            bar = figure.add_axes([box.x1 + 0.06 / width, box.y0, 0.1 / width, box.height])
            figure.colorbar(image, cax=bar).ax.tick_params(labelsize=6.5)
    return figure


def _legend(ax) -> None:
    ax.axis('off')
    ax.text(0.1, 1., (
        'rows: concepts (channels) of the layer\n\n'
        'leaky: CRP, relevance also flows\naround the layer (x% of it leaked)\n'
        'isolated: all relevance passed the layer\n\n'
        'R: sum of the heatmap\n\n'
        'red +, blue -; colour range: the\n'
        f'{RANGE_PERCENTILE:g}th percentile of |R|, bar at right\n'
        'shared scale: leaky and isolated on one\nscale, their magnitudes compare\n'
        'own scale: the isolated heatmap alone,\nits structure shows'
    ), transform=ax.transAxes, va='top', ha='left', fontsize=7.5, linespacing=1.25)


def save_figure(figure, path: Union[str, Path], dpi: Optional[int] = None) -> Path:
    '''Write ``figure`` as a PNG.

    Parameters
    ----------
    figure: :py:obj:`matplotlib.figure.Figure`
        The picture.
    path: str or :py:obj:`pathlib.Path`
        Where to write it.
    dpi: int, optional
        Resolution; :py:data:`DPI` by default.

    Returns
    -------
    :py:obj:`pathlib.Path`
        ``path``.
    '''
    path = Path(path)
    figure.savefig(path, dpi=dpi or DPI, format='png')
    return path
