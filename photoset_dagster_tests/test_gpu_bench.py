"""bench/gpu_passes.py: ``--smoke`` runs the whole script on the CPU, so ``--all`` meets a checked script
on the GPU machine; the projection's arithmetic is checked on its own."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu_passes.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_gpu_passes", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(BENCH), *args, "--workdir", str(tmp_path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> str:
    result = _run("--smoke", tmp_path=tmp_path_factory.mktemp("bench"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_smoke_measures_every_pass(smoke: str) -> None:
    assert "plan: smoke" in smoke and "failed:" not in smoke and "out of memory" not in smoke
    for stage in ("facts", "captions", "dinov3", "vae"):
        assert re.search(rf"^{stage} prepare \(CPU\) .* \d+\.\d", smoke, re.M), stage
    for name in ("dinov3 cls ", "dinov3 \\+patches", "vae ", "t5 "):
        assert re.search(rf"^{name}.*\d+\.\d", smoke, re.M), name
    assert smoke.count("best") >= 3  # each model pass names its best batch size
    assert re.search(r"^captions \(vLLM\) .*skipped: vllm is not importable", smoke, re.M)


def test_smoke_compares_each_dtype_with_float32(smoke: str) -> None:
    for model in ("dinov3 cls", "vae", "t5"):
        diffs = {
            dtype: float(re.search(rf"^{model} {dtype} .*max \|diff\| vs float32 (\S+)", smoke, re.M).group(1))
            for dtype in ("float32", "bfloat16", "float16")
        }
        assert diffs["float32"] == 0 and 0 < diffs["float16"] < diffs["bfloat16"] < 0.2, (model, diffs)


def test_smoke_projects_sixty_thousand_images_against_the_goal(smoke: str) -> None:
    assert "projection: 60,000 images" in smoke
    for stage in ("facts", "captions", "dinov3", "vae", "t5"):
        assert re.search(rf"^{stage} +", smoke, re.M), stage
    # No vLLM here: the projection says what the caption stage would need to meet the goal.
    assert re.search(r"^projected end to end: >= \d+\.\d+ h without captions \(goal <= 1\.5 h, >= 11 images/s", smoke,
                     re.M)  # fmt: skip
    assert "captions would need" in smoke


def test_all_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    result = _run("--all", tmp_path=tmp_path)
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_projection_adds_the_stages_one_after_another(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_module()
    stages = [
        bench.Stage("facts", None, 50.0, on_gpu=False),
        bench.Stage("captions", 20.0, 40.0),  # GPU-bound: 60,000 / 20 = 0.83 h
        bench.Stage("vae", 300.0, 60.0),  # CPU-bound: 0.28 h; with facts' 0.33 h, 5,200 s in all
    ]
    bench.print_projection(stages, workers=8)
    out = capsys.readouterr().out
    assert re.search(r"^projected end to end: 1\.44 h, 11\.5 images/s sustained .*: met\)", out, re.M)

    stages[1] = bench.Stage("captions", None, 40.0)
    bench.print_projection(stages, workers=8)
    out = capsys.readouterr().out
    # 1.5 h less facts (0.33 h) and vae (0.28 h) leaves 0.89 h for 60,000 captions: 18.8 images/s.
    assert "without captions" in out and "captions would need 18.8 images/s" in out
