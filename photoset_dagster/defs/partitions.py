"""Partitions: one dynamic partition per image id, one static partition per aspect bucket."""

from __future__ import annotations

import dagster as dg

from ..core.buckets import BUCKET_NAMES

IMAGE_ID_PARTITIONS_NAME = "image_id"
image_ids = dg.DynamicPartitionsDefinition(name=IMAGE_ID_PARTITIONS_NAME)
aspect_buckets = dg.StaticPartitionsDefinition(list(BUCKET_NAMES))
