from reembed.cli import main

raise SystemExit(main())
