"""One-off: copy the demo images from ../shared/data/images into demo/ (already committed).

Kept so the provenance of every demo file is reproducible; the project never reads ../shared.
"""

from __future__ import annotations

import csv
import random
import shutil
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/images")
DST = Path(__file__).resolve().parent.parent / "demo"
NUTS = {"peanuts", "chestnut", "coconut", "beans", "olive"}


def copy(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SRC / src, dst)


def main() -> None:
    text = (SRC / "labels.csv").read_text().replace("\r\n", "\n").replace("\r", "")
    rows = [r for r in csv.DictReader(text.splitlines()) if (SRC / r["path"]).is_file()]
    rng = random.Random(0)
    others = []
    for r in rows:
        path, label, item, source = r["path"], r["label"], r["item"], r["source"]
        ext = Path(path).suffix
        style = source.split()[0] if not path.startswith("emoji") else path.split("/")[1]
        if path.startswith("emoji_food/"):
            copy(path, DST / "food" / label / f"{item}-{style}{ext}")
            if item in NUTS:
                copy(path, DST / "almonds-suppliers" / item / f"{style}{ext}")
            else:
                others.append(r)
        else:
            others.append(r)
    # Clothing file names carry a stray carriage return ("boot\r.png"), so walk the folders instead.
    for f in sorted((SRC / "emoji_clothing").glob("*/*")):
        item = f.stem.replace("\r", "")
        copy(str(f.relative_to(SRC)), DST / "fashion" / item / f"{f.parent.name}{f.suffix}")
    # The "random" class: what a supplier site shows besides the product (other foods, tools, rooms).
    for r in rng.sample(others, 60):
        p = Path(r["path"])
        copy(
            r["path"],
            DST / "almonds-suppliers" / "random" / f"{p.parts[0]}-{r['item']}-{p.parent.name}{p.suffix}",
        )
    shutil.copyfile(SRC / "LICENSES.md", DST / "LICENSES.md")
    shutil.copyfile(SRC / "labels.csv", DST / "SOURCES.csv")


if __name__ == "__main__":
    main()
