"""Augmented code views: the transforms of formats/views.py, the encode stage's `views`, and
train-ar's one view per image and epoch."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.core.training import one_view_per_image
from pipeline.formats.codes_table import view_slots
from pipeline.formats.images import center_square
from pipeline.formats.views import VIEW_AUGMENTS, augmented_view, flips, swap_sides, view_rng
from pipeline.stages.encode import EncodeConfig, run_encode_stage


def gradient(w: int, h: int) -> Image.Image:
    """An image whose every pixel says where it is: red = x, green = y."""
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return Image.fromarray(np.stack([x * 255 // (w - 1), y * 255 // (h - 1), 0 * x], -1)
                           .astype(np.uint8))  # fmt: skip


@pytest.mark.parametrize("augment", VIEW_AUGMENTS)
def test_views_are_seeded_squares_of_the_resolution(augment):
    image = gradient(48, 32)
    views = [augmented_view(image, 32, augment, view_rng(0, "k", v), False) for v in range(1, 9)]
    again = [augmented_view(image, 32, augment, view_rng(0, "k", v), False) for v in range(1, 9)]
    for pixels, same in zip(views, again, strict=True):
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, same)
    assert len({p.tobytes() for p in views}) > 1  # views differ
    mirrored = augmented_view(image, 32, augment, view_rng(0, "k", 1), True)
    assert np.array_equal(mirrored, views[0][:, ::-1])
    assert [flips(augment, v) for v in range(4)] == (
        [False] * 4 if augment == "dalle" else [False, True, False, True]
    )


def test_crop_flip_is_resize_then_random_crop_along_the_longer_side():
    """ImageNet's Resize(256) + RandomCrop(256): a stored 48x32 image (shorter side at the
    resolution) gives 32x32 windows that slide along x only, never resized."""
    image = gradient(48, 32)
    for v in range(1, 12):
        pixels = augmented_view(image, 32, "crop_flip", view_rng(3, "key", v), False)
        assert np.array_equal(pixels[:, 0, 1], np.asarray(image)[:, 0, 1])  # all rows
        left = int(np.argmin(np.abs(np.asarray(image)[0, :, 0].astype(int) - pixels[0, 0, 0])))
        assert np.array_equal(pixels, np.asarray(image)[:, left : left + 32])
    centre = center_square(image, 32)
    assert np.array_equal(centre, np.asarray(image)[:, 8:40])  # view 0


def test_a_flipped_view_swaps_the_sides_its_caption_names():
    assert swap_sides("a red circle on the left, a cross to the Right") == (
        "a red circle on the right, a cross to the Left"
    )
    assert swap_sides("LEFT and leftover and bright") == "RIGHT and leftover and bright"
    assert swap_sides(None) is None


def test_one_view_per_image_each_epoch_and_every_view_in_n_epochs():
    keys = [f"k{i:03d}" for i in range(40) for _ in range(4)]
    views = np.array([v for _ in range(40) for v in range(4)])
    slots = torch.tensor(view_slots(keys, views, 4, seed=7))
    rows = torch.arange(len(keys))
    seen = []
    for epoch in range(4):
        batches = [{"row": rows[i : i + 16], "slot": slots[i : i + 16]} for i in range(0, 160, 16)]
        picked = [b for b in one_view_per_image(iter(batches), epoch, 4, batch_size=8)]
        assert all(len(b["row"]) == 8 for b in picked) and len(picked) == 5  # 40 rows, re-cut
        chosen = torch.cat([b["row"] for b in picked]).tolist()
        assert sorted(keys[r] for r in chosen) == sorted(set(keys))  # each image once
        seen += [(keys[r], int(views[r])) for r in chosen]
    assert len(set(seen)) == 160  # over 4 epochs, every view of every image once
    first = [views[r] for r in torch.cat([b["row"] for b in one_view_per_image(iter(
        [{"row": rows, "slot": slots}]), 0, 4, 8)]).tolist()]  # fmt: skip
    assert len(set(first)) > 1  # images show different views in the same epoch
    other = torch.tensor(view_slots(keys, views, 4, seed=8))
    assert not torch.equal(slots, other)  # another train_ar.seed, another order


def test_encode_writes_views_of_train_images_only(encoded_run, tmp_path, ray_local):
    """views=3: three rows per train image (view 0 = the single-view table's row), one per val
    image; re-encoding gives the same bytes."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(encoded_run, run, ignore=shutil.ignore_patterns("codes"))
    config = EncodeConfig(views=3, augment="crop_flip", cpus_per_actor=0.5)
    manifest = run_encode_stage(str(run), config)
    single = {p.name: pq.read_table(p) for p in (encoded_run / "codes").glob("*.parquet")}
    shards = json.loads((run / "shards" / "_manifest.json").read_text())
    assert manifest.counts["images"] == shards["counts"]["ok"] and manifest.counts["views"] == 3
    for name, one in single.items():
        table = pq.read_table(run / "codes" / name)
        per_image = 3 if name.startswith("train-") else 1
        assert len(table) == per_image * len(one)
        assert table.column("view").to_pylist() == list(range(per_image)) * len(one)
        first = table.filter(np.array(table.column("view").to_pylist()) == 0)
        assert first.column("key").to_pylist() == one.column("key").to_pylist()
        assert first.column("codes").equals(one.column("codes"))  # view 0: the centre crop
        if per_image == 3:  # view 1 mirrored: the demo's squares give other codes
            codes = table.column("codes").to_pylist()
            assert codes[0::3] != codes[1::3]
    first_run = {p.name: p.read_bytes() for p in (run / "codes").glob("*.parquet")}
    shutil.rmtree(run / "codes")
    run_encode_stage(str(run), config)
    assert {p.name: p.read_bytes() for p in (run / "codes").glob("*.parquet")} == first_run


def test_decoded_views_carry_their_captions_sides(tmp_path):
    """decode_shard: view 0 the centre square, odd views mirrored with left and right swapped
    in the caption, even views unmirrored with the caption as it is."""
    import io

    from pipeline.core.storage import StorageConfig
    from pipeline.formats.shard_tar import decode_shard, tar_bytes

    buffer = io.BytesIO()
    gradient(48, 32).save(buffer, format="PNG")
    meta = json.dumps({"label": 1, "caption": "a dog on the left"}).encode()
    (tmp_path / "s.tar").write_bytes(tar_bytes([("k.png", buffer.getvalue()), ("k.json", meta)]))
    decoded = decode_shard(str(tmp_path / "s.tar"), 32, StorageConfig(), views=4, seed=5)
    assert decoded["keys"] == ["k"] * 4 and decoded["views"] == [0, 1, 2, 3]
    assert decoded["captions"] == ["a dog on the left", "a dog on the right",
                                   "a dog on the left", "a dog on the right"]  # fmt: skip
    assert np.array_equal(decoded["images"][0], center_square(gradient(48, 32), 32))
    rng = view_rng(5, "k", 1)
    assert np.array_equal(decoded["images"][1],
                          augmented_view(gradient(48, 32), 32, "crop_flip", rng, True))  # fmt: skip
