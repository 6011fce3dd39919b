"""The README's recipe for two training processes on CPU, run as written (on the tiny model, for two steps): the run
must record two processes, which `accelerate launch --cpu --num_processes 2` does not start."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

RECIPE_START = 'CUDA_VISIBLE_DEVICES="" accelerate launch'


def readme_recipe() -> list[str]:
    """The words of the one README code block that starts two CPU processes, its continuation lines joined."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [block for block in re.findall(r"```bash\n(.*?)```", text, re.S) if RECIPE_START in block]
    assert len(blocks) == 1, f"expected one README block with {RECIPE_START!r}, found {len(blocks)}"
    return shlex.split(blocks[0].replace("\\\n", " "))


def test_the_readme_recipe_for_two_cpu_processes_runs_two(tiny, data, tmp_path):
    words, env = readme_recipe(), {**os.environ, "OMP_NUM_THREADS": "1"}
    while "=" in words[0]:  # the VAR=value prefix
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["accelerate", "launch"] and "--cpu" not in words
    words[0] = str(Path(sys.executable).with_name("accelerate"))
    words[words.index("--max-steps") + 1] = "2"
    # The recipe names the README's own tiny model and image folder (see "Using it"): they stand in the working folder.
    (tmp_path / words[words.index("--model") + 1]).symlink_to(tiny)
    (tmp_path / words[words.index("--data") + 1].removeprefix("folder:")).symlink_to(data.removeprefix("folder:"))
    done = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    output = tmp_path / words[words.index("--output") + 1]
    assert json.loads((output / "results.json").read_text())["num_processes"] == 2
    assert json.loads((output / "config.json").read_text())["num_processes"] == 2
