"""`simserver bench relevance`: a target the data or the domain lacks is a one-line error (no
traceback, before anything is trained), and the site-verdict figures."""

from __future__ import annotations

import pytest

from simserver.bench.common import BenchError
from simserver.bench.relevance import relevance_figures, verdict_figures
from tests.unit.conftest import BLUE, RED, solid


@pytest.fixture
def photos(tmp_path):
    for label, colour in (("tools", RED), ("fishes", BLUE)):
        (tmp_path / label).mkdir()
        for i in range(3):
            (tmp_path / label / f"{i}.png").write_bytes(solid(colour))
    return tmp_path


def test_a_target_missing_from_the_data_is_named_with_the_categories(photos):
    # The domain's own target (almonds-suppliers: peanuts) when none is given: the crash.
    with pytest.raises(BenchError, match=r"target 'peanuts' is not a category .*fishes, tools"):
        relevance_figures(photos)
    with pytest.raises(BenchError, match="'nuts' is not a category"):
        relevance_figures(photos, target="nuts")
    with pytest.raises(BenchError, match="unknown domain 'shop'"):
        relevance_figures(photos, domain="shop")
    with pytest.raises(BenchError, match="has no target_label"):
        relevance_figures(photos, domain="fashion")
    with pytest.raises(BenchError, match="not a folder"):
        relevance_figures(photos / "nope", target="fishes")


def test_the_cli_prints_the_error_without_a_traceback(photos, capsys):
    from simserver.cli import main

    assert main(["bench", "relevance", "--data", str(photos), "--target", "nuts"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: target 'nuts' is not a category") and "Traceback" not in err


def test_verdict_figures():
    f = verdict_figures([True, True, False, False], [True, False, False, True], 2.0)
    assert f == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "seconds": 2.0}
    assert verdict_figures([False, False], [False, True], 1.0)["precision"] is None


def test_misjudged_lists_the_wrong_verdicts_with_their_counts():
    from simserver.bench.relevance import misjudged
    from simserver.schemas import SiteImage, SiteVerdict

    def verdict(relevant: bool, similar: list[tuple[str, bool]]) -> SiteVerdict:
        images = [
            SiteImage(name=f"site/{label}/{i}.jpg", similarity=0, margin=0, score=0, similar=s, nearest=[])
            for i, (label, s) in enumerate(similar)
        ]
        fraction = sum(s for _, s in similar) / len(similar)
        return SiteVerdict(
            relevant=relevant,
            fraction=fraction,
            target="nut",
            image_threshold=0.5,
            site_threshold=0.2,
            images=images,
        )

    right = verdict(True, [("nut", True), ("olive", False)])
    wrong = verdict(True, [("olive", True), ("nut", False), ("olive", False), ("pea", True)])
    out = misjudged([right, wrong], [True, False], "nut")
    assert out == [
        {
            "site": 1,
            "relevant": False,
            "images": 4,
            "target_images": 1,
            "similar": 2,
            "similar_not_target": 2,
            "fraction": 0.5,
            "site_threshold": 0.2,
        }
    ]
