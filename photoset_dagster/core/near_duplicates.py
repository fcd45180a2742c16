"""Duplicate detection: exact duplicates by raw hash, near-duplicates by DINOv3 cosine similarity.

Two images are *linked* when their raw files have the same SHA-256 (exact) or their DINOv3 CLS vectors
have a cosine similarity of at least the threshold (near). Clusters are the connected components of
those links (single linkage: two members of one cluster may be less similar to each other than the
threshold when others join them). Each cluster is one line of ``derived/near_duplicates.jsonl``; every
image is in at most one cluster. Nothing is ever deleted: :func:`duplicates_to_exclude` only names the
images a consumer may leave out, keeping one representative per cluster.

The similarity search is exact, not approximate: the upper triangle of V·Vᵀ in float32 tiles (torch's
BLAS). 60,000 x 1,024 takes 15-20 s on 2 cores (``bench/near_duplicates.py``); the cost grows with n², so
at several hundred thousand images an approximate index (e.g. faiss IVF) would be the next step.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .layout import DataLayout, InvalidImageId, is_valid_image_id
from .records import iter_jsonl, record_image_id, write_jsonl_atomic

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95
NEAR_DUPLICATES_NAME = "near_duplicates.jsonl"
MAX_EVIDENCE_PAIRS = 50  # strongest cosine links written per cluster (a burst of 500 shots has 125k)
MAX_PAIRS = 20_000_000  # ~240 MB of links; more means the threshold is far too low for this data
_TILE = 2048  # rows per block: 2048² float32 = 16 MB, the fastest size measured on 2 cores

ClusterKind = Literal["exact", "near"]


class TooManySimilarPairs(ValueError):
    """The threshold links more pairs than :data:`MAX_PAIRS`; raise it."""


def near_duplicates_path(layout: DataLayout) -> Path:
    return layout.derived_dir / NEAR_DUPLICATES_NAME


# --- clusters and their JSONL form ----------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    cluster_id: str  # derived from the members, so the same group keeps its id across runs
    kind: ClusterKind  # "exact": all members are one raw file's bytes; "near": otherwise
    members: tuple[str, ...]  # sorted
    max_similarity: float  # over the links that formed the cluster (an exact link counts 1.0)
    min_similarity: float
    exact_groups: tuple[tuple[str, ...], ...]  # members sharing one raw file (groups of 2+)
    pairs: tuple[tuple[str, str, float], ...]  # the strongest cosine links (a, b, similarity)
    pair_count: int  # all cosine links found in the cluster (pairs holds at most MAX_EVIDENCE_PAIRS)
    threshold: float

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "kind": self.kind,
            "size": len(self.members),
            "members": list(self.members),
            "max_similarity": self.max_similarity,
            "min_similarity": self.min_similarity,
            "threshold": self.threshold,
            "exact_groups": [list(group) for group in self.exact_groups],
            "pair_count": self.pair_count,
            "pairs": [list(pair) for pair in self.pairs],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Cluster | None:
        """The cluster of a JSONL line, or None if the line is not one this module wrote."""
        members = obj.get("members")
        if not isinstance(members, list):
            return None
        try:
            cluster = cls(
                cluster_id=str(obj["cluster_id"]),
                kind=obj["kind"],
                members=tuple(members),
                max_similarity=float(obj["max_similarity"]),
                min_similarity=float(obj["min_similarity"]),
                exact_groups=tuple(tuple(group) for group in obj["exact_groups"]),
                pairs=tuple((str(a), str(b), float(s)) for a, b, s in obj["pairs"]),
                pair_count=int(obj["pair_count"]),
                threshold=float(obj["threshold"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        # Members become file names (thumbnails) in the report: only safe ids are accepted.
        if cluster.kind not in ("exact", "near") or len(members) < 2 or not all(map(is_valid_image_id, members)):
            return None
        return cluster


def write_clusters(path: Path, clusters: Iterable[Cluster]) -> None:
    """Replace ``path`` atomically with one JSON line per cluster (an empty file when there are none)."""
    write_jsonl_atomic(path, (cluster.to_json() for cluster in clusters), backups=0)


def read_clusters(path: Path) -> list[Cluster]:
    """The clusters in ``path`` in file order; [] if it does not exist. Malformed lines are skipped and logged."""
    if not Path(path).is_file():
        return []
    clusters, malformed = [], 0
    for _, obj, _ in iter_jsonl(path):
        cluster = Cluster.from_json(obj) if obj is not None else None
        if cluster is None:
            malformed += 1
        else:
            clusters.append(cluster)
    if malformed:
        log.warning("%s: skipped %d malformed lines", path, malformed)
    return clusters


# --- embeddings ------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    ids: list[str]
    vectors: np.ndarray  # (len(ids), d) float32, each row of unit length
    skipped: dict[str, str]  # image id -> why it has no vector ("missing", "unreadable", ...)


def load_embeddings(layout: DataLayout, image_ids: Iterable[str]) -> Embeddings:
    """The DINOv3 CLS vectors (``derived/dinov3/<id>.npy``) of ``image_ids``, normalised.

    A file that is missing, unreadable, not a 1-D float vector, of another length than most of them,
    non-finite or all zeros is skipped with its reason, never raised.
    """
    found: list[tuple[str, np.ndarray]] = []
    skipped: dict[str, str] = {}
    for image_id in image_ids:
        try:
            path = layout.npy_path("dinov3", image_id)
        except InvalidImageId:
            skipped[image_id] = "invalid image id"
            continue
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            skipped[image_id] = "missing"
            continue
        except (OSError, ValueError, EOFError):  # truncated, not an .npy, object dtype
            skipped[image_id] = "unreadable"
            continue
        if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
            skipped[image_id] = "not a float vector"
            continue
        found.append((image_id, array))
    # The expected length is the common one: a few odd files must not decide it for all the others.
    dims = Counter(array.shape[0] for _, array in found).most_common(1)
    dim = dims[0][0] if dims else 0
    ids, rows = [], []
    for image_id, array in found:
        if array.shape[0] != dim:
            skipped[image_id] = "wrong dimension"
            continue
        row = array.astype(np.float32)
        norm = float(np.linalg.norm(row))
        if not np.isfinite(norm):
            skipped[image_id] = "non-finite values"
        elif norm == 0.0:
            skipped[image_id] = "zero vector"
        else:
            ids.append(image_id)
            rows.append(row / norm)
    vectors = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    return Embeddings(ids, vectors, skipped)


# --- search and clustering --------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"similarity threshold must be in (0, 1], got {threshold}")


def similar_pairs(
    vectors: np.ndarray, threshold: float, *, tile: int = _TILE, max_pairs: int = MAX_PAIRS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``i < j`` of rows of ``vectors`` (unit rows) with dot product >= ``threshold``.

    Returns ``(i, j, similarity)`` arrays (int64, int64, float32). Exact: each tile of the upper
    triangle of V·Vᵀ is one float32 matrix product into a preallocated buffer, so memory stays at
    ``tile²`` floats whatever the number of rows. Raises :class:`TooManySimilarPairs` past ``max_pairs``.
    """
    import torch  # here, not at module level: the report reads clusters without paying torch's import

    _check_threshold(threshold)
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    n = v.shape[0]
    buffer = torch.empty(tile * tile)
    found_i, found_j, found_s = [], [], []
    total = 0
    for start in range(0, n, tile):
        left = v[start : start + tile]
        for other in range(start, n, tile):
            right = v[other : other + tile]
            sims = buffer[: len(left) * len(right)].view(len(left), len(right))
            torch.matmul(left, right.T, out=sims)
            hits = sims >= threshold
            if other == start:
                hits.triu_(diagonal=1)  # a diagonal tile: each pair once, no self-pairs
            i, j = torch.nonzero(hits, as_tuple=True)
            if len(i) == 0:
                continue
            total += len(i)
            if total > max_pairs:
                raise TooManySimilarPairs(
                    f"more than {max_pairs} pairs have a similarity >= {threshold}; raise the threshold"
                )
            found_s.append(sims[i, j].numpy().copy())  # the buffer is overwritten by the next tile
            found_i.append(i.numpy() + start)
            found_j.append(j.numpy() + other)
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)


def _root(parent: list[int], k: int) -> int:
    while parent[k] != k:
        parent[k] = parent[parent[k]]  # path halving
        k = parent[k]
    return k


def _union(parent: list[int], a: int, b: int) -> None:
    root_a, root_b = _root(parent, a), _root(parent, b)
    if root_a != root_b:
        parent[max(root_a, root_b)] = min(root_a, root_b)


def cluster_duplicates(
    raw_hashes: Mapping[str, str | None], embeddings: Embeddings, threshold: float = DEFAULT_THRESHOLD
) -> list[Cluster]:
    """Clusters of images linked by equal raw hashes or by cosine similarity >= ``threshold``.

    ``raw_hashes`` maps every image considered to its raw SHA-256 (None when unknown); images without a
    vector can still be exact duplicates. Largest clusters first, then by first member.
    """
    _check_threshold(threshold)
    ids = sorted(set(raw_hashes) | set(embeddings.ids))
    index = {image_id: k for k, image_id in enumerate(ids)}
    parent = list(range(len(ids)))

    by_hash: dict[str, list[str]] = defaultdict(list)
    for image_id in ids:
        if raw_hashes.get(image_id):
            by_hash[raw_hashes[image_id]].append(image_id)
    exact_groups = [group for group in by_hash.values() if len(group) > 1]
    for group in exact_groups:
        for image_id in group[1:]:
            _union(parent, index[group[0]], index[image_id])

    # One vector per distinct raw: identical bytes have identical vectors, which would only add
    # redundant links (and work) to what the hash already says.
    searched: list[int] = []
    seen_hashes: set[str] = set()
    for row, image_id in enumerate(embeddings.ids):
        digest = raw_hashes.get(image_id)
        if digest:
            if digest in seen_hashes:
                continue
            seen_hashes.add(digest)
        searched.append(row)
    rows_i, rows_j, sims = similar_pairs(embeddings.vectors[searched], threshold)
    pairs = [
        (embeddings.ids[searched[i]], embeddings.ids[searched[j]], round(s, 4))
        for i, j, s in zip(rows_i.tolist(), rows_j.tolist(), sims.tolist())
    ]
    for a, b, _ in pairs:
        _union(parent, index[a], index[b])

    members: dict[int, list[str]] = defaultdict(list)
    for image_id in ids:
        members[_root(parent, index[image_id])].append(image_id)
    groups_of: dict[int, list[tuple[str, ...]]] = defaultdict(list)
    for group in exact_groups:
        groups_of[_root(parent, index[group[0]])].append(tuple(group))
    pairs_of: dict[int, list[tuple[str, str, float]]] = defaultdict(list)
    for pair in pairs:
        pairs_of[_root(parent, index[pair[0]])].append(pair)

    clusters = []
    for root, cluster_members in members.items():
        if len(cluster_members) < 2:
            continue
        groups, links = groups_of[root], sorted(pairs_of[root], key=lambda pair: (-pair[2], pair[0], pair[1]))
        similarities = [pair[2] for pair in links] + ([1.0] if groups else [])
        clusters.append(
            Cluster(
                cluster_id="dup-" + hashlib.sha256("\n".join(cluster_members).encode()).hexdigest()[:12],
                kind="exact" if len(groups) == 1 and len(groups[0]) == len(cluster_members) else "near",
                members=tuple(cluster_members),
                max_similarity=max(similarities),
                min_similarity=min(similarities),
                exact_groups=tuple(groups),
                pairs=tuple(links[:MAX_EVIDENCE_PAIRS]),
                pair_count=len(links),
                threshold=threshold,
            )
        )
    clusters.sort(key=lambda cluster: (-len(cluster.members), cluster.members[0]))
    return clusters


# --- the layout-level entry point --------------------------------------------------------------------


@dataclass
class NearDuplicateReport:
    clusters: list[Cluster]
    images: int  # records considered
    embedded: int  # of which had a usable vector
    skipped: dict[str, str]  # image id -> why it had no vector
    threshold: float
    path: Path
    seconds: float

    def summary_lines(self, max_examples: int = 10) -> list[str]:
        kinds = Counter(cluster.kind for cluster in self.clusters)
        in_clusters = sum(len(cluster.members) for cluster in self.clusters)
        lines = [
            f"duplicates: {kinds['exact']} exact and {kinds['near']} near-duplicate clusters "
            f"({in_clusters} images) among {self.images} images at similarity >= {self.threshold} "
            f"-> {self.path} in {self.seconds:.1f}s"
        ]
        if self.skipped:
            reasons = Counter(self.skipped.values())
            lines.append(
                f"  no usable DINOv3 vector for {len(self.skipped)} images (only exact duplicates found): "
                + ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
            )
            lines += [f"  e.g. {image_id}: {reason}" for image_id, reason in list(self.skipped.items())[:max_examples]]
        return lines


def find_near_duplicates(
    layout: DataLayout,
    records: Iterable[Mapping[str, Any]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    path: Path | None = None,
) -> NearDuplicateReport:
    """Cluster the images of the dataset ``records`` (their ``raw_sha256`` and DINOv3 vectors) and write
    the clusters to ``path`` (default :func:`near_duplicates_path`) atomically."""
    _check_threshold(threshold)
    started = time.monotonic()
    raw_hashes: dict[str, str | None] = {}
    for record in records:
        image_id = record_image_id(record)
        if is_valid_image_id(image_id):
            digest = record.get("raw_sha256")
            raw_hashes[image_id] = digest if isinstance(digest, str) and digest else None
    embeddings = load_embeddings(layout, raw_hashes)
    clusters = cluster_duplicates(raw_hashes, embeddings, threshold)
    path = Path(path) if path is not None else near_duplicates_path(layout)
    write_clusters(path, clusters)
    return NearDuplicateReport(
        clusters=clusters,
        images=len(raw_hashes),
        embedded=len(embeddings.ids),
        skipped=embeddings.skipped,
        threshold=threshold,
        path=path,
        seconds=time.monotonic() - started,
    )


# --- representatives ----------------------------------------------------------------------------------


def choose_representative(cluster: Cluster, records_by_id: Mapping[str, Mapping[str, Any]]) -> str:
    """The member to keep: the most pixels (width x height of its record), then the first id.
    Members without a record (no longer in the dataset) come last."""

    def pixels(image_id: str) -> int:
        record = records_by_id.get(image_id) or {}
        width, height = record.get("width"), record.get("height")
        return width * height if type(width) is int and type(height) is int else -1

    return min(cluster.members, key=lambda image_id: (-pixels(image_id), image_id))


def duplicates_to_exclude(
    clusters: Iterable[Cluster], records: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """Image id -> the representative kept in its place, for every non-representative cluster member
    (what an ``exclude_near_duplicates`` option leaves out of the shards; nothing is deleted)."""
    records_by_id = {record_image_id(record): record for record in records}
    excluded = {}
    for cluster in clusters:
        kept = choose_representative(cluster, records_by_id)
        excluded.update({image_id: kept for image_id in cluster.members if image_id != kept})
    return excluded
