"""Model loading: devices, dtypes, local folders, refusals, adapters, GGUF conversion."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from tamis.errors import ModelError, TamisError
from tamis.runtime import models
from tamis.runtime.lm_scoring import score_answers
from tamis.runtime.models import choose_dtype, load_causal_lm, resolve_device, smollm2_asset

from conftest import make_tiny_gpt2

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."},
]


@pytest.fixture
def tiny_folder(tiny_gpt2_dir) -> Path:
    return Path(tiny_gpt2_dir)


# --------------------------------------------------------------------------- device and dtype


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            resolve_device("cuda")


def test_choose_dtype_explicit_and_unknown():
    cpu = torch.device("cpu")
    assert choose_dtype(cpu, "fp32") is torch.float32
    assert choose_dtype(cpu, "bf16") is torch.bfloat16
    assert choose_dtype(cpu, "fp16") is torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        choose_dtype(cpu, "int3")


@pytest.mark.parametrize(
    ("flags", "speedup", "want"),
    [
        (set(), 9.0, torch.float32),  # no native bf16: fp32 whatever a probe would say
        ({"amx_bf16", "avx512_bf16"}, 0.1, torch.bfloat16),  # AMX: bf16 without measuring
        ({"avx512_bf16"}, 0.5, torch.float32),  # flag but slower in practice (this VM)
        ({"avx512_bf16"}, 2.0, torch.bfloat16),
    ],
)
def test_choose_dtype_auto_on_cpu(monkeypatch, flags, speedup, want):
    monkeypatch.setattr(models, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(models, "_cpu_bf16_speedup", lambda: speedup)
    assert choose_dtype(torch.device("cpu"), "auto") is want


def test_cpu_bf16_flags_reads_proc_cpuinfo():
    assert models.cpu_bf16_flags() <= {"amx_bf16", "avx512_bf16"}


# --------------------------------------------------------------------------- local folders


def test_load_local_folder(tiny_folder):
    lm = load_causal_lm(tiny_folder, device="cpu", dtype="fp32")
    assert lm.device == torch.device("cpu") and lm.dtype is torch.float32
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype is torch.float32
    again = load_causal_lm(str(tiny_folder), device="cpu", dtype="fp32")
    assert again.fingerprint == lm.fingerprint  # stable: a cache key
    bf16 = load_causal_lm(tiny_folder, device="cpu", dtype="bf16")
    assert bf16.fingerprint != lm.fingerprint and next(bf16.model.parameters()).dtype is torch.bfloat16
    table = score_answers(lm, ROWS, progress=False)
    assert all(v is not None for v in table.value)


def test_fingerprint_changes_when_weights_change(tmp_path, gpt2_tokenizer):
    make_tiny_gpt2(seed=1).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    before = load_causal_lm(tmp_path, device="cpu", dtype="fp32").fingerprint
    time.sleep(0.01)
    make_tiny_gpt2(seed=2).save_pretrained(tmp_path)
    assert load_causal_lm(tmp_path, device="cpu", dtype="fp32").fingerprint != before


def test_pickled_checkpoint_is_refused_unless_allowed(tmp_path, gpt2_tokenizer):
    model = make_tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled"):
        load_causal_lm(tmp_path, device="cpu", dtype="fp32")
    lm = load_causal_lm(tmp_path, device="cpu", dtype="fp32", allow_pickle=True)
    assert torch.equal(lm.model.transformer.wte.weight, model.transformer.wte.weight)


def test_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no model at"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ModelError, match="local"):
        load_causal_lm("some-org/surely-not-cached-model-xyz")
    with pytest.raises(ModelError, match="not a model folder"):
        load_causal_lm(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match="several GGUF"):
        load_causal_lm(tmp_path)
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match="not a .gguf"):
        load_causal_lm(weights)
    assert issubclass(ModelError, TamisError)


# --------------------------------------------------------------------------- adapters


def test_lora_adapter_is_applied_and_fingerprinted(tiny_folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(tiny_folder, device="cpu", dtype="fp32")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True)
    peft_model = get_peft_model(make_tiny_gpt2(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapted = load_causal_lm(tiny_folder, device="cpu", dtype="fp32", adapter=tmp_path / "adapter")
    assert adapted.fingerprint != base.fingerprint
    a = score_answers(base, ROWS, progress=False).value
    b = score_answers(adapted, ROWS, progress=False).value
    assert a != b
    with pytest.raises(ModelError, match="adapter"):
        load_causal_lm(tiny_folder, device="cpu", dtype="fp32", adapter=tmp_path)


# --------------------------------------------------------------------------- the offline SmolLM2


def test_smollm2_asset_path():
    try:
        path = smollm2_asset()
    except ModelError as e:
        pytest.skip(str(e))
    assert path.endswith(".gguf") and os.path.isfile(path)


@pytest.mark.slow
def test_gguf_is_converted_once_then_loads_fast(tmp_path, monkeypatch):
    try:
        path = smollm2_asset()
    except ModelError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("TAMIS_CACHE_DIR", str(tmp_path))
    first = load_causal_lm(path, device="cpu", dtype="fp32")
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    assert not hasattr(first.model.config, "quantization_config")
    started = time.perf_counter()
    second = load_causal_lm(Path(path).parent, device="cpu", dtype="fp32")  # the folder with one .gguf
    assert time.perf_counter() - started < 10
    assert second.fingerprint == first.fingerprint
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.tokenizer.chat_template == second.tokenizer.chat_template
