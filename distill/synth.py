"""Synthetic vessel images with exact polygon annotations: the embedded default dataset.

Why synthetic: the whole pipeline (polygons -> raster, teacher cache, distillation, threshold sweeps)
must run without private data, on data that is hard in the same way as the real task. So the vessels
are recursive branching trees that taper down to one pixel, curve smoothly, cross each other and fade
as they thin, on fundus-like or angiogram-like backgrounds with uneven illumination, noise and blur:
a global intensity threshold finds the trunks and misses the thin branches.

Geometry first, pixels second. Each branch is a centre line with a radius per point; its annotation
is ONE polygon (a ribbon: left offset curve, round cap, reversed right offset curve, round cap), the
mask is the exact raster of those polygons (`rasterize_polygons`, pixel-centre rule), and the image
is rendered from the same centre lines and radii (soft coverage from the distance to them), so image
and mask agree to a fraction of a pixel. Trees are grown in 512-pixel units and scaled, so widths
go from ~6-8 px at 512 (proportionally less at smaller sizes) down to 1 px at every size.

Same seed, same bytes: every random draw comes from one `numpy.random.Generator` seeded by the
caller; `make_dataset` derives per-image seeds from (seed, index), so a dataset of N images is a
prefix of the one with more images and the same seed.

    python -m distill.synth --out data/synthetic --count 96 --size 192 --style fundus --seed 0   # make demo's
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from distill.data.rasterize import rasterize_polygons
from distill.data.writers import WRITERS, write_dataset
from distill.errors import ConfigError

STYLES = ("fundus", "angiogram")
TEXT = "blood vessel"
REFERENCE_SIZE = 512  # trees are grown in these units, then scaled to the requested size
STEP = 3.0  # centre-line step in reference pixels: fine enough for smooth curves, few polygon vertices
MIN_RADIUS = 0.5  # output pixels: a 1-px-wide vessel, the thinnest the pixel-centre rule draws without gaps
MAX_TURN = math.radians(
    75
)  # a branch never turns further than this from its start, so it cannot cross itself
THINNEST = 0.4  # output px: thinner children are not grown (they would vanish at this resolution)
TAPER = 1.5  # exponent of the radius profile along a branch
CHUNK = 12  # segments rendered together (vectorised) per bounding box


@dataclass
class SynthSample:
    """One generated image with its annotation.

    image: HxWx3 uint8 RGB. mask: HxW uint8 0/1, exactly `rasterize_polygons(polygons)`.
    polygons: one flat [x1, y1, x2, y2, ...] list per branch, COCO pixel convention, 2 decimals.
    roi: HxW bool, the camera field of view (all True for angiograms). id: the file stem writers use.
    """

    image: np.ndarray
    mask: np.ndarray
    polygons: list[list[float]]
    text: str = TEXT
    roi: np.ndarray | None = None
    id: str = "synth"


@dataclass
class Branch:
    """A vessel segment between branchings: centre line (N, 2) as (x, y), radius and darkness per point."""

    points: np.ndarray
    radii: np.ndarray
    darkness: np.ndarray


@dataclass
class Scene:
    """Where vessels may grow and how they start; differs between fundus and angiogram."""

    size: int
    scale: float  # output pixels per reference pixel
    centre: np.ndarray  # field-of-view centre (output px)
    fov_radius: float  # inf for angiograms (they fill the frame)
    wiggle: float  # heading noise per step (radians): tortuosity
    curl: float  # typical slow drift of the preferred heading per step (radians)
    reach: float = 1.0  # branch length factor: coronary arteries run longer than retinal ones

    @property
    def step(self) -> float:
        """Centre-line step in reference px: STEP, but at least 1.25 output px so small images stay cheap."""
        return max(STEP, 1.25 / self.scale)


# ----------------------------------------------------------------------------------------------------------
# Geometry: growing trees


def inside(scene: Scene, x: float, y: float, margin: float) -> bool:
    """Whether a centre-line point keeps `margin` output pixels from the image border and the FOV edge."""
    if not (margin <= x <= scene.size - margin and margin <= y <= scene.size - margin):
        return False
    return math.hypot(x - scene.centre[0], y - scene.centre[1]) <= scene.fov_radius - margin


def grow_branch(
    rng: np.random.Generator, scene: Scene, start: np.ndarray, heading: float, radius: float, curl: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-walk a centre line from `start` (output px) with momentum on the turning rate.

    The radius (reference px) tapers to the 1-px minimum over a length that grows with the starting
    radius, slowly first and faster near the tip (t ** TAPER); the walk stops early at the border. Returns points (output px), reference radii, headings.
    """
    scale, step = scene.scale, scene.step
    tip = min(MIN_RADIUS / scale, radius)
    length = scene.reach * (radius * rng.uniform(45.0, 85.0) + rng.uniform(20.0, 60.0))
    n_steps = max(int(length / step), 2)
    per_step = step / STEP  # noise, drift and pull are defined per STEP reference px
    # The turning rate is limited so that the inner offset curve never folds (radius of curvature > 2 r).
    max_rate = min(0.3 * per_step, step / (2.5 * radius))
    noise = rng.normal(0.0, scene.wiggle * math.sqrt(per_step), n_steps)
    x, y = float(start[0]), float(start[1])
    xs, ys, headings = [x], [y], [heading]
    initial, preferred, rate = heading, heading, 0.0
    for k in range(n_steps):
        preferred += curl * per_step
        offset = math.remainder(heading - preferred, math.tau)
        rate = min(max(0.8 * rate + noise[k] - 0.05 * per_step * offset, -max_rate), max_rate)
        heading += rate
        turned = math.remainder(heading - initial, math.tau)
        if abs(turned) > MAX_TURN:
            heading, rate = initial + math.copysign(MAX_TURN, turned), 0.0
        x, y = x + step * scale * math.cos(heading), y + step * scale * math.sin(heading)
        radius_here = radius + (tip - radius) * ((k + 1) / n_steps) ** TAPER
        if not inside(scene, x, y, max(radius_here * scale, MIN_RADIUS) + 2.0):
            break
        xs.append(x)
        ys.append(y)
        headings.append(heading)
    t = np.arange(len(xs)) / n_steps
    return np.stack([xs, ys], axis=1), radius + (tip - radius) * t**TAPER, np.array(headings)


def grow_tree(
    rng: np.random.Generator,
    scene: Scene,
    root: np.ndarray,
    heading: float,
    radius: float,
    darkness: float,
    curl: float,
    budget: int,
) -> list[Branch]:
    """Grow a vessel tree breadth-first (trunks before twigs) until `budget` branches exist.

    Children leave a parent every 15-50 reference px at 30-75 degrees, alternating sides mostly, with
    0.5-0.85 of the parent's local radius; darkness fades with the radius relative to the trunk.
    """
    queue = [(root, heading, radius, curl)]
    branches: list[Branch] = []
    while queue and len(branches) < budget:
        start, head, rad, drift = queue.pop(0)
        points, radii, headings = grow_branch(rng, scene, start, head, rad, drift)
        if len(points) < 3:
            continue
        fade = darkness * rng.uniform(0.8, 1.2) * (0.1 + 0.9 * np.clip(radii / radius, 0.0, 1.0) ** 0.8)
        branches.append(Branch(points, np.maximum(radii * scene.scale, MIN_RADIUS), fade))
        side = rng.choice((-1.0, 1.0))
        position = rng.uniform(8.0, 30.0) / scene.step
        while position < len(points) - 2:
            i = int(position)
            child_radius = radii[i] * rng.uniform(0.5, 0.85)
            if child_radius * scene.scale >= THINNEST:
                angle = side * math.radians(rng.uniform(30.0, 75.0))
                queue.append((points[i], headings[i] + angle, child_radius, rng.normal(0.0, scene.curl)))
            side = -side if rng.random() < 0.8 else side
            position += scene.reach * rng.uniform(20.0, 60.0) / scene.step
    return branches


def ribbon_polygon(points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """The outline of a tapering tube around a centre line: left side, end cap, right side back, start cap.

    Offsets follow the vertex normals (central differences); caps are half circles of the end radii,
    sampled about every pixel. Returns (M, 2) vertices.
    """
    tangent = np.gradient(points, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    left = points + radii[:, None] * normal
    right = points - radii[:, None] * normal

    def cap(centre: np.ndarray, radius: float, direction: np.ndarray) -> np.ndarray:
        # From the left side (+90 degrees) through `direction` to the right side (-90), endpoints excluded.
        n = max(3, math.ceil(math.pi * radius))
        base = math.atan2(direction[1], direction[0])
        angles = base + np.linspace(math.pi / 2, -math.pi / 2, n + 2)[1:-1]
        return centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    end_cap = cap(points[-1], radii[-1], tangent[-1])
    start_cap = cap(points[0], radii[0], -tangent[0])
    return np.concatenate([left, end_cap, right[::-1], start_cap])


# ----------------------------------------------------------------------------------------------------------
# Rendering: soft coverage from the same centre lines and radii


def paint(absorb: np.ndarray, branch: Branch) -> None:
    """Darken `absorb` (max-combined, in place) with one branch's soft coverage times its darkness.

    Coverage is clip(r - d + 0.5, 0, 1) for distance d from a pixel centre to the centre line and the
    local radius r, i.e. > 0.5 exactly where the polygon covers the pixel centre; a cylinder profile
    makes vessels darkest along their axis, as light crosses most blood there.
    """
    height, width = absorb.shape
    pts, rad, dark = branch.points, branch.radii, branch.darkness
    for k in range(0, len(pts) - 1, CHUNK):
        a, b = pts[k : k + CHUNK], pts[k + 1 : k + CHUNK + 1]
        ra, rb = rad[k : k + CHUNK], rad[k + 1 : k + CHUNK + 1]
        da, db = dark[k : k + CHUNK], dark[k + 1 : k + CHUNK + 1]
        a, ra, da = a[: len(b)], ra[: len(b)], da[: len(b)]
        reach = float(max(ra.max(), rb.max())) + 1.5
        lo = np.minimum(a.min(axis=0), b.min(axis=0)) - reach
        hi = np.maximum(a.max(axis=0), b.max(axis=0)) + reach
        x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        x1, y1 = min(int(hi[0]) + 1, width), min(int(hi[1]) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        px = (np.arange(x0, x1) + 0.5)[None, :, None]
        py = (np.arange(y0, y1) + 0.5)[:, None, None]
        ab = b - a
        t = ((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / np.maximum((ab**2).sum(axis=1), 1e-12)
        t = np.minimum(np.maximum(t, 0.0), 1.0)
        d = np.hypot(px - (a[:, 0] + t * ab[:, 0]), py - (a[:, 1] + t * ab[:, 1]))
        r = ra + t * (rb - ra)
        coverage = np.minimum(np.maximum(r - d + 0.5, 0.0), 1.0)
        profile = np.sqrt(np.maximum(1.0 - (d / (r + 0.5)) ** 2, 0.0))
        value = ((da + t * (db - da)) * coverage * (0.55 + 0.45 * profile)).max(axis=2)
        np.maximum(absorb[y0:y1, x0:x1], value, out=absorb[y0:y1, x0:x1])


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise varying over about size/cells pixels (bicubic upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    fine = cv2.resize(
        coarse, (size + 3 * size // cells, size + 3 * size // cells), interpolation=cv2.INTER_CUBIC
    )
    offset = size // cells
    fine = fine[offset : offset + size, offset : offset + size]
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def radial_grid(size: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) and their distance to `centre`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return x, y, np.hypot(x - centre[0], y - centre[1])


def ramp(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, amplitude: float) -> np.ndarray:
    """A linear illumination gradient in a random direction, from -amplitude/2 to +amplitude/2 across the image."""
    angle = rng.uniform(0, math.tau)
    size = x.shape[0]
    return amplitude * ((x - size / 2) * math.cos(angle) + (y - size / 2) * math.sin(angle)) / size


def finish(rng: np.random.Generator, image: np.ndarray, blur_sigma: float, noise_sigma: float) -> np.ndarray:
    """Optics and sensor: Gaussian blur, then additive noise, then 8-bit quantisation."""
    image = cv2.GaussianBlur(image, (0, 0), blur_sigma)
    image = image + rng.normal(0.0, noise_sigma, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Styles


def fundus(rng: np.random.Generator, size: int) -> tuple[list[Branch], np.ndarray, np.ndarray]:
    """A colour fundus photograph: circular field of view, orange-red retina, bright optic disc, dark macula.

    Arteries and veins leave the disc in pairs along the four arcades (the temporal ones curl around
    the macula) plus a few small vessels; their trees overlap and cross.
    """
    scale = size / REFERENCE_SIZE
    centre = np.array([size / 2, size / 2]) + rng.normal(0.0, 0.01 * size, 2)
    fov_radius = size * rng.uniform(0.45, 0.49)
    scene = Scene(size, scale, centre, fov_radius, wiggle=0.035, curl=0.004)
    disc_side = rng.choice((-1.0, 1.0))  # +1: disc right of centre (a left eye), temporal side is left
    disc = centre + np.array([disc_side * size * rng.uniform(0.17, 0.25), size * rng.normal(0.0, 0.03)])
    disc_radius = size * rng.uniform(0.055, 0.07)
    temporal = math.pi if disc_side > 0 else 0.0
    branches: list[Branch] = []
    budget = int(rng.integers(30, 45))
    for vertical in (-1.0, 1.0):  # superior (up, -y) and inferior arcades
        for kind, radius, darkness in (("vein", 3.8, 0.75), ("artery", 3.0, 0.55)):
            # Leave the disc mostly vertically, tilted temporally, then curl toward the macula.
            tilt = math.radians(rng.uniform(15, 40)) * (1 if kind == "vein" else rng.uniform(0.6, 1.4))
            heading = vertical * math.pi / 2 + (tilt if temporal == math.pi else -tilt) * vertical
            heading = math.atan2(math.sin(heading), math.cos(heading))
            curl = vertical * (1 if temporal == math.pi else -1) * rng.uniform(0.006, 0.012)
            start = disc + rng.normal(0.0, 0.2 * disc_radius, 2)
            branches += grow_tree(
                rng, scene, start, heading, radius * rng.uniform(0.9, 1.1), darkness, curl, budget
            )
            # The nasal vessels are smaller and run straighter.
            nasal = (temporal + math.pi) + vertical * math.radians(rng.uniform(20, 60))
            branches += grow_tree(
                rng, scene, start, nasal, radius * rng.uniform(0.55, 0.75), darkness, 0.0, budget // 3
            )
    for _ in range(int(rng.integers(2, 5))):  # small vessels leaving the disc in any direction
        branches += grow_tree(
            rng, scene, disc.copy(), rng.uniform(0, math.tau), rng.uniform(1.0, 1.8), 0.55, 0.0, 6
        )

    x, y, rho = radial_grid(size, centre)
    illumination = 1.0 + 0.15 * smooth_noise(rng, size, 3) + ramp(rng, x, y, rng.uniform(0.2, 0.5))
    vignette = 1.0 - rng.uniform(0.45, 0.65) * (rho / fov_radius) ** 3
    texture = 1.0 + 0.015 * smooth_noise(rng, size, 24) + 0.015 * smooth_noise(rng, size, 64)
    shade = illumination * vignette * texture
    macula_centre = disc + np.array(
        [-disc_side * size * rng.uniform(0.28, 0.33), size * rng.normal(0.0, 0.02)]
    )
    macula = np.exp(-(((x - macula_centre[0]) ** 2 + (y - macula_centre[1]) ** 2) / (2 * (0.08 * size) ** 2)))
    shade *= 1.0 - rng.uniform(0.15, 0.3) * macula
    disc_dist = np.hypot(x - disc[0], (y - disc[1]) / rng.uniform(1.0, 1.15))
    disc_glow = 1.0 / (1.0 + np.exp((disc_dist - disc_radius) / (0.12 * disc_radius)))
    cup = np.exp(-((disc_dist / (0.5 * disc_radius)) ** 2))

    retina = np.array([rng.uniform(180, 230), rng.uniform(70, 105), rng.uniform(20, 45)], dtype=np.float32)
    image = retina[None, None, :] * shade[:, :, None]
    disc_colour = np.array([60.0, 80.0, 50.0], dtype=np.float32) * rng.uniform(0.8, 1.1)
    image += disc_colour * (disc_glow + 0.5 * cup)[:, :, None]

    absorb = np.zeros((size, size), np.float32)
    for branch in branches:
        paint(absorb, branch)
    # Blood absorbs green and blue far more than red: vessels are dark red on orange.
    absorption = np.array([0.28, 0.75, 0.6], dtype=np.float32)
    image *= 1.0 - absorb[:, :, None] * absorption
    fov = np.clip(fov_radius - rho + 0.5, 0.0, 1.0)
    image = image * fov[:, :, None] + 4.0 * (1.0 - fov[:, :, None])
    image = finish(rng, image, rng.uniform(0.6, 1.0), rng.uniform(2.0, 4.0))
    return branches, image, rho <= fov_radius


def angiogram(rng: np.random.Generator, size: int) -> tuple[list[Branch], np.ndarray, np.ndarray]:
    """An X-ray coronary angiogram: grey, contrast-filled dark vessels from a catheter that enters at a border.

    The background carries what makes a threshold fail: ribs (broad curved bright and dark bands), the
    heart and diaphragm shadow, soft tissue texture and uneven exposure. The catheter is drawn but not
    annotated, as in real angiography datasets: a dark tube the model has to tell apart from a vessel.
    """
    scale = size / REFERENCE_SIZE
    scene = Scene(size, scale, np.array([size / 2, size / 2]), math.inf, wiggle=0.06, curl=0.006, reach=1.5)
    side = int(rng.integers(0, 4))  # catheter enters from the left, top, right or bottom edge
    along = rng.uniform(0.25, 0.6) * size
    depth = rng.uniform(0.18, 0.32) * size
    inward = (0.0, math.pi / 2, math.pi, -math.pi / 2)[side]
    entry = [
        np.array([0.0, along]),
        np.array([along, 0.0]),
        np.array([size, along]),
        np.array([along, size]),
    ][side]
    root = entry + depth * np.array([math.cos(inward), math.sin(inward)])
    catheter_points = np.linspace(entry, root, 24)
    catheter_points += (
        np.sin(np.linspace(0, math.pi, 24))[:, None]
        * rng.normal(0, 0.04 * size)
        * np.array([-math.sin(inward), math.cos(inward)])
    )
    root = catheter_points[-1]
    trunk = 3.6 * rng.uniform(0.9, 1.1)
    catheter = Branch(catheter_points, np.full(24, trunk * scale * 0.8), np.full(24, rng.uniform(0.35, 0.45)))

    branches: list[Branch] = []
    budget = int(rng.integers(16, 26))
    n_trees = int(rng.integers(2, 4))
    spread = np.sort(rng.uniform(-1.1, 1.1, n_trees))
    for k, offset in enumerate(spread):
        radius = trunk * (1.0 if k == 0 else rng.uniform(0.65, 0.9))
        branches += grow_tree(
            rng,
            scene,
            root.copy(),
            inward + offset,
            radius,
            rng.uniform(0.25, 0.4),
            rng.normal(0, 0.008),
            budget,
        )

    x, y, rho = radial_grid(size, scene.centre)
    exposure = 1.0 + 0.14 * smooth_noise(rng, size, 2) + ramp(rng, x, y, rng.uniform(0.2, 0.5))
    # The heart and diaphragm: a large dark region with a soft, curved edge against the bright lung field.
    heart_centre = np.array([rng.uniform(0.2, 0.8), rng.uniform(0.7, 1.1)]) * size
    heart_edge = np.hypot(x - heart_centre[0], y - heart_centre[1]) - rng.uniform(0.35, 0.55) * size
    heart = 1.0 / (1.0 + np.exp(heart_edge / (0.04 * size)))
    shade = exposure * (1.0 - rng.uniform(0.35, 0.5) * heart)
    tilt = rng.normal(0.0, 0.25)
    bend = rng.uniform(0.3, 0.8) / size
    spacing = rng.uniform(0.16, 0.22) * size
    rib_coordinate = (y - tilt * x + bend * (x - rng.uniform(0.3, 0.7) * size) ** 2) / spacing
    ribs = np.sin(math.tau * rib_coordinate + rng.uniform(0, math.tau))
    shade *= 1.0 + rng.uniform(0.06, 0.12) * np.tanh(2.0 * ribs) * (
        0.5 + 0.5 * smooth_noise(rng, size, 2) ** 2
    )
    shade *= 1.0 + 0.02 * smooth_noise(rng, size, 20) + 0.015 * smooth_noise(rng, size, 48)
    shade *= 1.0 - 0.25 * np.clip(rho / (0.72 * size), 0.0, 1.0) ** 4  # image-intensifier vignetting

    absorb = np.zeros((size, size), np.float32)
    for branch in branches:
        paint(absorb, branch)
    paint(absorb, catheter)
    image = rng.uniform(135, 175) * shade * (1.0 - absorb)
    grey = finish(rng, image.astype(np.float32), rng.uniform(0.7, 1.1), rng.uniform(3.0, 5.5))
    return branches, np.repeat(grey[:, :, None], 3, axis=2), np.ones((size, size), bool)


STYLE_BUILDERS = {"fundus": fundus, "angiogram": angiogram}


def generate_sample(seed: int, size: int, style: str = "fundus") -> SynthSample:
    """One synthetic vessel image of `size` x `size` pixels with its polygons and exact mask."""
    if style not in STYLE_BUILDERS:
        raise ConfigError(f"style={style!r} is unknown; choose one of {', '.join(STYLES)}")
    if size < 32:
        raise ConfigError(f"size={size} is too small for vessel trees; use 32 pixels or more")
    rng = np.random.default_rng(seed)
    branches, image, roi = STYLE_BUILDERS[style](rng, size)
    polygons = [np.round(ribbon_polygon(b.points, b.radii), 2).ravel().tolist() for b in branches]
    mask, _ = rasterize_polygons(polygons, size, size)
    return SynthSample(image=image, mask=mask, polygons=polygons, roi=roi)


def sample_seed(seed: int, index: int) -> int:
    """The seed of image `index` in a dataset seeded with `seed`: independent streams, stable under `count`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------
# Datasets, previews, CLI

PREVIEW_TILE = 256  # largest tile side in the contact sheet
PREVIEW_MAX = 16
OUTLINE = np.array([0, 255, 255], dtype=np.uint8)  # cyan: stands out on orange fundus and grey angiograms


def outline(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (the boundary, 1 px thick)."""
    padded = np.pad(mask.astype(bool), 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask.astype(bool) & ~interior


def preview_tiles(sample: SynthSample) -> np.ndarray:
    """The image beside the same image with the mask outline in cyan, at most PREVIEW_TILE px high."""
    image, mask = sample.image, sample.mask
    if image.shape[0] > PREVIEW_TILE:
        side = (PREVIEW_TILE, PREVIEW_TILE)
        image = cv2.resize(image, side, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.float32), side, interpolation=cv2.INTER_AREA) > 0.3
    overlay = image.copy()
    overlay[outline(mask)] = OUTLINE
    return np.concatenate([image, np.full((image.shape[0], 2, 3), 255, np.uint8), overlay], axis=1)


def write_preview(path: str | Path, samples: list[SynthSample]) -> Path:
    """A contact sheet PNG of up to 16 samples (4 per row), each as image | image with mask outline."""
    if not samples:
        raise ConfigError("--preview needs at least one image (--count >= 1)")
    tiles = [preview_tiles(sample) for sample in samples[:PREVIEW_MAX]]
    columns = min(4, len(tiles))
    height, width = tiles[0].shape[:2]
    gap = 6
    rows = math.ceil(len(tiles) / columns)
    caption = 16
    sheet = np.full((rows * (height + gap) + gap + caption, columns * (width + gap) + gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        top, left = gap + (k // columns) * (height + gap), gap + (k % columns) * (width + gap)
        sheet[top : top + height, left : left + width] = tile
    picture = Image.fromarray(sheet)
    legend = "each pair: image | image with the mask outline (cyan)"
    ImageDraw.Draw(picture).text((gap, sheet.shape[0] - caption), legend, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def make_dataset(
    out: str | Path,
    count: int,
    size: int,
    style: str = "fundus",
    seed: int = 0,
    format: str = "merged",
    preview: str | Path | None = None,
    verbose: bool = False,
) -> Path:
    """Generate `count` images into the empty (or new) directory `out` in `format`; returns `out`.

    Image i is `generate_sample(sample_seed(seed, i), size, style)` with id `<style>_<i:05d>`.
    The annotation file is written last, so a killed run leaves no valid-looking index. With
    `preview`, also writes a contact sheet of the first 16 images; `verbose` prints a summary line.
    """
    out = Path(out)
    if count < 1:
        raise ConfigError(f"--count={count}: generate at least one image")
    if seed < 0:
        raise ConfigError(f"--seed={seed}: seeds are non-negative integers")
    if format not in WRITERS:
        raise ConfigError(f"--format={format!r} is unknown; choose one of {', '.join(WRITERS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out} exists and is not an empty directory; delete it or choose another --out"
        )
    fractions: list[float] = []
    shown: list[SynthSample] = []

    def samples() -> Iterator[SynthSample]:
        for index in tqdm(range(count), desc=f"synth {style}", unit="image", disable=count <= 50):
            sample = generate_sample(sample_seed(seed, index), size, style)
            sample.id = f"{style}_{index:05d}"
            fractions.append(float(sample.mask.mean()))
            if preview is not None and len(shown) < PREVIEW_MAX:
                shown.append(sample)
            yield sample

    write_dataset(out, samples(), format)
    if preview is not None:
        write_preview(preview, shown)
    if verbose:
        sheet = f", preview {preview}" if preview is not None else ""
        print(
            f"wrote {count} {style} images of {size}x{size} px ({format}), "
            f"mean vessel fraction {np.mean(fractions):.3f}, to {out}{sheet}"
        )
    return out


EPILOG = """\
examples:
  # 8 small fundus images in Sa2VA's merged format, with a contact sheet to look at
  python -m distill.synth --out data/s --count 8 --size 128 --seed 1 --preview data/s_preview.png
  python -m distill.data check --data-format merged --data-root data/s

  # the embedded default, as `make demo` (scripts/demo.sh) makes it: 96 fundus images at 192 px
  python -m distill.synth --out data/synthetic --count 96 --size 192 --style fundus --seed 0 \
      --preview data/synthetic/preview.png

  # closer to the real data: 512 px
  python -m distill.synth --out data/synthetic512 --count 400 --size 512 --style fundus --seed 0

  # angiograms as a folder of PNG images and 0/255 masks
  python -m distill.synth --out data/angio --count 64 --size 256 --style angiogram --format mask_folder

Same --seed, same bytes: image i depends only on (--seed, i), so --count 8 is a prefix of --count 16.
--out must be new or empty; the annotation file is written last, so a killed run leaves no usable index.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distill.synth",
        description=(
            "Generate synthetic blood-vessel images with polygon annotations: branching trees that taper "
            "to 1 px and fade as they thin, on fundus-like or angiogram-like backgrounds with uneven "
            "illumination, noise and blur. A global intensity threshold finds the trunks and misses the "
            "thin branches, as on real data."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    parser.add_argument("--count", type=int, default=16, help="number of images (default: 16)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    parser.add_argument("--style", choices=STYLES, default="fundus", help="background and tree layout")
    parser.add_argument(
        "--seed", type=int, default=0, help="non-negative; same seed, same bytes (default: 0)"
    )
    parser.add_argument(
        "--format",
        choices=list(WRITERS),
        default="merged",
        help="dataset format to write (default: merged, Sa2VA's)",
    )
    parser.add_argument(
        "--preview", type=Path, help="also write a contact sheet PNG (first 16 images + outlines)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        make_dataset(
            args.out, args.count, args.size, args.style, args.seed, args.format, args.preview, verbose=True
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
