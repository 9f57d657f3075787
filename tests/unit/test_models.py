import pytest
import torch

from shipyard import ConfigError
from shipyard.config import ModelConfig
from shipyard.tasks.models import build_model


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_builtin_factories_map_rows_to_logits_and_export(name):
    model = build_model(ModelConfig(name=name, hidden=16, depth=2), in_features=64, num_classes=10).eval()
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)
    # logged and served in torch.export form, with a dynamic batch dimension (tracking.log_model)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert exported.module()(torch.randn(3, 64)).shape == (3, 10)
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_transformer_tokens_and_heads():
    model = build_model(ModelConfig(name="transformer", hidden=16), in_features=10, num_classes=3)
    assert model.token_features == 1 and model(torch.randn(2, 10)).shape == (2, 3)  # not square: one per feature
    with pytest.raises(ConfigError, match="multiple of model.options.heads"):
        build_model(ModelConfig(name="transformer", hidden=18), in_features=64, num_classes=3)


def test_user_factory_by_import_path_with_options():
    model = build_model(ModelConfig(name="tests.unit.user_models:linear", options={"bias": False}), 7, 3)
    assert isinstance(model, torch.nn.Linear) and model.bias is None
    assert model(torch.randn(2, 7)).shape == (2, 3)


@pytest.mark.parametrize(
    "name, match",
    [
        ("resnet50", r"neither a built-in \(mlp, cnn, resnet, transformer\) nor an import path"),
        ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
        ("tests.unit.user_models:missing", "has no callable 'missing'"),
        ("tests.unit.user_models:not_a_module", "not a torch.nn.Module"),
    ],
)
def test_bad_model_names_are_clear(name, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(name=name), 4, 2)


def test_unknown_factory_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.options \['width'\]"):
        build_model(ModelConfig(name="tests.unit.user_models:linear", options={"width": 3}), 4, 2)


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_image_models_need_an_image(name):
    with pytest.raises(ConfigError, match=rf"model.name={name} needs an image.*got 10 features. Use model.name=mlp"):
        build_model(ModelConfig(name=name), in_features=10, num_classes=2)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "transformer"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12)])
def test_every_builtin_takes_images_as_c_h_w_and_exports(name, shape):
    """An image task hands the factory [C, H, W] and batches [N, C, H, W] (tasks/images.py)."""
    model = build_model(ModelConfig(name=name, hidden=16, depth=2), in_features=shape, num_classes=5).eval()
    x = torch.randn(4, *shape)
    assert model(x).shape == (4, 5)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert torch.allclose(exported.module()(x[:2]), model(x[:2]), atol=1e-5)


def test_resnet_halves_the_image_and_doubles_the_width_after_the_first_block():
    model = build_model(ModelConfig(name="resnet", hidden=8, depth=3), in_features=(3, 32, 32), num_classes=4)
    blocks = [m for m in model.features if type(m).__name__ == "_Residual"]
    assert [b.body[0].out_channels for b in blocks] == [8, 16, 32]
    assert [b.body[0].stride for b in blocks] == [(1, 1), (2, 2), (2, 2)]
