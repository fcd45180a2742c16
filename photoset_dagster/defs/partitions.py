"""Partitions: one dynamic partition per image id, one static partition per aspect bucket."""

from __future__ import annotations

import dagster as dg

from ..core.buckets import BUCKET_NAMES
from .resources import env_int

IMAGE_ID_PARTITIONS_NAME = "image_id"
image_ids = dg.DynamicPartitionsDefinition(name=IMAGE_ID_PARTITIONS_NAME)
aspect_buckets = dg.StaticPartitionsDefinition(list(BUCKET_NAMES))

# Images per run when a backfill is launched (UI, daemon): each run loads every model once.
# 0 = one run for the whole selection, which `dagster asset materialize --partition-range` requires.
MAX_IMAGES_PER_RUN = env_int("PHOTOSET_MAX_IMAGES_PER_RUN", 1000)


def image_backfill_policy() -> dg.BackfillPolicy:
    if MAX_IMAGES_PER_RUN <= 0:
        return dg.BackfillPolicy.single_run()
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_IMAGES_PER_RUN)
