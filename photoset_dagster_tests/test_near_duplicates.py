"""Duplicate detection: exact by raw hash, near by DINOv3 cosine, clusters, their JSONL and representatives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from photoset_dagster.core.atomic import save_npy_atomic
from photoset_dagster.core.layout import DataLayout
from photoset_dagster.core.near_duplicates import (
    Cluster,
    Embeddings,
    TooManySimilarPairs,
    choose_representative,
    cluster_duplicates,
    duplicates_to_exclude,
    find_near_duplicates,
    load_embeddings,
    near_duplicates_path,
    read_clusters,
    similar_pairs,
    write_clusters,
)

DIM = 32


def unit(rng: np.random.Generator) -> np.ndarray:
    vector = rng.standard_normal(DIM)
    return vector / np.linalg.norm(vector)


def at_cosine(rng: np.random.Generator, source: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector whose cosine with the unit vector ``source`` is exactly ``cosine``."""
    noise = rng.standard_normal(DIM)
    noise -= noise.dot(source) * source
    return cosine * source + np.sqrt(1 - cosine**2) * noise / np.linalg.norm(noise)


def embeddings_of(vectors: dict[str, np.ndarray]) -> Embeddings:
    ids = sorted(vectors)
    return Embeddings(ids, np.stack([vectors[i] for i in ids]).astype(np.float32), {})


def record(image_id: str, raw_sha256: str | None = None, width: int = 1024, height: int = 1024) -> dict:
    return {"image_id": image_id, "raw_sha256": raw_sha256 or f"sha-{image_id}", "width": width, "height": height}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# --- the search ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [7, 64, 2048])
def test_similar_pairs_equal_brute_force_across_tile_boundaries(rng, tile):
    base = rng.standard_normal((60, DIM))
    base[40:] = base[:20] + 0.15 * rng.standard_normal((20, DIM))  # 20 planted near copies
    vectors = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    full = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    for threshold in (0.5, 0.9, 0.97):
        expected = {(i, j) for i, j in zip(*np.nonzero(full >= threshold)) if i < j}
        i, j, sims = similar_pairs(vectors, threshold, tile=tile)
        assert set(zip(i.tolist(), j.tolist())) == expected
        assert np.allclose(sims, full[i, j], atol=1e-5)
    assert len(expected) >= 5


def test_similar_pairs_of_nothing_and_of_one_vector():
    for n in (0, 1):
        i, j, sims = similar_pairs(np.ones((n, DIM), np.float32) / np.sqrt(DIM), 0.9)
        assert len(i) == len(j) == len(sims) == 0


def test_a_threshold_outside_0_1_is_refused():
    for threshold in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="threshold"):
            similar_pairs(np.eye(3, dtype=np.float32), threshold)


def test_too_many_pairs_is_a_clear_error():
    same = np.tile(np.eye(1, DIM, dtype=np.float32), (30, 1))  # 435 identical pairs
    with pytest.raises(TooManySimilarPairs, match="raise the threshold"):
        similar_pairs(same, 0.9, max_pairs=100)


# --- clustering ----------------------------------------------------------------------------------------


def test_exact_duplicates_come_from_the_raw_hash_even_without_vectors():
    hashes = {"a": "h1", "b": "h1", "c": "h1", "d": "h2", "e": None, "f": None}
    clusters = cluster_duplicates(hashes, Embeddings([], np.zeros((0, DIM), np.float32), {}))
    assert len(clusters) == 1
    (cluster,) = clusters
    assert (cluster.kind, cluster.members) == ("exact", ("a", "b", "c"))
    assert (cluster.min_similarity, cluster.max_similarity) == (1.0, 1.0)
    assert cluster.exact_groups == (("a", "b", "c"),)
    assert cluster.pairs == () and cluster.pair_count == 0


def test_near_duplicates_respect_the_threshold(rng):
    a = unit(rng)
    vectors = {"a": a, "close": at_cosine(rng, a, 0.97), "farther": at_cosine(rng, a, 0.93), "other": unit(rng)}
    hashes = {image_id: f"sha-{image_id}" for image_id in vectors}

    (cluster,) = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    assert (cluster.kind, cluster.members) == ("near", ("a", "close"))
    assert cluster.min_similarity == cluster.max_similarity == pytest.approx(0.97, abs=1e-4)
    assert cluster.pairs == (("a", "close", pytest.approx(0.97, abs=1e-4)),)

    (loose,) = cluster_duplicates(hashes, embeddings_of(vectors), 0.9)
    assert loose.members == ("a", "close", "farther")
    assert cluster_duplicates(hashes, embeddings_of(vectors), 0.99) == []


def test_clusters_are_connected_components(rng):
    # a~b and b~c above the threshold while a and c are not: single linkage makes one cluster of three.
    a = unit(rng)
    b = at_cosine(rng, a, 0.97)
    c = at_cosine(rng, b, 0.97)
    d = unit(rng)
    vectors = {"a": a, "b": b, "c": c, "d": d, "e": at_cosine(rng, d, 0.99)}
    assert float(a @ c) < 0.96
    hashes = {image_id: f"sha-{image_id}" for image_id in vectors}
    clusters = cluster_duplicates(hashes, embeddings_of(vectors), 0.96)
    assert [cluster.members for cluster in clusters] == [("a", "b", "c"), ("d", "e")]  # largest first
    assert clusters[0].pair_count == 2
    assert all(0.96 <= s for _, _, s in clusters[0].pairs)


def test_an_exact_group_with_a_near_neighbour_is_one_near_cluster(rng):
    a = unit(rng)
    vectors = {"a": a, "a-copy": a.copy(), "b": at_cosine(rng, a, 0.98)}
    hashes = {"a": "same", "a-copy": "same", "b": "sha-b"}
    (cluster,) = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    assert (cluster.kind, cluster.members) == ("near", ("a", "a-copy", "b"))
    assert cluster.exact_groups == (("a", "a-copy"),)
    # One vector per raw file was searched: the copy adds no redundant cosine link.
    assert [pair[:2] for pair in cluster.pairs] == [("a", "b")]
    assert cluster.max_similarity == 1.0 and cluster.min_similarity == pytest.approx(0.98, abs=1e-4)


def test_cluster_ids_are_stable_and_depend_on_the_members(rng):
    a = unit(rng)
    vectors = {"a": a, "b": at_cosine(rng, a, 0.99), "c": unit(rng)}
    hashes = {image_id: f"sha-{image_id}" for image_id in vectors}
    first = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    again = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    assert [c.cluster_id for c in first] == [c.cluster_id for c in again]
    vectors["c"] = at_cosine(rng, a, 0.99)
    (grown,) = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    assert grown.cluster_id != first[0].cluster_id


# --- loading embeddings -----------------------------------------------------------------------------


def test_unusable_vectors_are_skipped_with_their_reason(layout: DataLayout, rng):
    good = {f"ok{k}": unit(rng).astype(np.float32) for k in range(3)}
    for image_id, vector in good.items():
        save_npy_atomic(layout.npy_path("dinov3", image_id), vector * 7.5)  # not unit: normalised on load
    save_npy_atomic(layout.npy_path("dinov3", "short"), np.ones(DIM - 1, np.float32))
    save_npy_atomic(layout.npy_path("dinov3", "grid"), np.ones((2, DIM), np.float32))
    save_npy_atomic(layout.npy_path("dinov3", "ints"), np.ones(DIM, np.int64))
    save_npy_atomic(layout.npy_path("dinov3", "nan"), np.full(DIM, np.nan, np.float32))
    save_npy_atomic(layout.npy_path("dinov3", "zero"), np.zeros(DIM, np.float32))
    layout.npy_path("dinov3", "truncated").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr'")
    layout.npy_path("dinov3", "empty").write_bytes(b"")
    ids = [*good, "short", "grid", "ints", "nan", "zero", "truncated", "empty", "missing", "bad/id"]

    embeddings = load_embeddings(layout, ids)
    assert embeddings.ids == list(good)
    assert embeddings.vectors.dtype == np.float32 and embeddings.vectors.shape == (3, DIM)
    assert np.allclose(np.linalg.norm(embeddings.vectors, axis=1), 1.0)
    assert np.allclose(embeddings.vectors[0], good["ok0"], atol=1e-6)
    assert embeddings.skipped == {
        "short": "wrong dimension",
        "grid": "not a float vector",
        "ints": "not a float vector",
        "nan": "non-finite values",
        "zero": "zero vector",
        "truncated": "unreadable",
        "empty": "unreadable",
        "missing": "missing",
        "bad/id": "invalid image id",
    }


def test_no_vectors_at_all_is_not_an_error(layout: DataLayout):
    embeddings = load_embeddings(layout, ["a", "b"])
    assert embeddings.ids == [] and embeddings.vectors.shape[0] == 0
    assert cluster_duplicates({"a": "h", "b": "h"}, embeddings)[0].members == ("a", "b")


# --- the layout entry point and the JSONL ------------------------------------------------------------------


def test_find_near_duplicates_writes_one_jsonl_line_per_cluster(layout: DataLayout, rng):
    a, c = unit(rng), unit(rng)
    vectors = {"a": a, "b": at_cosine(rng, a, 0.98), "c": c, "d": at_cosine(rng, c, 0.5), "e": unit(rng)}
    for image_id, vector in vectors.items():
        save_npy_atomic(layout.npy_path("dinov3", image_id), vector.astype(np.float32))
    records = [record(i) for i in vectors] + [record("e-copy", raw_sha256="sha-e"), record("no-vector")]

    report = find_near_duplicates(layout, records)
    path = near_duplicates_path(layout)
    assert report.path == path and path.is_file()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["kind"], line["members"]) for line in lines] == [("near", ["a", "b"]), ("exact", ["e", "e-copy"])]
    assert set(lines[0]) >= {"cluster_id", "kind", "members", "size", "max_similarity", "min_similarity", "pairs"}
    assert (report.images, report.embedded) == (7, 5)
    assert report.skipped == {"e-copy": "missing", "no-vector": "missing"}
    assert "1 exact and 1 near-duplicate clusters (4 images) among 7 images" in report.summary_lines()[0]
    assert read_clusters(path) == report.clusters
    assert not list(path.parent.glob(".*.tmp"))

    for image_id in vectors:  # nothing similar any more: the file is rewritten empty, not left stale
        save_npy_atomic(layout.npy_path("dinov3", image_id), unit(rng).astype(np.float32))
    assert find_near_duplicates(layout, [record(i) for i in vectors]).clusters == []
    assert path.read_text() == ""


def test_clusters_round_trip_and_malformed_lines_are_skipped(tmp_path, rng, caplog):
    a = unit(rng)
    vectors = {"x": a, "y": at_cosine(rng, a, 0.99), "z": at_cosine(rng, a, 0.985)}
    hashes = {"x": "h", "y": "h2", "z": "h3", "x2": "h"}
    clusters = cluster_duplicates(hashes, embeddings_of(vectors), 0.95)
    path = tmp_path / "clusters.jsonl"
    write_clusters(path, clusters)
    assert read_clusters(path) == clusters

    good_line = json.dumps(clusters[0].to_json())
    bad_members = json.dumps({**clusters[0].to_json(), "members": ["../etc", "x"]})
    one_member = json.dumps({**clusters[0].to_json(), "members": ["x"]})
    as_string = json.dumps({**clusters[0].to_json(), "members": "xy"})
    path.write_text("\n".join([good_line, "not json", "[1, 2]", bad_members, one_member, as_string, "{}"]) + "\n")
    assert read_clusters(path) == clusters
    assert "skipped 6 malformed lines" in caplog.text
    assert read_clusters(tmp_path / "absent.jsonl") == []


# --- representatives -----------------------------------------------------------------------------------


def make_cluster(*members: str) -> Cluster:
    return Cluster("dup-test", "near", tuple(sorted(members)), 0.99, 0.96, (), (), 0, 0.95)


def test_the_representative_has_the_most_pixels_then_the_first_id():
    records = {"a": record("a", width=512, height=512), "b": record("b", width=1024, height=768),
               "c": record("c", width=768, height=1024)}
    assert choose_representative(make_cluster("a", "b", "c"), records) == "b"  # b and c tie on pixels
    assert choose_representative(make_cluster("a", "gone"), records) == "a"  # a member without a record is last
    assert choose_representative(make_cluster("gone", "lost"), records) == "gone"


def test_duplicates_to_exclude_keeps_one_per_cluster_and_deletes_nothing(layout: DataLayout):
    records = [record("a", width=100, height=100), record("b", width=200, height=200), record("c"),
               record("d"), record("e")]
    clusters = [make_cluster("a", "b"), make_cluster("c", "d", "e")]
    assert duplicates_to_exclude(clusters, records) == {"a": "b", "d": "c", "e": "c"}
    assert duplicates_to_exclude([], records) == {}
