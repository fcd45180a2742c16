"""The Dagster layer: partitions, resources, assets, checks, jobs, sensors and schedules over the core."""

import warnings

import dagster as dg

# The beta and preview parameters photoset uses on purpose (a single-run backfill policy, per-partition
# checks, sensor owners): every process that loads the definitions would otherwise print the same
# notices on each start. Any other beta or preview notice still shows.
for _category, _message in ((dg.BetaWarning, "Parameter `backfill_policy` of function `asset`"),
                            (dg.PreviewWarning, "Specifying a partitions_def on an AssetCheckSpec"),
                            (dg.BetaWarning, "Parameter `owners` of initializer `SensorDefinition")):
    warnings.filterwarnings("ignore", message=_message, category=_category)
