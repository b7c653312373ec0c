"""SEDD model package: the transformer, its config, attention kernels, EMA and hub I/O."""

from model.config import SEDDConfig, from_run_config, to_run_config
from model.transformer import SEDD

__all__ = ["SEDD", "SEDDConfig", "from_run_config", "to_run_config"]
