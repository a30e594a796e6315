"""The official pretrained checkpoints from the Hugging Face Hub (``nvidia/MambaVision-*``).

Files are downloaded once into the Hub's cache (``~/.cache/huggingface/hub``, or ``HF_HUB_CACHE``) and read from
there afterwards, offline too. Needs ``huggingface_hub`` (``pip install 'mambavision-jax[hub]'``).
"""

from typing import Optional

from mambavision_jax.models.registry import VARIANTS, resolve_name
from mambavision_jax.weights.readers import CheckpointError

HUB_SOURCE = "hf-hub"  # the `source` / `init_from` value that means "the official file of this variant"
SAFETENSORS_FILE = "model.safetensors"  # the Hugging Face wrapper's float32 weights; read without torch


def hub_repo_id(name: str) -> str:
    """``nvidia/<repo>``, the Hub repository of the official checkpoint of ``name`` (a registry name or alias)."""
    return f"nvidia/{VARIANTS[resolve_name(name)].hf_repo}"


def download_official(name: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """The local path of the official checkpoint of ``name``, downloaded first if the cache lacks it.

    The repository's ``model.safetensors`` is taken (no torch needed to read it); where a repository has none,
    the ``.pth.tar`` the official code downloads (reading it needs torch). Any failure (no ``huggingface_hub``,
    no network and nothing cached, an unknown revision, neither file in the repository) raises an error that
    names the repository and the file.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError as e:
        raise ImportError(
            "downloading the official weights needs huggingface_hub: pip install 'mambavision-jax[hub]' "
            "(or download the checkpoint yourself and pass its path)"
        ) from e
    repo = hub_repo_id(name)
    candidates = (SAFETENSORS_FILE, VARIANTS[resolve_name(name)].hf_file)
    for filename in candidates:
        try:
            return huggingface_hub.hf_hub_download(
                repo, filename, revision=revision, cache_dir=cache_dir, library_name="mambavision-jax"
            )
        except errors.LocalEntryNotFoundError as e:  # offline (or the Hub unreachable) and not in the cache
            raise CheckpointError(
                f"{repo}/{filename} is not in the Hugging Face cache and could not be downloaded: {e}"
            ) from e
        except errors.EntryNotFoundError:  # this repository has no such file: try the next one
            continue
        except OSError as e:  # HfHubHTTPError and its kinds: unknown repository or revision, gated, HTTP errors
            raise CheckpointError(f"could not download {repo}/{filename}: {e}") from e
    raise CheckpointError(f"{repo} holds none of {', '.join(candidates)}")
