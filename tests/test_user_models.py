"""Users' own models against the real libraries: open_clip by name or by a config JSON, torchvision by name, local
pretrained weights (safetensors, torch state_dicts, a planted pickle refused), and factories returning transforms."""

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from pipelines.models import Built, from_factory, open_clip_model, read_weights, torchvision_model

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}


def _write(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("configs")


@pytest.fixture(scope="module")
def tiny_config(configs) -> str:
    return _write(configs / "tiny-vit.json", TINY)


@pytest.fixture(scope="module")
def tiny(tiny_config) -> Built:
    torch.manual_seed(0)
    return open_clip_model(config=tiny_config)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Image.fromarray(pixels.numpy())


def _embed(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().encode_image(image[None])


def test_a_named_open_clip_model_is_built_without_weights():
    built = open_clip_model("ViT-B-32")
    assert isinstance(built.model, open_clip.CLIP)
    assert all(hasattr(built.model, name) for name in ("encode_image", "encode_text", "logit_scale"))
    tokens = built.tokenizer(["a photo of a cat", "a dog"])
    assert tokens.dtype == torch.long and tuple(tokens.shape) == (2, 77)
    assert built.preprocess_train is not None and built.preprocess_val is not None


def test_a_custom_config_builds_with_its_transforms_and_tokenizer(tiny, image, tiny_config):
    before = open_clip.list_models()
    pixels = tiny.preprocess_val(image)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (3, 32, 32)
    assert tuple(tiny.preprocess_train(image).shape) == (3, 32, 32)
    assert tuple(_embed(tiny.model, pixels).shape) == (1, 32)
    tokens = tiny.tokenizer(["a photo of a cat"])
    assert tuple(tokens.shape) == (1, 16)
    assert tuple(tiny.model.encode_text(tokens).shape) == (1, 32)
    open_clip_model(config=tiny_config)
    assert open_clip.list_models() == before  # open_clip's registry is left as it was
    # the hub's open_clip_config.json format, with a preprocess config
    hub = _write(Path(tiny_config).with_name("hub.json"), {"model_cfg": TINY, "preprocess_cfg": {"mean": [0.5] * 3}})
    assert open_clip_model(config=hub).preprocess_val.transforms[-1].mean == [0.5] * 3


def test_options_reach_open_clip(tiny_config):
    built = open_clip_model(config=tiny_config, init_logit_bias=-10.0, force_context_length=8)
    assert built.model.logit_bias.item() == -10.0
    assert tuple(built.tokenizer(["a cat"]).shape) == (1, 8)  # the tokenizer follows the model's context length


@pytest.mark.parametrize("save", ["safetensors", "state_dict", "open_clip_train", "curate_run"])
def test_pretrained_weights_load_exactly(tiny, tiny_config, image, tmp_path, save):
    weights = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    path = tmp_path / ("w.safetensors" if save == "safetensors" else "w.pt")
    if save == "safetensors":
        save_file(weights, str(path))
    elif save == "state_dict":
        torch.save(weights, path)
    elif save == "open_clip_train":
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in weights.items()}}, path)
    else:
        torch.save({"model": weights, "optimizer": {"state": {}}, "step": 7}, path)
    torch.manual_seed(1)  # a different initialisation, overwritten by the weights
    fresh = open_clip_model(config=tiny_config, pretrained=str(path))
    pixels = tiny.preprocess_val(image)
    assert torch.equal(_embed(fresh.model, pixels), _embed(tiny.model, pixels))


def _payload(marker: str) -> None:
    Path(marker).write_text("the planted code ran")


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _payload, (str(self.marker),)


def test_a_planted_pickle_is_refused_and_never_runs(tiny_config, tmp_path):
    marker = tmp_path / "ran"
    planted = tmp_path / "weights.pt"
    torch.save({"state_dict": {"visual.proj": _Planted(marker)}}, planted)
    with pytest.raises(ValueError, match=r"model.pretrained: .*weights.pt is not a weights file curate can load "
                                         r"safely \(UnpicklingError"):
        open_clip_model(config=tiny_config, pretrained=str(planted))
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # the control: the plant is live, read as anything but data
    assert marker.exists()


def test_weights_of_another_shape_name_the_parameter(tiny, configs, tmp_path):
    other = dict(TINY, embed_dim=16)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    fresh = open_clip_model(config=_write(configs / "other.json", other)).model.state_dict()
    first = next(k for k, v in fresh.items() if v.shape != tiny.model.state_dict()[k].shape)
    with pytest.raises(ValueError, match=rf"model.pretrained: .*w.safetensors has '{re.escape(first)}' of shape "
                                         r"\(.*\), the recipe's model \(.*\); they are weights of another model"):
        open_clip_model(config=str(configs / "other.json"), pretrained=str(path))


@pytest.mark.parametrize("write, message", [
    (None, r"model.pretrained: no weights file at '.*missing.pt'"),
    (lambda p: torch.save([1, 2], p), r"holds no state_dict"),
    (lambda p: p.write_bytes(b"not a checkpoint"), r"is not a weights file curate can load safely"),
])
def test_unreadable_weights_are_named(tmp_path, write, message):
    path = tmp_path / "missing.pt"
    if write:
        write(path)
    with pytest.raises(ValueError, match=message):
        read_weights(path)


@pytest.mark.parametrize("call, message", [
    (lambda: open_clip_model("ViT-B-23"), r"open_clip has no model 'ViT-B-23'; did you mean ViT-B-32.*model.config"),
    (lambda: torchvision_model("resnt18"), r"torchvision has no model 'resnt18'; did you mean resnet18"),
    (lambda: open_clip_model(), r"exactly one of model.name .* or model.config"),
    (lambda: open_clip_model("ViT-B-32", config="x.json"), r"exactly one of model.name"),
    (lambda: open_clip_model("ViT-B-32", init_logit_bais=1.0), r"cannot take \['init_logit_bais'\]; did you mean "
                                                                r"init_logit_bias"),
    (lambda: open_clip_model("ViT-B-32", pretrained_image=True), r"\['pretrained_image'\] would load or download"),
    (lambda: open_clip_model("ViT-B-16-SigLIP"), r"SigLIP tokenizer .* needs a download.*model.kind: factory"),
    (lambda: open_clip_model(config="no/such/config.json"), r"model.config: no model config JSON at"),
    (lambda: torchvision_model("resnet18", num_clases=3), r"torchvision resnet18 cannot take \['num_clases'\]"),
    (lambda: torchvision_model("resnet18", weights="DEFAULT"), r"\['weights'\] would download weights"),
])
def test_names_and_options_that_do_not_fit_are_named_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("change, message", [
    ({"text_cfg": dict(TINY["text_cfg"], hf_tokenizer_name="org/tok")}, r"Hugging Face tokenizer 'org/tok'.* download"),
    ({"text_cfg": dict(TINY["text_cfg"], vocab_size=1000)}, r"vocab_size 1000 is below the CLIP BPE tokenizer's 49408"),
    ({"vision_cfg": None}, r"not an open_clip model config \(it lacks \['vision_cfg'\]\)"),
])
def test_custom_configs_that_cannot_be_built_here_are_named_errors(configs, change, message):
    config = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        open_clip_model(config=_write(configs / "bad.json", config))


def test_a_torchvision_model_by_name(tmp_path):
    built = torchvision_model("resnet18", num_classes=10)
    assert built.preprocess_val is None and built.tokenizer is None
    with torch.no_grad():
        assert tuple(built.model.eval()(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
    small = torchvision_model("squeezenet1_1", num_classes=10).model.eval()
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "s.safetensors"))
    loaded = torchvision_model("squeezenet1_1", num_classes=10, pretrained=str(tmp_path / "s.safetensors")).model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), small(x))


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def _to_tensor(image) -> torch.Tensor:
    return torch.zeros(1, 4, 4)


def pair_factory():
    return _net(), _to_tensor


def triple_factory():
    return _net(), _to_tensor, None


def built_factory():
    return Built(_net(), tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))


def module_factory(*, image_size: int):
    return nn.Linear(image_size, 2)


def four_factory():
    return _net(), _to_tensor, _to_tensor, _to_tensor


def bad_transform_factory():
    return _net(), "resize"


def test_a_factory_result_becomes_built():
    pair = from_factory("tests.test_user_models:pair_factory", {}, image_size=16)
    assert isinstance(pair.model, nn.Sequential) and pair.preprocess_train is pair.preprocess_val is _to_tensor
    triple = from_factory("tests.test_user_models:triple_factory", {}, image_size=16)
    assert triple.preprocess_train is _to_tensor and triple.preprocess_val is None
    built = from_factory("tests.test_user_models:built_factory", {}, image_size=16)
    assert tuple(built.tokenizer(["a", "b"]).shape) == (2, 4)
    module = from_factory("tests.test_user_models:module_factory", {}, image_size=8)
    assert module.model.in_features == 8 and module.preprocess_val is None
    with pytest.raises(ValueError, match=r"returned a tuple of 4, not a torch.nn.Module; return the model itself, "
                                         r"\(model, preprocess\)"):
        from_factory("tests.test_user_models:four_factory", {}, image_size=16)
    with pytest.raises(ValueError, match=r"returned a str as its preprocess_train, which is not callable"):
        from_factory("tests.test_user_models:bad_transform_factory", {}, image_size=16)
