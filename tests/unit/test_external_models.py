"""timm and torchvision models by name: built without a hub, weights only from a local file, and every
method applies to them (RigL trains one end to end)."""
from __future__ import annotations

import pytest
import torch

from dist_sparse.config import load_config
from dist_sparse.errors import ConfigError
from dist_sparse.models import create_model, model_family
from dist_sparse.tasks import build_model
from tests.conftest import ROOT, TINY, needs_fmnist, read_metrics, run_train


def test_timm_and_torchvision_models_are_built_from_the_data_facts():
    m = create_model("timm/resnet10t", num_classes=7, in_chans=1)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    v = create_model("torchvision/resnet18", num_classes=4, in_chans=3)
    assert v(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    vit = create_model("timm/vit_tiny_patch16_224", num_classes=3, in_chans=3, img_size=32)
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert model_family("timm/resnet10t") == "timm" and model_family("torchvision/resnet18") == "torchvision"


def test_config_checks_the_architecture_name_and_channels():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.name=timm/no_such_net"])
    assert err.value.key == "model.name"
    cfg = load_config(TINY, ["model.name=torchvision/resnet18"])  # Fashion-MNIST is 1-channel
    with pytest.raises(ConfigError) as err:
        build_model(cfg, {"num_classes": 10, "in_chans": 1, "img_size": 28})
    assert err.value.key == "data.extra.channels"
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.name=timm/resnet10t", "model.stem=imagenet"])
    assert err.value.key == "model.stem"


def test_local_weights_load_and_a_new_head_is_reported(tmp_path):
    from safetensors.torch import save_file

    src = create_model("timm/resnet10t", num_classes=5, in_chans=1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    same = create_model("timm/resnet10t", num_classes=5, in_chans=1, checkpoint=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), same.state_dict().values()))
    other = create_model("timm/resnet10t", num_classes=3, in_chans=1, checkpoint=str(tmp_path / "w.safetensors"))
    assert torch.equal(other.conv1[0].weight, src.conv1[0].weight) and other.fc.weight.shape == (3, 512)
    with pytest.raises(ConfigError) as err:
        create_model("timm/resnet18", num_classes=5, in_chans=1, checkpoint=str(tmp_path / "w.safetensors"))
    assert err.value.key == "model.extra.checkpoint"


@needs_fmnist
def test_rigl_trains_a_timm_model(tmp_path):
    run_train(["--config", f"{ROOT}/configs/tiny_resnet20_rigl.yaml", "model.name=timm/resnet10t",
               "data.train_subset=1024", "data.val_subset=256", "data.batch_size=64", "run.epochs=2",
               "method.delta_t=4", "run.num_processes=0", "logging.log_every_steps=1", "logging.progress_bar=false",
               "checkpoint.every_epoch=false", f"run.output_dir={tmp_path}", "run.name=t"])
    rows = read_metrics(str(tmp_path / "t"))
    train = [r["loss"] for r in rows if r["event"] == "train"]
    epoch = [r for r in rows if r["event"] == "epoch"][-1]
    assert sum(train[-4:]) < sum(train[:4])  # it learns
    assert epoch["method"]["sparsity/global"] == pytest.approx(0.8, abs=0.01)
    assert epoch["method"]["sparsity/updates"] >= 3
    end = [r for r in rows if r["event"] == "end"][0]
    assert end["model"] == "timm/resnet10t" and end["val_acc"] > 0.3
