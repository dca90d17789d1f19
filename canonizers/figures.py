'''Pictures of leaky and isolated CRP conditional heatmaps, as written by the ``canonizers`` command line.

Heatmaps are drawn with a red-white-blue colour map centred at 0 (red positive, blue negative relevance), each with
its own symmetric range ``[-b, b]``, ``b`` the :py:data:`RANGE_PERCENTILE` th percentile of its absolute values, so
that the pattern of every heatmap is visible whatever its magnitude and a few extreme pixels do not wash it out
(pixels beyond are drawn at full colour); the magnitudes are in the labels.
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
COLORBAR_SPACE = 0.65
DPI = 100


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
    '''The picture of one image: the input, its class heatmap, and per concept the leaky, isolated and leaked
    heatmaps side by side.

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
        The picture; not attached to pyplot, so it needs no closing.
    '''
    from matplotlib.figure import Figure

    rows = 1 + len(concepts)
    # long layer names would run off the figure
    heading = textwrap.fill(heading, 75)
    extra = 0.17 * heading.count('\n')
    # margins in inches: the heading on top, the row labels on the left
    top, left = 0.85 + extra, 0.55
    width, height = 3 * PANEL_SIZE + 0.6 + COLORBAR_SPACE, rows * (PANEL_SIZE + 0.45) + 0.5 + extra
    figure = Figure(figsize=(width, height), dpi=DPI)
    axes = figure.subplots(rows, 3, squeeze=False)
    figure.suptitle(heading, fontsize=9.5)

    draw_image(axes[0, 0], image, image_title)
    draw_heatmap(axes[0, 1], class_heatmap, class_title)
    _legend(axes[0, 2])

    drawn = []
    for row, panels in zip(axes[1:], concepts):
        leaked = panels.leaky - panels.isolated
        # one scale for the row: leaky, isolated and leaked are parts of one another, so their magnitudes must
        # compare (each on its own scale, a small isolated heatmap would look as strong as the leaky one)
        bound = max(color_bound(_as_array(values)) for values in (panels.leaky, panels.isolated, leaked))
        share = 'no relevance' if math.isnan(panels.leaked_share) else f'{panels.leaked_share:.0%} leaked'
        draw_heatmap(row[0], panels.leaky, f'leaky  R={relevance_label(panels.leaky.sum().item())}\n{share}', bound)
        draw_heatmap(row[1], panels.isolated, f'isolated  R={relevance_label(panels.isolated.sum().item())}', bound)
        title = f'leaked = leaky - isolated\nR={relevance_label(leaked.sum().item())}'
        drawn.append(draw_heatmap(row[2], leaked, title, bound))
        row[0].set_ylabel(f'concept {panels.concept}\nR at layer {relevance_label(panels.relevance)}', fontsize=8.5)

    right = COLORBAR_SPACE / width
    figure.subplots_adjust(left=left / width, right=1 - right, bottom=0.1 / height, top=1 - top / height,
                           wspace=0.08, hspace=0.45 / PANEL_SIZE * 1.1)
    for row, image in zip(axes[1:], drawn):
        # the row's colour bar, right of its last panel
        box = row[2].get_position()
        bar = figure.add_axes([box.x1 + 0.08 / width, box.y0, 0.1 / width, box.height])
        figure.colorbar(image, cax=bar).ax.tick_params(labelsize=6.5)
    return figure


def _legend(ax) -> None:
    ax.axis('off')
    ax.text(0., 1., (
        'rows: concepts (channels)\nof the layer\n\n'
        'leaky: CRP, relevance also\nflows around the layer\n'
        'isolated: parallel paths cut\n\n'
        'R: sum of the heatmap\n'
        'leaked: share of |relevance|\nthrough parallel paths\n\n'
        f'red +, blue -; one colour\nscale per row (bar on the\nright): the {RANGE_PERCENTILE:g}th percentile\nof |R| '
        'of its three heatmaps'
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
