from clinbundle.cli import main

raise SystemExit(main())
