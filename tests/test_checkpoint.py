import torch

from pipeline.core.checkpoint import load_state, save_state


def test_optimizer_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    state = {"step": 3, "optimizer": optimizer.state_dict(), "model": model.state_dict()}
    save_state(state, tmp_path, "trainer")
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "trainer.safetensors").exists()
    loaded = load_state(tmp_path, "trainer")
    assert loaded["step"] == 3
    restored = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.5)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.5, 0.9)
    assert restored.param_groups[0]["lr"] == 1e-3
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(
            torch.as_tensor(value), torch.as_tensor(loaded["optimizer"]["state"][0][key])
        )
    assert torch.equal(loaded["model"]["weight"], model.weight)


def test_checkpoint_folders_ray_train_never_committed_are_removed(storage_root):
    """What a cut upload leaves (a checkpoint folder the snapshot does not name) goes; the
    committed ones, the snapshot and other files stay."""
    import json

    from pipeline.core.storage import join
    from pipeline.core.train_driver import remove_uncommitted_checkpoints

    root, storage = storage_root
    stage = join(root, "vae")
    committed = ["checkpoint_2026-12-07_10-00-00.000001", "checkpoint_2026-12-07_10-00-05.000002"]
    cut = "checkpoint_2026-12-07_10-00-09.000003"
    for name in [*committed, cut]:
        storage.write_bytes(join(stage, name, "model.json"), b"{}")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n} for n in committed],
                "latest_checkpoint_result": {"checkpoint_dir_name": committed[-1]}}  # fmt: skip
    storage.write_bytes(
        join(stage, "checkpoint_manager_snapshot.json"), json.dumps(snapshot).encode()
    )
    storage.write_bytes(join(stage, "metrics.jsonl"), b"")

    assert remove_uncommitted_checkpoints(storage, stage) == [cut]
    left = {uri.removeprefix(stage + "/").split("/")[0] for uri, _ in storage.list_files(stage)}
    assert left == {*committed, "checkpoint_manager_snapshot.json", "metrics.jsonl"}
    assert remove_uncommitted_checkpoints(storage, stage) == []


def test_an_incomplete_checkpoint_upload_is_an_error_naming_the_file(storage_root, tmp_path):
    """pyarrow's copy_files (Ray Train's upload) can return normally after a failed upload
    (bench/upload_outage.py): the check after it finds a missing or short object and names it,
    so the worker fails instead of committing the checkpoint."""
    import pyarrow.fs as pafs
    import pytest

    from pipeline.core.checkpoint import check_uploaded
    from pipeline.core.storage import join

    root, storage = storage_root
    local = tmp_path / "checkpoint"
    (local / "shards").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"m" * 1000)
    (local / "shards" / "rank-1.safetensors").write_bytes(b"t" * 3000)
    filesystem, destination = storage.arrow_fs(join(root, "checkpoint_1"))
    filesystem.create_dir(destination)
    pafs.copy_files(str(local), destination, destination_filesystem=filesystem)
    check_uploaded(str(local), filesystem, destination)  # whole: no error

    storage.write_bytes(join(root, "checkpoint_1", "shards", "rank-1.safetensors"), b"t" * 100)
    with pytest.raises(OSError, match=r"shards/rank-1\.safetensors is 100 bytes .*3000 bytes"):
        check_uploaded(str(local), filesystem, destination)
    filesystem.delete_file(f"{destination}/model.safetensors")
    with pytest.raises(OSError, match=r"incomplete: model\.safetensors is missing"):
        check_uploaded(str(local), filesystem, destination)
