"""The converter without PyTorch: safetensors in and out, detection, round trip (runs where torch is absent)."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from cbam_jax import create_model
from cbam_jax.convert import ConversionError, from_torch, to_numpy_state_dict, variant_of


@pytest.mark.parametrize("variant,layout", [("official", None), ("timm", None), ("common", "common_2018"),
                                            ("official", "pytorchcv")])
def test_safetensors_round_trip_without_torch(tmp_path, variant, layout):
    model = create_model("cbam_resnet18", num_classes=7, stem="cifar", variant=variant, width=16, reduction=4)
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda leaf: rng.random(leaf.shape, np.float32) + 0.1, variables)
    state = to_numpy_state_dict(variables, arch="cbam_resnet18", variant=variant, layout=layout)
    save_file(state, tmp_path / "model.safetensors")
    loaded_model, loaded = from_torch(tmp_path / "model.safetensors")
    assert variant_of(loaded_model) == variant
    assert loaded_model.clone(attention_options=model.attention_options) == model  # pytorchcv: BN momentum
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    assert to_numpy_state_dict(loaded, arch=loaded_model, layout=layout).keys() == state.keys()


def test_pth_without_torch_says_how_to_fix(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    (tmp_path / "model.pth").write_bytes(b"PK\x03\x04")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ConversionError, match="needs PyTorch.*safetensors"):
        from_torch(tmp_path / "model.pth")


def test_unknown_file_type(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0")
    with pytest.raises(ConversionError, match="Unknown checkpoint type 'model.onnx'"):
        from_torch(tmp_path / "model.onnx")
