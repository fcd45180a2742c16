import os
import tempfile

import pytest

# Tests never reach a model hub; tiny models are built locally and loaded by path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never read the developer's photoset.toml: each test that wants a settings file writes its own.
os.environ["PHOTOSET_SETTINGS"] = os.path.join(tempfile.mkdtemp(prefix="photoset-settings-"), "photoset.toml")
# The disk floor (20 GB by default) is a property of the machine, not of the code under test.
os.environ.setdefault("PHOTOSET_MIN_FREE_GB", "0")

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
