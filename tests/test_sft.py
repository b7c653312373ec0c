"""The real SFT recipe on CPU with a tiny model: it learns, checkpoints, resumes exactly, exports a model that
feeds a second stage, and its update does not depend on how the global batch is split."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import recipe
import sft
from checkpoint import load_checkpoint
from load_model import load_model
from model import SEDD
from tests.sft_helpers import sft_config, write_qa_dataset


def final_weights(run_dir):
    state, _ = load_checkpoint(run_dir)
    return state


def test_four_steps_write_checkpoint_export_and_change_parameters(tmp_path):
    data_dir = write_qa_dataset(tmp_path / "data", copies=2)
    cfg = sft_config(tmp_path / "run", data_dir, "training.n_iters=4")
    initial = SEDD({"tokens": 50257, **{k: dict(cfg[k]) for k in ("graph", "noise", "model")}})
    assert sft.run_sft(cfg) == "done"
    state = final_weights(tmp_path / "run")
    assert state["step"] == 4
    changed = [k for k, v in state["model"].items() if not torch.equal(v, initial.state_dict()[k])]
    trainable = [n for n, p in initial.named_parameters()]
    # zero-initialised layers (adaLN, output) and all others move: every parameter changed
    assert set(trainable) <= set(changed)
    export = tmp_path / "run" / "hf_model"
    model, graph, _ = load_model(export)
    assert graph.dim == 50258
    gen_config = json.loads((export / "sft_config.json").read_text())
    assert gen_config["prompt_template"] == cfg.sft.prompt_template
    assert (tmp_path / "run" / "run_config.yaml").is_file()
    assert (tmp_path / "run" / "train.log").read_text().count("train: loss=") == 4


def test_resume_n_plus_n_equals_2n(tmp_path):
    data_dir = write_qa_dataset(tmp_path / "data", copies=3)
    straight = sft_config(tmp_path / "straight", data_dir, "training.n_iters=6")
    sft.run_sft(straight)
    first = sft_config(tmp_path / "resumed", data_dir, "training.n_iters=3", "training.snapshot_freq=3")
    sft.run_sft(first)
    second = sft_config(tmp_path / "resumed", data_dir, "training.n_iters=6", "training.snapshot_freq=3")
    sft.run_sft(second)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    assert (a["epoch"], a["batches_in_epoch"]) == (b["epoch"], b["batches_in_epoch"])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    logs = [(tmp_path / d / "train.log").read_text() for d in ("straight", "resumed")]
    losses = [
        [line.split("loss=")[1].split(",")[0] for line in log.splitlines() if "train: loss=" in line]
        for log in logs
    ]
    assert losses[0] == losses[1]


def test_freeze_embeddings_keeps_them(tmp_path):
    data_dir = write_qa_dataset(tmp_path / "data")
    first = sft_config(tmp_path / "stage1", data_dir, "training.n_iters=2")
    sft.run_sft(first)
    cfg = sft_config(
        tmp_path / "stage2",
        data_dir,
        "training.n_iters=2",
        f"sft.pretrained_model={tmp_path / 'stage1'}",
        "sft.freeze_embeddings=True",
    )
    sft.run_sft(cfg)
    stage1, _, _ = load_model(tmp_path / "stage1")
    stage2 = final_weights(tmp_path / "stage2")
    torch.testing.assert_close(stage2["model"]["vocab_embed.embedding"], stage1.vocab_embed.embedding)
    assert not torch.equal(stage2["model"]["blocks.0.attn_qkv.weight"], stage1.blocks[0].attn_qkv.weight)
    assert "vocab_embed.embedding" not in stage2["ema_param_names"]


@pytest.mark.parametrize("source", ["run_dir", "hf_model"])
def test_second_stage_from_a_fine_tuned_run(tmp_path, source):
    data_dir = write_qa_dataset(tmp_path / "data")
    sft.run_sft(sft_config(tmp_path / "stage1", data_dir, "training.n_iters=2"))
    path = tmp_path / "stage1" if source == "run_dir" else tmp_path / "stage1" / "hf_model"
    cfg = sft_config(tmp_path / "stage2", data_dir, "training.n_iters=1", f"sft.pretrained_model={path}")
    assert sft.run_sft(cfg) == "done"


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """From step 3 on every loss is NaN: each update is skipped and logged, and after training.max_nonfinite
    in a row the run stops with the step and the last good checkpoint named; that checkpoint loads at step 2."""
    data_dir = write_qa_dataset(tmp_path / "data", copies=2)
    cfg = sft_config(tmp_path / "run", data_dir, "training.n_iters=10", "training.max_nonfinite=3",
                     "training.snapshot_freq_for_preemption=1")  # fmt: skip
    calls = {"n": 0}

    def loss_turning_nan(*args, **kwargs):
        terms = real_batch_loss(*args, **kwargs)
        calls["n"] += torch.is_grad_enabled()  # training steps only, not the validation loss
        if calls["n"] <= 2:
            return terms
        nan = float("nan")
        return dataclasses.replace(
            terms, per_token=terms.per_token * nan, per_sequence=terms.per_sequence * nan
        )

    real_batch_loss = sft.batch_loss
    monkeypatch.setattr(sft, "batch_loss", loss_turning_nan)
    with pytest.raises(
        recipe.NonFiniteLossError, match=r"3 non-finite losses in a row at step 2.*checkpoints-meta"
    ):
        sft.run_sft(cfg)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("update skipped") == 3 and "(3 in a row, 3 in total)" in log
    state, _ = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2 and state["nonfinite_total"] == 0  # the last good snapshot
    assert all(torch.isfinite(v).all() for v in state["model"].values())
