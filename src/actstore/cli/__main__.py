"""``python -m actstore.cli ...``: the ``actstore`` command (the package is imported as
``actstore.cli``, so its command modules find it; only this file is ``__main__``)."""

from actstore.cli import main

main(prog_name="actstore")
