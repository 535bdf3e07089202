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
