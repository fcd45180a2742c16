import hashlib
import json
import os
import random
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import webdataset as wds

from photoset_dagster.core.dataset import build_dataset_jsonl
from photoset_dagster.core.shards import ShardError, ShardOptions, ShardRefused, read_dataset_records, write_bucket_shards

BUCKET = "1024x1024"


@pytest.fixture
def images(layout, dataset_factory):
    """Five images in BUCKET, two in another bucket; returns {id: SyntheticImage}."""
    images = {f"sq{n}": dataset_factory.add(f"sq{n}", bucket=BUCKET, caption=f"square {n} \u00e9") for n in range(5)}
    images |= {f"tall{n}": dataset_factory.add(f"tall{n}", bucket="832x1216") for n in range(2)}
    build_dataset_jsonl(layout, images, dataset_factory.recipes)
    return images


def _rebuild(layout, dataset_factory, ids):
    build_dataset_jsonl(layout, ids, dataset_factory.recipes)
    return read_dataset_records(layout)


def _sample_ids(path):
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(name.split(".")[0] for name in tar.getnames()))


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_seed_readme_snippet_reads_the_shards_back(layout, images):
    report = write_bucket_shards(layout, BUCKET, read_dataset_records(layout), ShardOptions(shard_size=2))
    assert report.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert report.samples == 5 and report.shard_samples == [2, 2, 1]

    # the README's snippet as written (shardshuffle left unset: webdataset warns, shards keep their order)
    dataset = wds.WebDataset(str(layout.bucket_shard_dir(BUCKET) / "shard-{000000..000002}.tar"))
    dataset = dataset.decode()
    seen = []
    for sample in dataset:
        image = images[sample["__key__"]]
        assert sample["json"]["caption"] == image.caption
        assert sample["json"]["t5_attention_mask"] == image.mask
        assert (sample["json"]["width"], sample["json"]["height"]) == (1024, 1024)
        for member, kind in (("dinov3.npy", "dinov3"), ("vae.npy", "vae_latents"), ("t5.npy", "t5_hidden")):
            assert sample[member].dtype == image.arrays[kind].dtype
            assert np.array_equal(sample[member], image.arrays[kind])
        seen.append(sample["__key__"])
    assert seen == [f"sq{n}" for n in range(5)]


def test_members_are_in_order_and_npy_bytes_verbatim(layout, images):
    write_bucket_shards(layout, BUCKET, read_dataset_records(layout))
    with tarfile.open(layout.bucket_shard_dir(BUCKET) / "shard-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == ["sq0.json", "sq0.dinov3.npy", "sq0.vae.npy", "sq0.t5.npy"]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o644, "")}
        assert tar.extractfile("sq0.t5.npy").read() == layout.npy_path("t5_hidden", "sq0").read_bytes()
        body = json.loads(tar.extractfile("sq0.json").read().decode("utf-8"))
    assert sorted(body) == ["aspect_bucket", "caption", "height", "image_id", "t5_attention_mask", "width"]


def test_index_describes_every_shard(layout, images, dataset_factory):
    report = write_bucket_shards(layout, BUCKET, read_dataset_records(layout), ShardOptions(shard_size=3))

    index = json.loads(report.index_path.read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["name"] == f"bucket_{BUCKET}"
    assert index["recipes"] == {kind: recipe.hash for kind, recipe in dataset_factory.recipes.items()}
    shardlist = [(entry["url"], entry["nsamples"]) for entry in index["shardlist"]]
    assert shardlist == [("shard-000000.tar", 3), ("shard-000001.tar", 2)]
    for entry in index["shardlist"]:
        data = (report.index_path.parent / entry["url"]).read_bytes()
        assert entry["filesize"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert report.bytes == sum(e["filesize"] for e in index["shardlist"])


def test_tar_bytes_are_deterministic(layout, images):
    records = read_dataset_records(layout)
    write_bucket_shards(layout, BUCKET, records)
    path = layout.bucket_shard_dir(BUCKET) / "shard-000000.tar"
    first = path.read_bytes()
    os.unlink(path)

    report = write_bucket_shards(layout, BUCKET, records)

    assert report.rewritten == 1 and path.read_bytes() == first


def test_unchanged_shards_are_not_rewritten(layout, images, dataset_factory):
    options = ShardOptions(shard_size=2)
    write_bucket_shards(layout, BUCKET, read_dataset_records(layout), options)
    inodes = {p.name: p.stat().st_ino for p in layout.bucket_shard_dir(BUCKET).glob("shard-*.tar")}

    again = write_bucket_shards(layout, BUCKET, read_dataset_records(layout), options)
    assert (again.rewritten, again.unchanged) == (0, 3)

    image = images["sq2"]  # second shard
    dataset_factory.write_caption("sq2", "recaptioned", raw_sha256=image.raw_sha256)
    dataset_factory.write_t5("sq2", "recaptioned", image.mask)
    changed = write_bucket_shards(layout, BUCKET, _rebuild(layout, dataset_factory, images), options)

    assert changed.written == ["shard-000001.tar"] and changed.unchanged == 2
    after = {p.name: p.stat().st_ino for p in layout.bucket_shard_dir(BUCKET).glob("shard-*.tar")}
    assert after["shard-000000.tar"] == inodes["shard-000000.tar"]
    assert after["shard-000001.tar"] != inodes["shard-000001.tar"]
    assert after["shard-000002.tar"] == inodes["shard-000002.tar"]
    assert "  unchanged shard-000000.tar (2 samples)" in changed.summary_lines()


def test_fewer_samples_remove_the_extra_shards(layout, images, dataset_factory):
    options = ShardOptions(shard_size=2)
    write_bucket_shards(layout, BUCKET, read_dataset_records(layout), options)

    records = _rebuild(layout, dataset_factory, ["sq0", "sq1", "sq2"])
    with pytest.raises(ShardRefused, match="refusing to shrink its shards from 5 to 3 samples"):
        write_bucket_shards(layout, BUCKET, records, options)  # the guard: more than a tenth would go
    report = write_bucket_shards(layout, BUCKET, records, replace(options, force=True))

    assert report.removed_stale == ["shard-000002.tar"]
    assert sorted(p.name for p in layout.bucket_shard_dir(BUCKET).iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar"
    ]
    assert _sample_ids(layout.bucket_shard_dir(BUCKET) / "shard-000001.tar") == ["sq2"]


def test_shuffle_seed_limit_and_bucket_filter(layout, images):
    records = read_dataset_records(layout)
    ids = [f"sq{n}" for n in range(5)]
    expected = list(ids)
    random.Random(7).shuffle(expected)

    write_bucket_shards(layout, BUCKET, records, ShardOptions(shuffle=True, seed=7))
    shard = layout.bucket_shard_dir(BUCKET) / "shard-000000.tar"
    assert _sample_ids(shard) == expected != ids

    write_bucket_shards(layout, BUCKET, records, ShardOptions(shuffle=True, seed=7, limit=3))
    assert _sample_ids(shard) == expected[:3]
    with pytest.raises(ShardError, match="limit must be at least 1"):
        write_bucket_shards(layout, BUCKET, records, ShardOptions(limit=0))

    other = write_bucket_shards(layout, "832x1216", records, ShardOptions(buckets=frozenset({BUCKET})))
    assert other.samples == 0 and not layout.bucket_shard_dir("832x1216").exists()
    tall = write_bucket_shards(layout, "832x1216", records)
    assert _sample_ids(layout.bucket_shard_dir("832x1216") / "shard-000000.tar") == ["tall0", "tall1"]
    assert tall.samples == 2


def test_mixed_recipes_are_refused(layout, images):
    records = read_dataset_records(layout)
    records[1] = {**records[1], "recipes": {**records[1]["recipes"], "vae_latents": "0123456789abcdef"}}

    with pytest.raises(ShardError, match=r"different recipes.*\(e\.g\. sq1\)"):
        write_bucket_shards(layout, BUCKET, records)
    assert not layout.bucket_shard_dir(BUCKET).exists()


def test_dry_run_writes_nothing(layout, images):
    options = ShardOptions(shard_size=2, dry_run=True)
    report = write_bucket_shards(layout, BUCKET, read_dataset_records(layout), options)

    assert report.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert report.written == report.shards and report.index_path is None
    assert report.summary_lines()[1] == "  would write shard-000000.tar (2 samples)"
    assert not layout.bucket_shard_dir(BUCKET).exists()
    written = write_bucket_shards(layout, BUCKET, read_dataset_records(layout), replace(options, dry_run=False))
    assert report.bytes == written.bytes  # the dry run's size is the shards' real size


def test_overwrite_false_refuses_before_writing(layout, images):
    records = read_dataset_records(layout)
    write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=2))
    assert write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=2, overwrite=False)).unchanged == 3

    with pytest.raises(ShardError, match="refusing to overwrite"):
        write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=3, overwrite=False))
    assert len(list(layout.bucket_shard_dir(BUCKET).glob("shard-*.tar"))) == 3


def test_incomplete_records_are_skipped_and_reported(layout, images):
    os.unlink(layout.npy_path("vae_latents", "sq3"))
    records = read_dataset_records(layout)
    records.append(dict(records[0]))  # the same id twice would give two samples with one key
    records.append({**records[1], "image_id": "blank", "caption": " "})
    # a record without provenance is skipped, not taken for a second recipe set
    records.append({key: value for key, value in records[1].items() if key != "recipes"} | {"image_id": "legacy"})

    report = write_bucket_shards(layout, BUCKET, records)

    assert report.skipped == {
        "sq0": "duplicate image_id (the first record is packed)",
        "blank": "caption empty",
        "legacy": "missing fields recipes",
        "sq3": "vae_latents npy missing",
    }
    assert _sample_ids(layout.bucket_shard_dir(BUCKET) / "shard-000000.tar") == ["sq0", "sq1", "sq2", "sq4"]


def test_malformed_dataset_lines_are_skipped_and_counted(layout, images):
    with open(layout.dataset_jsonl, "a") as handle:
        handle.write("{not json\n")

    records = read_dataset_records(layout)

    assert len(records) == 7 and records.malformed_lines == [8]


def test_an_array_replaced_after_the_dataset_was_built_never_reaches_a_shard(layout, images):
    records = read_dataset_records(layout)
    path = layout.npy_path("vae_latents", "sq2")
    replaced = np.load(path) + np.float16(1)  # same shape and size, other bytes, a new mtime
    np.save(path, replaced)

    with pytest.raises(ShardError, match="sq2: its vae.npy is no longer the array its sidecar proves"):
        write_bucket_shards(layout, BUCKET, records, ShardOptions(shard_size=2))
    # The shard that would have held it was never renamed into place, and no index describes the run.
    assert all("sq2" not in _sample_ids(shard) for shard in layout.bucket_shard_dir(BUCKET).glob("*.tar"))
    assert not (layout.bucket_shard_dir(BUCKET) / "index.json").exists()
