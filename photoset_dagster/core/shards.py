"""WebDataset shards per aspect bucket (the seed's ``create_webdataset_shards.py``, rebuilt).

``shards/bucket_WxH/shard-NNNNNN.tar``: uncompressed tars, one sample per image keyed by its id, with the
members ``<id>.json``, ``<id>.dinov3.npy``, ``<id>.vae.npy``, ``<id>.t5.npy``; the arrays are the
``.npy`` files of ``data/derived`` copied verbatim. Tar bytes are deterministic (fixed metadata), each
shard is written to a temporary file and renamed, and ``index.json`` (wids-style) records per shard a
fingerprint of its members and their source files, so a rebuild rewrites only shards whose content
changed and removes shards a smaller dataset no longer needs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .artefacts import Recipe, read_json, recipe_change
from .atomic import atomic_open, atomic_write_json, remove_stale_temporaries
from .buckets import parse_bucket
from .layout import DataLayout, is_valid_image_id
from .lock import data_lock
from .records import iter_jsonl, stage2_record_problems
from .validity import stat_proves

log = logging.getLogger(__name__)

# Tar member suffix -> artefact kind whose .npy is copied verbatim, in member order after "<id>.json".
SAMPLE_ARRAYS = (("dinov3.npy", "dinov3"), ("vae.npy", "vae_latents"), ("t5.npy", "t5_hidden"))
SAMPLE_JSON_FIELDS = ("caption", "t5_attention_mask", "image_id", "aspect_bucket", "width", "height")
INDEX_NAME = "index.json"
_SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
# Part of every fingerprint: bump when the bytes written for the same inputs change.
_WRITER_VERSION = 1
_COPY_BUFFER = 1 << 20
_SHARDS_IN_FLIGHT = 2


class ShardError(RuntimeError):
    """The shards of a bucket cannot be written as asked (mixed recipes, refusing to overwrite, ...)."""


class ShardRefused(ShardError):
    """Writing would shrink a bucket's shards beyond the guard; nothing was changed."""


@dataclass(frozen=True)
class ShardOptions:
    shard_size: int = 1000
    buckets: frozenset[str] | None = None  # only these buckets; None: all
    shuffle: bool = False
    seed: int = 1337
    limit: int | None = None  # at most this many samples per bucket
    overwrite: bool = True
    dry_run: bool = False
    # fsync each shard before its rename. Shards can be rebuilt, but a consumer reading after a power loss
    # could meet an empty one until then; False trades that for ~2x speed where the disk is the limit.
    fsync: bool = True
    # Guard like prune's: refuse to shrink a bucket's shards by more than this share (say, after a
    # recipe change left most records out of the dataset) unless forced.
    max_shrink_fraction: float = 0.10
    force: bool = False


@dataclass
class BucketShardReport:
    bucket: str
    samples: int
    shards: list[str]
    bytes: int  # of the bucket's shards after the run (dry run: payload bytes that would be packed)
    rewritten: int
    unchanged: int
    removed_stale: list[str]
    index_path: Path | None
    skipped: dict[str, str] = field(default_factory=dict)  # records of the bucket left out: id -> why
    shard_samples: list[int] = field(default_factory=list)  # parallel to ``shards``
    written: list[str] = field(default_factory=list)  # shards (that would be) written this run
    dry_run: bool = False

    def summary_lines(self) -> list[str]:
        lines = [f"bucket {self.bucket}: samples={self.samples}"]
        verb = "would write" if self.dry_run else "writing"
        for name, count in zip(self.shards, self.shard_samples):
            action = verb if name in self.written else "unchanged"
            lines.append(f"  {action} {name} ({count} samples)")
        lines += [f"  {'would remove' if self.dry_run else 'removed'} stale {name}" for name in self.removed_stale]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} incomplete records")
            lines += [f"    {image_id}: {reason}" for image_id, reason in list(self.skipped.items())[:10]]
        lines.append(
            f"  shards={len(self.shards)} rewritten={self.rewritten} unchanged={self.unchanged} "
            f"bytes={self.bytes}"
        )
        return lines


class DatasetRecords(list[dict[str, Any]]):
    """The dataset JSONL's records (a plain list) plus the numbers of the lines skipped as malformed."""

    def __init__(self, records: Sequence[dict[str, Any]] = (), malformed_lines: Sequence[int] = ()) -> None:
        super().__init__(records)
        self.malformed_lines = list(malformed_lines)


def read_dataset_records(layout: DataLayout) -> DatasetRecords:
    """The Stage-2 records of ``layout.dataset_jsonl`` in file order; malformed lines are skipped and counted."""
    records, malformed = [], []
    for line_no, record, _ in iter_jsonl(layout.dataset_jsonl):
        if record is None:
            malformed.append(line_no)
        else:
            records.append(record)
    if malformed:
        log.warning(
            "%s: skipped %d malformed lines (first: line %d)", layout.dataset_jsonl, len(malformed), malformed[0]
        )
    return DatasetRecords(records, malformed)


# --- planning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    suffix: str  # tar member suffix, e.g. "vae.npy"
    path: Path
    size: int
    mtime_ns: int
    sha256: str  # what the dataset record says its bytes are
    proven: bool  # its sidecar proves those bytes by this size and mtime: no need to hash it again


@dataclass(frozen=True)
class _Sample:
    image_id: str
    json_bytes: bytes
    sources: tuple[_Source, ...]

    def fingerprint_part(self) -> list[Any]:
        sources = [[source.suffix, source.size, source.mtime_ns, source.sha256] for source in self.sources]
        return [self.image_id, hashlib.sha256(self.json_bytes).hexdigest(), sources]

    @property
    def tar_bytes(self) -> int:
        """What its members take in a shard: each header (GNU long-name blocks included) and its data
        padded to whole blocks, as ``tarfile`` writes them."""
        members = [(f"{self.image_id}.json", len(self.json_bytes)),
                   *((f"{self.image_id}.{source.suffix}", source.size) for source in self.sources)]
        return sum(len(_member(name, size).tobuf(tarfile.GNU_FORMAT)) + _round_up(size, tarfile.BLOCKSIZE)
                   for name, size in members)


def _round_up(size: int, unit: int) -> int:
    return -(-size // unit) * unit


def _tar_size(samples: Sequence[_Sample]) -> int:
    """The size of the shard :func:`_write_shard` makes of ``samples``: the members, two zero blocks
    that end the archive, padded to tarfile's record size."""
    return _round_up(sum(sample.tar_bytes for sample in samples) + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


@dataclass(frozen=True)
class _PlannedShard:
    name: str
    samples: tuple[_Sample, ...]
    fingerprint: str


def _sample_json(record: Mapping[str, Any]) -> bytes:
    body = {name: record[name] for name in SAMPLE_JSON_FIELDS}
    return (json.dumps(body, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def _sample(layout: DataLayout, record: Mapping[str, Any]) -> _Sample:
    """The sample of a valid record; raises ValueError when one of its arrays is missing or unproven."""
    image_id = record["image_id"]
    proofs = record.get("npy_sha256") if isinstance(record.get("npy_sha256"), Mapping) else {}
    sources = []
    for suffix, kind in SAMPLE_ARRAYS:
        path = layout.npy_path(kind, image_id)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ValueError(f"{kind} npy missing") from None
        digest = proofs.get(kind)
        if not isinstance(digest, str):
            raise ValueError(f"the record has no proof of its {kind} array (rebuild the dataset JSONL)")
        sidecar = read_json(layout.json_path(kind, image_id)) or {}
        proven = sidecar.get("npy_sha256") == digest and stat_proves(sidecar, stat.st_size, stat.st_mtime_ns)
        sources.append(_Source(suffix, path, stat.st_size, stat.st_mtime_ns, digest, proven))
    return _Sample(image_id, _sample_json(record), tuple(sources))


def _bucket_samples(
    layout: DataLayout, bucket: str, records: Sequence[Mapping[str, Any]], options: ShardOptions
) -> tuple[list[_Sample], dict[str, str], dict[str, str]]:
    """The bucket's packable samples in output order, the skipped records (id -> why) and the recipes."""
    chosen: list[Mapping[str, Any]] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for record in records:
        if record.get("aspect_bucket") != bucket:
            continue
        image_id = record.get("image_id")
        problems = stage2_record_problems(record)
        if not is_valid_image_id(image_id):
            skipped[repr(image_id)] = "invalid image_id"
        elif image_id in seen:  # two tar samples with one key would shadow each other (the seed's B14)
            skipped[image_id] = "duplicate image_id (the first record is packed)"
        elif problems:
            skipped[image_id] = "; ".join(problems)
        else:
            seen.add(image_id)
            chosen.append(record)
    recipes = _single_recipe_set(bucket, chosen)
    if options.shuffle:
        random.Random(options.seed).shuffle(chosen)
    samples: list[_Sample] = []
    for record in chosen:
        if options.limit is not None and len(samples) >= options.limit:
            break
        try:
            samples.append(_sample(layout, record))
        except ValueError as reason:
            skipped[record["image_id"]] = str(reason)
    return samples, skipped, recipes


def _single_recipe_set(bucket: str, records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The ``recipes`` shared by all records; ShardError naming the differing sets when they are mixed."""
    groups: dict[str, list[str]] = {}
    for record in records:
        key = json.dumps(record.get("recipes"), sort_keys=True)
        groups.setdefault(key, []).append(record["image_id"])
    if len(groups) > 1:
        details = "; ".join(
            f"{key} for {len(ids)} records (e.g. {', '.join(ids[:3])})"
            for key, ids in sorted(groups.items(), key=lambda item: -len(item[1]))
        )
        raise ShardError(
            f"bucket {bucket}: records were built with different recipes, refusing to mix them in one "
            f"bucket's shards: {details}. Recompute the stale artefacts and rebuild the dataset JSONL."
        )
    if not groups:
        return {}
    return json.loads(next(iter(groups))) or {}


def _fingerprint(samples: Sequence[_Sample]) -> str:
    canonical = json.dumps([_WRITER_VERSION, [s.fingerprint_part() for s in samples]], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _plan(samples: Sequence[_Sample], shard_size: int) -> list[_PlannedShard]:
    chunks = [tuple(samples[i : i + shard_size]) for i in range(0, len(samples), shard_size)]
    return [_PlannedShard(f"shard-{n:06d}.tar", chunk, _fingerprint(chunk)) for n, chunk in enumerate(chunks)]


def _existing_shards(directory: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(directory) if _SHARD_NAME.fullmatch(e.name))
    except FileNotFoundError:
        return []


def _previous_entries(index: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    entries = index.get("shardlist") if isinstance(index.get("shardlist"), list) else []
    return {entry["url"]: entry for entry in entries if isinstance(entry, dict) and "url" in entry}


def _is_unchanged(directory: Path, shard: _PlannedShard, previous: Mapping[str, Any] | None) -> bool:
    if previous is None or previous.get("fingerprint") != shard.fingerprint:
        return False
    try:
        return os.path.getsize(directory / shard.name) == previous.get("filesize")
    except FileNotFoundError:
        return False


# --- writing -------------------------------------------------------------------------------------


class _HashingReader:
    """File-like source that hashes what ``tarfile`` copies out of it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        return data


class _HashingWriter:
    """File-like sink that hashes and counts what ``tarfile`` writes through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def tell(self) -> int:
        return self.size


def _member(name: str, size: int) -> tarfile.TarInfo:
    """Deterministic header: only name and size vary between shards."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_shard(path: Path, samples: Sequence[_Sample], fsync: bool) -> tuple[int, str]:
    """Write one shard atomically; returns (file size, sha256)."""
    with atomic_open(path, "wb", fsync=fsync) as handle:
        sink = _HashingWriter(handle)
        # GNU format: deterministic, and ids up to 128 characters do not fit USTAR's 100-byte names.
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.GNU_FORMAT, copybufsize=_COPY_BUFFER) as tar:
            for sample in samples:
                tar.addfile(_member(f"{sample.image_id}.json", len(sample.json_bytes)), io.BytesIO(sample.json_bytes))
                for source in sample.sources:
                    with open(source.path, "rb", buffering=0) as array_file:
                        # The file actually opened: it may have been replaced since planning. Stat first,
                        # as everywhere: bytes whose sidecar still proves them are not hashed twice.
                        stat = os.fstat(array_file.fileno())
                        trusted = source.proven and (stat.st_size, stat.st_mtime_ns) == (source.size, source.mtime_ns)
                        reader = array_file if trusted else _HashingReader(array_file)
                        tar.addfile(_member(f"{sample.image_id}.{source.suffix}", stat.st_size), reader)
                    if not trusted and reader.digest.hexdigest() != source.sha256:
                        # Nothing invalid reaches a shard: the temporary file is dropped, the old shard kept.
                        raise ShardError(
                            f"{sample.image_id}: its {source.suffix} is no longer the array its sidecar proves "
                            "(changed since the dataset was built): run `photoset generate` and rebuild the dataset"
                        )
    return sink.size, sink.digest.hexdigest()


def _write_shards(
    directory: Path,
    planned: Sequence[_PlannedShard],
    to_write: Sequence[_PlannedShard],
    previous: Mapping[str, Mapping[str, Any]],
    fsync: bool,
) -> list[dict[str, Any]]:
    """Write ``to_write``; returns the index entries of all ``planned`` shards (kept ones from ``previous``)."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    # Two shards in flight: while one waits for its fsync (or the page cache), the other is written
    # and hashed on the second core (file I/O and hashlib release the GIL).
    with ThreadPoolExecutor(max_workers=_SHARDS_IN_FLIGHT) as pool:
        results = pool.map(lambda shard: _write_shard(directory / shard.name, shard.samples, fsync), to_write)
        written = dict(zip((shard.name for shard in to_write), results))
    entries = []
    for shard in planned:
        filesize, sha256 = written.get(shard.name) or (previous[shard.name]["filesize"], previous[shard.name]["sha256"])
        entries.append({
            "url": shard.name, "nsamples": len(shard.samples), "filesize": filesize, "sha256": sha256,
            "fingerprint": shard.fingerprint,
        })
    return entries


def _check_shrink(
    bucket: str, index: Mapping[str, Any], samples: int, recipes: Mapping[str, Recipe] | None, options: ShardOptions
) -> None:
    """Refuse to delete or shrink a bucket's shards beyond ``max_shrink_fraction``; names the recipe
    settings that differ from the ones the shards were written with."""
    entries = index.get("shardlist") if isinstance(index.get("shardlist"), list) else []
    before = sum(entry.get("nsamples", 0) for entry in entries if isinstance(entry, dict))
    if options.force or options.limit is not None or not before or samples >= before * (1 - options.max_shrink_fraction):
        return
    written_with = index.get("recipe_settings") if isinstance(index.get("recipe_settings"), Mapping) else {}
    changes = [change for kind, recipe in (recipes or {}).items()
               if isinstance(written_with.get(kind), Mapping)
               and (change := recipe_change({"recipe": written_with[kind], "recipe_hash": None}, recipe))]
    why = f" The recipe differs from the one the shards were written with: {'; '.join(changes)}." if changes else ""
    raise ShardRefused(
        f"bucket {bucket}: refusing to shrink its shards from {before} to {samples} samples.{why} Rebuild the "
        "dataset with the artefacts in place (`photoset generate`, then `photoset migrate`), or pass force"
    )


def write_bucket_shards(
    layout: DataLayout,
    bucket: str,
    records: Sequence[Mapping[str, Any]],
    options: ShardOptions = ShardOptions(),
    recipes: Mapping[str, Recipe] | None = None,
) -> BucketShardReport:
    """Write the shards of ``bucket`` from the dataset ``records`` (all of them; this filters to the bucket).

    Order: the records' order (sorted ids), or ``random.Random(seed)`` shuffled; ``limit`` caps the samples.
    Records that cannot be packed (invalid fields, missing ``.npy``, duplicate id) are skipped and reported.
    Raises ShardError if the bucket's records mix recipes, or if shards would change and not ``overwrite``.
    """
    try:
        parse_bucket(bucket)
    except ValueError as error:
        raise ShardError(str(error)) from None
    if options.shard_size < 1:
        raise ShardError(f"shard_size must be at least 1, not {options.shard_size}")
    if options.limit is not None and options.limit < 1:  # the seed's "--limit 0" meant "all": never "none"
        raise ShardError(f"limit must be at least 1 (None for no limit), not {options.limit}")
    directory = layout.bucket_shard_dir(bucket)
    report = BucketShardReport(bucket, 0, [], 0, 0, 0, [], None, dry_run=options.dry_run)
    if options.buckets is not None and bucket not in options.buckets:
        return report
    with data_lock(layout.lock_path, exclusive=False):
        samples, report.skipped, record_recipes = _bucket_samples(layout, bucket, records, options)
        planned = _plan(samples, options.shard_size)
        index = read_json(directory / INDEX_NAME) or {}
        _check_shrink(bucket, index, len(samples), recipes, options)
        previous = _previous_entries(index)
        to_write = [shard for shard in planned if not _is_unchanged(directory, shard, previous.get(shard.name))]
        existing = _existing_shards(directory)
        stale = [name for name in existing if name not in {shard.name for shard in planned}]
        if not options.overwrite and (stale or any(shard.name in existing for shard in to_write)):
            raise ShardError(
                f"bucket {bucket}: refusing to overwrite or remove existing shards in {directory} "
                "(pass overwrite to allow it)"
            )
        report.samples = len(samples)
        report.shards = [shard.name for shard in planned]
        report.shard_samples = [len(shard.samples) for shard in planned]
        report.written = [shard.name for shard in to_write]
        report.rewritten = len(to_write)
        report.unchanged = len(planned) - len(to_write)
        report.removed_stale = stale
        if options.dry_run:
            report.bytes = sum(_tar_size(shard.samples) for shard in planned)
            return report

        entries = _write_shards(directory, planned, to_write, previous, options.fsync)
        for name in stale:
            os.unlink(directory / name)
        report.index_path = directory / INDEX_NAME
        atomic_write_json(
            report.index_path,
            {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": directory.name, "recipes": record_recipes,
             "recipe_settings": {kind: recipe.as_dict() for kind, recipe in (recipes or {}).items()},
             "shardlist": entries},
        )
        report.bytes = sum(entry["filesize"] for entry in entries)
    return report
