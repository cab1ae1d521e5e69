"""The demo pipeline as `make demo` runs it (shortened): prep → train → export → transformers.

Oracles: our model rebuilt from the final checkpoint (the export's logits in `transformers`
must match it to 1e-4, fp32) and our tokenizer (the exported tokenizer must give the same ids).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.tokenizer import load_tokenizer
from pretrain.checkpoint import full_model_state
from pretrain.config import ModelShape
from pretrain.model import build_model

REPO = Path(__file__).resolve().parents[2]
TEXT = {
    "en": "It is a truth universally acknowledged that a single man must be in want of a wife.",
    "ja": "ある日の暮方の事である。一人の下人が、羅生門の下で雨やみを待っていた。",
}


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "ja"])
def test_demo_pipeline_exports_a_model_transformers_loads(tmp_path, lang):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.demo",
            "--lang",
            lang,
            "--out",
            str(out),
            "train.steps=6",
            "train.eval_every=3",
            "train.log_every=3",
            "train.precision=fp32",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out masked-token accuracy" in proc.stdout
    assert "most-frequent-token baseline" in proc.stdout
    assert "summary: the whole demo took" in proc.stdout
    assert "next: fine-tune the export" in proc.stdout

    checkpoint = out / "checkpoints" / "step_000006"
    state = json.loads((checkpoint / "train_state.json").read_text())
    ours = build_model(ModelShape(**state["model_shape"])).eval()
    ours.load_state_dict(full_model_state(checkpoint))
    theirs = AutoModelForMaskedLM.from_pretrained(out / "hf").eval()

    ids = load_tokenizer(out / "tokenizer").encode(TEXT[lang], add_special_tokens=False).ids
    hf_ids = AutoTokenizer.from_pretrained(out / "hf")(TEXT[lang])["input_ids"]
    assert hf_ids == [2, *ids, 3]

    input_ids = torch.tensor([hf_ids])
    with torch.no_grad():
        hidden = ours(input_ids, torch.zeros_like(input_ids), torch.ones_like(input_ids))
        logits = ours.mlm_head.transform(hidden) @ ours.decoder_weight.T + ours.mlm_head.bias
        hf_logits = theirs(input_ids=input_ids).logits
    assert (logits - hf_logits).abs().max().item() < 1e-4
