"""A separate venv with Flower for the comparison, created on first use (never a fedcli dependency).

python bench/flwr_env.py          # create or reuse bench/.venv-flwr, print its python
"""

import subprocess
import sys
import venv
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-flwr"
PACKAGES = ["flwr==1.42.*", "safetensors>=0.4", "numpy>=1.26"]


def python() -> Path:
    """Path of the venv's interpreter, creating the venv and installing Flower if needed."""
    exe = VENV / "bin" / "python"
    check = [str(exe), "-c", "import flwr.server.strategy.aggregate, safetensors"]
    if exe.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return exe
    print(f"creating {VENV} with {' '.join(PACKAGES)} (once)", file=sys.stderr)
    venv.create(VENV, with_pip=True, clear=True)
    subprocess.run([str(exe), "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    subprocess.run(check, check=True)
    return exe


if __name__ == "__main__":
    print(python())
