"""View plan: determinism, bounds, torchvision's sampling rule, and rendering against PIL directly."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.data.views import ALGORITHM_VERSION, View, ViewPlan, render


def _image(width=97, height=61, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


def test_same_view_is_identical_across_plan_instances():
    a = ViewPlan(seed=3, views=4, size=32)
    b = ViewPlan(seed=3, views=4, size=32)
    for index in (0, 1, 12345):
        for view_id in range(4):
            assert a.view(index, view_id, 640, 480) == b.view(index, view_id, 640, 480)


def test_different_index_view_or_seed_differ():
    plan = ViewPlan(seed=0, views=3, size=32)
    boxes = {plan.view(i, v, 500, 375).box for i in range(20) for v in range(3)}
    assert len(boxes) == 60  # continuous draws: no two views collide
    other = ViewPlan(seed=1, views=3, size=32)
    assert plan.view(5, 1, 500, 375) != other.view(5, 1, 500, 375)


@pytest.mark.parametrize("width,height", [(500, 375), (64, 64), (1000, 40), (33, 900)])
def test_box_inside_image_and_within_scale_ratio(width, height):
    plan = ViewPlan(seed=7, views=2, size=16, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    flips = []
    for index in range(200):
        view = plan.view(index, index % 2, width, height)
        top, left, h, w = view.pixel_box(width, height)
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
        area = w * h / (width * height)
        aspect = w / h
        # Rounding to whole pixels moves scale/ratio a little; the center-crop fallback (for very
        # elongated images) keeps the whole short side instead.
        sampled = 0.2 - 2.5 * (w + h) / (width * height) <= area <= 1.0 + 1e-9 and \
            3 / 4 * (1 - 1 / min(w, h)) - 1e-9 <= aspect <= 4 / 3 * (1 + 1 / min(w, h)) + 1e-9
        fallback = (w == width or h == height) and (left == (width - w) // 2 and top == (height - h) // 2)
        assert sampled or fallback, (index, view)
        flips.append(view.flip)
    assert 60 < sum(flips) < 140  # p = 0.5 over 200 draws


def test_matches_torchvision_rule_replayed_with_the_same_draws():
    """Replays RandomResizedCrop.get_params' arithmetic with the plan's numpy stream."""
    plan = ViewPlan(seed=11, views=1, size=8, hflip=False)
    width, height = 300, 200
    for index in range(30):
        rng = np.random.default_rng([11, index, 0])
        area = width * height
        expected = None
        for _ in range(10):
            target = area * rng.uniform(0.2, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                expected = (top, left, h, w)
                break
        assert plan.view(index, 0, width, height).pixel_box(width, height) == expected
        assert plan.view(index, 0, width, height).flip is False


def test_fallback_is_a_center_crop():
    # scale (1, 1) with an aspect ratio range the image cannot meet: every try fails.
    plan = ViewPlan(seed=0, views=1, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    view = plan.view(0, 0, 120, 40)
    assert view.pixel_box(120, 40) == (0, 40, 40, 40)  # top, left, h, w


def test_row_roundtrip_through_float32_is_exact_in_pixels():
    plan = ViewPlan(seed=5, views=2, size=16)
    for index in range(50):
        view = plan.view(index, 1, 4032, 3024)
        back = View.from_row(view.as_row().astype(np.float32))
        assert back.flip == view.flip
        assert back.pixel_box(4032, 3024) == view.pixel_box(4032, 3024)


def test_render_equals_independent_pil_crop_resize_flip():
    image = _image()
    plan = ViewPlan(seed=2, views=1, size=24)
    seen_flip = set()
    for index in range(12):
        view = plan.view(index, 0, image.width, image.height)
        out = render(image, view, 24, "bicubic")
        assert out.dtype == torch.float32 and out.shape == (3, 24, 24)
        assert 0.0 <= out.min() and out.max() <= 1.0
        top, left, h, w = view.pixel_box(image.width, image.height)
        ref = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.BICUBIC)
        if view.flip:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        ref = torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255.0).permute(2, 0, 1)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        seen_flip.add(view.flip)
    assert seen_flip == {True, False}


def test_render_known_image_whole_view_identity():
    """A full-image view at the image's own size is the image itself (no resampling error)."""
    image = _image(16, 16, seed=3)
    out = render(image, View(box=(0.0, 0.0, 1.0, 1.0), flip=True), 16, "bilinear")
    ref = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).flip(-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_digest_and_attrs_roundtrip():
    plan = ViewPlan(seed=1, views=2, size=224)
    attrs = plan.to_attrs()
    assert attrs["algorithm_version"] == ALGORITHM_VERSION
    again = ViewPlan.from_attrs(attrs)
    assert again == plan and again.digest() == plan.digest()
    assert ViewPlan(seed=1, views=2, size=224, scale=(0.08, 1.0)).digest() != plan.digest()
    assert ViewPlan(seed=2, views=2, size=224).digest() != plan.digest()
    with pytest.raises(ConfigError, match="algorithm version"):
        ViewPlan.from_attrs({**attrs, "algorithm_version": ALGORITHM_VERSION + 1})
    with pytest.raises(ConfigError, match="inconsistent"):
        ViewPlan.from_attrs({**attrs, "seed": 9})


@pytest.mark.parametrize("kwargs,match", [
    ({"views": 0}, "views"), ({"scale": (0.5, 0.2)}, "scale"), ({"ratio": (0, 1)}, "ratio"),
    ({"interpolation": "area"}, "interpolation"), ({"seed": -1}, "seed"),
])
def test_bad_plan_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ViewPlan(**{"seed": 0, "views": 1, "size": 8, **kwargs})
