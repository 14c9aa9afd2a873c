import pytest
import torch
from safetensors.torch import save_file

from svf_rl.expert import Expert, ExpertError, describe_expert, load_expert, save_expert


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


@pytest.mark.parametrize("shapes, fingerprint, message", [
    ({"model.layers.0.mlp.up_proj": 8, "model.layers.0.mlp.down_proj": 6}, "other", "fingerprint"),
    ({"model.layers.0.mlp.up_proj": 8, "model.layers.0.mlp.down_proj": 7}, "abc123", "has 6 values"),
    ({"model.layers.0.mlp.up_proj": 8}, "abc123", "does not target"),
])
def test_mismatched_expert_is_a_one_line_error(shapes, fingerprint, message):
    with pytest.raises(ExpertError, match=message) as err:
        make_expert().check_compatible(shapes, fingerprint)
    assert "\n" not in str(err.value)


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
