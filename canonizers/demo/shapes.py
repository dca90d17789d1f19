"""Seeded, deterministic generator of synthetic geometric-shape images.

Every image shows one large shape (the class) drawn with a random colour,
texture, size, position and rotation on a tinted, shaded, noisy background,
optionally with a few small distractors (dots and thin line segments) on top.
The class depends on the outline of the large shape only.

Pixel values are first rendered as RGB in ``[0, 1]`` and then, unless
``normalize=False``, normalised channel-wise as ``(rgb - MEAN) / STD`` with
``MEAN = 0.5`` and ``STD = 0.25`` for every channel, i.e. to ``[-2, 2]``.
Use :func:`denormalize` to get displayable RGB values back.

All random parameters are drawn up front from a :class:`numpy.random.Generator`
seeded with ``seed``; rendering is pure, chunked torch arithmetic, so the same
``(n, seed)`` always yields the same images, independent of the chunk size.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    'CLASSES',
    'IMAGE_SIZE',
    'MEAN',
    'STD',
    'denormalize',
    'make_dataset',
    'normalize',
    'sample_images',
]

CLASSES: tuple[str, ...] = ('circle', 'square', 'triangle', 'cross', 'star', 'ring')
IMAGE_SIZE: int = 64
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)

# at most this many distractors per image; a fixed maximum keeps the random stream independent of the drawn counts
_MAX_DISTRACTORS = 5
# rendering chunk size; small chunks keep the many [chunk, H, W] intermediates in cache (about 2x faster than 512)
_CHUNK = 64
_TEXTURES = ('solid', 'stripes', 'dots', 'checker')


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalise RGB images in ``[0, 1]`` to the model input range.

    Parameters
    ----------
    images : torch.Tensor
        Images of shape ``[N, 3, H, W]`` with values in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(images - MEAN) / STD``, channel-wise.
    """
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Invert :func:`normalize`, giving displayable RGB values.

    Parameters
    ----------
    images : torch.Tensor
        Normalised images of shape ``[N, 3, H, W]``.

    Returns
    -------
    torch.Tensor
        RGB images clipped to ``[0, 1]``.
    """
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std + mean).clamp(0., 1.)


def _sample_params(n: int, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Draw the random parameters of ``n`` images, always in the same order, so a seed fixes every image."""
    params: dict[str, np.ndarray] = {}

    # shape geometry: 'radius' is nominal; each shape scales it so the classes have comparable areas
    radius = rng.uniform(9.5, 22., n)
    margin = radius + 1.5
    params['radius'] = radius
    params['cx'] = rng.uniform(margin, size - margin)
    params['cy'] = rng.uniform(margin, size - margin)
    params['angle'] = rng.uniform(0., 2. * math.pi, n)
    params['ring_width'] = rng.uniform(0.3, 0.5, n)
    params['arm_width'] = rng.uniform(0.24, 0.36, n)
    params['star_sharpness'] = rng.uniform(3.0, 3.6, n)

    # background: dark or light base with a colour tint, a linear shading gradient and pixel noise
    base = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.3, n), rng.uniform(0.7, 1.0, n))
    background = np.clip(base[:, None] + rng.uniform(-0.15, 0.15, (n, 3)), 0., 1.)
    params['background'] = background
    params['grad_angle'] = rng.uniform(0., 2. * math.pi, n)
    params['grad_amp'] = rng.uniform(0., 0.15, n)
    params['noise'] = rng.uniform(0., 0.06, n)

    # foreground colours: both texture colours must stand out from the background so the outline stays visible
    fill = rng.uniform(0., 1., (n, 3))
    weak = np.abs(fill - background).mean(1) < 0.3
    fill[weak] = 1. - fill[weak]
    weak = np.abs(fill - background).mean(1) < 0.3
    fill[weak] = np.clip(1. - background[weak] + rng.uniform(-0.1, 0.1, (int(weak.sum()), 3)), 0., 1.)
    mix = rng.uniform(0.35, 0.65, n)[:, None]
    second = np.clip(mix * fill + (1. - mix) * (1. - background), 0., 1.)
    params['fill'] = fill
    params['second'] = second

    # texture of the shape
    params['texture'] = rng.integers(0, len(_TEXTURES), n)
    params['tex_period'] = rng.uniform(4., 9., n)
    params['tex_angle'] = rng.uniform(0., math.pi, n)
    params['tex_phase'] = rng.uniform(0., 1., (n, 2))
    params['tex_dot'] = rng.uniform(0.2, 0.35, n)

    # clutter: small dots and thin lines, much smaller than the smallest shape
    params['n_distractors'] = rng.integers(0, _MAX_DISTRACTORS + 1, n)
    params['d_kind'] = rng.integers(0, 2, (n, _MAX_DISTRACTORS))
    params['d_pos'] = rng.uniform(0., size, (n, _MAX_DISTRACTORS, 2))
    params['d_radius'] = rng.uniform(1.5, 3.5, (n, _MAX_DISTRACTORS))
    params['d_length'] = rng.uniform(5., 12., (n, _MAX_DISTRACTORS))
    params['d_width'] = rng.uniform(0.5, 1.0, (n, _MAX_DISTRACTORS))
    params['d_angle'] = rng.uniform(0., math.pi, (n, _MAX_DISTRACTORS))
    params['d_color'] = rng.uniform(0., 1., (n, _MAX_DISTRACTORS, 3))
    return params


def _star_sdf(px: torch.Tensor, py: torch.Tensor, radius: torch.Tensor, n: int, m: torch.Tensor) -> torch.Tensor:
    """Signed distance to a regular ``n``-gon (``m == 2``) or ``n``-pointed star (``2 < m < n``).

    Inigo Quilez' exact formulation, with ``radius`` the distance from the centre to the outer vertices.
    """
    an = math.pi / n
    en = math.pi / m
    ecs_x, ecs_y = torch.cos(en), torch.sin(en)
    bn = torch.remainder(torch.atan2(px, py), 2. * an) - an
    length = torch.sqrt(px * px + py * py)
    qx = length * torch.cos(bn) - radius * math.cos(an)
    qy = length * torch.abs(torch.sin(bn)) - radius * math.sin(an)
    h = torch.minimum(torch.clamp(-(qx * ecs_x + qy * ecs_y), min=0.), radius * math.sin(an) / ecs_y)
    qx = qx + ecs_x * h
    qy = qy + ecs_y * h
    return torch.sqrt(qx * qx + qy * qy) * torch.sign(qx)


def _box_sdf(px: torch.Tensor, py: torch.Tensor, half_x: torch.Tensor, half_y: torch.Tensor) -> torch.Tensor:
    """Signed distance to an axis-aligned box centred at the origin."""
    qx = px.abs() - half_x
    qy = py.abs() - half_y
    outside = torch.sqrt(qx.clamp(min=0.) ** 2 + qy.clamp(min=0.) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0.)


def _shape_sdf(label: int, px: torch.Tensor, py: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Signed distance in pixels to the shape of class ``label``, in shape-local coordinates."""
    r = p['radius']
    name = CLASSES[label]
    if name == 'circle':
        return torch.sqrt(px * px + py * py) - 0.8 * r
    if name == 'ring':
        outer = 0.85 * r
        width = p['ring_width'] * outer
        return (torch.sqrt(px * px + py * py) - (outer - 0.5 * width)).abs() - 0.5 * width
    if name == 'square':
        return _star_sdf(px, py, 0.95 * r, 4, torch.full_like(r, 2.))
    if name == 'triangle':
        return _star_sdf(px, py, 1.1 * r, 3, torch.full_like(r, 2.))
    if name == 'star':
        return _star_sdf(px, py, 1.05 * r, 5, p['star_sharpness'])
    if name == 'cross':
        long, short = 0.9 * r, p['arm_width'] * r
        return torch.minimum(_box_sdf(px, py, long, short), _box_sdf(px, py, short, long))
    raise ValueError(f'unknown class {label}')


def _coverage(sdf: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage of a pixel from its signed distance (in pixels)."""
    return (0.5 - sdf).clamp(0., 1.)


def _render(labels: torch.Tensor, p: dict[str, torch.Tensor], size: int, noise: torch.Tensor) -> torch.Tensor:
    """Render one chunk of RGB images in ``[0, 1]``."""
    n = len(labels)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing='ij')
    xs, ys = xs[None], ys[None]

    def col(key: str) -> torch.Tensor:
        return p[key][:, None, None]

    # background with a linear shading gradient across the image
    grad = (
        (xs - 0.5 * size) * torch.cos(col('grad_angle')) + (ys - 0.5 * size) * torch.sin(col('grad_angle'))
    ) / size * col('grad_amp')
    images = p['background'][:, :, None, None] + grad[:, None]

    # texture in image coordinates, so it does not rotate with the shape
    period = col('tex_period')
    cos_t, sin_t = torch.cos(col('tex_angle')), torch.sin(col('tex_angle'))
    tu = (xs * cos_t + ys * sin_t) / period + p['tex_phase'][:, 0, None, None]
    tv = (-xs * sin_t + ys * cos_t) / period + p['tex_phase'][:, 1, None, None]
    stripes = 0.5 + 0.5 * torch.tanh(3. * torch.sin(2. * math.pi * tu))
    checker = 0.5 + 0.5 * torch.tanh(3. * torch.sin(2. * math.pi * tu) * torch.sin(2. * math.pi * tv))
    dot_dist = torch.sqrt((torch.remainder(tu, 1.) - 0.5) ** 2 + (torch.remainder(tv, 1.) - 0.5) ** 2) * period
    dots = _coverage(dot_dist - col('tex_dot') * period)
    # patterns in the order of _TEXTURES; index 0 ('solid') keeps a zero texture
    texture = torch.zeros_like(stripes)
    for index, pattern in enumerate((stripes, dots, checker), start=1):
        texture = torch.where(col('texture') == index, pattern, texture)
    fill = (
        p['fill'][:, :, None, None] * (1. - texture[:, None]) + p['second'][:, :, None, None] * texture[:, None]
    )

    # the main shape, evaluated only for the images of each class
    cos_a, sin_a = torch.cos(col('angle')), torch.sin(col('angle'))
    dx, dy = xs - col('cx'), ys - col('cy')
    px = dx * cos_a + dy * sin_a
    py = -dx * sin_a + dy * cos_a
    sdf = torch.empty(n, size, size)
    for label in range(len(CLASSES)):
        select = labels == label
        if select.any():
            sub = {key: value[select][:, None, None] for key, value in p.items() if value.dim() == 1}
            sdf[select] = _shape_sdf(label, px[select], py[select], sub)
    alpha = _coverage(sdf)[:, None]
    images = images * (1. - alpha) + fill * alpha

    # distractors on top, possibly occluding parts of the shape, as clutter does in real images
    for k in range(_MAX_DISTRACTORS):
        active = (p['n_distractors'] > k).float()[:, None, None]
        ddx = xs - p['d_pos'][:, k, 0, None, None]
        ddy = ys - p['d_pos'][:, k, 1, None, None]
        dot_sdf = torch.sqrt(ddx * ddx + ddy * ddy) - p['d_radius'][:, k, None, None]
        cos_d, sin_d = torch.cos(p['d_angle'][:, k, None, None]), torch.sin(p['d_angle'][:, k, None, None])
        line_sdf = _box_sdf(
            ddx * cos_d + ddy * sin_d,
            -ddx * sin_d + ddy * cos_d,
            0.5 * p['d_length'][:, k, None, None],
            p['d_width'][:, k, None, None],
        )
        d_sdf = torch.where(p['d_kind'][:, k, None, None] == 0, dot_sdf, line_sdf)
        d_alpha = (_coverage(d_sdf) * active)[:, None]
        images = images * (1. - d_alpha) + p['d_color'][:, k, :, None, None] * d_alpha

    images = images + noise * col('noise')[:, None]
    return images.clamp(0., 1.)


def make_dataset(
    n: int,
    seed: int,
    *,
    size: int = IMAGE_SIZE,
    normalized: bool = True,
    clutter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a class-balanced, shuffled set of synthetic shape images.

    Parameters
    ----------
    n : int
        Number of images. Classes are balanced up to ``n % len(CLASSES)``.
    seed : int
        Seed of the random generator; equal ``(n, seed, size, clutter)`` give identical results.
    size : int, optional
        Height and width of the images in pixels. The demo model is trained on the default ``IMAGE_SIZE`` (64).
    normalized : bool, optional
        If True (default), return ``(rgb - MEAN) / STD`` as expected by the demo model; otherwise RGB in ``[0, 1]``.
    clutter : bool, optional
        If False, draw neither distractors nor pixel noise (the same random stream is used, so the shapes stay
        identical to the cluttered version).

    Returns
    -------
    images : torch.Tensor
        Float32 tensor of shape ``[n, 3, size, size]``.
    labels : torch.Tensor
        Int64 tensor of shape ``[n]``, indices into :data:`CLASSES`.
    """
    if n < 0:
        raise ValueError(f'n must be non-negative, got {n}')
    rng = np.random.default_rng(seed)
    labels_np = rng.permutation(np.arange(n) % len(CLASSES))
    # scale the geometry with the image size so that other sizes show the same scenes
    params_np = _sample_params(n, rng, IMAGE_SIZE)
    noise_seed = int(rng.integers(0, 2 ** 31 - 1))
    scale = size / IMAGE_SIZE
    for key in ('radius', 'cx', 'cy', 'd_pos', 'd_radius', 'd_length', 'd_width'):
        params_np[key] = params_np[key] * scale
    params_np['tex_period'] = params_np['tex_period'] * scale
    if not clutter:
        params_np['n_distractors'] = np.zeros_like(params_np['n_distractors'])
        params_np['noise'] = np.zeros_like(params_np['noise'])

    labels = torch.from_numpy(labels_np).long()
    params = {
        key: torch.from_numpy(value).to(torch.int64 if value.dtype.kind == 'i' else torch.float32)
        for key, value in params_np.items()
    }
    # a separate stream for the pixel noise, drawn chunk by chunk in image order
    noise_rng = np.random.default_rng(noise_seed)
    images = torch.empty(n, 3, size, size)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        noise = torch.from_numpy(noise_rng.standard_normal((stop - start, 3, size, size), dtype=np.float32))
        chunk = {key: value[start:stop] for key, value in params.items()}
        images[start:stop] = _render(labels[start:stop], chunk, size, noise)
    if normalized:
        images = normalize(images)
    return images, labels


def sample_images(seed: int = 0, *, normalized: bool = True, clutter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate one image per class, in the order of :data:`CLASSES`.

    Parameters
    ----------
    seed : int, optional
        Seed of the random generator.
    normalized : bool, optional
        If True (default), return model inputs; otherwise RGB in ``[0, 1]``.
    clutter : bool, optional
        If False, draw neither distractors nor pixel noise.

    Returns
    -------
    images : torch.Tensor
        Float32 tensor of shape ``[len(CLASSES), 3, IMAGE_SIZE, IMAGE_SIZE]``.
    labels : torch.Tensor
        ``torch.arange(len(CLASSES))``.
    """
    images, labels = make_dataset(len(CLASSES), seed, normalized=normalized, clutter=clutter)
    order = torch.argsort(labels)
    return images[order], labels[order]
