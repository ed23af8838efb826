"""`--model org/name`: a Hugging Face Hub model, downloaded once into the Hub's own cache.

Only what loraplex reads is fetched (config, tokenizer, chat template, safetensors weights):
never pickle (`.bin`, `.pt`, `.ckpt`), never Python files, and no remote code is ever run.
`huggingface_hub` does the work, so its cache layout (`models--org--name/{blobs,snapshots,refs}`),
`HF_TOKEN`, `HF_HUB_CACHE`/`HF_HOME` and its progress bars apply as usual. `HF_HUB_OFFLINE=1`
(read when called) serves only what is already cached.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

Log = Callable[[str], None]

# What a served model needs; anything else in the repository is left on the Hub.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", re.ASCII)


class HubModelError(ValueError):
    """A Hub model could not be made available; the message says why and what to do."""


@dataclass(frozen=True)
class HubModel:
    """A Hub repository at a revision (branch, tag or commit; default `main`)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def is_hub_id(model: str) -> bool:
    """True for `org/name` that is not an existing local path (a local directory wins)."""
    if not _HUB_ID_RE.fullmatch(model) or ".." in model:
        return False
    return not Path(model).expanduser().exists()


def offline(environ: Mapping[str, str] | None = None) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1/true/yes/on), read now rather than at import."""
    value = (environ if environ is not None else os.environ).get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def ensure_hub_model(model: HubModel, log: Log = print, cache_dir: str | Path | None = None,
                     environ: Mapping[str, str] | None = None) -> Path:
    """The local snapshot directory of `model`, downloading what is missing (unless offline).

    cache_dir: the Hub cache (default: huggingface_hub's, i.e. HF_HUB_CACHE or HF_HOME/hub).
    Raises HubModelError with the reason (offline and not cached, not found, gated, pickle only).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    env = environ if environ is not None else os.environ
    local_only = offline(env)
    token = env.get("HF_TOKEN") or None
    if not local_only:
        _refuse_pickle_only(model, token)
        log(f"[loraplex] fetching {model} from the Hugging Face Hub (safetensors, config and tokenizer "
            "only; files already in the cache are not downloaded again)")
    try:
        path = snapshot_download(model.repo_id, revision=model.revision, cache_dir=cache_dir,
                                 allow_patterns=list(ALLOW_PATTERNS), local_files_only=local_only,
                                 token=token)
    except GatedRepoError:
        raise HubModelError(f"--model {model}: the repository is gated; accept its terms on "
                            "huggingface.co and set HF_TOKEN to a token that may read it") from None
    except RepositoryNotFoundError:
        raise HubModelError(f"--model {model}: no such repository on the Hub (or it is private: "
                            f"set HF_TOKEN), and no local directory {model.repo_id!r} exists") from None
    except RevisionNotFoundError:
        raise HubModelError(f"--model {model}: the repository has no revision {model.revision!r} "
                            "(--revision)") from None
    except LocalEntryNotFoundError:
        raise HubModelError(_not_cached_message(model, local_only)) from None
    except OfflineModeIsEnabled:      # huggingface_hub read HF_HUB_OFFLINE at import
        raise HubModelError(_not_cached_message(model, True)) from None
    except OSError as error:          # network errors (requests/httpx) derive from OSError
        raise HubModelError(f"--model {model}: download failed ({error}); {_cached_hint(model)}") from None
    return _checked_snapshot(model, Path(path))


def _refuse_pickle_only(model: HubModel, token: str | None) -> None:
    """Online: refuse before downloading anything when the repository has no safetensors."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        files = HfApi(token=token).list_repo_files(model.repo_id, revision=model.revision)
    except (HfHubHTTPError, OSError):
        return          # snapshot_download reports not-found / gated / bad revision / offline precisely
    if not any(name.endswith(".safetensors") for name in files):
        raise HubModelError(_pickle_message(model, [f for f in files if f.endswith(PICKLE_SUFFIXES)]))


def _checked_snapshot(model: HubModel, path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise HubModelError(f"--model {model}: the repository has no config.json at its top level "
                            "(is it a transformers model?)")
    if not any(path.glob("*.safetensors")):
        raise HubModelError(_pickle_message(model, []))
    return path


def _pickle_message(model: HubModel, pickles: list[str]) -> str:
    found = f" (it has {', '.join(sorted(pickles)[:3])})" if pickles else ""
    return (f"--model {model}: the repository has no safetensors weights{found}; loraplex never loads "
            "pickle checkpoints. Convert it (transformers: from_pretrained + save_pretrained writes "
            "safetensors) and pass the local directory")


def _not_cached_message(model: HubModel, local_only: bool) -> str:
    if local_only:
        return (f"--model {model}: not in the Hugging Face cache and HF_HUB_OFFLINE is set, so nothing "
                f"is downloaded; run once with network access (unset HF_HUB_OFFLINE) to fetch it, or "
                f"pass a local directory. {_cached_hint(model)}")
    return f"--model {model}: the Hub cannot be reached and the model is not cached. {_cached_hint(model)}"


def _cached_hint(model: HubModel) -> str:
    return (f"The cache is HF_HUB_CACHE (or HF_HOME/hub, default ~/.cache/huggingface/hub); "
            f"`hf download {model.repo_id} --revision {model.revision}` also fills it")
