"""The Dagster layer: partitions, resources, assets, checks, jobs, sensors and schedules over the core."""
