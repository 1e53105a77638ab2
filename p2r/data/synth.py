"""Synthetic fine-grained VQA in the P2R-10k layout, for tests, the demo and the local pipeline.

Two tasks. ``objects`` (``make_sample``) mixes the three answer forms over coloured shapes and
words. ``stripes`` (``make_stripes_sample``) is the task the local pipeline trains and measures on: it
is built so that the P2R claim holds by construction (see the section's comment).

In the ``objects`` task each sample is a high-resolution canvas (long side >= 2048 px) scattered with small objects -
coloured shapes and short words in boxes - and one question about a few of them, in one of the
three answer forms, with its ground-truth answer and ground-truth boxes (0-1000 coordinates).
The objects are small on purpose: at the model's resized resolution they are a handful of
patches, which is exactly the regime where perceive-then-crop should help.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from p2r.core.bbox import COORD_SCALE
from p2r.core.prompts import AnswerForm, with_options

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 20),
    "purple": (130, 40, 160),
    "orange": (240, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
WORDS = ("cat", "sun", "map", "key", "box", "pen", "cup", "owl", "fig", "jet")
OPTION_LETTERS = "ABCD"
MIN_LONG_SIDE = 2048
DATA_SOURCE = "p2r-synthetic"


@dataclass
class SynthObject:
    kind: str  # a shape name, or "text"
    colour: str
    box: tuple[int, int, int, int]  # pixels
    word: str | None = None


@dataclass
class SynthSample:
    """One synthetic question with its image and ground truth."""

    index: int
    image: Image.Image
    question: str
    answer: str
    form: AnswerForm
    category: str
    gt_boxes: list[list[float]]  # 0-1000 coordinates


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _free_box(
    rng: random.Random, taken: list[tuple[int, int, int, int]], w: int, h: int, bw: int, bh: int
) -> tuple[int, int, int, int]:
    """A ``bw`` x ``bh`` box inside the canvas, at least half its size away from the others."""
    margin = max(bw, bh) // 2
    for _ in range(200):
        x = rng.randrange(20, w - bw - 20)
        y = rng.randrange(20, h - bh - 20)
        box = (x, y, x + bw, y + bh)
        if all(
            box[2] + margin < t[0]
            or t[2] + margin < box[0]
            or box[3] + margin < t[1]
            or t[3] + margin < box[1]
            for t in taken
        ):
            return box
    raise RuntimeError("could not place an object without overlap; use a larger canvas")


def _draw(draw: ImageDraw.ImageDraw, obj: SynthObject) -> None:
    x1, y1, x2, y2 = obj.box
    fill = COLOURS[obj.colour]
    if obj.kind == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.kind == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.kind == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)
    else:  # a word in a white box with a coloured border
        draw.rectangle(obj.box, fill=(255, 255, 255), outline=fill, width=3)
        font = _font(max(10, (y2 - y1) // 2))
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), obj.word or "", fill=(0, 0, 0), font=font, anchor="mm")


def _normalised(box: tuple[int, int, int, int], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [
        round(x1 / w * COORD_SCALE, 1),
        round(y1 / h * COORD_SCALE, 1),
        round(x2 / w * COORD_SCALE, 1),
        round(y2 / h * COORD_SCALE, 1),
    ]


def make_sample(index: int, seed: int = 0) -> SynthSample:
    """Sample ``index`` of the synthetic set; the same (index, seed) always gives the same sample."""
    rng = random.Random(seed * 1_000_003 + index)
    w, h = rng.choice([(2560, 1920), (2048, 2048), (3072, 1728), (1920, 2560)])
    background = tuple(rng.randrange(200, 245) for _ in range(3))
    image = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(image)
    # Faint grid texture so the background is not trivially uniform.
    for x in range(0, w, 128):
        draw.line([(x, 0), (x, h)], fill=tuple(c - 12 for c in background), width=1)

    form = [AnswerForm.MCA, AnswerForm.NA, AnswerForm.FREE_FORM][index % 3]
    taken: list[tuple[int, int, int, int]] = []
    objects: list[SynthObject] = []

    def place(kind: str, colour: str, word: str | None = None) -> SynthObject:
        if kind == "text":
            size = rng.randrange(70, 110)
            box = _free_box(rng, taken, w, h, int(size * 1.8), size // 2 + 10)
        else:
            size = rng.randrange(48, 96)
            box = _free_box(rng, taken, w, h, size, size)
        taken.append(box)
        obj = SynthObject(kind, colour, box, word)
        objects.append(obj)
        return obj

    if form is AnswerForm.MCA:
        shape = rng.choice(SHAPES)
        target = place(shape, rng.choice(list(COLOURS)))
        distractor_colours = [c for c in COLOURS if c != target.colour]
        options = [*rng.sample(distractor_colours, len(OPTION_LETTERS) - 1), target.colour]
        rng.shuffle(options)
        letter = OPTION_LETTERS[options.index(target.colour)]
        question = with_options(
            f"What is the colour of the small {shape} in the image?",
            [f"{L}. {c}" for L, c in zip(OPTION_LETTERS, options, strict=True)],
        )
        answer, category, targets = letter, "attribute", [target]
        for other in (s for s in SHAPES if s != shape):  # distractors of other shapes
            place(other, rng.choice(list(COLOURS)))
    elif form is AnswerForm.NA:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        count = rng.randrange(1, 5)
        targets = [place(shape, colour) for _ in range(count)]
        question = f"How many {colour} {shape}s are there in the image?"
        answer, category = str(count), "count"
        for _ in range(3):  # distractors: same shape in other colours
            place(shape, rng.choice([c for c in COLOURS if c != colour]))
    else:
        word = rng.choice(WORDS)
        target = place("text", rng.choice(list(COLOURS)), word)
        question = "What word is written in the small white box?"
        answer, category, targets = word, "ocr", [target]
        for _ in range(3):
            place(rng.choice(SHAPES), rng.choice(list(COLOURS)))

    for obj in objects:
        _draw(draw, obj)
    return SynthSample(
        index=index,
        image=image,
        question=question,
        answer=answer,
        form=form,
        category=category,
        gt_boxes=[_normalised(t.box, w, h) for t in targets],
    )


# -------------------------------------------------------------------------------- stripes task
#
# A 2,048-px canvas with four squares on a 3 x 3 grid, one of them red, each striped with white in
# one of four directions - the four squares, four different directions. "Which way do the stripes
# on the red square run?" The stripes repeat every 8 px (along x, y, x + y or x - y), exactly the
# factor by which the canvas shrinks to the pipeline's 65,536 model pixels (256 x 256): every model
# pixel's resize filter then sees the same phases, so each square becomes a flat tint - the squares
# and their colours show, their stripes do not, whatever the model. The perceiver's crop of the
# red square (10 % padding of the image per side) shrinks only ~1.9x, to a 4-px period, several
# periods per vision patch. Direct answering
# sees *where* but not *what*; the crop of the right square answers, and a crop of any other square
# shows another direction - a wrong answer.

TASKS = ("objects", "stripes")
STRIPES_CANVAS = 2048
STRIPES_GRID = 3  # cells per side; squares sit at cell centres
STRIPES_SQUARE_HALF = 24  # half the square's side in 0-1000 units (98 px on the canvas)
STRIPES_PERIOD_PX = 8  # = STRIPES_CANVAS / 256: flat at the model's 65,536 pixels
STRIPES_TARGET = "red"
STRIPES_DISTRACTORS = ("green", "blue", "yellow")
STRIPES_OPTIONS = ("horizontal", "vertical", "rising diagonal", "falling diagonal")  # fixed order: A is horizontal
STRIPES_QUESTION = with_options(
    f"Which way do the stripes on the {STRIPES_TARGET} square run?",
    [f"{letter}. {way}" for letter, way in zip(OPTION_LETTERS, STRIPES_OPTIONS, strict=True)],
)
STRIPES_CATEGORY = "stripes"
STRIPES_LABEL = f"{STRIPES_TARGET} square"


@dataclass
class StripesSample(SynthSample):
    """A stripes-task sample: the squares' boxes by colour (0-1000) and each square's direction."""

    squares: dict[str, list[float]] = field(default_factory=dict)
    directions: dict[str, str] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return self.directions[STRIPES_TARGET]


def stripes_cell_box(cell: int) -> list[float]:
    """The square's box (0-1000) in grid cell ``cell`` (row-major): one of ``STRIPES_GRID ** 2``."""
    step = COORD_SCALE / STRIPES_GRID
    cx, cy = (cell % STRIPES_GRID + 0.5) * step, (cell // STRIPES_GRID + 0.5) * step
    return [cx - STRIPES_SQUARE_HALF, cy - STRIPES_SQUARE_HALF, cx + STRIPES_SQUARE_HALF, cy + STRIPES_SQUARE_HALF]


def _stripes(colour: tuple[int, int, int], direction: str, size: int, phase: int) -> Image.Image:
    """A ``size`` square of ``colour`` striped with white, half the period each, in ``direction``."""
    y, x = np.mgrid[0:size, 0:size]
    along = {"horizontal": y, "vertical": x, "rising diagonal": x + y, "falling diagonal": x - y}[direction]
    white = ((along + phase) % STRIPES_PERIOD_PX) < STRIPES_PERIOD_PX // 2
    pixels = np.where(white[..., None], np.uint8(255), np.array(colour, dtype=np.uint8))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_stripes_sample(index: int, seed: int = 0) -> StripesSample:
    """Sample ``index`` of the stripes task; the same (index, seed) always gives the same sample."""
    rng = random.Random(seed * 1_000_003 + index + 7_919)
    size = STRIPES_CANVAS
    background = tuple(rng.randrange(215, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    cells = rng.sample(range(STRIPES_GRID * STRIPES_GRID), 1 + len(STRIPES_DISTRACTORS))
    ways = rng.sample(STRIPES_OPTIONS, len(cells))
    squares: dict[str, list[float]] = {}
    directions: dict[str, str] = {}
    for colour, cell, way in zip((STRIPES_TARGET, *STRIPES_DISTRACTORS), cells, ways, strict=True):
        box = stripes_cell_box(cell)
        x1, y1, x2, _ = (round(v / COORD_SCALE * size) for v in box)
        image.paste(_stripes(COLOURS[colour], way, x2 - x1, rng.randrange(STRIPES_PERIOD_PX)), (x1, y1))
        squares[colour], directions[colour] = box, way
    answer = OPTION_LETTERS[STRIPES_OPTIONS.index(directions[STRIPES_TARGET])]
    return StripesSample(
        index=index, image=image, question=STRIPES_QUESTION, answer=answer, form=AnswerForm.MCA,
        category=STRIPES_CATEGORY, gt_boxes=[squares[STRIPES_TARGET]], squares=squares, directions=directions,
    )


def make_task_sample(task: str, index: int, seed: int = 0) -> SynthSample:
    """Sample ``index`` of ``task`` (one of ``TASKS``)."""
    if task == "stripes":
        return make_stripes_sample(index, seed)
    if task == "objects":
        return make_sample(index, seed)
    raise ValueError(f"unknown synthetic task {task!r} (expected one of: {', '.join(TASKS)})")
