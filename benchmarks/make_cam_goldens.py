"""Golden CAMs from pytorch-grad-cam for ``tests/test_cam.py``.

Writes ``tests/fixtures/cam/cnn.pt`` (state_dict of :func:`fixture_cnn`) and
``tests/fixtures/cam/goldens.npz`` (the input images, targets and every reference method's maps).
pytorch-grad-cam pulls torchvision, which stays out of the main environment; run it from a separate
virtual environment::

    python -m venv /tmp/venv-gradcam
    /tmp/venv-gradcam/bin/pip install torch torchvision grad-cam
    /tmp/venv-gradcam/bin/python benchmarks/make_cam_goldens.py
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "cam"
LAYER = "10"  # the last ReLU: an 8 x 8 map of 32 channels
TARGETS = [0, 3, 1, 4]
SEED = 3  # a seed for which no reference map is constant (all-negative CAMs rectify to zero)


def fixture_cnn() -> nn.Sequential:
    """A small CNN with BatchNorm for 3 x 32 x 32 images and 5 classes (weights from the state_dict)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def _build() -> tuple[nn.Sequential, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = fixture_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so BatchNorm matters
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    model.eval()
    # Images with structure: a smooth background plus two bright blobs at random places.
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = 0.3 * torch.randn(4, 3, 32, 32, generator=gen)
    for i in range(4):
        for _ in range(2):
            cy, cx = torch.randint(4, 28, (2,), generator=gen).tolist()
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
            images[i] += torch.randn(3, 1, 1, generator=gen) * 2 * blob
    return model, images


def main() -> None:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, XGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_with_sign_correction

    class SignCorrectedEigenCAM(EigenCAM):
        """EigenCAM with pytorch-grad-cam's own sign correction (its Seg-Eigen-CAM rule)."""

        def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
            return get_2d_projection_with_sign_correction(activations)

    FIXTURES.mkdir(parents=True, exist_ok=True)
    model, images = _build()
    torch.save(model.state_dict(), FIXTURES / "cnn.pt")
    layer = model.get_submodule(LAYER)
    targets = [ClassifierOutputTarget(t) for t in TARGETS]
    out: dict[str, np.ndarray] = {"images": images.numpy(), "targets": np.array(TARGETS)}
    methods = {
        "grad_cam": GradCAM,
        "grad_cam_plus_plus": GradCAMPlusPlus,
        "xgrad_cam": XGradCAM,
        "layer_cam": LayerCAM,
        "eigen_cam_raw_sign": EigenCAM,
        "eigen_cam": SignCorrectedEigenCAM,
        "score_cam": ScoreCAM,
    }
    for name, cls in methods.items():
        with cls(model=model, target_layers=[layer]) as cam:
            maps = cam(input_tensor=images.clone(), targets=targets)
        if not (maps.reshape(len(maps), -1).std(1) > 0.01).all():
            raise RuntimeError(f"{name}: a degenerate (constant) golden map; change the fixture")
        out[name] = maps.astype(np.float32)
    acts = {}
    handle = layer.register_forward_hook(lambda _m, _i, o: acts.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    out["eigen_projection"] = get_2d_projection(acts["a"].numpy())  # raw first-component maps, SVD's own sign
    out["grad_cam_version"] = np.array(metadata.version("grad-cam"))
    np.savez_compressed(FIXTURES / "goldens.npz", **out)
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    print(f"wrote {sorted(p.name for p in FIXTURES.iterdir())} ({total / 1024:.0f} KiB) to {FIXTURES}")


if __name__ == "__main__":
    main()
