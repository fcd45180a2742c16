"""Progress lines: rate and ETA while work remains, the time it took once done."""

from __future__ import annotations

from photoset_dagster.core.progress import ProgressMeter


def test_a_meter_shows_rate_and_eta_then_the_time_taken():
    lines: list[str] = []
    meter = ProgressMeter("vae_latents", 4, lines.append, every_s=0.0)

    meter.advance()
    meter.advance(3)

    assert lines[0].startswith("vae_latents: [######..................] 1/4 (") and "/s, ETA " in lines[0]
    assert lines[1].startswith("vae_latents: [########################] 4/4 in ") and lines[1].endswith("s")
