"""Remote commands of the ``simserver`` CLI: each talks to a running server through
:mod:`simserver.client` and prints the reply as one line of JSON on stdout.

Every command takes ``--url`` (default: ``$SIMSERVER_URL``, else http://127.0.0.1:3000) and
``--api-key`` (default: ``$SIMSERVER_API_KEY``). A refusal or an unreachable server prints
``{"error": ..., "status": ...}`` on stderr and exits 1; a missing local file or argument exits 2.

Commands: ``domains``, ``stats``, ``ready``, ``search``, ``similar``, ``items add|delete|list``,
``similarity``, ``image``, ``relevance``, ``train``, ``train-status``, ``train-result``,
``train-progress``.
:func:`add_parsers` adds them to the CLI's sub-commands; each sets ``func``
(``args.func(args)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from simserver.cli.progress import StageBars
from simserver.client import DEFAULT_URL, Client, MatchGroupsOptions, SimserverError, StoredImage, TaskStatus
from simserver.finetune import TrainingMode

Handler = Callable[[Client, argparse.Namespace], Any]


def _emit(reply: Any) -> None:
    data: Any
    if isinstance(reply, BaseModel):
        data = reply.model_dump(mode="json")
    elif isinstance(reply, list):
        data = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in reply]
    else:
        data = reply
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class UsageError(ValueError):
    """A command line that cannot be sent (exit 2)."""


def _run(
    handler: Handler, exit_code: Callable[[Any], int] | None = None
) -> Callable[[argparse.Namespace], int]:
    """The ``func`` of a command: connect, run ``handler``, print its reply; errors as JSON on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            with Client(args.url, api_key=args.api_key or None, timeout=args.request_timeout) as client:
                reply = handler(client, args)
        except SimserverError as exc:
            body: dict[str, Any] = {"error": exc.error, "status": exc.status}
            if exc.task_id:
                body["task_id"] = exc.task_id
            sys.stderr.write(json.dumps(body, ensure_ascii=False) + "\n")
            return 1
        except (UsageError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            sys.stderr.write(json.dumps({"error": str(exc), "status": None}) + "\n")
            return 2
        _emit(reply)
        return exit_code(reply) if exit_code else 0

    return run


# -- handlers ------------------------------------------------------------------------------------------
def _domains(client: Client, args: argparse.Namespace) -> Any:
    return client.domains()


def _stats(client: Client, args: argparse.Namespace) -> Any:
    return client.stats()


def _ready(client: Client, args: argparse.Namespace) -> Any:
    return {"ready": client.ready()}


def _json_object(text: str | None, option: str, example: str) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{option}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{option}: a JSON object, e.g. '{example}'")
    return value


def _json_filter(text: str | None) -> dict | None:
    return _json_object(text, "--filter", '{"label": "dress"}')


def _search(client: Client, args: argparse.Namespace) -> Any:
    if args.text is None and args.weights is None and args.fusion is None:
        if args.image is None:
            raise UsageError("give an image file, or --text")
        return client.domain(args.domain).search(
            args.image, top_k=args.top_k, filter=_json_filter(args.filter)
        )
    return client.domain(args.domain).search_text(
        args.text,
        image=args.image,
        top_k=args.top_k,
        filter=_json_filter(args.filter),
        weights=_json_weights(args.weights),
        fusion=args.fusion,
    )


def _json_weights(text: str | None) -> dict | None:
    return _json_object(text, "--weights", '{"image": 0.3, "text": 0.7}')


def _match_groups(client: Client, args: argparse.Namespace) -> Any:
    domain = client.domain(args.domain)
    options = MatchGroupsOptions(
        weights=_json_weights(args.weights), fusion=args.fusion, threshold=args.threshold
    )
    if args.no_wait:
        return {"task_id": domain.submit_match_groups(args.group, args.against, **options)}
    return domain.match_groups(
        args.group, args.against, **options, task=args.task, poll=args.poll, timeout=args.timeout
    )


def _match_groups_status(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).match_groups_status(args.task_id)


def _match_groups_result(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).match_groups_result(args.task_id)


def _match(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).match(
        id=args.id,
        image=args.image,
        text=args.text,
        group=args.group,
        weights=_json_weights(args.weights),
        fusion=args.fusion,
        threshold=args.threshold,
    )


def _similar(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).similar(args.id, top_k=args.top_k, filter=_json_filter(args.filter))


def _items_add(client: Client, args: argparse.Namespace) -> Any:
    """Upload in batches of ``--batch`` files (one request each), a progress line per batch."""
    domain = client.domain(args.domain)
    ids = args.ids.split(",") if args.ids else None
    if ids is not None and len(ids) != len(args.images):
        raise UsageError(f"--ids: {len(ids)} ids for {len(args.images)} files")
    if args.images and not args.label:
        raise UsageError("--label: image files need the label they all take")
    if not args.images and not args.archive:
        raise UsageError("give image files (with --label) and/or --archive")
    for f in [*args.images, *([args.archive] if args.archive else [])]:
        if not Path(f).exists():
            raise UsageError(f"{f}: no such file or folder")
    replies = []
    if args.archive:
        replies.append(domain.add_items(archive=args.archive, on_duplicate=args.on_duplicate))
    total = len(args.images)
    for start in range(0, total, args.batch):
        chunk = args.images[start : start + args.batch]
        replies.append(
            domain.add_items(
                images=chunk,
                label=args.label,
                ids=ids[start : start + args.batch] if ids else None,
                on_duplicate=args.on_duplicate,
            )
        )
        if not args.quiet:
            done = min(start + args.batch, total)
            bar = "#" * int(30 * done / total)
            sys.stderr.write(f"\ritems [{bar:<30}] {done}/{total}")
            sys.stderr.flush()
    if total and not args.quiet:
        sys.stderr.write("\n")
    last = replies[-1]
    return {
        "version": last.version,
        "added": sum(r.added for r in replies),
        "replaced": sum(r.replaced for r in replies),
        "skipped": [s.model_dump() for r in replies for s in r.skipped],
        "count": last.count,
        "duplicates": [d.model_dump() for r in replies for d in r.duplicates],
    }


def _items_delete(client: Client, args: argparse.Namespace) -> Any:
    if bool(args.ids) == bool(args.filter):
        raise UsageError("give item ids or --filter (one of them)")
    domain = client.domain(args.domain)
    if args.filter:
        return domain.delete_items(filter=_json_filter(args.filter))
    return domain.delete_items(ids=args.ids)


def _items_list(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).list_items(label=args.label, offset=args.offset, limit=args.limit)


def _similarity(client: Client, args: argparse.Namespace) -> Any:
    return client.similarity(args.image_a, args.image_b, metric=args.metric)


def _image(client: Client, args: argparse.Namespace) -> Any:
    img: StoredImage = client.domain(args.domain).image(args.id, version=args.version)
    out = Path(args.output) if args.output else Path(Path(img.name or f"{args.id}").name)
    img.save(out)
    return {
        "path": str(out),
        "bytes": len(img.data),
        "media_type": img.media_type,
        "name": img.name,
        "label": img.label,
        "version": img.version,
    }


def _relevance(client: Client, args: argparse.Namespace) -> Any:
    if args.archive is None and not args.images:
        raise UsageError("give the site's images: --archive ZIP_OR_FOLDER and/or image files")
    return client.domain(args.domain).relevance(
        archive=args.archive,
        images=args.images,
        image_threshold=args.image_threshold,
        site_threshold=args.site_threshold,
        nearest=args.nearest,
    )


def _train(client: Client, args: argparse.Namespace) -> Any:
    domain = client.domain(args.domain)
    if args.no_wait:
        return {"task_id": domain.submit_training(args.archive, mode=args.mode, catalog=args.catalog)}
    last: list[str] = []

    def progress(status: TaskStatus) -> None:
        if not args.quiet and last != [status.status]:
            sys.stderr.write(f"{args.domain}: task {status.task_id} {status.status}\n")
            sys.stderr.flush()
            last[:] = [status.status]

    with StageBars(args.domain, enabled=not args.quiet) as bars:
        return domain.train(
            args.archive,
            mode=args.mode,
            progress=progress,
            poll=args.poll,
            timeout=args.timeout,
            catalog=args.catalog,
            stages=bars.update,
        )


def _train_status(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).training_status(args.task_id)


def _train_result(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).training_result(args.task_id)


def _train_progress(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).training_progress(args.task_id)


# -- parsers -------------------------------------------------------------------------------------------
def _duplicates_check(client: Client, args: argparse.Namespace) -> Any:
    if not args.images and not args.archive:
        raise UsageError("give image files and/or --archive")
    for f in [*args.images, *([args.archive] if args.archive else [])]:
        if not Path(f).exists():
            raise UsageError(f"{f}: no such file or folder")
    return client.domain(args.domain).check_duplicates(images=args.images, archive=args.archive)


def _duplicates_groups(client: Client, args: argparse.Namespace) -> Any:
    domain = client.domain(args.domain)
    if args.no_wait:
        return {"task_id": domain.submit_duplicates()}
    return domain.find_duplicates(poll=args.poll, timeout=args.timeout)


def _duplicates_calibrate(client: Client, args: argparse.Namespace) -> Any:
    return client.domain(args.domain).calibrate_duplicates()


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--url",
        default=os.environ.get("SIMSERVER_URL") or DEFAULT_URL,
        help=f"server URL (default: $SIMSERVER_URL, else {DEFAULT_URL})",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("SIMSERVER_API_KEY"),
        help="API key, sent as 'Authorization: Bearer <key>' (default: $SIMSERVER_API_KEY)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="seconds to wait for one answer (default: %(default)s)",
    )
    return common


def _text_options(p: argparse.ArgumentParser, text_help: str = "query text (domains with text)") -> None:
    p.add_argument("--text", default=None, help=text_help)
    p.add_argument("--weights", default=None, help='JSON, e.g. \'{"image": 0.3, "text": 0.7}\'')
    p.add_argument("--fusion", choices=("weighted", "rrf"), default=None)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the remote commands to a CLI's sub-commands."""
    common = [_connection_options()]

    def command(
        name: str, handler: Handler, help: str, exit_code: Callable[[Any], int] | None = None
    ) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=common, help=help, description=help)
        p.set_defaults(func=_run(handler, exit_code))
        return p

    command("domains", _domains, "list the server's domains (GET /domains)")
    command("stats", _stats, "the encoder's batching since the server started (GET /stats)")
    command(
        "ready", _ready, "is the server ready? (GET /readyz; exit 1 if not)", lambda r: 0 if r["ready"] else 1
    )

    p = command("search", _search, "most similar indexed images (POST /{domain}/search)")
    p.add_argument("domain")
    p.add_argument("image", nargs="?", default=None, help="image file (optional with --text)")
    p.add_argument("--top-k", type=int, default=None, help="results, 1..100 (default: the domain's)")
    p.add_argument("--filter", default=None, help='JSON filter, e.g. \'{"label": "dress"}\'')
    _text_options(p)

    p = command("similar", _similar, "more like a stored item (GET /{domain}/similar)")
    p.add_argument("domain")
    p.add_argument("id", help="the stored item's id")
    p.add_argument("--top-k", type=int, default=None, help="results, 1..100 (default: the domain's)")
    p.add_argument("--filter", default=None, help="JSON filter")

    def actions_of(group: str, help: str) -> Callable[[str, Handler, str], argparse.ArgumentParser]:
        """``simserver <group> ACTION DOMAIN ...``: a parser per action."""
        actions = subparsers.add_parser(group, help=help).add_subparsers(
            dest=f"{group}_command", metavar="ACTION", required=True
        )

        def action(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
            p = actions.add_parser(name, parents=common, help=help, description=help)
            p.set_defaults(func=_run(handler))
            p.add_argument("domain")
            return p

        return action

    action = actions_of("items", "add, delete or list a domain's items (no training)")

    p = action("add", _items_add, "add or replace items by id (POST /{domain}/items)")
    p.add_argument("images", nargs="*", help="image files, all of --label")
    p.add_argument("--label", default=None, help="the label of the image files")
    p.add_argument("--ids", default=None, help="comma-separated ids, one per file (default: <label>/<file>)")
    p.add_argument("--archive", default=None, help="zip or folder in the training layout (+ metadata.csv)")
    p.add_argument("--batch", type=int, default=100, help="files per request (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--on-duplicate",
        choices=("allow", "skip", "reject"),
        default=None,
        help="items duplicating existing ones: add and list (allow, default), leave out (skip), "
        "refuse (reject)",
    )
    p = action("delete", _items_delete, "delete items by id or filter (POST /{domain}/items/delete)")
    p.add_argument("ids", nargs="*", help="item ids")
    p.add_argument("--filter", default=None, help="JSON filter instead of ids")
    p = action("list", _items_list, "one page of the catalog (GET /{domain}/items)")
    p.add_argument("--label", default=None)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)

    p = command("similarity", _similarity, "distance and score of two images (POST /similarity)")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--metric", choices=("cosine", "l1", "l2"), default=None)

    p = command("image", _image, "download a result's stored image (GET /{domain}/images/{id})")
    p.add_argument("domain")
    p.add_argument("id", help="the item's id (as in a search result)")
    p.add_argument("--version", default=None, help="the search's version (409 if no longer served)")
    p.add_argument("-o", "--output", default=None, help="file to write (default: the item's file name)")

    p = command(
        "relevance", _relevance, "does a supplier site sell the domain's target? (POST /{domain}/relevance)"
    )
    p.add_argument("domain")
    p.add_argument("images", nargs="*", help="the site's image files")
    p.add_argument("--archive", default=None, help="zip (or folder) of the site's images")
    p.add_argument("--image-threshold", type=float, default=None)
    p.add_argument("--site-threshold", type=float, default=None)
    p.add_argument("--nearest", type=int, default=None, help="neighbours listed per image")

    p = command("train", _train, "train a domain on a zip or folder of <category>/<image> and wait")
    p.add_argument("domain")
    p.add_argument("archive", help="zip, or folder (zipped on the fly)")
    p.add_argument("--mode", choices=get_args(TrainingMode), default=None)
    p.add_argument(
        "--catalog",
        choices=("replace", "merge"),
        default=None,
        help="merge: upsert the archive into the current catalog and train on the merged catalog",
    )
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="status poll interval")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up waiting after")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    p = command("match", _match, "best match in each other group (POST /{domain}/match)")
    p.add_argument("domain")
    p.add_argument("--id", default=None, help="a stored item's id (instead of --image/--text)")
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("--group", default=None, help="the query's own group, left out of the answer")
    p.add_argument("--threshold", type=float, default=None, help="same-product threshold, 0..1")
    _text_options(p, text_help="query text")

    p = command(
        "match-groups",
        _match_groups,
        "every item of a group with its best match in another (POST /{domain}/match/groups)",
    )
    p.add_argument("domain")
    p.add_argument("group", help="the group whose items are matched")
    p.add_argument("against", help="the group they are matched in")
    p.add_argument("--weights", default=None, help='JSON, e.g. \'{"image": 0.3, "text": 0.7}\'')
    p.add_argument("--fusion", choices=("weighted", "rrf"), default=None)
    p.add_argument("--threshold", type=float, default=None, help="same-product threshold, 0..1")
    p.add_argument("--task", action="store_true", help="as a task (/match/groups/submit), waited for")
    p.add_argument("--no-wait", action="store_true", help="submit the task, print its id and return")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="status poll interval")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up waiting after")
    for name, run, route in (
        ("status", _match_groups_status, "status"),
        ("result", _match_groups_result, "get"),
    ):
        p = command(
            f"match-groups-{name}",
            run,
            f"a match-groups task's {name} (GET /{{domain}}/match/groups/{route})",
        )
        p.add_argument("domain")
        p.add_argument("task_id")
    dup_action = actions_of("duplicates", "duplicate listings: check images, whole-catalog groups")

    p = dup_action(
        "check",
        _duplicates_check,
        "are these images copies of catalog items? (POST /{domain}/duplicates/check)",
    )
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--archive", default=None, help="zip (or folder) of images")
    p = dup_action(
        "groups", _duplicates_groups, "the whole catalog's duplicate groups (task /{domain}/duplicates)"
    )
    p.add_argument("--no-wait", action="store_true", help="print the task id and return at once")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="status poll interval")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="give up waiting after")
    dup_action(
        "calibrate",
        _duplicates_calibrate,
        "calibrate the duplicate decision now (POST /{domain}/duplicates/calibrate)",
    )

    p = command("train-status", _train_status, "a training task's status (GET /{domain}/train/status)")
    p.add_argument("domain")
    p.add_argument("task_id")

    p = command("train-result", _train_result, "a training task's result (GET /{domain}/train/get)")
    p.add_argument("domain")
    p.add_argument("task_id")

    p = command(
        "train-progress",
        _train_progress,
        "a training's stage, done / total, ETA (GET /{domain}/train/progress)",
    )
    p.add_argument("domain")
    p.add_argument("task_id")
