"""The README's Python blocks run as pasted, in order, in one Python session in a fresh folder (as a reader
pasting them in turn): every name they use is defined, every keyword and attribute exists, every file they read
is one they write or one the repository ships.

The blocks compress the bundled SmolLM2 teacher, which takes minutes on a CPU (see BENCHMARKS.md for those
runs). Here ``"smollm2"`` is served by a tiny random Llama (the same family, with a tiny tokenizer) and the
sizes that only fit the real teacher are scaled down by the substitutions below, the only changes made to the
text. The blocks run in a subprocess, so that the adapter the last block registers does not outlive it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent
# README text -> what the tiny stand-in needs instead (sizes and budgets only; names, calls and keywords stay).
SCALE = {
    "70_000_000": "TEACHER_PARAMS * 6 // 10",
    '"hidden_size": 448, "intermediate_size": 608': '"hidden_size": 48, "intermediate_size": 64',
    "num_samples=128": "num_samples=8",
    "max_tokens=32_768": "max_tokens=4_096",
    "checkpoint_every=16": "checkpoint_every=2",
}

RUNNER = '''
import os, sys, json
from pathlib import Path
import compress, compress.loading, compress.pipeline
STAND_IN = Path(sys.argv[1])
serve = lambda: STAND_IN  # "smollm2" -> the tiny teacher folder
compress.loading.smollm2_gguf_path = serve
compress.pipeline.smollm2_gguf_path = serve
from transformers import AutoConfig
TEACHER_PARAMS = int(json.loads(Path(sys.argv[2]).read_text()))
session = {"TEACHER_PARAMS": TEACHER_PARAMS}  # one Python session, as a reader pasting the blocks in turn
for index, block in enumerate(json.loads(Path(sys.argv[3]).read_text())):
    print(f"--- README python block {index + 1}", flush=True)
    exec(compile(block, f"README.md python block {index + 1}", "exec"), session)
print("--- all blocks ran")
'''


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_pasted(tmp_path, tokenizer):
    blocks = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 5, "the README's Python blocks were not found"
    scaled = []
    for block in blocks:
        for old, new in SCALE.items():
            block = block.replace(old, new)
        scaled.append(block)
    assert any("TEACHER_PARAMS" in b for b in scaled), "a substitution no longer matches the README"
    for old in SCALE:
        assert any(old in b for b in blocks), f"the README no longer contains {old!r}: update SCALE"

    teacher = tmp_path / "stand-in"
    model = tiny_model("llama", max_position_embeddings=1024)  # calibration windows of 512 tokens
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples")
    (tmp_path / "params.json").write_text(str(sum(p.numel() for p in model.parameters())))
    (tmp_path / "blocks.json").write_text(json.dumps(scaled))
    (tmp_path / "runner.py").write_text(RUNNER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), str(teacher), str(tmp_path / "params.json"),
         str(tmp_path / "blocks.json")],
        cwd=work, capture_output=True, text=True, timeout=1500,
        env={**os.environ, "COMPRESS_PROGRESS": "0"},
    )
    assert done.returncode == 0 and "--- all blocks ran" in done.stdout, (done.stdout[-3000:], done.stderr[-6000:])
    # What the blocks wrote is there: the one call's student, the saved pruned model, the exports.
    for folder in ("runs/student", "runs/pruned", "runs/distilled", "runs/deploy/onnx-genai-int8", "runs/w50"):
        assert (work / folder).is_dir(), folder
