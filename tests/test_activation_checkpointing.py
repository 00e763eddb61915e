"""Activation checkpointing (``train.activation_checkpointing``): the encoder blocks are recomputed in backward,
with the losses, gradients and BatchNorm running statistics of a step without it, and fewer saved activations."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from segadapt.config import load_config
from segadapt.engine.trainer import Trainer
from segadapt.errors import ConfigError
from segadapt.models import create_model, set_activation_checkpointing
from segadapt.models.mit import MixTransformer
from segadapt.models.resnet import Bottleneck, CaffeBottleneck, make_resnet_stage

from data_fixtures import toy_overrides
from test_hrda import TOY_HRDA

pytestmark = pytest.mark.usefixtures("single_thread")


def hrda_step(toy: Path, tmp_path: Path, checkpointing: bool, stream_backward: bool) -> tuple[Trainer, dict[str, float]]:
    """One trainer step of MIC(HRDA) on MiT-B0 (stochastic depth 0.1, so the recomputation must replay its masks)."""
    overrides = [
        *toy_overrides(toy), *TOY_HRDA, "train.iters=1", "method.feature_distance_weight=0",
        f"train.activation_checkpointing={str(checkpointing).lower()}", f"train.stream_backward={str(stream_backward).lower()}",
        f"output_dir={tmp_path}", f"name=run_{checkpointing}_{stream_backward}",
    ]  # fmt: skip
    trainer = Trainer(load_config("benchmark/mic_hrda", overrides), log=lambda _: None)
    torch.manual_seed(0)  # the same drop-path masks, masks of MIC and detail crops for both runs
    return trainer, trainer._step(trainer._loaders())


@pytest.mark.parametrize("stream_backward", [True, False])
def test_mic_hrda_step_has_the_losses_and_gradients_of_one_without_checkpointing(toy: Path, tmp_path: Path, stream_backward: bool) -> None:
    torch.manual_seed(0)
    plain, plain_losses = hrda_step(toy, tmp_path, False, stream_backward)
    torch.manual_seed(0)
    recomputed, recomputed_losses = hrda_step(toy, tmp_path, True, stream_backward)
    assert "loss_mic" in plain_losses
    encoders = [m for m in recomputed.recipe.model.modules() if isinstance(m, MixTransformer)]
    assert encoders and all(encoder.activation_checkpointing for encoder in encoders)
    assert encoders[0].block1[1].drop_path.rate > 0  # stochastic depth is drawn, and must be replayed
    for key, value in plain_losses.items():
        assert recomputed_losses[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    compared = 0
    pairs = zip(plain.recipe.trainable_model().named_parameters(), recomputed.recipe.trainable_model().named_parameters())
    for (name, a), (_, b) in pairs:
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # nothing else in the step differs
            compared += 1
    assert compared > 50


def tiny_resnet() -> nn.Sequential:
    """Both bottleneck layouts, strided and dilated stages, BatchNorm in train mode: a ResNet's stages in miniature."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        make_resnet_stage(CaffeBottleneck, 8, 4, blocks=2, stride=2),
        make_resnet_stage(Bottleneck, 16, 4, blocks=2, dilation=2),
    )


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average, which reads num_batches_tracked
def test_resnet_step_has_the_gradients_and_running_statistics_of_one_without_checkpointing(momentum: float | None) -> None:
    torch.manual_seed(0)
    plain = tiny_resnet()
    for module in plain.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = momentum
    recomputed = copy.deepcopy(plain)
    assert set_activation_checkpointing(recomputed, True) == 4
    images = [torch.rand(2, 3, 12, 12) for _ in range(2)]
    for network in (plain, recomputed):
        network.train()
        loss = sum((network(batch) ** 2).mean() for batch in images)  # two forwards, one backward: as a two-stream step
        loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    buffers = dict(recomputed.named_buffers())
    for name, value in plain.named_buffers():  # running mean/var updated once per forward, the batches counted once
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=0, msg=name)
    assert int(buffers["1.0.bn1.num_batches_tracked"]) == 2


def saved_activation_bytes(network: nn.Module, images: torch.Tensor) -> int:
    """Bytes the autograd graph of one forward keeps for backward."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(images)
    return saved


def test_checkpointed_encoder_keeps_a_fraction_of_the_activations_and_none_without_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("daformer_mitb0", 5, embed_dim=16).train()
    images = torch.rand(1, 3, 64, 64)
    full = saved_activation_bytes(model, images)
    assert set_activation_checkpointing(model, True) == 8  # MiT-B0's 2 + 2 + 2 + 2 blocks
    assert saved_activation_bytes(model, images) < 0.5 * full
    with torch.no_grad():  # a teacher's forward runs the blocks as they are, and keeps nothing
        assert saved_activation_bytes(model, images) == 0
    assert set_activation_checkpointing(model, False) == 0
    assert saved_activation_bytes(model, images) == full


def test_checkpointing_a_model_without_encoder_blocks_is_a_config_error_and_the_option_is_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SmallSegNet has no encoder blocks.*train.activation_checkpointing=false"):
        set_activation_checkpointing(create_model("small", 3), True)
    assert set_activation_checkpointing(create_model("small", 3), False) == 0
    assert load_config("benchmark/dacs").train.activation_checkpointing is False
    assert load_config("benchmark/dacs", ["train.activation_checkpointing=true"]).train.activation_checkpointing is True
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config("benchmark/dacs", ["train.activation_checkpointing=sometimes"])
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config("benchmark/dacs", ["train.activation_checkpoint=true"])  # the closest valid key is named
