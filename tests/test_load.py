import pytest
import torch
from helpers import save_tiny

from recoup import RecoupError, load_model
from recoup.model.load import resolve_source


def test_local_directory_loads_to_identical_logits(tmp_path):
    lm = save_tiny(tmp_path / "m", "llama")
    loaded = load_model(str(tmp_path / "m"))
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, lm.model(x).logits)
    assert loaded.tokenizer("ab").input_ids == lm.tokenizer("ab").input_ids


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(RecoupError, match="not a model: it has no config.json"):
        load_model(str(tmp_path))


def test_missing_path_and_non_gguf_file(tmp_path):
    with pytest.raises(RecoupError, match="no such file or directory"):
        resolve_source(str(tmp_path / "nope"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(RecoupError, match="not a .gguf checkpoint"):
        resolve_source(str(f))


def test_corrupt_gguf_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path / "home"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\x00" * 20)
    with pytest.raises(RecoupError, match="could not read GGUF file"):
        load_model(str(f))
    assert not list((tmp_path / "home" / "models").glob("*/config.json"))


def test_corrupt_weights_in_a_model_directory(tmp_path):
    save_tiny(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RecoupError, match="could not load model"):
        load_model(str(tmp_path / "m"))


def test_hub_id_offline_gives_a_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecoupError, match="could not load 'recoup-test/definitely-missing' from the Hugging Face hub"):
        load_model("recoup-test/definitely-missing")


def test_bundled_alias_without_setup_says_run_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("RECOUP_HOME", str(tmp_path))
    monkeypatch.setattr("recoup.model.load.bundled_gguf_path", lambda: None)
    with pytest.raises(RecoupError, match="run `recoup setup`"):
        load_model("smollm2-135m")
