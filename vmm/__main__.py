from vmm.process import main

raise SystemExit(main())
