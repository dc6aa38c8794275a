"""Prepare ``.device/`` so that a lent GPU machine (no network, at most 64 MiB carried per call) can run
``benchmarks/gpu_check.py`` with this repository's pinned libraries and the real teacher.

    python benchmarks/stage_device.py        # then run the two commands it prints, back to back

What it writes (``.device/`` is git-ignored):

* ``wheels/``: transformers at the version setup.cfg pins (the machine ships a newer major version), the
  tokenizers and huggingface_hub versions it accepts, and gguf;
* ``teacher-a`` / ``teacher-b``: the two halves of the bundled SmolLM2 GGUF file (98 MB, more than one call
  may carry). The first call carries wheels and the first half; the second, made while the machine is still
  warm (it keeps ignored files between calls), carries the second half, joins them and runs the check.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".device"
# transformers at setup.cfg's pin, with the tokenizers and huggingface_hub it accepts (the machine's are newer).
PINS = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2", "gguf==0.19.0"]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from compress import smollm2_gguf_path

    (STAGE / "wheels").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(STAGE / "wheels"), *PINS], check=True)
    gguf = smollm2_gguf_path()
    data = gguf.read_bytes()
    half = len(data) // 2
    (STAGE / "teacher-a").write_bytes(data[:half])
    (STAGE / "teacher-b").write_bytes(data[half:])
    # compress itself is installed too (no build isolation, no network): its plugins are entry points.
    setup = ("python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl && "
             "export PYTHONPATH=/tmp/site:$PWD && "
             "python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .")
    print("call 1 (carry ['.device/wheels', '.device/teacher-a']):  true")
    print("call 2 (carry ['.device/teacher-b'], right after):")
    print(f"  {setup} && cat .device/teacher-a .device/teacher-b > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf && "
          "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --teacher /tmp/SmolLM2-135M-Instruct.Q4_1.gguf "
          "--out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log")
    print(f"sizes: wheels {sum(f.stat().st_size for f in (STAGE / 'wheels').iterdir()) / 2**20:.1f} MiB, "
          f"halves {half / 2**20:.1f} MiB each; {shutil.disk_usage(STAGE).free / 2**30:.0f} GiB free here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
