from luvmm.cli import entry

raise SystemExit(entry())
