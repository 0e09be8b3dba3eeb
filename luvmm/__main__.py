from luvmm.cli import main

raise SystemExit(main())
