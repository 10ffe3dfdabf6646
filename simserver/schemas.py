"""Typed replies: the HTTP API's JSON (they also document it in /docs), the replies the internal
services give the gateway, and what :mod:`simserver.client` returns. One model per concept."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from simserver.duplicates import Decision
from simserver.finetune import TrainingMode


def _not_a_bool(value: Any) -> Any:
    """A number parameter sent as ``true``/``false`` is a mistake; pydantic would read it as 1/0."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


_NUMBER = BeforeValidator(_not_a_bool)

# Request parameters of the HTTP routes, validated by BentoML (a violation is a 400 naming the field).
# Bounds inside the optional: on the union, a null would meet the bound (a TypeError, a 500).
TopK = Annotated[
    Annotated[int, Field(ge=1, le=100)] | None, _NUMBER, Field(description="default: the domain's top_k")
]
Mode = Annotated[
    TrainingMode | None,
    Field(
        description="auto: fine-tune and promote only if better on the hold-out; finetune: always; "
        "pretrained: never. Default: the domain's training.mode"
    ),
]
CatalogMode = Annotated[
    Literal["replace", "merge"] | None,
    Field(
        description="replace (default): the archive becomes the catalog; merge: the archive is upserted "
        "into the current catalog, and fine-tuning, evaluation and index cover the merged catalog"
    ),
]
ImageThreshold = Annotated[
    Annotated[float, Field(ge=-1, le=1)] | None,
    _NUMBER,
    Field(
        description="threshold on each image's score (the probe's, in [0, 1], or the margin, by the "
        "version's scorer); default: calibrated at training"
    ),
]
SiteThreshold = Annotated[
    Annotated[float, Field(ge=0, le=1)] | None,
    _NUMBER,
    Field(description="default: the domain's relevance.site_threshold"),
]
Nearest = Annotated[int, _NUMBER, Field(ge=0, le=20, description="neighbours listed per image")]
OnDuplicate = Annotated[
    Literal["allow", "skip", "reject"],
    Field(
        description="items that duplicate existing ones: added and listed (allow), left out (skip), "
        "409 (reject)"
    ),
]
# Any: BentoML json-decodes a multipart text field itself; simserver.filters.parse_filter checks
# whatever arrives (text or decoded JSON) and says what is wrong.
FilterText = Annotated[
    Any,
    Field(
        description='JSON object, e.g. {"label": {"in": ["dress", "coat"]}, "metadata.price": {"lt": 50}} '
        "(several keys = AND; fields label, id, name, metadata.<column>; "
        "operators eq, ne, in, nin, gt, gte, lt, lte)"
    ),
]


class Hit(BaseModel):
    """One indexed item found near a query (a search result, or a site image's neighbour)."""

    id: str = Field(
        description="the item's stable id (metadata.csv's id column, else <label>/<file>); "
        "GET /{domain}/images/{id} returns its image"
    )
    name: str = Field(description="path of the image in the training set, <category>/<file>")
    label: str = Field(description="category folder the image came from")
    score: float = Field(ge=0, le=1, description="1 = identical image, 0 = unrelated")
    distance: float = Field(description="raw distance in the domain's metric (0 = identical)")
    metadata: dict[str, str] = Field(default_factory=dict, description="row of metadata.csv, if any")
    scores: dict[str, float] | None = Field(
        None, description="text or hybrid search: each modality's own score (image, text) before fusion"
    )


class SearchReply(BaseModel):
    domain: str
    version: str
    results: list[Hit]


class Skipped(BaseModel):
    """An uploaded file that was left out, and why (the rest of the upload was used)."""

    name: str
    reason: str


class RetrievalMetrics(BaseModel):
    recall_at_1: float = Field(
        description="share of hold-out queries whose nearest training image has their label"
    )
    recall_at_5: float
    map_at_r: float = Field(
        description="mean average precision at R (R = training images of the query's label)"
    )
    per_class_recall_at_1: dict[str, float]
    queries: int
    recall_at_1_ci: list[float] | None = Field(
        None, description="bootstrap interval of Recall@1 over the queries (training.promotion.confidence)"
    )


class Gain(BaseModel):
    recall_at_1: float = Field(description="fine-tuned minus pretrained Recall@1 on the same queries")
    ci: list[float] = Field(description="paired bootstrap interval of that gain")


class OpenSetEvaluation(BaseModel):
    held_out_categories: list[str] = Field(description="whole categories the open-set head never saw")
    train_images: int
    queries: int
    pretrained: RetrievalMetrics
    finetuned: RetrievalMetrics = Field(description="a head trained without the held-out categories")
    gain: Gain


class WorstQueryHit(BaseModel):
    id: str
    label: str


class WorstQuery(BaseModel):
    """A hold-out query whose first result has another label (both are catalog items)."""

    id: str = Field(description="the hold-out image's item id")
    label: str = Field(description="its label (the right one)")
    first: WorstQueryHit = Field(description="its nearest training image, of another label")
    correct_rank: int | None = Field(description="rank (1 = first) of its first result with the right label")


class FusionHoldout(BaseModel):
    """Recall@1 of cross-group matching on the hold-out products, per modality."""

    queries: int = Field(description="(item, other group) pairs of the held-out products")
    image_only: float
    text_only: float
    fused: float = Field(description="with the learned weights")
    fused_domain_weights: float = Field(description="with the yaml's text.weights")


class FusionLearning(BaseModel):
    """The fusion weights and match threshold a version serves with (simserver/fusion_learning.py)."""

    learned: bool = Field(description="false: nothing to learn from; the yaml's values are served")
    reason: str
    fusion: str = Field(description="the fusion the weights were learned for (text.fusion)")
    weights: dict[str, float] = Field(description="image/text weights served by /search and /match")
    match_threshold: float = Field(description="/match's same_product threshold served")
    items: int | None = None
    products: dict[str, int] | None = Field(None, description="products fitted on / held out")
    fit: dict | None = Field(
        None, description="Recall@1 and the threshold's balanced accuracy on the fit part"
    )
    holdout: FusionHoldout | None = None
    seconds: float | None = None


class Evaluation(BaseModel):
    mode: str
    pretrained: RetrievalMetrics | None = Field(description="the domain's configured encoder on the hold-out")
    finetuned: RetrievalMetrics | None = Field(description="backbone + fine-tuned head on the hold-out")
    promoted: bool = Field(description="whether this version serves the fine-tuned encoder")
    reason: str
    holdout_images: int
    train_images: int
    augmented_views: int
    blend: float | None = Field(
        None,
        description="the served head's blend weight (raised while the open set fell short); None: no blend",
    )
    preserve: float | None = Field(
        None,
        description="the similarity-preservation weight the served head was fitted with "
        "(training.preserve, or training.open_set_preserve when the open set fell short); None: no head",
    )
    seconds: dict[str, float]
    gain: Gain | None = Field(None, description="closed-set (stratified hold-out) Recall@1 gain")
    open_set: OpenSetEvaluation | None = Field(None, description="whole categories held out")
    promotion: dict | None = Field(None, description="the auto rule applied (training.promotion)")
    pair: dict | None = Field(
        None,
        description="hold-out x training pairs: same-label threshold, ROC AUC, accuracy (POST /similarity)",
    )
    worst_queries: list[WorstQuery] | None = Field(
        None,
        description="the served embedding's hold-out queries whose first result has the wrong label, "
        "worst first (at most 8)",
    )
    fusion: FusionLearning | None = Field(
        None, description="domains with text: the fusion weights learned across groups (text.product)"
    )


class RuntimeSide(BaseModel):
    recall_at_1: float
    map_at_r: float
    queries: int


class EncoderRuntime(BaseModel):
    """Which runtime a version serves, float32 or int8, and why (``encoder_runtime`` in the yaml)."""

    runtime: str = Field(description="float32 | int8: where the version's index and query vectors come from")
    reason: str
    int8_max_loss: float
    float32: RuntimeSide | None = Field(None, description="the served encoder in float32 on the hold-out")
    int8: RuntimeSide | None = Field(None, description="its int8 runtime on the same hold-out")
    recall_at_1_loss: float | None = Field(None, description="float32 minus int8")
    recall_at_1_loss_ci: list[float] | None = Field(None, description="bootstrap interval, paired per query")
    map_at_r_loss: float | None = None
    img_per_s: dict[str, float] | None = Field(None, description="each runtime, measured in the training")
    seconds: float = Field(0.0, description="what building and evaluating int8 added to the training")


class TrainReply(BaseModel):
    version: str
    indexed: int
    skipped: list[Skipped]
    labels: dict[str, int]
    seconds: float
    encoder: str | None = Field(None, description="encoder this version serves with")
    encoder_id: str | None = None
    evaluation: Evaluation | None = None
    duplicates: DuplicateCalibration | None = Field(
        None,
        description="the duplicate decision calibrated on synthetic copies "
        "(per-transform recall, look-alike FPR)",
    )
    relevance: dict | None = Field(
        None, description="domains with a target_label: the calibrated image_threshold and how it was found"
    )
    runtime: EncoderRuntime | None = None


class SiteImage(BaseModel):
    name: str = Field(description="path in the archive, or the uploaded file's name")
    similarity: float = Field(
        description="score of the nearest target-label image among the top_k nearest (0 if none)"
    )
    margin: float = Field(description="similarity minus the score of the nearest image of another label")
    score: float = Field(
        description="what image_threshold is compared with: the probe's P(target) in [0, 1] (scorer probe) "
        "or the margin (scorer margin)"
    )
    similar: bool = Field(description="score >= image_threshold")
    nearest: list[Hit]


class SiteBasis(BaseModel):
    """What a likelihood site threshold rests on: the leave-one-out image-level counts of the
    version's calibration and the expected fraction of similar images on each kind of site."""

    positives: int = Field(description="target images the calibration scored (leave-one-out)")
    negatives: int = Field(description="other images it scored")
    image_recall: float = Field(description="share of target images found similar")
    image_recall_ci95: list[float] | None = Field(None, description="Wilson 95% interval")
    image_false_positive_rate: float = Field(description="share of other images found similar")
    image_false_positive_rate_ci95: list[float] | None = None
    relevant_share: float = Field(description="a relevant site shows at least this share of target images")
    irrelevant_share: float = Field(description="an irrelevant one at most this share")
    expected_fraction_relevant: float = Field(description="similar-image fraction of a relevant_share site")
    expected_fraction_irrelevant: float = Field(description="of an irrelevant_share site")


class SiteVerdict(BaseModel):
    relevant: bool = Field(description="fraction >= site_threshold")
    fraction: float = Field(description="share of the site's usable images that are similar to the target")
    target: str
    scorer: Literal["probe", "margin"] = Field(
        "margin",  # what servers before the probe scored by (their replies lack the field)
        description="probe: a linear classifier fitted at training scores each image; margin: its kNN margin",
    )
    image_threshold: float = Field(description="score threshold (calibrated at training, or the request's)")
    site_threshold: float = Field(description="fraction needed for 'relevant' (derived: see site_rule)")
    site_rule: str = Field(
        "fixed",  # what servers before the likelihood rule applied (their replies lack the field)
        description="likelihood: from the calibrated image recall (equivalent to log_likelihood_ratio >= 0); "
        "fixed: the domain's relevance.site_threshold; request: the request's site_threshold",
    )
    log_likelihood_ratio: float | None = Field(
        None, description="likelihood rule: log P(this many similar | relevant) / P(... | irrelevant)"
    )
    basis: SiteBasis | None = Field(None, description="likelihood rule: what the site threshold rests on")
    images: list[SiteImage]


class RelevanceReply(SiteVerdict):
    domain: str
    version: str
    skipped: list[Skipped]


class SimilarityReply(BaseModel):
    metric: str
    distance: float
    score: float = Field(ge=0, le=1)
    domain: str | None = Field(None, description="with a domain: compared with its served encoder and metric")
    version: str | None = None
    same_label: bool | None = Field(
        None,
        description="distance <= the pair threshold calibrated on the domain's hold-out "
        "(None: none calibrated)",
    )
    threshold: float | None = Field(None, description="that pair threshold (a distance)")


class IndexStatus(BaseModel):
    """What a domain's index service serves right now."""

    version: str | None
    count: int = 0
    labels: dict[str, int] = Field(default_factory=dict)
    encoder_id: str | None = None
    serving_encoder: str | None = Field(None, description="encoder of the served version (fine-tuned or not)")
    evaluation: Evaluation | None = None
    created_at: str | None = None
    store_error: str | None = Field(None, description="why the newest version could not be loaded, if so")
    runtime: EncoderRuntime | None = None
    duplicates: DuplicateCalibration | None = Field(
        None, description="the served version's duplicate calibration"
    )


class DomainInfo(IndexStatus):
    name: str
    description: str
    encoder: str = Field(description="the domain's configured (pretrained) encoder")
    metric: str
    top_k: int


class ItemInfo(BaseModel):
    """An indexed item of the version being served (its image is fetched from the store)."""

    version: str
    id: str
    name: str
    label: str
    image_key: str
    # Not `media_type`: BentoML's IO models reserve that name and drop such a field in transit.
    content_type: str


class EncoderInfo(BaseModel):
    id: str
    dim: int
    image_size: int
    runtime: str


class BatchingStats(BaseModel):
    runs: int = Field(description="model runs")
    calls: int = Field(description="encode calls served (one per search)")
    rows: int = Field(description="images encoded")
    calls_per_run: dict[str, int] = Field(description="histogram: calls batched together -> runs")


class EncoderStats(BaseModel):
    batching: dict[str, BatchingStats] = Field(description="per base encoder (fine-tuned ones share it)")
    export_templates_ready: bool = Field(
        description="false while export templates are traced in the background (when a training starts)"
    )


# -- the living catalog: items, versions ------------------------------------------------------------
class ItemsReply(BaseModel):
    """What an upload of items changed (``POST /{domain}/items``)."""

    version: str = Field(description="the version now served, with these items")
    added: int = Field(description="items whose id was new")
    replaced: int = Field(description="items whose id existed: their image, label and metadata replaced")
    skipped: list[Skipped]
    count: int = Field(description="items in the catalog now")
    duplicates: list[NewItemDuplicate] = Field(
        default_factory=list, description="uploaded items that duplicate existing ones, with the match"
    )


class ItemRecord(BaseModel):
    id: str
    name: str
    label: str
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: str | None = Field(None, description="when this id's current image was added")


class ItemPage(BaseModel):
    domain: str
    version: str
    total: int = Field(description="items matching the query (all pages)")
    offset: int
    limit: int
    items: list[ItemRecord]


class DeleteRequest(BaseModel):
    """``POST /{domain}/items/delete``: ``ids``, or a ``filter`` (see ``/search``), not both."""

    ids: list[str] | None = Field(None, max_length=100_000)
    filter: dict | None = None


class DeleteReply(BaseModel):
    version: str
    deleted: int
    count: int = Field(description="items in the catalog now")


class VersionInfo(BaseModel):
    version: str
    created_at: str | None
    count: int
    kind: str = Field(description="train | items | delete | activate | compact")
    active: bool = Field(description="the version served now")
    evaluation: Evaluation | None = None
    parent: str | None = None
    activated_from: str | None = None


# -- a training's progress (GET /{domain}/train/progress) ---------------------------------------------
TrainingStage = Literal[
    "reading", "encoding", "training", "evaluating", "indexing", "publishing", "done", "failed"
]


class TrainProgress(BaseModel):
    """Where a training is (:mod:`simserver.progress`); read from the artifact store: any replica answers."""

    stage: TrainingStage
    done: int = Field(description="images (or augmented views) of this stage done")
    total: int = Field(description="images of this stage; 0 when not known in advance")
    seconds: float = Field(description="since the trainer started; to the end once finished")
    eta_seconds: float | None = Field(description="this stage's remaining seconds at its rate so far")
    error: str | None = Field(None, description="stage failed: why")


# -- image + text: product matching across groups ---------------------------------------------------
class AppliedWeights(BaseModel):
    """Which fusion weights a /match answer applied."""

    weights: dict[str, float] | None = Field(None, description="the image/text weights applied")
    weights_from: Literal["request", "version", "domain"] | None = Field(
        None, description="request: sent; version: learned at its training; domain: the yaml's text.weights"
    )


class GroupMatch(BaseModel):
    group: str = Field(description="the group (the domain's text.group column) this match is from")
    hit: Hit = Field(description="the group's best item by fused score")
    match_score: float = Field(description="weighted mean of the pair's own image and text scores")
    same_product: bool = Field(description="match_score >= threshold")


class MatchReply(AppliedWeights):
    domain: str
    version: str
    group: str | None = Field(None, description="the query's own group (skipped), if known")
    threshold: float
    matches: list[GroupMatch]


# Request parameters of /search's text side and /match.
QueryText = Annotated[
    str | None,
    Field(description="query text (domains with text configured): matched against the items' text fields"),
]
WeightsText = Annotated[
    Any,
    Field(
        description='JSON object {"image": 0.3, "text": 0.7}: how much each modality counts when both are '
        "sent (non-negative, positive sum). Default: the weights learned at the version's training "
        "(text.product), else the domain's text.weights"
    ),
]
FusionName = Annotated[
    Literal["weighted", "rrf"] | None,
    Field(
        description="weighted: each modality's scores min-max normalised over the pooled candidates, then "
        "weighted; rrf: reciprocal-rank fusion. Default: the domain's text.fusion"
    ),
]
MatchThreshold = Annotated[
    Annotated[float, Field(ge=0, le=1)] | None,
    _NUMBER,
    Field(
        description="same-product threshold on match_score; default: the one learned at the version's "
        "training (text.product), else the domain's text.match_threshold"
    ),
]


GroupName = Annotated[str, Field(min_length=1, description="a value of the domain's text.group column")]


class GroupPair(BaseModel):
    id: str = Field(description="an item of the group")
    hit: Hit = Field(description="its best match in the other group, by fused score")
    match_score: float = Field(description="weighted mean of the pair's own image and text scores")
    same_product: bool = Field(description="match_score >= threshold")


class GroupPairsReply(AppliedWeights):
    domain: str
    version: str
    group: str
    against: str
    threshold: float
    pairs: list[GroupPair] = Field(description="one per item of group, best match_score first")


# -- duplicates (simserver/duplicates.py, duplicate_groups.py) -----------------------------------------
class DuplicateMatch(BaseModel):
    id: str
    name: str
    label: str
    score: float = Field(ge=0, le=1, description="embedding similarity, as search reports it")
    same_item: float = Field(
        ge=0,
        le=1,
        description="calibrated probability that this match is the same item (a copy), not a look-alike",
    )
    inliers: int = Field(description="geometric verification: RANSAC inliers of ORB matches")
    ncc: float = Field(0.0, description="template match of the grey thumbnails (0..1; 0: not verified)")
    edge_ncc: float = Field(0.0, description="template match of their edges (0..1; 0: not verified)")
    detail_ncc: float = Field(
        0.0,
        description="fine detail once aligned: the median correlation of 8 x 8 band-passed cells "
        "(-1..1; 0: not verified)",
    )


class DuplicateResult(BaseModel):
    name: str = Field(description="the checked file's name")
    duplicate: bool = Field(description="some match has same_item >= threshold")
    matches: list[DuplicateMatch] = Field(description="the candidates checked, most likely copy first")


class DuplicateCheckReply(BaseModel):
    domain: str
    version: str
    threshold: float = Field(description="same_item threshold (calibrated for duplicates.precision)")
    calibrated: bool = Field(description="false: the version has no calibration yet, a default rule decides")
    results: list[DuplicateResult]
    skipped: list[Skipped] = Field(default_factory=list)


class DuplicateGroup(BaseModel):
    keep: str = Field(description="the group's oldest item (then smallest id)")
    duplicates: list[str]
    scores: list[float] = Field(description="per duplicate: its highest same_item with a group member")


class DuplicateGroupsReply(BaseModel):
    domain: str
    version: str
    groups: list[DuplicateGroup]
    to_remove: list[str] = Field(description="every group's duplicates (keep the 'keep')")
    items: int = Field(description="items scanned")
    candidate_pairs: int = Field(description="neighbour pairs over the decision's min_score")
    verified_pairs: int = Field(
        description="of them geometrically verified (at most duplicates.max_verified_pairs)"
    )
    seconds: float


class TransformRecall(BaseModel):
    recall: dict[str, float] = Field(description="per transform: share of synthetic copies flagged")
    recall_min: float | None = None
    lookalike_fpr: float | None = Field(None, description="share of look-alike pairs flagged")
    copies: int = 0
    lookalikes: int = 0


class DuplicateCalibration(TransformRecall):
    """What a calibration fitted (stored in the version's meta.json under ``duplicates``)."""

    decision: Decision | None = None
    precision_target: float | None = None
    embedding_only: TransformRecall | None = Field(
        None, description="the same calibration without geometric verification, for comparison"
    )
    images: int = 0
    seconds: float = 0.0
    reason: str | None = Field(None, description="why there is no decision, if so")


class NewItemDuplicate(BaseModel):
    """An uploaded item that duplicates an item already in the catalog."""

    id: str
    name: str
    match: DuplicateMatch
    action: str = Field(description="on_duplicate applied: added (allow) or skipped (skip)")


ItemsReply.model_rebuild()
IndexStatus.model_rebuild()
TrainReply.model_rebuild()
