import sys

if sys.argv[1:] == ["serve"]:
    # The container's command: become gunicorn without importing the CLI first (its config file
    # loads and checks the settings; see service/entrypoints/server.py).
    from service.entrypoints.server import serve

    sys.exit(serve())

from service.entrypoints.cli import main

sys.exit(main())
