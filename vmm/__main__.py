from luvmm.vmm.process import main

raise SystemExit(main())
