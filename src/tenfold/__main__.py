from __future__ import annotations

from tenfold.cli import main

main()
