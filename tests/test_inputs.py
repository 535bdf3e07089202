"""What a run's input has, read before any stage starts (`formats/inputs.py`), and the plan
that fits train-ar's conditioning to it (`run.py`): on local disk and on the S3 endpoint."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import ConfigError
from pipeline.formats.inputs import describe_input
from pipeline.formats.shard_tar import tar_bytes
from pipeline.run import plan_pipeline

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
OFF = "evaluate.enabled=false"  # as the README's "your data" command
PNG = b"\x89PNG\r\n\x1a\n not decoded here"


def put(storage, uri: str, data: bytes) -> None:
    storage.write_bytes(uri, data)


def test_folders_listings_and_tars_are_told_apart(storage_root):
    root, storage = storage_root
    put(storage, f"{root}/classes/cat/a.png", PNG)
    put(storage, f"{root}/classes/dog/b.png", PNG)
    put(storage, f"{root}/flat/a.png", PNG)
    put(storage, f"{root}/captions.csv", b"path,caption\na.png,a cat\n")
    put(storage, f"{root}/labels.csv", b"\xef\xbb\xbfpath,label\na.png,cat\n")  # a BOM too
    table = pa.table({"path": ["a.png"], "label": [1], "caption": ["a cat"]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put(storage, f"{root}/both.parquet", buffer.getvalue())
    meta = json.dumps({"label": 3, "caption": "a dog"}).encode()
    put(storage, f"{root}/tars/a-000.tar", tar_bytes([("k.png", PNG), ("k.json", meta)]))
    put(storage, f"{root}/tars/a-001.tar", tar_bytes([("j.png", PNG)]))
    put(storage, f"{root}/bare-tars/a.tar", tar_bytes([("k.png", PNG), ("k.json", b"{}")]))

    described = {name: describe_input(storage, f"{root}/{name}") for name in
                 ("classes", "flat", "captions.csv", "labels.csv", "both.parquet", "tars",
                  "bare-tars")}  # fmt: skip
    found = {name: (d.kind, d.labels, d.captions) for name, d in described.items()}
    assert found == {
        "classes": ("folder", True, False),
        "flat": ("folder", False, False),
        "captions.csv": ("listing", False, True),
        "labels.csv": ("listing", True, False),
        "both.parquet": ("listing", True, True),
        "tars": ("tars", True, True),
        "bare-tars": ("tars", False, False),
    }
    assert str(described["classes"]) == "a folder with labels"
    assert str(described["flat"]) == "a folder with no labels or captions"

    with pytest.raises(FileNotFoundError, match="nothing there"):
        describe_input(storage, f"{root}/missing")
    with pytest.raises(FileNotFoundError, match="no such listing"):
        describe_input(storage, f"{root}/missing.csv")
    put(storage, f"{root}/nopath.csv", b"file,label\na.png,1\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        describe_input(storage, f"{root}/nopath.csv")


@pytest.fixture
def class_folders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "in" / name).mkdir(parents=True)
        (tmp_path / "in" / name / "a.png").write_bytes(PNG)
    return str(tmp_path / "in")


def conditioning(plan) -> str:
    return next(p.config for p in plan if p.stage.name == "train-ar").conditioning


def test_the_plan_fits_the_conditioning_to_the_input(class_folders, tmp_path, capsys):
    """configs/demo.yaml on class folders: auto -> class, said in the first line; on a caption
    listing: text; on a flat folder: unconditional, where the preset's guidance is refused."""
    plan = plan_pipeline(DEMO, [OFF], class_folders)
    assert conditioning(plan) == "class"
    first = capsys.readouterr().out.splitlines()[0]
    assert first == ("rqpipe plan: the input is a folder with labels: the RQ-Transformer will be "
                     "conditioned on class labels (auto)")  # fmt: skip

    (tmp_path / "listing.csv").write_text("path,caption\nin/cat/a.png,a cat\n")
    assert conditioning(plan_pipeline(DEMO, [OFF], str(tmp_path / "listing.csv"))) == "text"

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(PNG)
    with pytest.raises(ConfigError, match=r"set sample\.cfg_scale=1"):
        plan_pipeline(DEMO, [OFF], str(flat))
    plan = plan_pipeline(DEMO, [OFF, "sample.cfg_scale=1"], str(flat))
    assert conditioning(plan) == "none"


def test_what_the_input_cannot_serve_is_refused_before_any_stage(class_folders, tmp_path):
    with pytest.raises(ValueError, match=r"conditioning=text needs captions.*folder with labels"):
        plan_pipeline(DEMO, [OFF, "train_ar.conditioning=text"], class_folders)
    (tmp_path / "listing.csv").write_text("path,caption\nin/cat/a.png,a cat\n")
    with pytest.raises(ValueError, match="conditioning=class needs labels"):
        plan_pipeline(DEMO, [OFF, "train_ar.conditioning=class"], str(tmp_path / "listing.csv"))
    with pytest.raises(ConfigError, match=r"sample\.prompts / prompts_file are set"):
        plan_pipeline(DEMO, [OFF, "sample.prompts=[a red cat]"], class_folders)
    with pytest.raises(ConfigError, match=r"sample\.labels is set"):
        plan_pipeline(DEMO, [OFF, "sample.labels=[0]"], str(tmp_path / "listing.csv"))
    # an explicit choice the input can serve stands
    plan = plan_pipeline(DEMO, [OFF, "train_ar.conditioning=none", "sample.cfg_scale=1"],
                         class_folders)  # fmt: skip
    assert conditioning(plan) == "none"
    assert not list(tmp_path.glob("**/_started.json"))  # nothing ran
