"""Near-duplicate search at scale: N random unit vectors with planted noisy copies, against brute force.

Plants ``--planted`` copies with a cosine similarity just above the threshold (uniform on
[threshold + 0.002, 0.999]) and as many decoys just below it (uniform on [threshold - 0.10,
threshold - 0.005]), then times ``cluster_duplicates`` (the exact tiled search plus clustering; no
files) and reports recall and precision of the planted pairs. Random 1,024-d vectors are otherwise
near-orthogonal (cosine ~ N(0, 1/1024)), so the planted pairs are the whole truth.

The brute-force reference is the plainest correct search: float64 rows against the whole matrix, no
tiling, no symmetry. At the full N it would take minutes, so it runs over ``--brute-rows`` random query
rows and its time is extrapolated to N rows (measured in full when N <= --brute-rows); the pairs it finds
for those rows are compared with ours.

    .venv/bin/python bench/near_duplicates.py [--n 60000] [--threshold 0.95]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from photoset_dagster.core.near_duplicates import DEFAULT_THRESHOLD, Embeddings, cluster_duplicates  # noqa: E402

TARGET_SECONDS = 60.0
TARGET_RECALL = 0.99


def _copy_at(rng: np.random.Generator, source: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at exactly ``cosine`` from the unit vector ``source``."""
    noise = rng.standard_normal(source.shape[0])
    noise -= noise.dot(source) * source
    noise /= np.linalg.norm(noise)
    return cosine * source + np.sqrt(1.0 - cosine**2) * noise


def make_vectors(n: int, dim: int, planted: int, threshold: float, seed: int) -> tuple[np.ndarray, set, set]:
    """(vectors, planted pairs above the threshold, decoy pairs below it); pairs are (i, j) with i < j."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # Disjoint rows for every source and copy, so no pair chains into a triple by accident.
    rows = rng.permutation(n)[: 4 * planted].reshape(2, 2, planted)
    truth, decoys = set(), set()
    for (sources, copies), low, high, pairs in (
        (rows[0], threshold + 0.002, 0.999, truth),
        (rows[1], threshold - 0.10, threshold - 0.005, decoys),
    ):
        for source, copy in zip(sources.tolist(), copies.tolist()):
            vectors[copy] = _copy_at(rng, vectors[source].astype(np.float64), rng.uniform(low, high))
            pairs.add((min(source, copy), max(source, copy)))
    return vectors, truth, decoys


def brute_force(vectors: np.ndarray, queries: np.ndarray, threshold: float) -> tuple[set, float]:
    """Pairs (i < j) with i or j in ``queries`` and cosine >= threshold, and the seconds it took."""
    started = time.perf_counter()
    full = vectors.astype(np.float64)
    pairs = set()
    for start in range(0, len(queries), 256):
        block = queries[start : start + 256]
        rows, cols = np.nonzero(full[block] @ full.T >= threshold)
        pairs.update((min(a, b), max(a, b)) for a, b in zip(block[rows].tolist(), cols.tolist()) if a != b)
    return pairs, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60_000, help="vectors (default 60000)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--planted", type=int, default=600, help="planted pairs above the threshold (and decoys)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--brute-rows", type=int, default=2000, help="query rows for the brute-force reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.n < 4 * args.planted:
        parser.error("--n must be at least 4 x --planted")

    vectors, truth, decoys = make_vectors(args.n, args.dim, args.planted, args.threshold, args.seed)
    ids = [f"img{k:06d}" for k in range(args.n)]
    embeddings = Embeddings(ids=ids, vectors=vectors, skipped={})
    print(f"{args.n} x {args.dim} unit vectors, {len(truth)} planted pairs, {len(decoys)} decoys, "
          f"threshold {args.threshold}")

    started = time.perf_counter()
    clusters = cluster_duplicates(dict.fromkeys(ids), embeddings, args.threshold)
    seconds = time.perf_counter() - started
    assert all(cluster.pair_count == len(cluster.pairs) for cluster in clusters), "evidence was capped"
    found = {tuple(sorted((int(a[3:]), int(b[3:])))) for cluster in clusters for a, b, _ in cluster.pairs}
    recall = len(found & truth) / len(truth) if truth else 1.0
    precision = len(found & truth) / len(found) if found else 1.0
    print(f"tiled search + clustering: {seconds:.1f}s, {len(found)} pairs in {len(clusters)} clusters, "
          f"recall {recall:.4f}, precision {precision:.4f}, decoys found {len(found & decoys)}")

    queries = np.random.default_rng(args.seed + 1).permutation(args.n)[: args.brute_rows]
    reference, brute_seconds = brute_force(vectors, queries, args.threshold)
    queried = set(queries.tolist())
    ours = {pair for pair in found if pair[0] in queried or pair[1] in queried}
    agreement = len(ours & reference) / len(reference) if reference else 1.0
    if len(queries) == args.n:
        print(f"brute force (float64, all {args.n} rows, measured): {brute_seconds:.1f}s")
    else:
        print(f"brute force (float64): {brute_seconds:.1f}s for {len(queries)} query rows -> "
              f"{brute_seconds * args.n / len(queries):.0f}s extrapolated to {args.n} rows")
    print(f"against brute force on those rows: {len(reference)} pairs, recall {agreement:.4f}, "
          f"extra pairs {len(ours - reference)}")

    met = seconds <= TARGET_SECONDS and recall >= TARGET_RECALL and agreement >= TARGET_RECALL
    print(f"target (<= {TARGET_SECONDS:.0f}s, recall >= {TARGET_RECALL}): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
