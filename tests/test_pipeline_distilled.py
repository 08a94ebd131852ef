"""The pipeline with a distilled refiner (§2.4.3): the refine settings its records give, one DiT call a step, and
a warning for explicit settings it was not distilled for."""

from __future__ import annotations

import pytest
import yaml
from run_dirs import write_test_image, write_two_stage_config

from fsvideo import distill
from fsvideo.dit import DiT
from fsvideo.pipeline import FSVideoPipeline
from fsvideo.pretrained import load_network, read_records
from fsvideo.stages import SamplingSettings

RECORDS = {distill.GUIDANCE_DISTILLED: True, distill.DISTILLED_STEPS: 8, distill.DISTILLED_SHIFT: 3.0}


@pytest.fixture(scope="module")
def distilled_config(tmp_path_factory):
    """The two-stage test chain with its refiner re-saved as distilled, and no ``refine:`` settings."""
    directory = tmp_path_factory.mktemp("distilled_chain")
    config = yaml.safe_load(write_two_stage_config(directory).read_text())
    records = {**read_records(config["refiner"]), **RECORDS}
    refiner = load_network(config["refiner"], DiT)
    config["refiner"] = str(refiner.save_pretrained(directory / "distilled" / "refiner", records=records))
    del config["refine"]
    return config, write_test_image(directory / "image.png")


def test_a_distilled_refiner_samples_with_its_recorded_settings(distilled_config, tmp_path):
    config, image = distilled_config
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    pipe = FSVideoPipeline.from_config(path)
    assert pipe.chain.settings == SamplingSettings(8, 1.0, 3.0, "euler")
    result = pipe.generate(image, "a cat", steps=2)
    refine = result.stages[3]
    assert refine["name"] == "refine" and refine["nfe"] == 8 and refine["shift"] == 3.0
    assert result.stages[1]["nfe"] == 2 * 2  # the base DiT keeps its guidance


def test_explicit_settings_off_the_distilled_ones_warn(distilled_config, tmp_path):
    config, _ = distilled_config
    config = {**config, "refine": {"steps": 4, "guidance_scale": 1.0, "shift": 3.0, "sampler": "euler"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match=r"steps 4 \(distilled for 8\)"):
        pipe = FSVideoPipeline.from_config(path)
    assert pipe.chain.settings.steps == 4
