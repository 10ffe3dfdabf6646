"""Score fusion against a plain re-statement of its definition, the character TF-IDF, the text
settings' refusals, and the demo titles being what their generator writes."""

from __future__ import annotations

import numpy as np
import pytest

from simserver.errors import RequestRefused
from simserver.hybrid import RRF_K, Lexical, absolute, fuse
from simserver.text_config import TextConfig, Weights
from simserver.text_search import check_fusion, check_query_text, parse_weights
from tests.conftest import DEMO


def _naive(scores, top_k, mask, weights, fusion, candidates):
    rows = [r for r in range(len(mask)) if mask[r]]
    w = {"image": weights.image, "text": weights.text}
    pool = set()
    for s in scores.values():
        pool |= set(sorted(rows, key=lambda r: (-s[r], r))[:candidates])
    pool = sorted(pool)
    fused = {}
    for r in pool:
        total = 0.0
        for m, s in scores.items():
            if fusion == "rrf":
                rank = sorted(rows, key=lambda q: (-s[q], q)).index(r) + 1
                total += w[m] / (RRF_K + rank)
            else:
                lo, hi = min(s[q] for q in pool), max(s[q] for q in pool)
                total += w[m] * ((s[r] - lo) / (hi - lo) if hi > lo else 1.0)
        fused[r] = total / sum(w[m] for m in scores) * ((RRF_K + 1) if fusion == "rrf" else 1)
    return sorted(pool, key=lambda r: (-fused[r], r))[:top_k], fused


@pytest.mark.parametrize("fusion", ["weighted", "rrf"])
@pytest.mark.parametrize("seed", range(6))
def test_fuse_equals_its_definition(fusion, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    scores = {"image": rng.random(n), "text": rng.random(n)}
    mask = rng.random(n) < 0.7
    weights = Weights(image=float(rng.random()), text=float(rng.random()) + 0.01)
    candidates, top_k = int(rng.integers(1, 20)), int(rng.integers(1, 10))
    got = fuse(scores, top_k, mask, weights, fusion, candidates)
    want, fused = _naive(scores, top_k, mask, weights, fusion, candidates)
    assert [c.row for c in got] == want
    assert [c.score for c in got] == pytest.approx([fused[r] for r in want])
    assert all(mask[c.row] for c in got)


def test_one_modality_is_its_own_ranking_and_exclude_works():
    s = np.array([0.1, 0.9, 0.5, 0.9])
    got = fuse({"text": s}, 3, np.ones(4, bool), Weights(), "weighted", 10, exclude=1)
    assert [c.row for c in got] == [3, 2, 0] and got[0].scores == {"text": 0.9}


def test_absolute_is_the_weighted_mean_of_own_scores():
    assert absolute({"image": 0.2, "text": 0.8}, Weights(image=1, text=3)) == pytest.approx(0.65)
    assert absolute({"image": 0.4}, Weights(image=0, text=1)) == pytest.approx(0.4)


def test_lexical_catches_typos_and_units():
    lex = Lexical(["Almonds, blanched 500 g", "Hazelnuts 500 g", "Chopsticks 12 pcs"])
    s = lex.scores("ALMODNS BLANCHED 500 GR")
    assert int(np.argmax(s)) == 0 and s[0] > s[1] + 0.1
    assert Lexical(["", ""]).scores("x") is None


def test_refusals_say_what_is_wrong():
    cfg = TextConfig(fields=["title"], max_query_chars=10)
    with pytest.raises(RequestRefused, match="empty"):
        check_query_text(" ", cfg)
    with pytest.raises(RequestRefused, match="limit of 10"):
        check_query_text("x" * 11, cfg)
    with pytest.raises(RequestRefused, match="positive"):
        check_fusion({"image": 0, "text": 0}, None, cfg)
    with pytest.raises(RequestRefused, match="weights.img"):
        check_fusion({"img": 1}, None, cfg)
    with pytest.raises(RequestRefused, match="fusion"):
        check_fusion(None, "max", cfg)
    with pytest.raises(RequestRefused, match="not JSON"):
        parse_weights("{")
    assert parse_weights('{"image": 1}') == {"image": 1}
    assert check_fusion(None, None, cfg) == (Weights(), "weighted")


def test_demo_titles_are_the_generators():
    from simserver.bench.match_set import metadata_csv, title

    assert (DEMO / "food" / "metadata.csv").read_text() == metadata_csv()
    assert title("fork_and_knife", "google") == title("fork_and_knife", "google")
    assert title("fork_and_knife", "google") != title("fork_and_knife", "twitter")
