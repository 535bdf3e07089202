"""The networks and maths that *measure* models, not the paper's models themselves.

- `inception.py`  the FID Inception network (TF 2015-12-05 graph), loading the published weights
- `metrics.py`    Fréchet distance, Inception Score, precision/recall, SSIM over feature arrays
- `resnet.py`     torchvision-layout ImageNet ResNets: the rejection sampler's classifier
- `clip.py`       CLIP through `transformers`: the CLIP score of caption models
- `classifier.py` a small CNN saved like every model: the demo's shape classifier

They import the weights helpers (`model.weights`) and nothing of the paper's models; the
paper's models import nothing of them (tests/test_layers.py).
"""
