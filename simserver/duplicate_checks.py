"""Duplicates against a served version: check uploads, screen an upsert, scan the whole catalog,
calibrate on demand. The decision rule and the calibration are in :mod:`simserver.duplicates`, the
verification in :mod:`simserver.verification`, the whole-catalog scan in
:mod:`simserver.duplicate_groups`; this module applies them to a :class:`simserver.catalog.Catalog`
and its stored images.

Plain functions, no BentoML: the index service calls them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import numpy as np
from PIL import Image

from simserver import duplicate_groups, verification
from simserver import duplicates as dup
from simserver.catalog import Catalog
from simserver.domain_config import DomainConfig
from simserver.errors import Conflict
from simserver.index import Item
from simserver.ingest import Sample
from simserver.repository import Repository
from simserver.schemas import (
    DuplicateGroup,
    DuplicateGroupsReply,
    DuplicateMatch,
    DuplicateResult,
    NewItemDuplicate,
)

logger = logging.getLogger(__name__)

OnDuplicate = str  # "allow" | "skip" | "reject"
ON_DUPLICATE = ("allow", "skip", "reject")


def decision_for(catalog: Catalog, cfg: DomainConfig) -> tuple[dup.Decision, bool]:
    """The served version's calibrated decision, or the default rule (and whether calibrated)."""
    d = dup.decision_of(catalog.meta)
    return (d, True) if d is not None else (dup.default_decision(cfg.duplicates), False)


def stored_image(repo: Repository) -> Callable[[Item], Image.Image]:
    def load(item: Item) -> Image.Image:
        return dup.open_for_calibration(repo.image(item.image_key))

    return load


def check_vectors(
    catalog: Catalog,
    cfg: DomainConfig,
    samples: list[Sample],
    vectors: np.ndarray,
    load_image: Callable[[Item], Image.Image],
    exclude_ids: bool = False,
) -> list[DuplicateResult]:
    """Each sample against its ``duplicates.candidates`` nearest items: candidates over the
    decision's ``min_score`` verified geometrically, scored ``same_item``. ``exclude_ids``: a
    sample's own id is not its duplicate (an upload replacing an item)."""
    decision, _ = decision_for(catalog, cfg)
    k = cfg.duplicates.candidates + (1 if exclude_ids else 0)
    hits = catalog.search(vectors, k) if len(catalog) else [[] for _ in samples]
    out = []
    for s, found in zip(samples, hits, strict=True):
        found = [h for h in found if not (exclude_ids and h.id == s.id)][: cfg.duplicates.candidates]
        cands = [h for h in found if h.score >= decision.min_score]
        matches: list[DuplicateMatch] = []
        duplicate_of: list[bool] = []
        if cands:
            q = verification.features(dup.open_for_calibration(s.data)) if decision.verify else None
            for h in cands:
                ev = verification.Evidence()
                if q is not None:
                    item = catalog.get(h.id)
                    try:
                        ev = (
                            verification.verify(q, verification.features(load_image(item), mirror=False))
                            if item
                            else ev
                        )
                    except KeyError:  # the stored image is gone (collected): embedding only
                        logger.warning("duplicates: image of %s missing", h.id)
                signals = (
                    np.asarray([h.score]),
                    np.asarray([ev.inliers]),
                    np.asarray([ev.ncc]),
                    np.asarray([ev.edge_ncc]),
                    np.asarray([ev.detail_ncc]),
                )
                p = float(decision.same_item(*signals)[0])
                matches.append(
                    DuplicateMatch(
                        id=h.id,
                        name=h.name,
                        label=h.label,
                        score=h.score,
                        same_item=round(p, 6),
                        inliers=ev.inliers,
                        ncc=round(ev.ncc, 4),
                        edge_ncc=round(ev.edge_ncc, 4),
                        detail_ncc=round(ev.detail_ncc, 4),
                    )
                )
                duplicate_of.append(bool(decision.duplicate(*signals)[0]))
        order = sorted(range(len(matches)), key=lambda m: -matches[m].same_item)
        matches = [matches[m] for m in order]
        duplicate = any(duplicate_of)
        out.append(DuplicateResult(name=s.name, duplicate=duplicate, matches=matches))
    return out


def threshold_of(catalog: Catalog, cfg: DomainConfig) -> tuple[float, bool]:
    d, calibrated = decision_for(catalog, cfg)
    return d.threshold, calibrated


def screen(
    results: list[DuplicateResult], samples: list[Sample], on_duplicate: OnDuplicate
) -> tuple[list[int], list[NewItemDuplicate]]:
    """Which samples an upsert keeps, and the duplicates it reports (``reject``: a 409 naming them)."""
    found = [(i, r) for i, r in enumerate(results) if r.duplicate]
    if on_duplicate == "reject" and found:
        names = ", ".join(f"{samples[i].id} ~ {r.matches[0].id}" for i, r in found[:10])
        raise Conflict(
            f"{len(found)} uploaded item(s) duplicate items in the catalog ({names}); nothing was added "
            "(on_duplicate=reject; send on_duplicate=skip to add the others)"
        )
    action = "skipped" if on_duplicate == "skip" else "added"
    report = [
        NewItemDuplicate(id=samples[i].id, name=samples[i].name, match=r.matches[0], action=action)
        for i, r in found
    ]
    dupes = {i for i, _ in found}
    keep = [i for i in range(len(samples)) if not (on_duplicate == "skip" and i in dupes)]
    return keep, report


def groups(catalog: Catalog, cfg: DomainConfig, repo: Repository, domain: str) -> DuplicateGroupsReply:
    if not len(catalog):
        raise Conflict(f"domain {domain!r}: the catalog is empty, there are no duplicates to find")
    decision, _ = decision_for(catalog, cfg)
    found = duplicate_groups.find_groups(catalog, decision, cfg.duplicates, stored_image(repo))
    return DuplicateGroupsReply(
        domain=domain,
        version=catalog.version,
        groups=[DuplicateGroup(**g) for g in found["groups"]],
        to_remove=found["to_remove"],
        items=found["items"],
        candidate_pairs=found["candidate_pairs"],
        verified_pairs=found["verified_pairs"],
        seconds=found["seconds"],
    )


def calibration_input(catalog: Catalog, cfg: DomainConfig, encoder: str) -> str:
    """A digest of everything an on-demand calibration of ``catalog`` depends on: its live rows
    (segments and tombstones), the encoder that makes their copies' vectors, and the domain's
    ``duplicates`` settings. The calibration is seeded, so equal digests mean equal results: a
    version that carries its own digest (``duplicates_input``) need not be calibrated again."""
    basis = {
        "segments": catalog.meta.get("segments", []),
        "tombstones": catalog.meta.get("tombstones", []),
        "encoder": encoder,
        "duplicates": cfg.duplicates.model_dump(mode="json"),
        # a decision on other signals, or on signals measured otherwise (an older release's), is refitted
        "signals": list(dup.SIGNALS),
        "verification": verification.parameters(),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def calibrate_catalog(
    catalog: Catalog,
    cfg: DomainConfig,
    repo: Repository,
    encode_pixels: Callable[[np.ndarray], np.ndarray],
    image_size: int,
    batch_size: int = 32,
) -> dict:
    """The calibration a training runs, on the served catalog (its stored images and vectors)."""
    items, vectors = catalog.live()
    if len(items) < 2:
        raise Conflict(f"domain {cfg.name!r}: {len(items)} item(s); calibration needs at least 2")
    return dup.calibrate_rows(
        cfg.duplicates,
        lambda r: repo.image(items[r].image_key),
        vectors,
        np.asarray([it.label for it in items]),
        encode_pixels,
        catalog.metric,
        image_size,
        batch_size,
    )
