"""Tensor and pipeline parallelism with MLX's ring backend: two local ranks over loopback, started
by `mlx.launch`, checked token for token against one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_glm4moe import distributed
from mlx_glm4moe.cli import generate_main as main
from mlx_glm4moe.convert import convert
from mlx_glm4moe.generate import generate_step
from mlx_glm4moe.loading import load
from mlx_glm4moe.synthetic import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]
MAX_TOKENS = 16
CLI = ["--prompt", "Hello", "--max-tokens", "12"]

# Rank r writes what it generated in each parallel mode to rank{r}.json ("single": the model
# left whole, the peak-memory baseline), then runs the command line.
RANK_SCRIPT = """
import json, sys
from pathlib import Path

import mlx.core as mx

from mlx_glm4moe import distributed
from mlx_glm4moe.cli import generate_main as main
from mlx_glm4moe.generate import generate_step
from mlx_glm4moe.loading import load

group = mx.distributed.init()
job = json.loads(sys.argv[1])
prompt = mx.array(job["prompt"])
results = {}
for path in job["models"] + job["native"] + [job["memory"]]:
    activations = "native" if path in job["native"] else "auto"
    for mode in distributed.MODES + (("single",) if path == job["memory"] else ()):
        model, _ = load(path, activations=activations)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        try:
            if mode == "single":
                distributed.materialize(model)
            else:
                distributed.setup(model, group, mode)
        except ValueError as e:
            results[f"{path}:{mode}"] = {"error": str(e)}
            continue
        peak = mx.get_peak_memory() - base
        tokens = [t for t, _ in generate_step(prompt, model, max_tokens=job["max_tokens"])]
        logits, hidden = model(prompt[None], return_hidden=True)
        mtp_logits = model.mtp.predict(prompt[None], hidden)[0][0].astype(mx.float32)
        results[f"{path}:{mode}"] = {
            "tokens": tokens,
            "mtp": mtp_logits.argmax(-1).tolist(),
            "mtp_logits": mtp_logits.tolist(),
            "peak": peak,
        }
        del model, logits, hidden
(Path(job["out"]) / f"rank{group.rank()}.json").write_text(json.dumps(results))

# The command line, tensor (default) and pipeline: rank 0 prints.
for parallel in distributed.MODES:
    if group.rank() == 0:
        print(f"=== {parallel}", flush=True)
    main(["--model", job["models"][0], "--parallel", parallel, *job["cli"]])
"""

# Rank 1 exits (with status 0, which mlx.launch does not act on) in its fourth forward pass.
DYING_SCRIPT = """
import os, sys

import mlx.core as mx

from mlx_glm4moe.cli import generate_main as main
from mlx_glm4moe.models import Model

if mx.distributed.init().rank() == 1:
    forward, calls = Model.__call__, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os._exit(0)
        return forward(self, *args, **kwargs)

    Model.__call__ = dying
main(sys.argv[1:])
"""


def launch(script: Path, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Two ranks of `script` with mlx.launch's ring backend on free loopback ports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("mlx.launch")
    assert launcher, "mlx.launch (installed with mlx) is not on PATH"
    cmd = [launcher, "-n", "2", "--backend", "ring", "--starting-port", str(port)]
    cmd += ["--env", f"PYTHONPATH={ROOT}", sys.executable, str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Converted float32 and 4-bit checkpoints of both presets, sized so that the 4-bit MLPs have
    quantization groups to split; glm45 gets an uneven split (3 KV heads, 3 and 5 groups) and
    GLM-4.6's layout (its MTP layer reads the main embedding and head)."""
    root = tmp_path_factory.mktemp("dist")
    shapes = {
        "air": dict(moe_intermediate_size=128, intermediate_size=256),
        # GLM-4.7-Flash's latent attention: 2 of its 4 heads per rank, o_proj cut at a group.
        "lite": dict(v_head_dim=32, moe_intermediate_size=128, intermediate_size=256),
        # GLM-5's: the same, with the indexer whole on every rank.
        "glm5": dict(moe_intermediate_size=128, intermediate_size=256),
        "glm45": dict(
            num_attention_heads=6,
            num_key_value_heads=3,
            moe_intermediate_size=192,
            intermediate_size=320,
        ),
    }
    out = {}
    for preset, overrides in shapes.items():
        layout = "glm46" if preset == "glm45" else "glm45"
        hf = make_checkpoint(root / f"hf-{preset}", preset, layout=layout, **overrides)
        out[f"{preset}-f32"] = str(convert(str(hf), str(root / f"{preset}-f32")))
        out[f"{preset}-q4"] = str(convert(str(hf), str(root / f"{preset}-q4"), quantize=True))
    # bfloat16 scales: run with activations="native", the GPU's code path.
    out["air-bf16-q4"] = str(
        convert(str(root / "hf-air"), str(root / "air-bf16-q4"), quantize=True, dtype="bfloat16")
    )
    # Big enough that the weights dominate peak memory: 6 MoE-heavy layers, read from HF files.
    out["memory"] = str(
        make_checkpoint(
            root / "hf-memory",
            "air",
            hidden_size=256,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_hidden_layers=6,
            intermediate_size=512,
            moe_intermediate_size=256,
            n_routed_experts=16,
        )
    )
    return out


def single_process(path: str, activations: str = "auto") -> dict:
    model, _ = load(path, activations=activations)
    tokens = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=MAX_TOKENS)]
    _, hidden = model(mx.array(PROMPT)[None], return_hidden=True)
    mtp_logits = model.mtp.predict(mx.array(PROMPT)[None], hidden)[0][0].astype(mx.float32)
    return {"tokens": tokens, "mtp": mtp_logits.argmax(-1).tolist(), "mtp_logits": mtp_logits}


def test_two_ranks_match_one_process(models, air_q4, tmp_path, capsys):
    parity = [
        models[f"{preset}-{kind}"]
        for preset in ("air", "glm45", "lite", "glm5")
        for kind in ("f32", "q4")
    ]
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    job = dict(
        out=str(tmp_path),
        memory=models["memory"],
        models=parity + [str(air_q4)],
        native=[models["air-bf16-q4"]],
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        cli=CLI,
    )
    run = launch(script, [json.dumps(job)], timeout=240)
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    results = ranks[0]
    for key, got in ranks[1].items():  # all ranks agree
        assert {k: v for k, v in got.items() if k != "peak"} == {
            k: v for k, v in results[key].items() if k != "peak"
        }, key

    for path in parity + [models["memory"]]:
        expected = single_process(path)
        for mode in distributed.MODES:
            got = results[f"{path}:{mode}"]
            assert got["tokens"] == expected["tokens"], (path, mode)
            assert got["mtp"] == expected["mtp"], (path, mode)
    # The GPU's code path (bfloat16 activations). Pipeline runs each layer's arithmetic
    # unchanged: bit-exact. Tensor parallelism adds the ranks' partial products in bfloat16,
    # rounding otherwise than one process: the greedy tokens agree here, and the MTP layer's
    # logits stay within bfloat16's own error (one process's distance from float32 activations;
    # their argmax flips at a near-tie of this random fixture). Only float32 activations (above)
    # make tensor parallelism exact.
    path = models["air-bf16-q4"]
    expected = single_process(path, "native")
    error = mx.abs(expected["mtp_logits"] - single_process(path, "float32")["mtp_logits"]).max()
    for mode in distributed.MODES:
        got = results[f"{path}:{mode}"]
        assert got["tokens"] == expected["tokens"], mode
        mtp_logits = mx.array(got["mtp_logits"])
        if mode == "pipeline":
            assert mx.array_equal(mtp_logits, expected["mtp_logits"]).item()
        else:
            assert (mx.abs(mtp_logits - expected["mtp_logits"]).max() < error).item()

    # Each rank holds about half of the model: layers split, embeddings and heads whole.
    for rank in ranks:
        whole = rank[f"{models['memory']}:single"]["peak"]
        for mode in distributed.MODES:
            assert rank[f"{models['memory']}:{mode}"]["peak"] < 0.62 * whole, mode

    # The shared fixture's 4-bit MLPs are one quantization group wide: no tensor split, a clear
    # error naming the way out; pipeline works.
    error = results[f"{air_q4}:tensor"]["error"]
    assert "cannot be split over 2 ranks" in error and "--parallel pipeline" in error
    assert results[f"{air_q4}:pipeline"]["tokens"] == single_process(air_q4)["tokens"]

    # The command line: rank 0 prints what one process prints; --parallel alone is a no-op.
    main(["--model", parity[0], *CLI])
    single = capsys.readouterr().out
    main(["--model", parity[0], "--parallel", "pipeline", *CLI])
    assert capsys.readouterr().out == single
    printed = run.stdout.split("=== ")
    assert printed[1:] == [f"{mode}\n{single}" for mode in distributed.MODES]


def test_dying_rank_is_a_clear_error(models, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING_SCRIPT)
    args = ["--model", models["air-q4"], "--max-tokens", "50", "--dist-timeout", "30"]
    run = launch(script, args, timeout=150)
    # The ring backend usually raises at once; when the peer dies while a result is awaited, MLX
    # can wait forever instead, and the watchdog ends the rank after --dist-timeout.
    lost = "error: rank 0 lost the other ranks" in run.stderr
    silent = "error: rank 0: no progress for 30 s" in run.stderr
    assert lost or silent, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_watchdog_ends_a_silent_wait():
    """On a clock the test moves: beats half a timeout apart keep the watchdog quiet through
    seven and a half timeouts; a silence of two timeouts ends the process."""
    code = textwrap.dedent(
        """
        import threading
        from types import SimpleNamespace
        from mlx_glm4moe import distributed

        now = [0.0]
        distributed.time = SimpleNamespace(monotonic=lambda: now[0])
        dog = distributed.Watchdog(1.0, rank=3)
        for _ in range(15):
            now[0] += 0.5
            dog.beat()
        print("beats done", flush=True)
        now[0] += 2.0
        threading.Event().wait()  # until the watchdog ends the process
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 1
    assert run.stdout == "beats done\n"
    assert "error: rank 3: no progress for 1 s" in run.stderr
