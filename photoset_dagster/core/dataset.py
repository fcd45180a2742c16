"""The Stage-2 dataset JSONL, derived from the per-image artefacts (the ``dataset_jsonl`` asset's work).

One record per *ready* image: facts present, and captions, DINOv3, VAE latents and T5 hidden states all
current for the configured recipes and the image's current inputs. Images that are not ready are counted
by reason, never silently dropped.

At 60k images a full build reads ~300k small JSON files; ``state/dataset_cache/`` makes rebuilds cheap.
It remembers each image's outcome (its JSONL line, or why it is not ready) and, per artefact folder, the
folder's (inode, mtime) and each record file's (inode, size, mtime_ns). Every pipeline writer replaces a
file by rename, which changes the folder's mtime, so a folder whose mtime is unchanged is not even listed;
a changed folder is listed with one ``os.scandir`` and a stat per record, and only images with a new,
changed or vanished file are read and judged again. (An edit *in place* of a record, which no pipeline
writer makes, goes unseen while nothing else changes in its folder, or until ``use_cache=False``.)
No ``.npy`` is ever opened: its presence is enough.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artefacts import FORMAT_VERSION, Recipe, read_json, text_hash
from .atomic import atomic_open, atomic_write_json
from .buckets import BUCKET_NAMES
from .layout import NPY_KINDS, DataLayout, is_valid_image_id
from .lock import data_lock
from .records import is_attention_mask, iter_jsonl, jsonl_text, write_jsonl_atomic
from .validity import sidecar_problem, stale_reason, stat_proves

CURRENT_KINDS = ("captions", "dinov3", "vae_latents", "t5_hidden")
_SCANNED_KINDS = ("facts", *CURRENT_KINDS)
# Bump when the cache's layout or the records' content changes, so old caches are discarded.
_CACHE_VERSION = 4
_CACHE_DIR = "dataset_cache"
_SETTLE_NS = 2_000_000_000  # a folder state is trusted once its mtime is this much older than the listing
MAX_EXAMPLES = 50


def expected_inputs(kind: str, raw_sha256: str | None, caption: str | None) -> dict[str, str]:
    """The inputs a current ``kind`` artefact must record: the raw file's hash, or for T5 the caption's."""
    if kind == "t5_hidden":
        return {"caption_sha256": text_hash(caption)} if isinstance(caption, str) else {}
    return {"raw_sha256": raw_sha256} if raw_sha256 else {}


class DatasetGuard(RuntimeError):
    """The rebuild would drop too many ready records because their artefacts were made with another
    recipe; nothing was written. The message names the settings that differ."""


def _guard(previous_ids: set[str], outputs: Mapping[str, Any], max_fraction: float) -> None:
    """Refuse when more than ``max_fraction`` of the records in the current JSONL would be dropped only
    because the recipe in force differs from the one their artefacts were made with."""
    dropped = [outputs[image_id] for image_id in previous_ids
               if image_id in outputs and not isinstance(outputs[image_id], dict)]
    by_recipe = Counter(detail for category, detail in dropped if category.startswith("stale") and "recipe" in detail)
    count = sum(by_recipe.values())
    if not count or count <= max_fraction * len(previous_ids):
        return
    changes = "; ".join(f"{detail} ({n} images)" for detail, n in by_recipe.most_common(5))
    raise DatasetGuard(
        f"refusing to rebuild the dataset: {count} of its {len(previous_ids)} records would be dropped because "
        f"their artefacts were made with another recipe ({changes}). Run `photoset generate` to recompute them "
        f"with the settings in force, or put the old settings back (`photoset config` shows where each comes "
        f"from); --force rebuilds anyway"
    )


def status_path(layout: DataLayout) -> Path:
    return layout.state_dir / "dataset_status.json"


def read_status(layout: DataLayout) -> dict[str, Any]:
    """The last build's counts (records, not-ready reasons), for readers that must not rebuild (the report)."""
    return read_json(status_path(layout)) or {}


def _jsonl_ids(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {record["image_id"] for _, record, _ in iter_jsonl(path)
            if record is not None and isinstance(record.get("image_id"), str)}


@dataclass
class DatasetReport:
    records: int
    not_ready: dict[str, int]  # reason category -> number of images
    not_ready_examples: list[tuple[str, str]]  # the first MAX_EXAMPLES (image id, full reason), in id order
    buckets: dict[str, int]
    path: Path
    backup: Path | None
    seconds: float
    recipes: dict[str, str]
    bytes: int
    files_read: int = 0  # JSON records parsed this build (the rest came from the cache)

    def summary_lines(self) -> list[str]:
        lines = [
            f"dataset: {self.records} ready records -> {self.path} ({self.bytes / 1e6:.1f} MB) "
            f"in {self.seconds:.2f}s ({self.files_read} files read)"
        ]
        lines += [f"  bucket {bucket}: {count}" for bucket, count in sorted(self.buckets.items())]
        if self.backup:
            lines.append(f"  previous file kept as {self.backup.name}")
        if self.not_ready:
            lines.append(f"not ready: {sum(self.not_ready.values())} images")
            lines += [f"  {reason}: {count}" for reason, count in sorted(self.not_ready.items())]
            lines += [f"  e.g. {image_id}: {reason}" for image_id, reason in self.not_ready_examples[:10]]
        return lines


# --- reading artefact records ---------------------------------------------------------------------


def _summarise(kind: str, record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields the builder needs from one JSON record (still a record ``stale_reason`` can judge)."""
    if record is None:
        return None
    summary: dict[str, Any] = {"recipe_hash": record.get("recipe_hash"), "recipe": record.get("recipe"),
                               "inputs": record.get("inputs") or {}}
    if kind == "facts":
        names = ("ext", "width", "height", "aspect_bucket", "raw_size", "raw_mtime_ns", "raw_inode")
        summary.update({name: record.get(name) for name in names})
    elif kind == "captions":
        summary["caption"] = record.get("caption")
    else:
        summary.update({name: record.get(name) for name in ("npy_size", "npy_mtime_ns", "npy_sha256")})
        summary["problem"] = sidecar_problem(kind, record)
        if kind == "t5_hidden":
            mask, shape = record.get("attention_mask"), record.get("shape")
            summary["mask"] = mask if is_attention_mask(mask) else None
            summary["rows"] = shape[0] if isinstance(shape, list) and shape else None
    return summary


def _read_record(folder: int, name: str) -> tuple[list[int], dict[str, Any] | None] | None:
    """(cache key, parsed object or None if unparsable) of the JSON file ``name`` in the open directory
    ``folder``, or None if it does not exist. The key comes from the open file, so it always describes
    the bytes that were parsed. Raw ``os`` calls relative to the folder: at 300k files per cold build
    Python's file objects and path handling would cost more than the reading itself."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
    except FileNotFoundError:
        return None
    try:
        stat = os.fstat(fd)
        data = os.read(fd, stat.st_size)
        while len(data) < stat.st_size and (chunk := os.read(fd, stat.st_size - len(data))):
            data += chunk
    finally:
        os.close(fd)
    try:
        value = json.loads(data.decode("utf-8"))  # text in: spares json its encoding detection
    except ValueError:  # UnicodeDecodeError is one too
        value = None
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns], value if isinstance(value, dict) else None


# --- the cache --------------------------------------------------------------------------------------
#
# state/dataset_cache/
#   meta.json      version; context (what every output depends on besides the files: recipes, root name);
#                  per kind the folder's [inode, mtime_ns] when it was last listed; the requested ids with
#                  their outputs (bucket when ready, [category, detail] when not); keys of the JSONL and lines
#   <kind>.json    {"ids", "keys": flat [inode, size, mtime_ns, ...], "npy": ids with an .npy}: read only
#                  when that folder changed
#   lines.jsonl    a hard link to the JSONL as this builder wrote it (its ready lines, in id order), so a
#                  JSONL replaced by prune costs nothing here


def _file_key(path: Path) -> list[int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns]


def _write_cache_file(path: Path, body: Any) -> None:
    # No fsync: the cache is disposable; an unreadable part only costs reading the records again.
    with atomic_open(path, "w", fsync=False) as handle:
        handle.write(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


@dataclass
class _Cache:
    directory: Path
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: Path, context: Mapping[str, Any], use_cache: bool) -> _Cache:
        meta = read_json(directory / "meta.json") if use_cache else None
        if meta is None or meta.get("version") != _CACHE_VERSION or meta.get("context") != context:
            meta = {"version": _CACHE_VERSION, "context": dict(context), "folders": {}, "ids": [], "outputs": []}
        elif meta.get("lines_key") != _file_key(directory / "lines.jsonl"):
            meta.update(ids=[], outputs=[])  # the lines are gone or were edited: no output can be reused
        return cls(directory, meta)

    def folder_state(self, kind: str) -> list[int] | None:
        return self.meta["folders"].get(kind)

    def kind_keys(self, kind: str) -> tuple[dict[str, list[int]], set[str]]:
        """The stored record keys and .npy ids of one kind (only consulted when its folder changed)."""
        stored = read_json(self.directory / f"{kind}.json") if self.meta["ids"] else None
        if stored is None:
            return {}, set()
        flat = stored["keys"]
        return {image_id: flat[3 * n : 3 * n + 3] for n, image_id in enumerate(stored["ids"])}, set(stored["npy"])

    def outputs(self) -> dict[str, Any]:
        return dict(zip(self.meta["ids"], self.meta["outputs"]))

    def ready_ids(self) -> set[str] | None:
        """Ids in the JSONL as this builder last wrote it (None when the cache knows nothing)."""
        if not self.meta["ids"]:
            return None
        return {image_id for image_id, output in self.outputs().items() if isinstance(output, dict)}

    def ready_lines(self) -> dict[str, str]:
        """id -> JSONL line of every image that was ready last time."""
        ready = [image_id for image_id, output in self.outputs().items() if isinstance(output, dict)]
        with open(self.directory / "lines.jsonl", encoding="utf-8") as handle:
            return dict(zip(ready, handle.read().splitlines()))

    def store(self, listings: Mapping[str, _Listing], outputs: Mapping[str, Any], jsonl: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for kind, listing in listings.items():
            if listing.scanned:
                flat = [value for key in listing.keys.values() for value in key]
                body = {"ids": list(listing.keys), "keys": flat, "npy": sorted(listing.npy_ids)}
                _write_cache_file(self.directory / f"{kind}.json", body)
        lines = self.directory / "lines.jsonl"
        temporary = lines.with_name(".lines.jsonl.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        try:
            os.link(jsonl, temporary)  # free, and exact: the JSONL is only ever replaced, never edited
        except OSError:
            shutil.copyfile(jsonl, temporary)
        os.replace(temporary, lines)
        folders = {kind: listing.state for kind, listing in listings.items() if listing.state is not None}
        self.meta.update(
            folders=folders, ids=list(outputs), outputs=list(outputs.values()),
            jsonl_key=_file_key(jsonl), lines_key=_file_key(lines),
        )
        _write_cache_file(self.directory / "meta.json", self.meta)


@dataclass
class _Listing:
    """One kind's folder as of this build."""

    folder: int | None  # the open directory (None if it does not exist)
    state: list[int] | None = None  # [inode, mtime_ns] worth remembering (None: missing or not settled)
    scanned: bool = True  # False: unchanged since the cache was made; keys and npy_ids are not loaded
    keys: dict[str, list[int]] = field(default_factory=dict)  # id -> [inode, size, mtime_ns] of <id>.json
    npy_ids: set[str] = field(default_factory=set)
    # ids whose record is new, changed or gone, or whose .npy appeared or vanished
    changed: set[str] = field(default_factory=set)

    def has_npy(self, image_id: str) -> bool:
        if self.scanned:
            return image_id in self.npy_ids
        try:
            os.stat(f"{image_id}.npy", dir_fd=self.folder)
        except FileNotFoundError:
            return False
        return True

    def record_key(self, image_id: str, key: list[int] | None) -> None:
        if self.scanned:  # an unscanned folder keeps its stored keys (see _list_folder)
            if key is None:
                self.keys.pop(image_id, None)
            else:
                self.keys[image_id] = key


def _open_folder(folders: contextlib.ExitStack, directory: Path) -> int | None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    folders.callback(os.close, fd)
    return fd


def _list_folder(folder: int | None, kind: str, wanted: set[str], cache: _Cache, started_ns: int) -> _Listing:
    """What changed in one kind's folder since the cache was made.

    A folder whose (inode, mtime) equals the remembered one had no file created, renamed or deleted in it,
    and every writer replaces files by rename, so nothing in it changed: it is not even listed. Otherwise
    one scandir, and a stat of each record the cache knows (an unknown record is read anyway and keyed
    from the open file then). A folder state is only remembered once its mtime is _SETTLE_NS older than
    the listing, so a rename in the same timestamp tick as the listing cannot go unnoticed.
    """
    if folder is not None:
        stat = os.fstat(folder)
        state = [stat.st_ino, stat.st_mtime_ns]
        if state == cache.folder_state(kind):
            return _Listing(folder, state, scanned=False)
    listing = _Listing(folder)
    if folder is not None and stat.st_mtime_ns < started_ns - _SETTLE_NS:
        listing.state = state
    stored_keys, stored_npy = cache.kind_keys(kind)
    for entry in os.scandir(folder) if folder is not None else ():
        stem, _, suffix = entry.name.rpartition(".")
        if stem not in wanted:
            continue
        if suffix == "npy":
            listing.npy_ids.add(stem)
        elif suffix == "json":
            if stem not in stored_keys:
                listing.changed.add(stem)
                continue
            try:
                entry_stat = entry.stat()
            except FileNotFoundError:  # removed since the listing
                continue
            key = [entry_stat.st_ino, entry_stat.st_size, entry_stat.st_mtime_ns]
            listing.keys[stem] = key
            if key != stored_keys[stem]:
                listing.changed.add(stem)
    listing.changed.update(stem for stem in stored_keys if stem in wanted and stem not in listing.keys)
    listing.changed.update(listing.npy_ids.symmetric_difference(stored_npy & wanted))
    return listing


# --- readiness --------------------------------------------------------------------------------


class _NotReady(Exception):
    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category
        self.detail = detail


def _current(
    summaries: Mapping[str, dict[str, Any] | None],
    arrays: set[str],
    kind: str,
    recipe: Recipe | None,
    inputs: Mapping[str, str],
) -> dict[str, Any]:
    if kind not in summaries:
        raise _NotReady(f"missing {kind}", f"{kind} missing")
    summary = summaries[kind]
    if summary is None:
        raise _NotReady(f"unreadable {kind}", f"{kind} record is not readable JSON")
    if summary.get("problem"):
        raise _NotReady(f"invalid {kind}", f"{kind}: {summary['problem']}")
    reason = stale_reason(summary, recipe, inputs)
    if reason is not None:
        raise _NotReady(f"stale {kind} ({reason.split(' (')[0]})", f"{kind} {reason}")
    if kind in NPY_KINDS and kind not in arrays:
        raise _NotReady(f"missing {kind} npy", f"{kind} sidecar present but .npy missing")
    return summary


def facts_problem(facts: Mapping[str, Any]) -> str | None:
    """Why a facts record cannot place its image in the dataset ("bucket invalid", ...), or None."""
    if not isinstance((facts.get("inputs") or {}).get("raw_sha256"), str):
        return "facts lack raw_sha256"
    ext = facts.get("ext")
    if not (isinstance(ext, str) and ext.isalnum()):
        return f"facts ext {ext!r} invalid"
    if not all(type(facts.get(name)) is int and facts[name] > 0 for name in ("width", "height")):
        return "facts width/height invalid"
    if facts.get("aspect_bucket") not in BUCKET_NAMES:
        return "bucket invalid"
    return None


def _dataset_record(
    layout: DataLayout,
    image_id: str,
    summaries: Mapping[str, dict[str, Any] | None],
    arrays: set[str],
    recipes: Mapping[str, Recipe],
) -> dict[str, Any]:
    """The Stage-2 record of an image from its records' summaries (kind -> summary, None if unreadable,
    absent if missing) and the kinds whose .npy exists; raises _NotReady with the first failing check,
    in pipeline order."""
    facts = _current(summaries, arrays, "facts", None, {})
    problem = facts_problem(facts)
    if problem:
        raise _NotReady(problem if problem == "bucket invalid" else "invalid facts", problem)
    raw_sha256 = facts["inputs"]["raw_sha256"]

    def current(kind: str, caption: str | None = None) -> dict[str, Any]:
        return _current(summaries, arrays, kind, recipes[kind], expected_inputs(kind, raw_sha256, caption))

    caption = current("captions")["caption"]
    if not (isinstance(caption, str) and caption.strip()):
        raise _NotReady("empty caption", "caption is empty")
    current("dinov3")
    current("vae_latents")
    t5 = current("t5_hidden", caption)
    if t5["mask"] is None:
        raise _NotReady("invalid t5_hidden mask", "t5_hidden attention_mask is not a list of 0/1")
    if len(t5["mask"]) != t5["rows"]:
        detail = f"mask length {len(t5['mask'])} != hidden rows {t5['rows']}"
        raise _NotReady("t5_hidden mask length mismatch", detail)
    return {
        "image_id": image_id,
        "image_path": layout.image_path_field(image_id, facts["ext"]),
        "caption": caption,
        "t5_attention_mask": t5["mask"],
        "height": facts["height"],
        "width": facts["width"],
        "aspect_bucket": facts["aspect_bucket"],
        "format_version": FORMAT_VERSION,
        "raw_sha256": raw_sha256,
        "recipes": {kind: recipe.hash for kind, recipe in recipes.items()},
        "t5_max_length": t5["rows"],
        # The proof of each array, so the shard writer can refuse one that changed since (it hashes
        # what it packs anyway).
        "npy_sha256": {kind: (summaries[kind] or {}).get("npy_sha256") for kind in NPY_KINDS},
    }


def _proof(
    image_id: str, summaries: Mapping[str, dict[str, Any] | None], folders: Mapping[str, int | None]
) -> list[int]:
    """That the raw and the three arrays are still the bytes their records describe (stat first, the
    sha256 only for a file that moved); returns the files' current [size, mtime_ns(, inode)] keys for
    the next build, or raises _NotReady."""
    facts = summaries["facts"] or {}
    raw = _stat_in(folders["raw"], image_id)
    if raw is None:
        raise _NotReady("missing raw", "raw file missing")
    proof = list(raw)
    if raw != [facts.get("raw_size"), facts.get("raw_mtime_ns"), facts.get("raw_inode")]:
        if _sha256_in(folders["raw"], image_id) != facts["inputs"]["raw_sha256"]:
            raise _NotReady("stale facts (raw file changed)", "the raw file changed since its facts were recorded")
    for kind in NPY_KINDS:
        summary = summaries[kind] or {}
        stat = _stat_in(folders[kind], f"{image_id}.npy")
        if stat is None:
            raise _NotReady(f"missing {kind} npy", f"{kind} .npy missing")
        if not isinstance(summary.get("npy_sha256"), str):
            raise _NotReady(f"invalid {kind}", f"{kind} sidecar has no proof of its .npy (written by an older photoset)")
        if not stat_proves(summary, *stat[:2]):
            if _sha256_in(folders[kind], f"{image_id}.npy") != summary["npy_sha256"]:
                raise _NotReady(f"invalid {kind}", f"{kind} .npy does not match its sidecar (truncated or replaced)")
        proof += stat[:2]
    return proof


def _stat_in(folder: int | None, name: str) -> list[int] | None:
    if folder is None:
        return None
    try:
        stat = os.stat(name, dir_fd=folder)
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _sha256_in(folder: int | None, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _proof_holds(output: Any, image_id: str, folders: Mapping[str, int | None]) -> bool:
    """A ready image's files still have the stat keys they had when it was judged (one stat each)."""
    if not isinstance(output, dict):
        return True  # not ready: it can only become ready through a record change, which is noticed
    current = _stat_in(folders["raw"], image_id) or []
    for kind in NPY_KINDS:
        current += (_stat_in(folders[kind], f"{image_id}.npy") or [None, None, None])[:2]
    return current == output.get("proof")


@dataclass
class _Evaluated:
    """One image evaluated from its files: the cache output ({bucket, proof}, or [category, detail]) and
    its line."""

    output: dict[str, Any] | list[str]
    line: str | None
    files_read: int


def _evaluate(
    layout: DataLayout,
    image_id: str,
    listings: Mapping[str, _Listing],
    recipes: Mapping[str, Recipe],
    folders: Mapping[str, int | None],
) -> _Evaluated:
    """Read the image's records (refreshing the scanned listings' keys) and judge it."""
    summaries: dict[str, dict[str, Any] | None] = {}
    for kind, listing in listings.items():
        found = _read_record(listing.folder, f"{image_id}.json") if listing.folder is not None else None
        listing.record_key(image_id, found[0] if found else None)
        if found is not None:
            summaries[kind] = _summarise(kind, found[1])
    arrays = {kind for kind in NPY_KINDS if listings[kind].folder is not None and listings[kind].has_npy(image_id)}
    try:
        record = _dataset_record(layout, image_id, summaries, arrays, recipes)
        proof = _proof(image_id, summaries, folders)
    except _NotReady as reason:
        return _Evaluated([reason.category, reason.detail], None, len(summaries))
    return _Evaluated({"bucket": record["aspect_bucket"], "proof": proof}, jsonl_text(record), len(summaries))


def _jsonl_lines(outputs: Mapping[str, Any], new_lines: Mapping[str, str], cache: _Cache) -> Iterator[str]:
    """The JSONL's lines in id order: those just evaluated, the others as the cache kept them."""
    ready = [image_id for image_id, output in outputs.items() if isinstance(output, dict)]
    kept = cache.ready_lines() if len(ready) > len(new_lines) else {}
    return (new_lines.get(image_id) or kept[image_id] for image_id in ready)


def build_dataset_jsonl(
    layout: DataLayout,
    image_ids: Iterable[str],
    recipes: Mapping[str, Recipe],
    *,
    backups: int = 3,
    use_cache: bool = True,
    max_drop_fraction: float = 0.10,
    force: bool = False,
) -> DatasetReport:
    """Write ``layout.dataset_jsonl``: one record per ready image among ``image_ids``, sorted by id.

    ``recipes`` holds the configured recipe of each of :data:`CURRENT_KINDS`. Any existing file is
    replaced (a Stage-1 file must be migrated by the caller first), keeping ``backups`` backups.
    Every build re-checks, with one stat each, that every ready image's raw file and arrays are still
    the bytes their records describe (an in-place edit of a record itself goes unseen while nothing
    else changes in its folder; ``use_cache=False`` reads every record again).
    Raises :class:`DatasetGuard`, writing nothing, when
    more than ``max_drop_fraction`` of the current records would go because of a recipe change, unless
    ``force``.
    """
    missing = [kind for kind in CURRENT_KINDS if kind not in recipes]
    if missing:
        raise ValueError(f"recipes lacks {', '.join(missing)}")
    started, started_ns = time.monotonic(), time.time_ns()
    recipes = {kind: recipes[kind] for kind in CURRENT_KINDS}
    hashes = {kind: recipe.hash for kind, recipe in recipes.items()}
    requested = set(image_ids)
    wanted = {image_id for image_id in requested if is_valid_image_id(image_id)}
    with data_lock(layout.lock_path, exclusive=False, what="dataset build"), contextlib.ExitStack() as folders:
        cache = _Cache.load(layout.state_dir / _CACHE_DIR, {"recipes": hashes, "root": layout.root.name}, use_cache)
        listings = {
            kind: _list_folder(_open_folder(folders, layout.kind_dir(kind)), kind, wanted, cache, started_ns)
            for kind in _SCANNED_KINDS
        }
        fds = {"raw": _open_folder(folders, layout.raw_dir), **{kind: listings[kind].folder for kind in NPY_KINDS}}
        changed = set().union(*(listing.changed for listing in listings.values()))
        previous = cache.outputs()
        outputs: dict[str, Any] = {}
        new_lines: dict[str, str] = {}
        files_read = 0
        for image_id in sorted(requested):
            if image_id not in wanted:
                outputs[image_id] = ["invalid image id", "not a valid image id"]
            elif image_id in previous and image_id not in changed and _proof_holds(previous[image_id], image_id, fds):
                outputs[image_id] = previous[image_id]
            else:
                evaluated = _evaluate(layout, image_id, listings, recipes, fds)
                outputs[image_id] = evaluated.output
                files_read += evaluated.files_read
                if evaluated.line is not None:
                    new_lines[image_id] = evaluated.line
        if not force:
            kept = cache.ready_ids() if cache.meta.get("jsonl_key") == _file_key(layout.dataset_jsonl) else None
            _guard(kept if kept is not None else _jsonl_ids(layout.dataset_jsonl), outputs, max_drop_fraction)
        backup = None
        jsonl_as_written = cache.meta.get("jsonl_key") == _file_key(layout.dataset_jsonl)
        if new_lines or outputs != previous or not jsonl_as_written:
            lines = _jsonl_lines(outputs, new_lines, cache)
            backup = write_jsonl_atomic(layout.dataset_jsonl, lines, backups=backups)
            cache.store(listings, outputs, layout.dataset_jsonl)
        elif any(listing.scanned for listing in listings.values()):
            cache.store(listings, outputs, layout.dataset_jsonl)  # new folder states and keys

    ready = {image_id: out["bucket"] for image_id, out in outputs.items() if isinstance(out, dict)}
    not_ready = [(image_id, out) for image_id, out in outputs.items() if not isinstance(out, dict)]
    not_ready_counts = dict(Counter(category for _, (category, _) in not_ready))
    atomic_write_json(status_path(layout), {"records": len(ready), "not_ready": not_ready_counts}, fsync=False)
    return DatasetReport(
        records=len(ready),
        not_ready=not_ready_counts,
        not_ready_examples=[(image_id, detail) for image_id, (_, detail) in not_ready[:MAX_EXAMPLES]],
        buckets=dict(Counter(ready.values())),
        path=layout.dataset_jsonl,
        backup=backup,
        seconds=time.monotonic() - started,
        recipes=hashes,
        bytes=os.path.getsize(layout.dataset_jsonl),
        files_read=files_read,
    )
