"""Synthetic fine-grained VQA in the P2R-10k layout, for tests, the demo and the local pipeline.

Two tasks. ``objects`` (``make_sample``) mixes the three answer forms over coloured shapes and
words. ``dot`` (``make_dot_sample``) is the task the local pipeline trains and measures on: it is built
so that the P2R claim holds for the tiny model (see the section's comment).

In the ``objects`` task each sample is a high-resolution canvas (long side >= 2048 px) scattered with small objects -
coloured shapes and short words in boxes - and one question about a few of them, in one of the
three answer forms, with its ground-truth answer and ground-truth boxes (0-1000 coordinates).
The objects are small on purpose: at the model's resized resolution they are a handful of
patches, which is exactly the regime where perceive-then-crop should help.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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


# ------------------------------------------------------------------------------------ dot task
#
# A 2,048-px canvas with four filled squares on a 3 x 3 grid, one of them red; each square holds a
# dot, and the four dots have four different colours. "What colour is the dot on the red square?"
# At the pipeline's 65,536 model pixels the canvas shrinks 8x: a square is 18 px, easy to find,
# and its dot 8.5 px, a quarter of one merged vision token, blended into the square. The
# perceiver's crop of the red square (10 % padding of the image per side) shrinks only ~2.2x: the
# dot spans 31 px, a whole merged token. What the tiny model can learn decides the sizes (measured,
# fp32, lr 1e-3, batch 16, init std 0.1): from the crop it reads the dot's colour after 100 steps
# (held-out 1.0); from the whole image it stays at chance after 200. A variant whose detail is flat
# at the model's resolution by construction (stripes repeating every 8 px, the resize factor) was
# not learnt from the crop either within 150 steps, so the dot is the task. A crop of any other
# square shows a dot of another colour: a wrong answer.

TASKS = ("objects", "dot")
DOT_CANVAS = 2048
DOT_GRID = 3  # cells per side; four of the nine cells hold a square
DOT_CENTRES = (167, 500, 833)  # the cells' centres (0-1000) on both axes
DOT_SQUARE_HALF = 36  # half the square's side in 0-1000 units (147 px on the canvas)
DOT_DIAMETER_PX = 68
DOT_TARGET = "red"
DOT_DISTRACTORS = ("green", "blue", "yellow")
DOT_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "cyan": (0, 220, 230), "magenta": (255, 0, 255)}
DOT_OPTIONS = tuple(DOT_COLOURS)  # fixed order: option A is always white
DOT_QUESTION = with_options(
    f"What colour is the dot on the {DOT_TARGET} square?",
    [f"{letter}. {colour}" for letter, colour in zip(OPTION_LETTERS, DOT_OPTIONS, strict=True)],
)
DOT_CATEGORY = "dot-colour"
DOT_LABEL = f"{DOT_TARGET} square"


@dataclass
class DotSample(SynthSample):
    """A dot-task sample: the squares' boxes by colour (0-1000) and each square's dot colour."""

    squares: dict[str, list[float]] = field(default_factory=dict)
    dots: dict[str, str] = field(default_factory=dict)

    @property
    def dot_colour(self) -> str:
        return self.dots[DOT_TARGET]


def dot_cell_box(cell: int) -> list[float]:
    """The square's box (0-1000) in grid cell ``cell`` (row-major): one of ``DOT_GRID ** 2`` boxes."""
    cx, cy = DOT_CENTRES[cell % DOT_GRID], DOT_CENTRES[cell // DOT_GRID]
    return [cx - DOT_SQUARE_HALF, cy - DOT_SQUARE_HALF, cx + DOT_SQUARE_HALF, cy + DOT_SQUARE_HALF]


def make_dot_sample(index: int, seed: int = 0) -> DotSample:
    """Sample ``index`` of the dot task; the same (index, seed) always gives the same sample."""
    rng = random.Random(seed * 1_000_003 + index + 7_919)
    size = DOT_CANVAS
    background = tuple(rng.randrange(215, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cells = rng.sample(range(DOT_GRID * DOT_GRID), 1 + len(DOT_DISTRACTORS))
    dot_colours = rng.sample(DOT_OPTIONS, len(cells))
    squares: dict[str, list[float]] = {}
    dots: dict[str, str] = {}
    for colour, cell, dot in zip((DOT_TARGET, *DOT_DISTRACTORS), cells, dot_colours, strict=True):
        box = dot_cell_box(cell)
        x1, y1, x2, y2 = (round(v / COORD_SCALE * size) for v in box)
        draw.rectangle((x1, y1, x2, y2), fill=COLOURS[colour])
        cx, cy, r = (x1 + x2) // 2, (y1 + y2) // 2, DOT_DIAMETER_PX // 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=DOT_COLOURS[dot])
        squares[colour], dots[colour] = box, dot
    answer = OPTION_LETTERS[DOT_OPTIONS.index(dots[DOT_TARGET])]
    return DotSample(
        index=index, image=image, question=DOT_QUESTION, answer=answer, form=AnswerForm.MCA,
        category=DOT_CATEGORY, gt_boxes=[squares[DOT_TARGET]], squares=squares, dots=dots,
    )


def make_task_sample(task: str, index: int, seed: int = 0) -> SynthSample:
    """Sample ``index`` of ``task`` (one of ``TASKS``)."""
    if task == "dot":
        return make_dot_sample(index, seed)
    if task == "objects":
        return make_sample(index, seed)
    raise ValueError(f"unknown synthetic task {task!r} (expected one of: {', '.join(TASKS)})")
