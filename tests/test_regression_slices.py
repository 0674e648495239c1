"""Expected-output regression tests, as diffusers pins them: a 3x3 slice of the output of the seeded tiny model.

The tiny pipeline (`tiny_pipe` in conftest.py: `build_pipeline("tiny", seed=0)`) has random weights, so these
numbers mean nothing in themselves; they pin that a refactor leaves every output of `__call__` (text-to-image and
img2img), `image_upscale`, `encode_image` and `refine_prompts` unchanged for a seed.

Tolerance: 1e-3 on pixels in [0, 1] and on embeddings (float32 on CPU differs by ~1e-6 between CPU kinds and
thread counts; a real change of the numerics moves these values by far more). Texts are compared exactly.

To regenerate after an intended change of the numerics, run

    SDXS_PRINT_SLICES=1 python -m pytest tests/test_regression_slices.py -q -s

copy the printed lists over the `EXPECTED_*` constants below, and say why in the commit message.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

ATOL = 1e-3
PRINT = os.environ.get("SDXS_PRINT_SLICES") == "1"

EXPECTED_TEXT_TO_IMAGE = [0.5149, 0.4807, 0.5224, 0.6153, 0.5742, 0.5241, 0.4586, 0.4928, 0.545]
EXPECTED_IMG2IMG = [0.5634, 0.4177, 0.4646, 0.6147, 0.5314, 0.4708, 0.5117, 0.4913, 0.5611]
EXPECTED_UPSCALE = [0.5284, 0.4519, 0.4683, 0.5867, 0.5299, 0.4881, 0.4757, 0.483, 0.5133]
EXPECTED_ENCODE_IMAGE = [0.0015, 0.0179, 0.0224, 0.0186, -0.0266, -0.0341, -0.0022, -0.0, -0.0077]
EXPECTED_ENCODE_IMAGE_TOKENS = 7
EXPECTED_REFINE_GREEDY = ["cat"]
EXPECTED_REFINE_SAMPLED = ["cat, \ufffd illustratw green\ufffd ilue"]


def source_image() -> Image.Image:
    """A fixed 40x40 RGB gradient (not a multiple of the VAE factors: exercises padding and resizing)."""
    y, x = np.mgrid[0:40, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 6, (x + y) * 3], -1).astype(np.uint8))


def check_slice(name: str, actual, expected: list[float]) -> None:
    values = np.asarray(actual, dtype=np.float64).flatten()
    if PRINT:
        print(f"\n{name} = {np.round(values, 4).tolist()}")
    np.testing.assert_allclose(values, expected, atol=ATOL, rtol=0, err_msg=f"{name}: the output changed")


def test_call_text_to_image_slice(pipe):
    images = pipe(
        "a red apple",
        negative_prompt="low quality",
        num_inference_steps=2,
        seed=0,
        width=64,
        height=64,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    check_slice("EXPECTED_TEXT_TO_IMAGE", images[0, -3:, -3:, -1], EXPECTED_TEXT_TO_IMAGE)


def test_call_img2img_slice(pipe):
    images = pipe(
        "a red apple",
        image=source_image(),
        strength=0.5,
        num_inference_steps=4,
        seed=1,
        width=48,
        height=48,
        output_type="np",
    ).images
    assert images.shape == (1, 48, 48, 3)
    check_slice("EXPECTED_IMG2IMG", images[0, -3:, -3:, -1], EXPECTED_IMG2IMG)


def test_image_upscale_slice(pipe):
    up = pipe.image_upscale(source_image(), output_type="np")[0]
    assert up.shape == (80, 80, 3)
    check_slice("EXPECTED_UPSCALE", up[-3:, -3:, -1], EXPECTED_UPSCALE)


def test_encode_image_slice(pipe):
    embeds, mask = pipe.encode_image(source_image())
    if PRINT:
        print(f"\nEXPECTED_ENCODE_IMAGE_TOKENS = {int(mask.sum())}")
    assert int(mask.sum()) == EXPECTED_ENCODE_IMAGE_TOKENS
    check_slice("EXPECTED_ENCODE_IMAGE", embeds[0, :3, :3].float().numpy(), EXPECTED_ENCODE_IMAGE)


@pytest.mark.parametrize(
    ("kwargs", "name", "expected"),
    [
        # min_token_prob=0: every token the random tiny LM writes (at the default 0.05 it keeps none of them)
        ({"do_sample": False, "min_token_prob": 0}, "EXPECTED_REFINE_GREEDY", EXPECTED_REFINE_GREEDY),
        ({"seed": 0, "min_token_prob": 0}, "EXPECTED_REFINE_SAMPLED", EXPECTED_REFINE_SAMPLED),
    ],
)
def test_refine_prompts_tokens(pipe, kwargs, name, expected):
    refined = pipe.refine_prompts("cat", max_new_tokens=8, **kwargs)
    if PRINT:
        print(f"\n{name} = {refined!r}")
    assert refined == expected
