"""The launch path hands the launcher's rendezvous address on unchanged (two local `ngpus=2` runs on one
machine each got a free port, and a `device=cpu` run once fell back to the default port 29500)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

import recipe
import utils


def test_cpu_workers_keep_the_launchers_address_and_port(monkeypatch):
    seen = []
    monkeypatch.setattr(utils, "init_distributed", lambda info: seen.append(info))
    monkeypatch.setattr(utils, "cleanup_distributed", lambda: None)
    info = utils.DistInfo(rank=1, local_rank=1, world_size=2, device=torch.device("cuda", 1),
                          master_addr="10.1.2.3", master_port=41234)  # fmt: skip
    ran = []
    recipe._run_distributed(info, OmegaConf.create({"device": "cpu"}), lambda cfg: ran.append(cfg.device))
    assert ran == ["cpu"]
    (used,) = seen
    assert (used.master_addr, used.master_port, used.device) == ("10.1.2.3", 41234, torch.device("cpu"))
    assert (used.rank, used.local_rank, used.world_size) == (1, 1, 2)
