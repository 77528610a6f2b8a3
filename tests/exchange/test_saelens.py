"""An export trains a sparse autoencoder with SAELens itself.

SAELens (the ``dev`` extra) loads the folder with its own cached-activation loader
(``ActivationsStore(cached_activations_path=...)``, no language model: ``dataset=None``),
which checks the column's (context, d_in) shape and reads ``token_ids``; its batches
are compared with the run's arrays read straight from Zarr, then its ``SAETrainer`` takes
a few steps on them. Slow: importing SAELens (and TransformerLens) takes ~4 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from actstore.store.hf_dataset import export_hf_dataset


@pytest.mark.slow
def test_saelens_trains_on_an_export(exchange_store: dict[str, Any], tmp_path: Path) -> None:
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    run = exchange_store["f16"].run
    hook, context = "blocks.1.hook_resid_post", 6
    path = export_hf_dataset(run, tmp_path / "sae_data", [hook], context, quiet=True)
    g = zarr.open_group(store=run.group.store, path=run.group.path, mode="r")
    stored = g["acts/residual"][run.meta["residual_boundaries"].index(2)]  # leaving layer 1, float16
    tokens = g["tokens"][...]
    d_in = stored.shape[1]

    def loader() -> Any:
        return ActivationsStore(
            model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,  # type: ignore[arg-type]
            context_size=context, d_in=d_in, n_batches_in_buffer=2, total_training_tokens=10_000,
            store_batch_size_prompts=2, train_batch_size_tokens=8, prepend_bos=False,
            normalize_activations="none", device=torch.device("cpu"), dtype="float32",
            cached_activations_path=str(path),
        )  # fmt: skip

    acts, token_ids = loader().get_raw_llm_batch()  # the first two windows, flattened
    np.testing.assert_array_equal(acts.numpy(), stored[: 2 * context].astype(np.float32))
    assert token_ids is not None
    np.testing.assert_array_equal(token_ids.numpy(), tokens[: 2 * context])

    with pytest.raises(ValueError, match="does not match context_size"):  # its own shape check
        ActivationsStore(
            model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,  # type: ignore[arg-type]
            context_size=context + 1, d_in=d_in, n_batches_in_buffer=2, total_training_tokens=100,
            store_batch_size_prompts=2, train_batch_size_tokens=8, prepend_bos=False,
            normalize_activations="none", device=torch.device("cpu"), dtype="float32",
            cached_activations_path=str(path),
        )  # fmt: skip

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=32, l1_coefficient=1e-3))
    before = sae.W_dec.detach().clone()
    steps = 5
    cfg = SAETrainerConfig(total_training_samples=8 * steps, train_batch_size_samples=8, lr=1e-2, lr_end=1e-2)
    trainer = SAETrainer(cfg, sae, loader())
    trainer.fit()
    assert trainer.n_training_steps == steps
    assert torch.isfinite(sae.W_dec).all() and not torch.equal(sae.W_dec, before)
