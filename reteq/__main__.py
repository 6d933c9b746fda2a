from reteq.cli import main

raise SystemExit(main())
