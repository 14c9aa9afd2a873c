import pytest
import torch
from safetensors.torch import save_file

from svf_rl.inference.expert import Expert, ExpertError, describe_expert, load_expert, save_expert


def make_expert() -> Expert:
    vectors = {"model.layers.0.mlp.up_proj": torch.rand(8) + 0.5, "model.layers.0.mlp.down_proj": torch.rand(6)}
    return Expert(vectors, "tiny", "abc123", "mlp", "arithmetic", {"lr": 0.002}, {"test_accuracy": 0.5})


def test_round_trip_keeps_vectors_and_metadata(tmp_path):
    expert = make_expert()
    loaded = load_expert(save_expert(expert, tmp_path / "e.safetensors"))
    assert loaded.vectors.keys() == expert.vectors.keys()
    for name, z in expert.vectors.items():
        assert torch.equal(loaded.vectors[name], z)
    assert (loaded.base_model, loaded.base_fingerprint, loaded.task) == ("tiny", "abc123", "arithmetic")
    assert loaded.config == {"lr": 0.002} and loaded.scores == {"test_accuracy": 0.5}
    assert not list(tmp_path.glob("*.tmp"))


def test_compatible_expert_passes_the_check():
    make_expert().check_compatible({"model.layers.0.mlp.up_proj": 8, "model.layers.0.mlp.down_proj": 6}, "abc123")


def test_compatible_expert_passes_with_its_targets():
    make_expert().check_compatible({"model.layers.0.mlp.up_proj": 8, "model.layers.0.mlp.down_proj": 6}, "abc123",
                                   "mlp")


UP, DOWN, GATE = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize("shapes, fingerprint, targets, message", [
    ({UP: 8, DOWN: 6}, "other", None, "fingerprint"),
    ({UP: 8, DOWN: 7}, "abc123", None, "has 6 values"),
    ({UP: 8}, "abc123", None, f"modules that this model does not target: 1, e.g. '{DOWN}'"),
    # A partial expert would leave the other layers' z as they were.
    ({UP: 8, DOWN: 6, GATE: 8}, "abc123", None, f"the model's 3 SVF layers: model SVF layers without a z in the "
                                                f"expert: 1, e.g. '{GATE}'$"),
    ({UP: 8, GATE: 8}, "abc123", None, "without a z .*: 1, e.g. '.*gate_proj'; .* not target: 1, e.g. '.*down_proj'"),
    ({UP: 8, DOWN: 6}, "abc123", "attn", "trained with targets 'mlp', but .* targets 'attn'"),
])
def test_mismatched_expert_is_a_one_line_error(shapes, fingerprint, targets, message):
    with pytest.raises(ExpertError, match=message) as err:
        make_expert().check_compatible(shapes, fingerprint, targets)
    assert "\n" not in str(err.value)


def write_raw(path, vectors, **metadata) -> str:
    """An expert file as another program might write it, bypassing save_expert's checks."""
    save_file(vectors, path, metadata={**make_expert().metadata(), **metadata})
    return path


@pytest.mark.parametrize("vectors, metadata, message", [
    ({UP: torch.tensor([1.0, float("nan")])}, {}, f"z for '{UP}' has 1 non-finite values"),
    ({UP: torch.tensor([float("inf"), 1.0, float("-inf")])}, {}, "has 2 non-finite values"),
    ({}, {}, "no z vectors"),
    ({UP: torch.ones(2)}, {"config": "{\"lr\": 0.1"}, "metadata 'config' is not valid JSON"),
    ({UP: torch.ones(2)}, {"scores": "nan?"}, "metadata 'scores' is not valid JSON"),
    ({UP: torch.ones(2)}, {"config": "[1, 2]"}, "metadata 'config' must be a JSON object, got list"),
    ({UP: torch.ones(2)}, {"scores": "0.5"}, "metadata 'scores' must be a JSON object, got float"),
])
def test_invalid_expert_file_is_a_one_line_error(vectors, metadata, message, tmp_path):
    path = write_raw(tmp_path / "bad.safetensors", vectors, **metadata)
    with pytest.raises(ExpertError, match=message) as err:
        load_expert(path)
    assert "\n" not in str(err.value)


def test_save_refuses_what_load_would_refuse(tmp_path):
    expert = make_expert()
    expert.vectors[UP][0] = float("nan")
    with pytest.raises(ExpertError, match="non-finite"):
        save_expert(expert, tmp_path / "e.safetensors")
    assert not list(tmp_path.iterdir())


def test_missing_file_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(ExpertError, match="not found"):
        load_expert(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExpertError, match="not a safetensors"):
        load_expert(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ExpertError, match="not an svf-rl expert"):
        load_expert(tmp_path / "plain.safetensors")


def test_describe_summarises_the_expert():
    text = describe_expert(make_expert())
    assert "tiny" in text and "2 modules" in text and "test_accuracy: 0.5" in text
