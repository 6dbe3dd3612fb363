"""`interlace serve` whose schema check refuses no write to a weight, in the server and in its worker
process (`spawn` runs this file's top level there too): what a server does when an operator writes a
weight without its schema saying so. Run as `python unchecked_writes.py serve MODEL ...`."""

import sys
from pathlib import Path

# only as the program and in its spawned worker (`__mp_main__`): pytest imports this file to look for
# doctests, and a patch there would take the write check away from every test after it
if __name__ in ("__main__", "__mp_main__"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers
    from helpers import check_without_refusing
    from interlace.backends import writes

    writes.WriteCheck._check = check_without_refusing  # the version counters are still compared: the second line stays

if __name__ == "__main__":
    from interlace.cli import main

    sys.exit(main())
