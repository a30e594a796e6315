"""The weights tests' shared fixture: a randomised small official model saved as a checkpoint."""

import numpy as np
import pytest

from mvj_weights_helpers import ARCH, NAME
from official_reference import official_model, torch, torch_logits


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The randomised small official model, its EMA twin, test images (2, 64, 64, 3) float32 NHWC, the official
    logits of both, and ``dir`` holding the model's ``state_dict.pth.tar``."""
    model, ema_model = official_model(NAME, seed=3, **ARCH), official_model(NAME, seed=4, **ARCH)
    images = np.random.default_rng(5).standard_normal((2, 64, 64, 3), dtype=np.float32)
    directory = tmp_path_factory.mktemp("ckpt")
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, directory / "state_dict.pth.tar")
    return dict(
        model=model,
        ema_model=ema_model,
        images=images,
        logits=torch_logits(model, images),
        ema_logits=torch_logits(ema_model, images),
        dir=directory,
    )
