"""The opt-in speed/memory options of `training.prepare_model`, through the real SFT recipe: activation
checkpointing changes no number, torch.compile keeps the parameter names and the function."""

from __future__ import annotations

import pytest
import torch

import recipe
import sft
import training
from checkpoint import load_checkpoint
from model import SEDD
from tests.conftest import randomize_
from tests.sft_helpers import sft_config, write_qa_dataset


def test_sft_with_activation_checkpointing_equals_without(tmp_path, monkeypatch):
    data_dir = write_qa_dataset(tmp_path / "data", copies=2)
    seen = []

    def recording_prepare_model(model, **options):
        seen.append(options)
        return training.prepare_model(model, **options)

    monkeypatch.setattr(recipe, "prepare_model", recording_prepare_model)
    states = []
    for checkpointing in (False, True):
        run_dir = tmp_path / f"run_{checkpointing}"
        cfg = sft_config(
            run_dir, data_dir, "training.n_iters=3", f"training.activation_checkpointing={checkpointing}"
        )
        assert sft.run_sft(cfg) == "done"
        states.append(load_checkpoint(run_dir)[0]["model"])
    assert [o["activation_checkpointing"] for o in seen] == [False, True]
    assert not any(o["compile"] or o["distributed"] for o in seen)
    plain, checkpointed = states
    assert plain.keys() == checkpointed.keys()
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compile_keeps_state_dict_names_and_outputs(tiny_config):
    """Compiling the blocks in place (about a minute on 2 CPU cores) leaves checkpoints and results unchanged."""
    model, reference = randomize_(SEDD(tiny_config), 1), randomize_(SEDD(tiny_config), 1)
    names = list(model.state_dict())
    forward_model = training.prepare_model(model, compile=True)
    assert forward_model is model and list(model.state_dict()) == names
    indices = torch.randint(0, model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.2, 1.5])
    out = model(indices, sigma)
    out.square().mean().backward()
    ref = reference(indices, sigma)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
