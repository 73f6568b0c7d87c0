import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# helpers (training_tiny.py) import by module name under any --import-mode (the project uses importlib)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# DeepSpeed compiles a small CPU comm op on first use (20-60 s): compile it once into the repo's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_BUILD_OPS", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer tests (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """Tests run standalone: no leftover RANK/WORLD_SIZE from a previous engine in this process."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
