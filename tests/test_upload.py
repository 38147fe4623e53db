"""Publishing: the folder check, every upload failure as one line, the model card. Offline: the
Hub is a fake `HfApi`, or an endpoint nothing listens on."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import hf_raise_for_status

from mlx_glm4moe import upload
from mlx_glm4moe.cli import convert_main, upload_main
from mlx_glm4moe.convert import convert

try:  # the HTTP client of the installed huggingface_hub (see upload.py)
    import httpx2 as httpx
except ImportError:
    import httpx

REPO = "me/air-4bit"
ROOT = Path(__file__).resolve().parents[1]
NO_HUB = "http://127.0.0.1:9"  # nothing listens there: refused at once, on any machine
# How this platform words that refusal (errno 111 on Linux, 61 on macOS).
REFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns)
        for f in folder.rglob("*")
    }


def http_error(status: int, message: str) -> HfHubHTTPError:
    """The error huggingface_hub raises for a Hub answer with this status and message."""
    request = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    try:
        hf_raise_for_status(httpx.Response(status, request=request, json={"error": message}))
    except HfHubHTTPError as e:
        return e
    raise AssertionError(status)


class FakeApi:
    """Records calls; `fail` maps a method name to the exception it raises."""

    calls: list
    fail: dict
    role = "write"

    def _call(self, name, kw):
        self.calls.append((name, kw))
        if name in self.fail:
            raise self.fail[name]

    def whoami(self):
        self._call("whoami", {})
        return {"name": "me", "auth": {"accessToken": {"displayName": "laptop", "role": self.role}}}

    def create_repo(self, **kw):
        self._call("create_repo", kw)

    def upload_folder(self, **kw):
        self._call("upload_folder", kw)

    def upload_file(self, **kw):
        self._call("upload_file", kw)


@pytest.fixture
def hub(monkeypatch):
    class Api(FakeApi):
        calls, fail = [], {}

    monkeypatch.setattr(upload, "HfApi", Api)
    return Api


def run_upload(path, repo, capsys):
    """`glm4moe-upload`, in process: (exit status, stderr lines)."""
    try:
        upload_main(["--mlx-path", str(path), "--upload-repo", repo])
        status = 0
    except SystemExit as e:
        assert isinstance(e.code, str)  # sys.exit(message): printed on stderr, status 1
        print(e.code, file=sys.stderr)
        status = 1
    return status, capsys.readouterr().err.strip().splitlines()


def test_upload_sends_folder_and_card_named_after_repo(air_q4, hub, capsys):
    before = snapshot(air_q4)
    assert run_upload(air_q4, REPO, capsys) == (
        0,
        [f"Uploaded {air_q4} to https://huggingface.co/{REPO}"],
    )
    names = [c[0] for c in hub.calls]
    assert names == ["whoami", "create_repo", "upload_folder", "upload_file"]
    assert hub.calls[1][1] == {"repo_id": REPO, "repo_type": "model", "exist_ok": True}
    assert hub.calls[2][1] == {
        "repo_id": REPO,
        "folder_path": str(air_q4),
        "repo_type": "model",
        "ignore_patterns": ["README.md"],
    }
    # The folder was converted without a repo name: the published card names the repo.
    sent = hub.calls[3][1]
    assert sent["path_in_repo"] == "README.md" and sent["repo_id"] == REPO
    card = sent["path_or_fileobj"].decode()
    local = (air_q4 / "README.md").read_text()
    assert card.split("\n# ")[0] == local.split("\n# ")[0]  # same front matter
    assert f"\n# {REPO}\n" in card and f'load("{REPO}")' in card
    assert f"--model {REPO} " in card and f'"{air_q4.name}"' not in card
    assert snapshot(air_q4) == before


def test_card_naming_the_repo_goes_up_with_the_folder(air_checkpoint, tmp_path, hub):
    out = convert(str(air_checkpoint), str(tmp_path / "up"), quantize=True, upload_repo=REPO)
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert hub.calls[2][1]["ignore_patterns"] is None
    assert f'load("{REPO}")' in (out / "README.md").read_text()


def test_huggingface_hub_1_uses_upload_large_folder(air_q4, hub, capsys, monkeypatch):
    class Api(hub):
        def upload_large_folder(self, **kw):
            self._call("upload_large_folder", kw)

    monkeypatch.setattr(upload, "HfApi", Api)
    assert run_upload(air_q4, REPO, capsys)[0] == 0
    assert [c[0] for c in hub.calls][2] == "upload_large_folder"


RETRY = "retry with: glm4moe-upload --mlx-path {path} --upload-repo " + REPO


@pytest.mark.parametrize(
    "method,error,says",
    [
        ("whoami", LocalTokenNotFoundError("no token"), "no Hugging Face token: log in with"),
        ("whoami", httpx.ConnectError("[Errno -2] Name or service not known"), "cannot reach"),
        ("whoami", OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set: unset it"),
        ("whoami", http_error(401, "Invalid user token."), "the Hub rejected the token"),
        ("role", "read", "is read-only: create one with write access"),
        ("create_repo", http_error(403, "You don't have the rights"), "may not write to me/"),
        ("upload_folder", http_error(403, "Forbidden"), "may not write to me/air-4bit"),
        ("upload_folder", http_error(500, "Internal Error"), "the Hub answered HTTP 500"),
        ("upload_folder", RuntimeError("Data processing error: CAS"), "the upload stopped"),
    ],
)
def test_hub_failures_are_one_line_with_a_retry(air_q4, hub, capsys, method, error, says):
    if method == "role":
        hub.role = error
    else:
        hub.fail[method] = error
    before = snapshot(air_q4)
    status, lines = run_upload(air_q4, REPO, capsys)
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and says in lines[0]
    assert lines[0].endswith(RETRY.format(path=air_q4))
    assert snapshot(air_q4) == before


@pytest.mark.parametrize("repo", ["air-4bit", "me/air/4bit", "me/air 4bit", "me/-air", "me/a--b"])
def test_invalid_repo_is_refused_before_the_hub(air_q4, hub, capsys, repo):
    status, lines = run_upload(air_q4, repo, capsys)
    assert status == 1 and len(lines) == 1
    assert f"error: {repo!r} is not a Hugging Face repo id" in lines[0]
    assert "--upload-repo ORG/NAME" in lines[0] and hub.calls == []


def broken(model: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / sorted(set(index["weight_map"].values()))[0]
    if how == "no folder":
        shutil.rmtree(bad)
    elif how == "no config":
        (bad / "config.json").unlink()
    elif how == "llama config":
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif how == "no index":
        (bad / "model.safetensors.index.json").unlink()
    elif how == "missing shard":
        shard.unlink()
    elif how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "garbage shard":
        shard.write_bytes(b"not safetensors" * 10)
    elif how == "tensor not in shard":
        index["weight_map"]["model.extra.weight"] = shard.name
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    elif how == "no tokenizer":
        (bad / "tokenizer.json").unlink()
    return bad


@pytest.mark.parametrize(
    "how,says",
    [
        ("no folder", "no converted model at"),
        ("no config", "has no config.json"),
        ("llama config", "is not a config this package runs (Unsupported model_type 'llama'"),
        ("no index", "has no model.safetensors.index.json"),
        ("missing shard", "is missing the shard model-00001-of-00001.safetensors"),
        ("truncated shard", "is unreadable (Error while deserializing header"),
        ("garbage shard", "is unreadable (Error while deserializing header"),
        ("tensor not in shard", "lacks 1 tensor(s) its index lists, e.g. model.extra.weight"),
        ("no tokenizer", "has no tokenizer"),
    ],
)
def test_broken_folder_is_never_sent(air_q4, tmp_path, hub, capsys, how, says):
    bad = broken(air_q4, tmp_path, how)
    before = snapshot(bad) if bad.exists() else None
    status, lines = run_upload(bad, REPO, capsys)
    assert status == 1 and len(lines) == 1 and says in lines[0], lines
    assert f"python convert.py --hf-path SOURCE --mlx-path {bad}" in lines[0]
    assert hub.calls == []
    assert (snapshot(bad) if bad.exists() else None) == before


def test_unconverted_checkpoint_is_never_sent(air_checkpoint, hub, capsys):
    status, lines = run_upload(air_checkpoint, REPO, capsys)
    assert status == 1 and len(lines) == 1
    assert "holds Hugging Face weights (one tensor per expert), not a converted model" in lines[0]
    assert f"python convert.py --hf-path {air_checkpoint} --mlx-path OUT" in lines[0]
    assert hub.calls == []


def cli(*args, token="hf_test", home=None):
    """A command line in a fresh process that reaches no Hub: `NO_HUB` as the endpoint, and
    `token` (None: no token anywhere, `home` standing in for the saved login's folder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env["HF_ENDPOINT"] = NO_HUB
    if token is not None:
        env["HF_TOKEN"] = token
    if home is not None:
        env["HF_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )


def test_real_hub_client_without_network_fails_fast_and_cleanly(air_q4):
    r = cli("convert.py", "--upload-only", "--mlx-path", str(air_q4), "--upload-repo", REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: upload of {air_q4} to {REPO} failed, cannot reach {NO_HUB} (ConnectError: "
        f"{REFUSED}): check the network connection; the folder is "
        f"unchanged, {RETRY.format(path=air_q4)}"
    ]


def test_real_hub_client_without_token(air_q4, tmp_path):
    args = ("--upload-only", "--mlx-path", str(air_q4), "--upload-repo", REPO)
    r = cli("convert.py", *args, token=None, home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "no Hugging Face token: log in with `hf auth login`" in r.stderr


def test_convert_then_failed_upload_keeps_the_folder(air_checkpoint, tmp_path):
    out = tmp_path / "out"
    args = ("--hf-path", str(air_checkpoint), "--mlx-path", str(out), "-q", "--upload-repo", REPO)
    r = cli("convert.py", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: upload of {out} to {REPO} failed")
    assert upload.check_folder(out) is None  # complete, ready for the retry
    assert f'load("{REPO}")' in (out / "README.md").read_text()


def test_upload_only_needs_a_repo(air_q4, hub, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--upload-only", "--mlx-path", str(air_q4)])
    assert e.value.code == "error: no repo to upload to; pass --upload-repo ORG/NAME"
    assert hub.calls == []


# The card.

URL = re.compile(r"https?://[^\s)\"'>]+")


def card_of(folder: Path) -> ModelCard:
    text = (folder / "README.md").read_text()
    return ModelCard(text)


def test_card_of_a_local_source_has_no_base_model_and_no_links(air_q4, air_checkpoint):
    card = card_of(air_q4)
    assert card.data.base_model is None and card.data.library_name == "mlx"
    assert URL.findall(card.content) == []
    assert air_checkpoint.name not in card.content  # never the source folder's name
    text = card.content
    assert "`convert.py -q --q-bits 4 --q-group-size 64 --dtype float32`" in text
    assert "4-bit, group size 64, affine" in text
    assert "(MTP) layer: kept." in text
    size = sum(f.stat().st_size for f in air_q4.iterdir() if f.name != "README.md")
    assert f"size on disk: {size / 1e6:.1f} MB" in text


def test_card_install_command_is_the_readmes():
    readme = (ROOT / "README.md").read_text().splitlines()[:10]
    assert any(line.startswith("pip install -e . ") for line in readme)
    assert "pip install mlx-glm4moe" not in upload._usage("x")
    assert "\npip install -e .\n" in upload._usage("x")


def hub_snapshot(src: Path, root: Path, readme: str | None) -> Path:
    """`src` laid out as huggingface_hub caches `zai-org/GLM-4.5-Air`, with a model card."""
    snap = root / "hub" / "models--zai-org--GLM-4.5-Air" / "snapshots" / "0123abc"
    shutil.copytree(src, snap)
    if readme is not None:
        (snap / "README.md").write_text(readme)
    return snap


SOURCE_CARD = "---\nlicense: mit\nlanguage: [en, zh]\n---\n# GLM-4.5-Air\n"


def test_card_of_a_hub_source_names_it_and_carries_its_license(
    air_checkpoint, tmp_path, monkeypatch
):
    snap = hub_snapshot(air_checkpoint, tmp_path, SOURCE_CARD)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: str(snap))
    out = convert("zai-org/GLM-4.5-Air", str(tmp_path / "out"), quant_recipe="mixed-4")
    card = card_of(out)
    assert card.data.base_model == "zai-org/GLM-4.5-Air" and card.data.license == "mit"
    assert URL.findall(card.content) == ["https://huggingface.co/zai-org/GLM-4.5-Air"]
    assert "`convert.py --quant-recipe mixed-4 --dtype float32`" in card.content
    assert "language" not in card.data.to_dict()  # only the license is carried over


@pytest.mark.parametrize("readme", [SOURCE_CARD, None, "---\nlicense: [mit\n---\n"])
def test_base_model_of_a_local_snapshot_and_license(air_checkpoint, tmp_path, readme):
    snap = hub_snapshot(air_checkpoint, tmp_path, readme)
    assert upload.base_model(str(snap), snap, {}) == "zai-org/GLM-4.5-Air"
    expected = {"license": "mit"} if readme == SOURCE_CARD else {}
    assert upload.source_license(snap, {}) == expected


@pytest.mark.parametrize(
    "hint,expected",
    [("zai-org/GLM-4.5", "zai-org/GLM-4.5"), ("/data/glm", None), ("glm", None), (None, None)],
)
def test_base_model_from_name_or_path_hint(tmp_path, hint, expected):
    local = tmp_path / "hf"
    local.mkdir()
    assert upload.base_model(str(local), local, {"_name_or_path": hint}) == expected
