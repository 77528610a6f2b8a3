"""``actstore layers``: a model's module tree and its capture points. A thin command over
:mod:`actstore.models`; ``actstore.cli`` calls :func:`register`."""

from __future__ import annotations

import click

from actstore.cli.common import _fail_cleanly


@click.command()
@click.argument("model_id")
@click.option("--gguf-file", default=None, help="GGUF file inside MODEL_ID's folder")
@click.option("--trust-remote-code", is_flag=True)
@_fail_cleanly
def layers(model_id: str, gguf_file: str | None, trust_remote_code: bool) -> None:
    """Print a model's module tree and where each capture point hooks in."""
    from actstore.models.architectures import describe_model
    from actstore.models.loading import load_model
    from actstore.scenario import ModelConfig

    cfg = ModelConfig(id=model_id, dtype="float32", device="cpu", gguf_file=gguf_file,
                      trust_remote_code=trust_remote_code)  # fmt: skip
    click.echo(describe_model(load_model(cfg).model))


def register(main: click.Group) -> None:
    """Add ``layers`` to the ``actstore`` group."""
    main.add_command(layers)
