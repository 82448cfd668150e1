"""No code from checkpoints, ever: pickled weights are refused unless asked for, and a model
directory's own Python (an ``auto_map``) is never run nor asked about, even with 'y' on stdin."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_support import env, error_line, files, run_main  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")
WISE = str(Path(sys.executable).parent / "wise")


def test_pickled_weights_are_refused_unless_allowed(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    model = AutoModelForCausalLM.from_pretrained(str(pickled))
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    code, _, err = run_main(monkeypatch, capsys, "generate", pickled, "the king", "--device", "cpu")
    line = error_line(err)
    assert code == 1 and "pytorch_model.bin" in line and "safetensors" in line and "--allow-pickle" in err
    code, out, err = run_main(monkeypatch, capsys, "generate", pickled, "the king", "--device", "cpu",
                              "--allow-pickle", "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["generations"][0]["prompt"] == "the king"


def test_a_models_own_code_never_runs_nor_prompts(tiny_llama_dir, tmp_path):
    """config.json names custom code that would leave a marker file; wise loads the known
    architecture without it, asks nothing on stdout, and answers 'y' changes nothing."""
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_llama_dir, hostile)
    marker = tmp_path / "ran"
    (hostile / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                     "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    config = json.loads((hostile / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (hostile / "config.json").write_text(json.dumps(config))
    res = subprocess.run([WISE, "generate", str(hostile), "the king", "--device", "cpu", "--max-new-tokens", "2",
                          "--json"], input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert "custom code" not in res.stdout + res.stderr and "[y/N]" not in res.stdout
    assert res.returncode == 0 and json.loads(res.stdout)["generations"][0]["prompt"] == "the king"
