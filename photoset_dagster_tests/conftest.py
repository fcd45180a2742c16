import os

import pytest

# Tests never reach a model hub; tiny models are built locally and loaded by path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the CLI and `photoset dev` do: one planned event per run, not one per partition (see README).
os.environ.setdefault("DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS", "true")

pytest_plugins = [
    "photoset_dagster_tests.fixtures_http",
    "photoset_dagster_tests.fixtures_models",
    "photoset_dagster_tests.fixtures_dataset",
    "photoset_dagster_tests.fixtures_dagster",
]


@pytest.fixture
def layout(tmp_path):
    from photoset_dagster.core.layout import DataLayout

    data = DataLayout(tmp_path / "data")
    data.ensure_dirs()
    return data
