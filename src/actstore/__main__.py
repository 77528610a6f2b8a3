"""``python -m actstore ...``: the ``actstore`` command (``actstore.cli`` cannot be run
as ``__main__`` itself: its command modules import it back)."""

from actstore.cli import main

main(prog_name="actstore")
