"""What every run's metadata records about where its numbers came from: the model and
its architecture, the tokenizer, the software versions, and when. Scenario runs and
corpus units both record it, in the same shape, so every reader finds it alike."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from actstore import __version__
from actstore.models.architectures import ModelSites
from actstore.models.loading import LoadedModel


def provenance(loaded: LoadedModel, sites: ModelSites) -> dict[str, Any]:
    """The ``model``, ``tokenizer``, ``env`` and ``created_at`` entries of run metadata."""
    import transformers
    import zarr

    tok = loaded.tokenizer
    return {
        "model": {
            "id": loaded.model_id,
            "source": loaded.source,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "device": str(loaded.device),
            "arch": {
                "family": sites.family,
                "model_type": getattr(loaded.model.config, "model_type", None),
                "num_layers": sites.num_layers,
                "hidden_size": sites.hidden_size,
                "intermediate_size": sites.intermediate_size,
                "num_attention_heads": sites.num_heads,
                "num_key_value_heads": sites.num_kv_heads,
                "head_dim": sites.head_dim,
                "vocab_size": sites.vocab_size,
                "paths": sites.paths,
            },
        },
        "tokenizer": {
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "has_chat_template": bool(getattr(tok, "chat_template", None)),
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "zarr": zarr.__version__,
            "actstore": __version__,
            "device": str(loaded.device),
            "platform": platform.platform(),
        },
        "created_at": datetime.now(UTC).isoformat(),
    }
