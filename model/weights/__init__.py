"""How model weights are stored, found and brought in.

- `serialization.py` `model.safetensors` + `config.json` under any fsspec URI (`Pretrained`,
                     `ModelConfig`), and checked loading of foreign `.pth` files
- `fileio.py`        atomic byte reads and writes under fsspec, without torch
- `hub.py`           Hugging Face Hub models (`hf://org/name`)
- `official.py`      the official RQ-VAE / RQ-Transformer checkpoints' layout mapped onto ours

`official.py` imports the paper's models (it maps tensors onto them); the other three import
nothing of them, so a worker that only moves bytes never imports torch.
"""
