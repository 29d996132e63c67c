"""Models by Hugging Face Hub name: `train_model --init-from gpt2` (or ORG/NAME) takes the
model's files through `huggingface_hub` (the `hub` extra: pip install '.[hub]').

Choices written down here:

- A name is a Hub repository id only when no file or directory of that name exists here, so
  a local directory always wins, as transformers' from_pretrained does; a name with more than
  one "/", or one that starts as a path does ("/", "./", "~"), or a .cllm file's name, is a
  path.
- Only what a model directory needs is fetched: config.json, the safetensors weights (one
  file, or the shards and their index; pickled weights never), the tokenizer's files and
  the generation config. The files go to huggingface_hub's own cache (HF_HOME, HF_HUB_CACHE)
  and are read from there, so a second run downloads nothing; HF_HUB_OFFLINE=1 uses the
  cache only. --revision names a branch, tag or commit (default: the repository's main).
- Faults are one line: no huggingface_hub (status 2, before anything is read), a repository
  or revision the Hub does not have, and a model that is neither cached nor reachable
  (offline, or no network), which names the cache it looked in.
"""
from __future__ import annotations

import os
import re

from cllm_cli.errors import DataError, MissingExtra

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "generation_config.json"]
# NAME or ORG/NAME, as the Hub spells repository ids
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_hub_name(name: str) -> bool:
    """Whether `name` is taken as a Hub repository id: no such path here, and spelt as one."""
    return (not os.path.lexists(name) and _REPO_ID.fullmatch(name) is not None
            and not name.endswith(".cllm"))


def model_source(name: str, revision: str | None = None) -> str:
    """The local path of the model `name` names: `name` itself, or for a Hub repository id
    the directory of its files in huggingface_hub's cache (fetched when they are not there).
    One line (DataError, MissingExtra) when it cannot be had."""
    if not is_hub_name(name):
        if revision:
            raise DataError(f"--revision {revision} applies to a Hugging Face Hub name; "
                            f"{name} is a local path")
        return name
    try:
        import huggingface_hub
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise MissingExtra(f"{name} is not a file or directory here, and reading it from the "
                           f"Hugging Face Hub needs huggingface_hub: pip install '.[hub]'") from None
    where = f"{name}" + (f" at revision {revision}" if revision else "")
    try:
        return huggingface_hub.snapshot_download(name, revision=revision or None,
                                                 allow_patterns=HUB_FILES)
    except RevisionNotFoundError:
        raise DataError(f"{where}: the Hugging Face Hub has no such revision") from None
    except RepositoryNotFoundError:
        raise DataError(f"{name}: no such file or directory here, nor a model on the Hugging "
                        f"Face Hub (or one that needs a login)") from None
    except LocalEntryNotFoundError:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        raise DataError(f"{where}: no such file or directory here, not in the Hugging Face "
                        f"cache ({cache}), and the Hub cannot be reached (offline or no "
                        f"network): fetch it once with the network, or give a local "
                        f"directory") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise DataError(f"{where}: cannot fetch it from the Hugging Face Hub ({reason})") from None
