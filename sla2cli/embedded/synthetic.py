"""Procedural videos for the embedded model: moving, rotating, coloured shapes in a few channels.

Why procedural: the embedded model must be trainable from scratch in minutes, with no data set to
download, yet its attention must have the spatio-temporal structure of a real video model. Shapes
that move and spin across frames give it that: to denoise a token the model has to look at its
neighbours in space and at the same object in the frames before and after.

Everything is deterministic given a seed (Python's `random.Random` for the scene, a fixed seed for
the text-embedding table), so validation clips are the same on every machine.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LATENT_CHANNELS = 4
TEXT_DIM = 32
TEXT_TOKENS = 8
MAX_SHAPES = 5
VALIDATION_SEED_BASE = 1_000_000_000
CALIBRATION_SEED_BASE = 2_000_000_000  # training draws seeds below VALIDATION_SEED_BASE; validation above it
EMBEDDING_TABLE_SEED = 20_250_611

# Colours are points in the 4-channel latent space, roughly within [-1, 1] like a normalised VAE latent.
SHAPE_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "red": (1.0, -0.6, -0.4, 0.2),
    "green": (-0.5, 1.0, -0.3, -0.4),
    "blue": (-0.4, -0.3, 1.0, 0.5),
    "yellow": (0.8, 0.8, -0.6, -0.2),
    "white": (0.9, 0.9, 0.9, 0.9),
    "purple": (0.6, -0.5, 0.8, -0.8),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float, float]] = {
    "black": (-0.8, -0.8, -0.8, -0.8),
    "grey": (0.0, 0.0, 0.0, 0.0),
    "navy": (-0.6, -0.6, -0.1, 0.3),
}
# Sides of the polygon; 0 means a circle.
SHAPE_SIDES: dict[str, int] = {"circle": 0, "triangle": 3, "square": 4}
# Image y points down, so "up" is a negative y velocity.
DIRECTION_ANGLES: dict[str, float] = {
    "right": 0.0,
    "down-right": 45.0,
    "down": 90.0,
    "down-left": 135.0,
    "left": 180.0,
    "up-left": 225.0,
    "up": 270.0,
    "up-right": 315.0,
}
# Distance per frame, as a fraction of the clip's shorter side.
SPEEDS: dict[str, float] = {"slowly": 0.012, "steadily": 0.028, "quickly": 0.05}
# Background texture: smooth noise with a correlation length of a few pixels, panning like a camera.
# Pixel units (not clip-relative) so that a token's neighbourhood looks alike at every clip size.
TEXTURE_CELL_PIXELS = 4
TEXTURE_AMPLITUDE = 0.3
TEXTURE_FIELDS = 2
# Pixels per frame.
PAN_SPEEDS: dict[str, float] = {"still": 0.0, "panning slowly": 0.5, "panning quickly": 1.5}
# Radians per frame.
SPINS: dict[str, float] = {"without spinning": 0.0, "spinning clockwise": 0.3, "spinning anticlockwise": -0.3}

ROLE_WORDS = ("background", "shape", "textured")
VOCABULARY: tuple[str, ...] = (
    ROLE_WORDS
    + tuple(SHAPE_COLOURS)
    + tuple(BACKGROUND_COLOURS)
    + tuple(SHAPE_SIDES)
    + tuple(DIRECTION_ANGLES)
    + tuple(SPEEDS)
    + tuple(SPINS)
    + tuple(PAN_SPEEDS)
)


@dataclass(frozen=True)
class ShapeSpec:
    """One shape of a scene: what it is, and its motion in clip-relative units."""

    kind: str
    colour: str
    direction: str
    speed: str
    spin: str
    centre: tuple[float, float]  # (x, y) as fractions of width and height at frame 0
    radius: float  # fraction of the shorter side
    velocity: tuple[float, float]  # (x, y) per frame, fraction of the shorter side
    angle: float  # radians at frame 0
    spin_rate: float  # radians per frame


@dataclass(frozen=True)
class SceneSpec:
    """A whole clip: a textured, panning background and shapes painted in order (later cover earlier)."""

    background: str
    pan: str
    pan_direction: str
    pan_velocity: tuple[float, float]  # (x, y) pixels per frame
    texture_seed: int
    shapes: tuple[ShapeSpec, ...]


@dataclass(frozen=True)
class SyntheticClip:
    """A rendered clip with its conditioning: latents (C, F, H, W) and text embedding (S, text_dim)."""

    seed: int
    latents: torch.Tensor
    text_embedding: torch.Tensor
    description: str


def sample_scene(seed: int) -> SceneSpec:
    """Draw a scene from a seed: 2 to 5 shapes with random kind, colour, position, speed and spin."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(rng.randint(2, MAX_SHAPES)):
        direction = rng.choice(tuple(DIRECTION_ANGLES))
        speed = rng.choice(tuple(SPEEDS))
        spin = rng.choice(tuple(SPINS))
        heading = math.radians(DIRECTION_ANGLES[direction] + rng.uniform(-12.0, 12.0))
        pace = SPEEDS[speed] * rng.uniform(0.8, 1.2)
        shapes.append(
            ShapeSpec(
                kind=rng.choice(tuple(SHAPE_SIDES)),
                colour=rng.choice(tuple(SHAPE_COLOURS)),
                direction=direction,
                speed=speed,
                spin=spin,
                centre=(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)),
                radius=rng.uniform(0.08, 0.17),
                velocity=(pace * math.cos(heading), pace * math.sin(heading)),
                angle=rng.uniform(0.0, 2.0 * math.pi),
                spin_rate=SPINS[spin] * rng.uniform(0.7, 1.3),
            )
        )
    pan = rng.choice(tuple(PAN_SPEEDS))
    pan_direction = rng.choice(tuple(DIRECTION_ANGLES))
    pan_heading = math.radians(DIRECTION_ANGLES[pan_direction])
    return SceneSpec(
        background=rng.choice(tuple(BACKGROUND_COLOURS)),
        pan=pan,
        pan_direction=pan_direction,
        pan_velocity=(PAN_SPEEDS[pan] * math.cos(pan_heading), PAN_SPEEDS[pan] * math.sin(pan_heading)),
        texture_seed=rng.randrange(2**31),
        shapes=tuple(shapes),
    )


def describe_scene(scene: SceneSpec) -> str:
    """The clip's caption, e.g. 'a red circle moving left quickly without spinning, ... on black'."""
    parts = [
        f"a {shape.colour} {shape.kind} moving {shape.direction} {shape.speed} {shape.spin}" for shape in scene.shapes
    ]
    motion = "still" if scene.pan == "still" else f"{scene.pan} {scene.pan_direction}"
    return "; ".join(parts) + f"; on a {scene.background} textured background, {motion}"


def _bounce(start: float, travel: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Position after `travel` from `start`, reflecting off the walls at `low` and `high`."""
    span = max(high - low, 1e-6)
    phase = torch.remainder(start - low + travel, 2.0 * span)
    return low + span - torch.abs(phase - span)


def _shape_distance(
    shape: ShapeSpec, frame_index: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Signed distance in pixels from every pixel to the shape's edge, per frame: (F, H, W)."""
    unit = float(min(height, width))
    radius = shape.radius * unit
    centre_x = _bounce(shape.centre[0] * width, frame_index * shape.velocity[0] * unit, radius, width - radius)
    centre_y = _bounce(shape.centre[1] * height, frame_index * shape.velocity[1] * unit, radius, height - radius)
    dx = xs.view(1, 1, -1) - centre_x.view(-1, 1, 1)
    dy = ys.view(1, -1, 1) - centre_y.view(-1, 1, 1)
    sides = SHAPE_SIDES[shape.kind]
    if sides == 0:
        return torch.sqrt(dx * dx + dy * dy) - radius
    # A regular polygon is the intersection of half-planes: distance = max over edge normals.
    apothem = radius * math.cos(math.pi / sides)
    angles = shape.angle + frame_index * shape.spin_rate
    distance = None
    for side in range(sides):
        normal = (angles + 2.0 * math.pi * side / sides).view(-1, 1, 1)
        along = dx * torch.cos(normal) + dy * torch.sin(normal) - apothem
        distance = along if distance is None else torch.maximum(distance, along)
    return distance


def render_scene(
    scene: SceneSpec,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Paint the scene into a (C, F, H, W) float32 tensor, with one-pixel anti-aliased edges."""
    if frames < 1 or height < 1 or width < 1:
        raise ValueError(f"clip size must be positive, got frames={frames}, height={height}, width={width}")
    frame_index = torch.arange(frames, dtype=torch.float32, device=device)
    ys = torch.arange(height, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=device) + 0.5
    canvas = render_background(scene, frames, height, width, device)
    for shape in scene.shapes:
        distance = _shape_distance(shape, frame_index, ys, xs, height, width)
        coverage = torch.clamp(0.5 - distance, 0.0, 1.0)
        colour = torch.tensor(SHAPE_COLOURS[shape.colour], device=device).view(-1, 1, 1, 1)
        canvas = canvas + coverage.unsqueeze(0) * (colour - canvas)
    return canvas


def render_background(
    scene: SceneSpec, frames: int, height: int, width: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Background colour plus smooth noise texture, shifted by the pan each frame: (C, F, H, W).

    The texture is only predictable from nearby pixels of the same and neighbouring frames, which is
    what makes the model's attention local in space and time.
    """
    travel_x, travel_y = (abs(component) * max(frames - 1, 0) for component in scene.pan_velocity)
    margin = math.ceil(max(travel_x, travel_y)) + 2
    field_height, field_width = height + 2 * margin, width + 2 * margin
    coarse = (
        math.ceil(field_height / TEXTURE_CELL_PIXELS) + 3,
        math.ceil(field_width / TEXTURE_CELL_PIXELS) + 3,
    )
    generator = torch.Generator().manual_seed(scene.texture_seed)
    noise = torch.randn(1, TEXTURE_FIELDS, *coarse, generator=generator)
    mixing = torch.randn(LATENT_CHANNELS, TEXTURE_FIELDS, generator=generator) / math.sqrt(TEXTURE_FIELDS)
    field = F.interpolate(noise.to(device), size=(field_height, field_width), mode="bicubic", align_corners=False)
    field = field / field.std().clamp_min(1e-6)
    frame_index = torch.arange(frames, dtype=torch.float32, device=device).view(-1, 1, 1)
    xs = torch.arange(width, dtype=torch.float32, device=device).view(1, 1, -1)
    ys = torch.arange(height, dtype=torch.float32, device=device).view(1, -1, 1)
    # Pixel centres in the big field, moved against the pan so the content moves with it.
    field_x = margin + xs + 0.5 - frame_index * scene.pan_velocity[0]
    field_y = margin + ys + 0.5 - frame_index * scene.pan_velocity[1]
    grid = torch.stack(
        (
            (2.0 * field_x / field_width - 1.0).expand(frames, height, width),
            (2.0 * field_y / field_height - 1.0).expand(frames, height, width),
        ),
        dim=-1,
    )
    sampled = F.grid_sample(
        field.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (F, fields, H, W)
    texture = torch.einsum("cf,tfhw->cthw", mixing.to(sampled), sampled)
    colour = torch.tensor(BACKGROUND_COLOURS[scene.background], device=device).view(-1, 1, 1, 1)
    return colour + TEXTURE_AMPLITUDE * texture


def _embedding_table(text_dim: int) -> torch.Tensor:
    """A fixed random vector per vocabulary word: the 'text encoder' is a frozen random projection."""
    generator = torch.Generator().manual_seed(EMBEDDING_TABLE_SEED + text_dim)
    return torch.randn(len(VOCABULARY), text_dim, generator=generator)


def _bag_of_words(words: Sequence[str], table: torch.Tensor) -> torch.Tensor:
    rows = torch.stack([table[VOCABULARY.index(word)] for word in words])
    return rows.sum(dim=0) / math.sqrt(len(words))


def embed_scene(scene: SceneSpec, text_dim: int = TEXT_DIM, tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """Text embedding (tokens, text_dim): one token for the background, one per shape, zeros after."""
    if tokens < 1 + len(scene.shapes):
        raise ValueError(f"{tokens} text tokens cannot hold a scene of {len(scene.shapes)} shapes")
    table = _embedding_table(text_dim)
    embedding = torch.zeros(tokens, text_dim)
    embedding[0] = _bag_of_words(("background", "textured", scene.background, scene.pan, scene.pan_direction), table)
    for index, shape in enumerate(scene.shapes, start=1):
        words = ("shape", shape.kind, shape.colour, shape.direction, shape.speed, shape.spin)
        embedding[index] = _bag_of_words(words, table)
    return embedding


def make_clip(
    seed: int,
    frames: int,
    height: int,
    width: int,
    text_dim: int = TEXT_DIM,
    tokens: int = TEXT_TOKENS,
    device: torch.device | str | None = None,
) -> SyntheticClip:
    """Scene, latents, caption and text embedding for one seed."""
    scene = sample_scene(seed)
    return SyntheticClip(
        seed=seed,
        latents=render_scene(scene, frames, height, width, device=device),
        text_embedding=embed_scene(scene, text_dim, tokens).to(device),
        description=describe_scene(scene),
    )


def make_batch(
    seeds: Sequence[int],
    frames: int,
    height: int,
    width: int,
    text_dim: int = TEXT_DIM,
    tokens: int = TEXT_TOKENS,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, F, H, W) and text embeddings (B, S, text_dim) for a list of seeds."""
    clips = [make_clip(seed, frames, height, width, text_dim, tokens, device) for seed in seeds]
    return stack_clips(clips)


def stack_clips(clips: Sequence[SyntheticClip]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch clips of one size into (latents, text embeddings)."""
    latents = torch.stack([clip.latents for clip in clips])
    embeddings = torch.stack([clip.text_embedding for clip in clips])
    return latents, embeddings


def validation_clips(
    n: int,
    size: tuple[int, int, int] = (8, 64, 64),
    text_dim: int = TEXT_DIM,
    tokens: int = TEXT_TOKENS,
) -> list[SyntheticClip]:
    """The n held-out clips (fixed seeds, never drawn in training) at size (frames, height, width)."""
    frames, height, width = size
    return [make_clip(VALIDATION_SEED_BASE + index, frames, height, width, text_dim, tokens) for index in range(n)]


def calibration_clips(
    n: int,
    size: tuple[int, int, int] = (8, 64, 64),
    text_dim: int = TEXT_DIM,
    tokens: int = TEXT_TOKENS,
) -> list[SyntheticClip]:
    """n clips for `sla2 calibrate`: the training distribution, seeds of their own (never drawn in training,
    never validation clips), so that the report's validation figures stay out of sample."""
    frames, height, width = size
    return [make_clip(CALIBRATION_SEED_BASE + index, frames, height, width, text_dim, tokens) for index in range(n)]
