"""What every recipe shares: PSPNet's auxiliary loss in the supervised terms."""

from __future__ import annotations

import torch

from segadapt.config import load_config
from segadapt.data.classes import ClassInfo
from segadapt.engine.losses import build_seg_loss
from segadapt.engine.recipes.source_only import SourceOnly
from segadapt.models import create_model


def test_supervised_loss_adds_pspnet_auxiliary_head_with_weight_0_4() -> None:
    model = create_model("pspnet50", 3).train()
    seg_loss = build_seg_loss(load_config(None).loss, ignore_index=255)
    classes = ClassInfo("toy", ("a", "b", "c"), ((0, 0, 0), (1, 1, 1), (2, 2, 2)))
    recipe = SourceOnly(load_config(None, ["model.name=pspnet50"]), model, seg_loss, classes)
    images, labels = torch.rand(2, 3, 33, 33), torch.randint(0, 3, (2, 33, 33))
    labels[0, :5] = 255

    torch.manual_seed(1)  # the same dropout masks in both forwards
    out = model(images)
    main, aux = seg_loss(out.logits, labels), seg_loss(model.aux_logits, labels)
    torch.manual_seed(1)
    losses = recipe.training_step({"source": {"image": images, "label": labels}}, 0)
    assert torch.allclose(losses["loss"], main + 0.4 * aux)
    assert float(aux.detach()) > 0
