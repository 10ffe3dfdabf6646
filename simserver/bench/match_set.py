"""The cross-group product set of ``simserver bench match`` (and the food demo's titles).

Images: ``demo/food``, 130 food and drink emoji each drawn by three vendors (Google, Twitter,
Microsoft Fluent 3D; licences in ``demo/LICENSES.md``). Each vendor plays a shop (``shop`` column:
``google``, ``twitter``, ``fluent``); one emoji is one product (``product`` column), so every product
is listed once per shop with a differently drawn picture.

Titles are **generated** (seeded, :func:`title`), not scraped: each product gets a pack size, and
each shop words it its own way from the emoji's name: the ``google`` shop writes the plain name and
size ("Fork And Knife, 500 g"), ``twitter`` reorders the words, abbreviates some of them and writes
the unit differently ("knife & fork 0.5kg"), ``fluent`` puts in one typo (a dropped or swapped
letter) and a third unit spelling ("FORK AND KNFIE 500 GR"). A product's size is the same in every
shop, so the size is a true clue, and several products share words ("... with straw", "glass of ...").
"""

from __future__ import annotations

import csv
import io
import random
import re
from pathlib import Path

from simserver.settings import PROJECT_ROOT

FOOD = PROJECT_ROOT / "demo" / "food"
SHOPS = {"google": "google", "twitter": "twitter", "fluent-emoji-3d": "fluent"}
_SIZES = [
    (250, "g"),
    (500, "g"),
    (1000, "g"),
    (330, "ml"),
    (750, "ml"),
    (1000, "ml"),
    (6, "pcs"),
    (12, "pcs"),
]
_ABBREV = {
    "and": "&",
    "with": "w/",
    "without": "w/o",
    "of": "",
    "green": "grn",
    "sweet": "swt",
    "roasted": "rstd",
    "potato": "pot.",
    "bottle": "btl",
    "glass": "gls",
    "cooked": "ckd",
    "bowl": "bwl",
    "chocolate": "choc",
    "fried": "frd",
    "pepper": "pepr",
}


def product_of(path: Path) -> tuple[str, str]:
    """(product, shop) of ``demo/food/<label>/<product>-<vendor>.<ext>``."""
    stem = path.stem
    for vendor, shop in SHOPS.items():
        if stem.endswith("-" + vendor):
            return stem[: -len(vendor) - 1], shop
    raise ValueError(f"{path}: not <product>-<vendor>")


def _size(amount: int, unit: str, shop: str) -> str:
    if unit == "pcs":
        return {"google": f"{amount} pcs", "twitter": f"{amount}pk", "fluent": f"{amount} PIECES"}[shop]
    if shop == "google":
        return f"{amount} {unit}"
    if shop == "twitter":
        big = {"g": "kg", "ml": "l"}[unit]
        return f"{amount / 1000:g}{big}" if amount >= 500 else f"{amount}{unit}"
    return f"{amount} {'GR' if unit == 'g' else 'ML'}"


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1 :]  # a dropped letter
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # two letters swapped


def title(product: str, shop: str, seed: int = 0) -> str:
    """The title ``shop`` gives ``product`` (deterministic for a seed)."""
    rng = random.Random(f"{seed}:{product}")
    amount, unit = _SIZES[rng.randrange(len(_SIZES))]
    words = [w for w in re.split(r"[_\s]+", product) if w]
    shop_rng = random.Random(f"{seed}:{product}:{shop}")
    if shop == "google":
        return " ".join(w.capitalize() for w in words) + ", " + _size(amount, unit, shop)
    if shop == "twitter":
        if len(words) > 1:
            words = words[1:] + words[:1] if shop_rng.random() < 0.5 else list(reversed(words))
        short = [_ABBREV.get(w, w) if shop_rng.random() < 0.7 else w for w in words]
        return " ".join(w for w in short if w).lower() + " " + _size(amount, unit, shop)
    j = shop_rng.randrange(len(words))
    words = [(_typo(w, shop_rng) if i == j else w) for i, w in enumerate(words)]
    return " ".join(words).upper() + " " + _size(amount, unit, shop)


def metadata_rows(folder: Path = FOOD, seed: int = 0) -> list[dict[str, str]]:
    rows = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.suffix in (".png", ".webp")):
        product, shop = product_of(p)
        rows.append(
            {
                "filename": p.relative_to(folder).as_posix(),
                "title": title(product, shop, seed),
                "shop": shop,
                "product": product,
            }
        )
    return rows


def metadata_csv(folder: Path = FOOD, seed: int = 0) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["filename", "title", "shop", "product"], lineterminator="\n")
    w.writeheader()
    w.writerows(metadata_rows(folder, seed))
    return buf.getvalue()
