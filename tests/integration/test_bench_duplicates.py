"""`simserver bench duplicates --data DIR` with the real encoder on a small folder of real images:
every method's recall per transform and look-alike rate, on the same test pairs."""

from __future__ import annotations

import json
import shutil

from simserver.copies import TRANSFORMS
from tests.integration.conftest import TEST_DATA


def test_bench_duplicates_reports_every_method_on_the_same_pairs(builtin_tag, tmp_path, capsys):
    from simserver.cli import main

    for label, names in (
        ("tools", ["hammer1.webp", "hammer2.webp", "plier1.webp", "plier2.webp", "wrench.webp"]),
        ("renders", ["render_speaker2.png", "render_speaker3.png", "render_lockedLocker.png"]),
    ):
        (tmp_path / label).mkdir()
        for n in names:
            shutil.copy(TEST_DATA / n, tmp_path / label / n)
    (tmp_path / "tools" / "notes.txt").write_text("not an image: skipped")
    assert (
        main(
            [
                "bench",
                "duplicates",
                "--data",
                str(tmp_path),
                "--originals",
                "6",
                "--look-alikes",
                "1",
                "--json",
            ]
        )
        == 0
    )
    (result,) = json.loads(capsys.readouterr().out)["sets"]
    assert result["images"] == 8 and result["labels"] == 2
    assert result["calibration_originals"] == result["test_originals"] == 3
    assert result["copies"] == 3 * len(TRANSFORMS) and result["lookalike_pairs"] == 3
    methods = result["methods"]
    ours = "ours (embedding + ORB/RANSAC + template + detail match, calibrated)"
    assert (
        ours in methods and "ours without detail match (embedding + ORB/RANSAC + template match)" in methods
    )
    assert {"phash distance <= 10 (imagededup default)", "dhash at 1% look-alike FPR"} <= set(methods)
    for name, m in methods.items():
        assert set(m["recall"]) == set(TRANSFORMS), name
        assert all(0 <= r <= 1 for r in m["recall"].values()) and 0 <= m["lookalike_fpr"] <= 1, name
        assert m["recall_min"] == min(m["recall"].values())
    # exact and mirrored copies of real images are found by our decision, whatever the draw
    assert methods[ours]["recall"]["mirror"] == 1.0 and methods[ours]["recall"]["jpeg"] == 1.0
