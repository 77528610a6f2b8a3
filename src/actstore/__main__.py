"""``python -m actstore ...``: the ``actstore`` command (``python -m actstore.cli`` works
too, through ``actstore/cli/__main__.py``)."""

from actstore.cli import main

main(prog_name="actstore")
