"""Hub I/O: save/load round trips, checkpoint formats, published key names and shapes, load_model errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import graph_lib
import noise_lib
from load_model import load_model
from model import SEDD, SEDDConfig, from_run_config, to_run_config
from model.hub_io import HubUnreachableError, ModelNotFoundError

# The published louaaron/sedd-small config.json (tokens, graph, noise and model as released) plus run keys.
PUBLISHED_SMALL = {
    "ngpus": 8,
    "tokens": 50257,
    "training": {
        "batch_size": 512,
        "accum": 1,
        "n_iters": 1300001,
        "snapshot_freq": 50000,
        "log_freq": 50,
        "eval_freq": 100,
        "snapshot_freq_for_preemption": 10000,
        "weight": "standard",
        "snapshot_sampling": True,
        "ema": 0.9999,
    },
    "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
    "graph": {"type": "absorb", "file": "data", "report_all": False},
    "noise": {"type": "loglinear", "sigma_min": 0.0001, "sigma_max": 20},
    "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
    "eval": {"batch_size": 512, "perplexity": True, "perplexity_batch_size": 32},
    "optim": {
        "weight_decay": 0,
        "optimizer": "AdamW",
        "lr": 0.0003,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-08,
        "warmup": 2500,
        "grad_clip": 1.0,
    },
    "model": {
        "name": "small",
        "type": "ddit",
        "hidden_size": 768,
        "cond_dim": 128,
        "length": 1024,
        "n_blocks": 12,
        "n_heads": 12,
        "scale_by_sigma": True,
        "dropout": 0.1,
    },
}

MEDIUM_MODEL = {"hidden_size": 1024, "cond_dim": 128, "length": 1024, "n_blocks": 24, "n_heads": 16}


def published_keys(n_blocks: int) -> list[str]:
    """State-dict keys of the published SEDD checkpoints, in module order."""
    block = [
        "norm1.weight",
        "attn_qkv.weight",
        "attn_out.weight",
        "norm2.weight",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "adaLN_modulation.weight",
        "adaLN_modulation.bias",
    ]
    return [
        "vocab_embed.embedding",
        "sigma_map.mlp.0.weight",
        "sigma_map.mlp.0.bias",
        "sigma_map.mlp.2.weight",
        "sigma_map.mlp.2.bias",
        "rotary_emb.inv_freq",
        *(f"blocks.{i}.{name}" for i in range(n_blocks) for name in block),
        "output_layer.norm_final.weight",
        "output_layer.linear.weight",
        "output_layer.linear.bias",
        "output_layer.adaLN_modulation.weight",
        "output_layer.adaLN_modulation.bias",
    ]


def expected_shapes(
    hidden: int, cond: int, heads: int, vocab: int, n_blocks: int
) -> dict[str, tuple[int, ...]]:
    block = {
        "norm1.weight": (hidden,),
        "attn_qkv.weight": (3 * hidden, hidden),
        "attn_out.weight": (hidden, hidden),
        "norm2.weight": (hidden,),
        "mlp.0.weight": (4 * hidden, hidden),
        "mlp.0.bias": (4 * hidden,),
        "mlp.2.weight": (hidden, 4 * hidden),
        "mlp.2.bias": (hidden,),
        "adaLN_modulation.weight": (6 * hidden, cond),
        "adaLN_modulation.bias": (6 * hidden,),
    }
    shapes = {
        "vocab_embed.embedding": (vocab, hidden),
        "sigma_map.mlp.0.weight": (cond, 256),
        "sigma_map.mlp.0.bias": (cond,),
        "sigma_map.mlp.2.weight": (cond, cond),
        "sigma_map.mlp.2.bias": (cond,),
        "rotary_emb.inv_freq": (hidden // heads // 2,),
        "output_layer.norm_final.weight": (hidden,),
        "output_layer.linear.weight": (vocab, hidden),
        "output_layer.linear.bias": (vocab,),
        "output_layer.adaLN_modulation.weight": (2 * hidden, cond),
        "output_layer.adaLN_modulation.bias": (2 * hidden,),
    }
    for i in range(n_blocks):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def inputs(model: SEDD, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (2, 10), generator=gen), torch.rand(2, generator=gen) + 0.1


def outputs(model: SEDD) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs(model))


def write_pickle_dir(directory, config, state_dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, directory / "pytorch_model.bin")


# -------------------------------------------------------------------------------------------- round trips
def test_save_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = SEDD.from_pretrained(str(tmp_path / "m"))  # strict by default
    assert loaded.state_dict().keys() == tiny_model.state_dict().keys()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(outputs(loaded), outputs(tiny_model))


def test_config_json_has_published_layout(tiny_model, tiny_config, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tokens"] == 50
    assert config["graph"]["type"] == "absorb"
    assert config["noise"]["type"] == "loglinear"
    for key in ("hidden_size", "cond_dim", "length", "n_blocks", "n_heads", "scale_by_sigma", "dropout"):
        assert config["model"][key] == tiny_config["model"][key], key
    # what the original repository's `load_model` reads: get_graph / get_noise on the config
    assert graph_lib.get_graph(config).dim == 51
    assert isinstance(noise_lib.get_noise(config), noise_lib.LogLinearNoise)


def test_pytorch_model_bin_directory_loads(tiny_model, tiny_config, tmp_path):
    write_pickle_dir(tmp_path, tiny_config, tiny_model.state_dict())
    loaded = SEDD.from_pretrained(str(tmp_path))
    assert torch.equal(outputs(loaded), outputs(tiny_model))


def test_state_dict_without_inv_freq_loads(tiny_model, tiny_config, tmp_path):
    state = {k: v for k, v in tiny_model.state_dict().items() if k != "rotary_emb.inv_freq"}
    write_pickle_dir(tmp_path, tiny_config, state)
    loaded = SEDD.from_pretrained(str(tmp_path))
    assert torch.equal(outputs(loaded), outputs(tiny_model))


def test_module_prefixed_state_dict_loads(tiny_model, tiny_config, tmp_path):
    state = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    write_pickle_dir(tmp_path, tiny_config, state)
    assert torch.equal(outputs(SEDD.from_pretrained(str(tmp_path))), outputs(tiny_model))
    fresh = SEDD(tiny_config)
    fresh.load_weights(state)
    assert torch.equal(outputs(fresh), outputs(tiny_model))


def test_wrong_state_dicts_raise(tiny_model, tiny_config, tmp_path):
    other = dict(tiny_config, model=dict(tiny_config["model"], hidden_size=32))
    write_pickle_dir(tmp_path / "shape", tiny_config, SEDD(other).state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        SEDD.from_pretrained(str(tmp_path / "shape"))
    missing = {k: v for k, v in tiny_model.state_dict().items() if k != "output_layer.linear.bias"}
    write_pickle_dir(tmp_path / "missing", tiny_config, missing)
    with pytest.raises(RuntimeError, match="output_layer.linear.bias"):
        SEDD.from_pretrained(str(tmp_path / "missing"))
    extra = dict(tiny_model.state_dict(), **{"blocks.9.norm1.weight": torch.ones(64)})
    write_pickle_dir(tmp_path / "extra", tiny_config, extra)
    with pytest.raises(RuntimeError, match="blocks.9"):
        SEDD.from_pretrained(str(tmp_path / "extra"))


def test_published_style_config_with_run_keys(tiny_model, tmp_path):
    config = json.loads(json.dumps(PUBLISHED_SMALL))
    config["model"].update(hidden_size=64, cond_dim=32, length=64, n_blocks=2, n_heads=4)
    config["tokens"] = 50
    write_pickle_dir(tmp_path / "published", config, tiny_model.state_dict())
    loaded = SEDD.from_pretrained(str(tmp_path / "published"))
    assert torch.equal(outputs(loaded), outputs(tiny_model))
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    for key in (
        "ngpus",
        "training",
        "data",
        "optim",
        "sampling",
        "eval",
        "graph",
        "noise",
        "model",
        "tokens",
    ):
        assert saved[key] == config[key], key
    assert saved["noise"]["sigma_min"] == 1e-4 and saved["noise"]["sigma_max"] == 20


# -------------------------------------------------------------------------------------------- load_model
def test_load_model_returns_model_graph_noise(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    model, graph, noise = load_model(str(tmp_path))
    assert isinstance(model, SEDD) and not model.training
    assert isinstance(graph, graph_lib.Absorbing) and graph.dim == 51
    assert isinstance(noise, noise_lib.LogLinearNoise)
    assert torch.equal(outputs(model), outputs(tiny_model))


def test_load_model_geometric_noise_from_config(tiny_model, tiny_config, tmp_path):
    config = dict(tiny_config, noise={"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20})
    write_pickle_dir(tmp_path, config, tiny_model.state_dict())
    _, _, noise = load_model(tmp_path)
    assert isinstance(noise, noise_lib.GeometricNoise) and noise.sigma_max == 20


def test_load_model_missing_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="nope/model") as info:
        load_model("./nope/model")
    assert isinstance(info.value, FileNotFoundError)
    assert not isinstance(info.value, HubUnreachableError)


def test_load_model_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_hub_id_offline_is_a_different_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "sedd-tests-nonexistent-org/sedd-tests-nonexistent-model"
    with pytest.raises(HubUnreachableError, match=name) as info:
        load_model(name)
    assert not isinstance(info.value, FileNotFoundError)
    assert not issubclass(HubUnreachableError, ModelNotFoundError)
    with pytest.raises(HubUnreachableError):
        SEDD.from_pretrained(name, cache_dir=str(tmp_path / "cache"))


# -------------------------------------------------------------------------------------------- key names
def test_state_dict_keys_match_published_checkpoint(tiny_model):
    assert list(tiny_model.state_dict().keys()) == published_keys(2)


def test_small_config_shapes_on_meta_device():
    with torch.device("meta"):
        model = SEDD(PUBLISHED_SMALL)
    state = model.state_dict()
    assert list(state.keys()) == published_keys(12)
    shapes = expected_shapes(hidden=768, cond=128, heads=12, vocab=50258, n_blocks=12)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes


def expected_parameter_count(hidden: int, cond: int, vocab: int, n_blocks: int) -> int:
    block = (
        2 * hidden  # norms
        + 3 * hidden * hidden  # qkv
        + hidden * hidden  # out
        + hidden * 4 * hidden
        + 4 * hidden  # mlp.0
        + 4 * hidden * hidden
        + hidden  # mlp.2
        + cond * 6 * hidden
        + 6 * hidden  # adaLN
    )
    sigma_map = 256 * cond + cond + cond * cond + cond
    output = hidden + hidden * vocab + vocab + cond * 2 * hidden + 2 * hidden
    return vocab * hidden + sigma_map + n_blocks * block + output


@pytest.mark.parametrize(
    "name, model_cfg, low, high",
    [
        ("small", PUBLISHED_SMALL["model"], 125e6, 170e6),
        ("medium", dict(PUBLISHED_SMALL["model"], name="medium", **MEDIUM_MODEL), 350e6, 430e6),
    ],
)
def test_parameter_counts(name, model_cfg, low, high):
    with torch.device("meta"):
        model = SEDD(dict(PUBLISHED_SMALL, model=model_cfg))
    count = sum(p.numel() for p in model.parameters())
    expected = expected_parameter_count(
        model_cfg["hidden_size"], model_cfg["cond_dim"], 50258, model_cfg["n_blocks"]
    )
    assert count == expected, f"SEDD-{name}: {count:,} parameters, expected {expected:,}"
    assert low <= count <= high, f"SEDD-{name}: {count:,} parameters"
    # inv_freq is a buffer, not a parameter
    assert math.isclose(
        sum(b.numel() for b in model.buffers()), model_cfg["hidden_size"] / model_cfg["n_heads"] / 2
    )


@pytest.mark.parametrize("mlp_ratio", [4, 2])
def test_sedd_config_round_trips_through_config_json(mlp_ratio, tmp_path):
    arch = SEDDConfig(
        tokens=50, hidden_size=32, cond_dim=16, length=32, n_blocks=1, n_heads=2, mlp_ratio=mlp_ratio
    )
    assert from_run_config(to_run_config(arch)) == arch
    model = SEDD(arch)
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("mlp_ratio" in config["model"]) == (mlp_ratio != 4)  # the published layout has no mlp_ratio
    loaded = SEDD.from_pretrained(str(tmp_path))
    assert loaded.arch == arch
    assert torch.equal(outputs(loaded), outputs(model))
