"""The method seam: a method added by a registry entry alone is edited, written, read back,
shown by ``wise info`` and evaluated by the same pipeline, checkpoint and eval code as WISE.

The method here is small on purpose: a learned shift of one FFN output projection's output,
fitted in closed form to the edits' targets' first token embedding; it is a real method
(its edits change the model's answers), written against ``wisecli.methods.base`` only.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from wisecli import methods
from wisecli.app.metrics import evaluate
from wisecli.app.pipeline import EditOptions, edit
from wisecli.app.session import open_model
from wisecli.errors import CheckpointError
from wisecli.methods.base import Method
from wisecli.methods.locate import get_module, locate_ffn_out, set_module
from wisecli.methods.wise.method import WISE

from cli_support import run_main
from conftest import EDITS
from wisecli.records import EditRecord

pytestmark = pytest.mark.usefixtures("single_thread", "wise_cache")


@dataclass(frozen=True)
class ShiftConfig:
    mode: str = "bulk"
    scale: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ShiftLayer(nn.Module):
    """The projection's output plus one shift vector on every token."""

    def __init__(self, base_layer: nn.Module, d_out: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("shift", torch.zeros(d_out))
        self._on = True
        self.last_route = self.answered_route = None

    @property
    def n_memories(self) -> int:
        return int(bool(self.shift.abs().sum() > 0))

    @contextmanager
    def main_only(self) -> Iterator[None]:
        prev, self._on = self._on, False
        try:
            yield
        finally:
            self._on = prev

    @contextmanager
    def routing_on(self, _mask: torch.Tensor) -> Iterator[None]:
        yield

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(a)
        return out + self.shift.to(out.dtype) if self._on else out


class ShiftEditor:
    def __init__(self, model, tok, layer: ShiftLayer, cfg: ShiftConfig, state: dict | None) -> None:
        self.model, self.tok, self.layer, self.cfg = model, tok, layer, cfg
        self.count = int((state or {}).get("count", 0))

    def prepare(self, negatives, source) -> None:
        pass

    def apply(self, records, progress=None) -> list[dict]:
        emb = self.model.get_output_embeddings().weight
        ids = [self.tok(" " + r.target_new, add_special_tokens=False)["input_ids"][0] for r in records]
        with torch.no_grad():
            self.layer.shift += self.cfg.scale * emb[ids].float().mean(0)
        self.count += len(records)
        return [{"id": r.id, "shard": 0, "steps": 0, "memory": None, "subject": r.subject} for r in records]

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"shift": self.layer.shift.clone()}, {"count": self.count}


def _attach(model: nn.Module, target: Any, _tok: Any) -> ShiftLayer:
    t = target if isinstance(target, dict) else asdict(target)
    layer = ShiftLayer(get_module(model, t["module_path"]), t["out_features"])
    set_module(model, t["module_path"], layer)
    return layer


def _check(manifest: dict, tensors: dict, where: str) -> None:
    if set(tensors) != {"shift"}:
        raise CheckpointError(f"{where}: expected the tensor 'shift'")


SHIFT = Method(
    name="shift",
    load_config=lambda path, model_type, overrides: ShiftConfig(),
    config_from_dict=lambda data, where: ShiftConfig(**data),
    resolve_config=lambda model, layer, manifest, index, path, overrides: ShiftConfig(),
    locate=lambda model, layer, module_path, path, saved: locate_ffn_out(
        model, layer=saved["layer"] if saved else layer, module_path=saved["module_path"] if saved else module_path),
    attach=_attach, check_state=_check,
    restore=lambda layer, tensors, manifest: layer.shift.copy_(tensors["shift"]),
    editor=lambda model, tok, layer, blocks, index, cfg, state: ShiftEditor(model, tok, layer, cfg, state),
    summary=lambda layer: {"n_memories": layer.n_memories, "norm": float(layer.shift.norm())})


@pytest.fixture
def with_shift(monkeypatch):
    monkeypatch.setattr(methods, "registry", lambda: {WISE.name: WISE, SHIFT.name: SHIFT})


def test_a_method_added_by_a_registry_entry_edits_saves_loads_and_evaluates(with_shift, tiny_llama_dir, tmp_path,
                                                                            monkeypatch, capsys):
    records = [EditRecord(id=e["id"], prompt=e["prompt"], target_new=e["target_new"]) for e in EDITS]
    out = tmp_path / "patched"
    run = edit(str(tiny_llama_dir), records, out, EditOptions(method="shift", evaluate=False, device="cpu"))
    manifest = json.loads((out / "wise.json").read_text())
    assert manifest["method"] == "shift" and manifest["editor"] == {"count": 3}
    assert set(safetensors.torch.load_file(str(out / "wise.safetensors"))) == {"shift"}
    assert float(run.session.mem.shift.norm()) > 0

    again = open_model(str(out), device="cpu")
    assert again.method == "shift" and torch.equal(again.mem.shift, run.session.mem.shift)
    batch = again.tokenizer([EDITS[0]["prompt"]], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        edited = again.model(**batch).logits
        with again.mem.main_only():
            unedited = again.model(**batch).logits
    assert not torch.allclose(edited, unedited)
    report = evaluate(again.model, again.tokenizer, again.mem, records, generate=False)
    assert report.n_edits == 3 and report.reliability is not None

    code, stdout, err = run_main(monkeypatch, capsys, "info", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["method"] == "shift"
    more = edit(str(out), records[:1], tmp_path / "more", EditOptions(evaluate=False, device="cpu"))
    assert more.manifest["method"] == "shift" and more.manifest["editor"] == {"count": 4}
