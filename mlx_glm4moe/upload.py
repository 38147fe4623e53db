"""Publishing a converted folder on the Hugging Face Hub, and the model card that describes it.

Uploading is a step of its own (`glm4moe-upload`, or `convert.py --upload-only`), so a failed
upload is retried without converting again. The folder is checked before anything is sent, every
failure becomes one `UploadError` line saying what failed and how to retry, and the folder is
left as it was.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open

from .models import model_args
from .progress import Progress
from .weights import INDEX_FILE

try:  # huggingface_hub talks through httpx2 from 2.0 on, through httpx before
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

CARD_TAGS = ["mlx", "mlx-glm4moe"]  # and the model_type
_LICENSE_FIELDS = ("license", "license_name", "license_link")


class UploadError(Exception):
    """An upload that cannot go ahead or did not complete; the message is one line that says what
    failed and how to retry."""


def check_folder(path: Path) -> None:
    """Raise `UploadError` unless `path` is a converted checkpoint that loads: a supported
    config.json, a tokenizer, and an index whose every shard is present, has a readable
    safetensors header and holds the tensors the index gives it. Reads headers, not weights."""
    if not path.is_dir():
        raise UploadError(
            f"no converted model at {path}; convert one first: "
            f"python convert.py --hf-path SOURCE --mlx-path {path}"
        )
    reconvert = f"convert again with: python convert.py --hf-path SOURCE --mlx-path {path} --force"
    try:
        model_args(json.loads((path / "config.json").read_text()))
    except FileNotFoundError:
        raise UploadError(f"{path} has no config.json; {reconvert}") from None
    except (json.JSONDecodeError, ValueError) as e:
        why = f"{path}/config.json is not a config this package runs ({e})"
        raise UploadError(f"{why}; {reconvert}") from None
    index = path / INDEX_FILE
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except FileNotFoundError:
        raise UploadError(f"{path} has no {INDEX_FILE}; {reconvert}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UploadError(f"{index} is not a safetensors index ({e}); {reconvert}") from None
    if any(".experts." in name for name in weight_map):
        raise UploadError(
            f"{path} holds Hugging Face weights (one tensor per expert), not a converted model; "
            f"convert it first: python convert.py --hf-path {path} --mlx-path OUT, then upload OUT"
        )
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    for shard, names in sorted(shards.items()):
        try:
            with safe_open(path / shard, framework="numpy") as f:
                missing = names - set(f.keys())
        except FileNotFoundError:
            raise UploadError(f"{path} is missing the shard {shard}; {reconvert}") from None
        except (SafetensorError, OSError) as e:
            raise UploadError(f"{path}/{shard} is unreadable ({e}); {reconvert}") from None
        if missing:
            raise UploadError(
                f"{path}/{shard} lacks {len(missing)} tensor(s) its index lists, e.g. "
                f"{min(missing)}; {reconvert}"
            )
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise UploadError(f"{path} has no tokenizer (tokenizer.json); {reconvert}")


def _check_repo(repo: str | None) -> None:
    """ORG/NAME, as the Hub and `load()` take it: a bare NAME would land in whichever account the
    token belongs to, and `load()` would not recognise it as a repo id."""
    if not repo:
        raise UploadError("no repo to upload to; pass --upload-repo ORG/NAME")
    try:
        validate_repo_id(repo)
        if repo.count("/") != 1:
            raise HFValidationError("it must be ORG/NAME")
    except HFValidationError as e:
        raise UploadError(
            f"{repo!r} is not a Hugging Face repo id ({_first_line(e)}); "
            "pass --upload-repo ORG/NAME (letters, digits, '-', '_', '.')"
        ) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _reason(e: Exception, repo: str) -> str:
    """What went wrong with the Hub, and what to do about it, for the errors a user can fix."""
    if isinstance(e, LocalTokenNotFoundError):
        return (
            "no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN), "
            "using a token with write access"
        )
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it"
    if isinstance(e, TransportError):
        where = f"{constants.ENDPOINT} ({type(e).__name__}: {_first_line(e)})"
        return f"cannot reach {where}: check the network connection"
    if not isinstance(e, HfHubHTTPError):  # e.g. hf_xet's transfer errors, mid-upload
        return f"the upload stopped ({type(e).__name__}: {_first_line(e)})"
    status = e.response.status_code
    detail = f"HTTP {status}: {getattr(e, 'server_message', None) or _first_line(e)}"
    if status == 401:
        return f"the Hub rejected the token ({detail}): log in again with `hf auth login`"
    if status == 403:
        return (
            f"the token may not write to {repo} ({detail}): "
            f"use a token with write access to '{repo.split('/')[0]}'"
        )
    return f"the Hub answered {detail}"


def publish(mlx_path: str | Path, repo: str | None, progress: Progress | None = None) -> str:
    """Check `mlx_path` (see `check_folder`), create `repo` on the Hub if needed and upload the
    folder with huggingface_hub's resumable path. Returns the repo's URL; raises `UploadError`.

    Always the resumable path, whatever the size: converted GLM-4.5 checkpoints are 50-400 GB and
    a small folder costs nothing more. huggingface_hub 2 made `upload_folder` itself that path
    (hf_xet, several commits, resumed by running it again) and dropped `upload_large_folder`,
    which 1.x needs for it (and which keeps its resume state in the folder's .cache/).

    `progress` hears ("upload", 0, bytes) before and ("upload", bytes, bytes) after: the Hub
    client reports nothing in between."""
    path = Path(mlx_path).expanduser()
    _check_repo(repo)
    check_folder(path)
    api = HfApi()
    try:
        token = (api.whoami().get("auth") or {}).get("accessToken") or {}
        if token.get("role") == "read":
            raise UploadError(
                f"the Hugging Face token {token.get('displayName', '')!r} is read-only: create one "
                "with write access at https://huggingface.co/settings/tokens and run "
                f"`hf auth login`, then retry with: {retry_command(path, repo)}"
            )
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        card = _renamed_card(path, repo)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if progress is not None:
            progress("upload", 0, size)
        upload = getattr(api, "upload_large_folder", None) or api.upload_folder
        upload(
            repo_id=repo,
            folder_path=str(path),
            repo_type="model",
            ignore_patterns=["README.md"] if card else None,
        )
        if card:
            api.upload_file(
                path_or_fileobj=card.encode(),
                path_in_repo="README.md",
                repo_id=repo,
                repo_type="model",
            )
    # OSError covers the Hub's own errors (HTTP, no token, offline mode) and hf_xet's; hf_xet
    # reports its other transfer failures as RuntimeError.
    except (TransportError, OSError, RuntimeError) as e:
        raise UploadError(
            f"upload of {path} to {repo} failed, {_reason(e, repo)}; the folder is unchanged, "
            f"retry with: {retry_command(path, repo)}"
        ) from None
    if progress is not None:
        progress("upload", size, size)
    url = f"https://huggingface.co/{repo}"
    print(f"Uploaded {path} to {url}", file=sys.stderr)
    return url


def retry_command(path: Path, repo: str) -> str:
    """The command that uploads `path` again (files already on the Hub are skipped)."""
    return f"glm4moe-upload --mlx-path {path} --upload-repo {repo}"


def base_model(source: str, source_dir: Path, config: dict[str, Any]) -> str | None:
    """The Hub repo a conversion started from (`source` as given, found at `source_dir`):
    `source` itself when it was a repo id, the repo of a huggingface_hub cache snapshot
    (`.../models--ORG--NAME/snapshots/REV`), or a repo id left in the config as `_name_or_path`.
    None when unknown: a local folder's name is no repo id."""
    if Path(source).expanduser() != source_dir:  # `resolve` fetched it from the Hub
        return source
    snapshot = source_dir.resolve()
    repo_folder = snapshot.parent.parent.name
    if snapshot.parent.name == "snapshots" and repo_folder.startswith("models--"):
        return repo_folder.removeprefix("models--").replace("--", "/")  # ids never contain "--"
    hint = config.get("_name_or_path")
    if isinstance(hint, str) and hint.count("/") == 1 and not Path(hint).expanduser().exists():
        try:
            validate_repo_id(hint)
            return hint
        except HFValidationError:
            pass
    return None


def source_license(source_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """The source's license fields, from its README's front matter or else its config. A front
    matter that does not parse contributes nothing (the conversion goes on)."""
    readme, meta = source_dir / "README.md", {}
    if readme.exists():
        try:
            meta = ModelCard.load(readme).data.to_dict()
        except (ValueError, yaml.YAMLError):
            pass
    found = {k: meta[k] for k in _LICENSE_FIELDS if meta.get(k)}
    return found or {k: config[k] for k in _LICENSE_FIELDS if config.get(k)}


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e9:.1f} GB" if total >= 1e9 else f"{total / 1e6:.1f} MB"


_USE_HEADING = "\n## Use\n"


def _usage(name: str) -> str:
    """The card's part that names the model: how to run it."""
    return f"""{_USE_HEADING}
mlx-glm4moe is not on PyPI: install it from a checkout of its source, then generate.

```bash
pip install -e .
python generate.py --model {name} --prompt "Hello"
```

```python
from mlx_glm4moe import chat, load

model, tokenizer = load("{name}")
print(chat(model, tokenizer, [{{"role": "user", "content": "Hello"}}])["content"])
```

The folder also loads with mlx-lm (`pip install mlx-lm`, then
`mlx_lm.generate --model {name} --prompt "Hello"`), which ignores the MTP layer.
"""


def _renamed_card(path: Path, repo: str) -> str | None:
    """The folder's card with `repo` in its title and commands, for a folder converted before
    its repo was chosen (`model_card` named it after the folder). None when the card already
    names `repo`, or is not one of ours: then the folder's README.md goes up as it is."""
    readme = path / "README.md"
    if not readme.exists():
        return None
    head, found, _ = readme.read_text().partition(_USE_HEADING)
    if not found or "mlx-glm4moe" not in head or f"\n# {repo}\n" in head:
        return None
    return re.sub(r"^# .*$", f"# {repo}", head, count=1, flags=re.MULTILINE) + _usage(repo)


def model_card(
    folder: Path,
    name: str,
    source: str,
    source_dir: Path,
    quant_recipe: str | None = None,
) -> str:
    """The README.md for a converted `folder` (complete but for this card), to be published as
    `name`. Every statement is read from the folder or the source: the base model (see
    `base_model`), the license, the conversion flags, whether the MTP layer was kept, the size.
    Its only links are the base model's Hub page and the Hub's own."""
    config = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    base = base_model(source, source_dir, config)
    data = ModelCardData(
        base_model=base,
        library_name="mlx",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, config["model_type"]],
        **source_license(source_dir, config),
    )
    dtype, quant = config["torch_dtype"], config.get("quantization")
    if quant_recipe:
        flags = f"--quant-recipe {quant_recipe}"
        quantization = f"recipe `{quant_recipe}`, per-module bits listed in config.json"
    elif quant:
        flags = f"-q --q-bits {quant['bits']} --q-group-size {quant['group_size']}"
        quantization = f"{quant['bits']}-bit, group size {quant['group_size']}, {quant['mode']}"
    else:
        flags, quantization = "", "none"
    flags = f"{flags} --dtype {dtype}".strip()
    mtp_prefix = f"model.layers.{config['num_hidden_layers']}."
    if any(k.startswith(mtp_prefix) for k in index):
        mtp = (
            "kept. mlx-glm4moe drafts tokens with it and verifies them in one pass (speculative "
            "decoding, on by default; `--no-mtp` turns it off)."
        )
    else:
        mtp = "not in the source; generation decodes one token at a time."
    origin = (
        f"[{base}](https://huggingface.co/{base})"
        if base
        else f"A {config['model_type']} checkpoint"
    )
    return f"""---
{data.to_yaml()}
---
# {name}

{origin} converted to MLX with mlx-glm4moe's `convert.py {flags}`.

- Quantization: {quantization}; the router weight and its correction bias stay float32.
- Weights dtype: {dtype}; size on disk: {_size(folder)}.
- Multi-token prediction (MTP) layer: {mtp}
{_usage(name)}"""
